"""A guest's xenbus device (``/dev/xen/xenbus``) over its xenstore ring, for programs that
use Xen's libxenstore.

Theory of operation
-------------------
In a Linux guest, libxenstore reaches xenstore through ``/dev/xen/xenbus``: a character
device whose reads and writes carry the socket's framing, which the guest kernel's xenbus
driver moves over the domain's xenstore ring (the shared page and its event channel).
libxenstore opens whatever ``$XENSTORED_PATH`` names: a socket is connected, anything else
is opened read-write as that device.  :class:`XenbusDevice` plays the guest kernel's part
for one opener: it makes a pseudo-terminal pair in raw mode (no echo, no line editing, no
flow control: bytes pass unchanged both ways), offers the slave's path as the device, and
a thread moves bytes between the master and the ring — what the program writes goes into
``req`` (the server is signalled when it had caught up), what the server puts in ``rsp``
goes to the program.  Like a kernel taking over the ring, it first resets the connection
(reconnection protocol) when the server offers it.

The ring is any :class:`~xenpv.platforms.base.GuestXenstoreRing` (``platform.xenstore_ring()``
in every platform mode); the device owns neither it nor the event handle, which its
thread uses while it runs (so nothing else should wait on that handle meanwhile).  It serves one
program at a time, as the messages of two openers would interleave on the one ring (the
kernel driver multiplexes them; this device does not).  A corrupt ring or a server that
sets ``error`` ends the forwarding (the program then sees its reads end).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import tty
from typing import Any

from xenpv.errors import RingOverflowError
from xenpv.xenstore.page import (
    ERROR_NONE,
    FEATURE_RECONNECTION,
    XS_CONNECTED,
    XS_RECONNECT,
    XsRingPage,
)
from xenpv.xenstore.ring import attach_dispatcher

__all__ = ["XenbusDevice"]

#: Seconds the connection reset may take.
RESET_TIMEOUT = 10.0


class XenbusDevice:
    """The xenbus device of the guest owning ``mem`` / ``port`` (module docstring).

    ``events`` is the event-channel handle the port is bound on.  Use as a context manager
    or call :meth:`start` and :meth:`close`; :attr:`path` is the device to give the program
    (``XENSTORED_PATH``)."""

    def __init__(self, mem: Any, events: Any, port: int) -> None:
        """Take the ring (nothing runs until :meth:`start`)."""
        self.page = XsRingPage(mem, server=False)
        self.events = events
        self.port = port
        self._hub = attach_dispatcher(events)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        #: The device's path: a pseudo-terminal in raw mode.
        self.path = os.ttyname(self._slave)
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        #: Why forwarding ended (None while it runs or after a clean close).
        self.error: str | None = None

    def start(self) -> XenbusDevice:
        """Reset the connection (if the server offers it) and start forwarding."""
        page = self.page
        if page.features & FEATURE_RECONNECTION:
            page.connection = XS_RECONNECT
            self.events.notify(self.port)
            waited = 0.0
            while page.connection != XS_CONNECTED:
                if waited >= RESET_TIMEOUT:
                    raise TimeoutError("xenstore ring: the server did not reset it")
                self._hub.wait(self.port, 0.05)
                waited += 0.05
        self._thread = threading.Thread(target=self._forward, name="xenbus-device",
                                        daemon=True)
        self._thread.start()
        return self

    def _forward(self) -> None:
        page, notify, port = self.page, self.events.notify, self.port
        master = self._master
        pending = bytearray()  # from the program, not yet in req
        watched = [master, self.events.fileno(), self._stop_r]
        try:
            while True:
                if page.error != ERROR_NONE:
                    self.error = f"the server stopped serving the ring (error {page.error})"
                    return
                got, wake = page.read_wake()
                if got:
                    if wake:
                        notify(port)  # it was (or became) full: the server may wait for room
                    os.write(master, got)  # (blocking: the program reads its replies)
                if pending:
                    n, wake = page.write_wake(pending)
                    del pending[:n]
                    if wake:
                        notify(port)
                if got or (pending and page.writable()):
                    continue
                want = watched if not pending else watched[1:]  # room first
                ready = select.select(want, [], [], 1.0)[0]
                if self._stop_r in ready:
                    return
                if master in ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # (EIO: nobody has the device open)
                        data = b""
                    pending += data
                self._hub.wait(port, 0)  # consume a firing, if any
        except RingOverflowError as exc:
            self.error = f"xenstore ring: {exc}"
        finally:
            with contextlib.suppress(OSError):
                os.close(master)
            self._master = -1

    def close(self) -> None:
        """Stop forwarding and let go of the ring and the device (idempotent)."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(10)
            self._thread = None
        for fd in (self._master, self._slave, self._stop_r, self._stop_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = self._stop_r = self._stop_w = -1
        if self._hub is not None:
            self._hub.detach(self.port)
            self._hub = None
        self.page.release()

    def __enter__(self) -> XenbusDevice:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

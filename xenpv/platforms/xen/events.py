"""Event channels on real Xen, through ``libxenevtchn.so.1`` (``/dev/xen/evtchn``).

The handle's descriptor is switched to non-blocking, so ``xenevtchn_pending`` never
blocks; waiting is done with ``poll`` (:meth:`XenEvents.pending`) or the asyncio loop's
reader callbacks (:meth:`XenEvents.wait`).  Masking and coalescing are the device's (or
the emulator's replacement library's): a delivered port stays masked until
:meth:`XenEvents.unmask`.
"""

from __future__ import annotations

import errno
import os
import select
import time
from typing import Any

from xenpv.errors import LocalError
from xenpv.platforms.base import PortError
from xenpv.platforms.dispatch import DispatchedEvents
from xenpv.platforms.fdwait import wait_readable
from xenpv.platforms.xen._libs import XenLibraries, call_error, ffi

__all__ = ["XenEvents"]


class XenEvents(DispatchedEvents):
    """:class:`~xenpv.platforms.base.EventChannels` on ``libxenevtchn.so.1``."""

    def __init__(self, libs: XenLibraries, domid: int) -> None:
        self._lib: Any = libs.evtchn
        self._domid = domid
        self._h: Any = self._lib.xenevtchn_open(ffi.NULL, 0)
        if self._h == ffi.NULL:
            raise call_error("xenevtchn_open")
        self._fd: int = self._lib.xenevtchn_fd(self._h)
        os.set_blocking(self._fd, False)

    @property
    def domid(self) -> int:
        """The domain this handle acts as."""
        return self._domid

    def _handle(self) -> Any:
        if self._h is None:
            raise LocalError("event-channel handle is closed")
        return self._h

    def _checked(self, what: str, result: int) -> int:
        # The library is the judge of which ports this handle owns (EINVAL otherwise).
        if result < 0:
            err = call_error(what)
            if err.errno in (errno.EINVAL, errno.EPERM):
                raise PortError(str(err), err.errno)
            raise err
        return result

    def fileno(self) -> int:
        """A pollable fd, readable while some port of this handle is pending."""
        self._handle()
        return self._fd

    def alloc_unbound(self, remote_domid: int) -> int:
        """A new local port that only ``remote_domid`` may bind."""
        return self._checked(
            "xenevtchn_bind_unbound_port",
            self._lib.xenevtchn_bind_unbound_port(self._handle(), remote_domid),
        )

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Connect to a port ``remote_domid`` offered us; the new local port is pending."""
        return self._checked(
            "xenevtchn_bind_interdomain",
            self._lib.xenevtchn_bind_interdomain(self._handle(), remote_domid, remote_port),
        )

    def restrict(self, domid: int) -> None:
        """Only allow interdomain binds to ``domid`` from now on (irreversible)."""
        self._checked("xenevtchn_restrict", self._lib.xenevtchn_restrict(self._handle(), domid))

    def notify(self, port: int) -> None:
        """Signal the remote end of local ``port`` (no-op while unbound)."""
        self._checked("xenevtchn_notify", self._lib.xenevtchn_notify(self._handle(), port))

    def pending(self, timeout: float | None = 0.0) -> int | None:
        """A pending port (now masked), waiting at most ``timeout`` seconds (``None`` =
        forever); ``None`` if nothing arrived."""
        h = self._handle()
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            port = self._lib.xenevtchn_pending(h)
            if port >= 0:
                return int(port)
            if ffi.errno not in (errno.EAGAIN, errno.EINTR):
                raise call_error("xenevtchn_pending")
            if deadline is None:
                poller.poll()
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000.0):
                return None

    def unmask(self, port: int) -> None:
        """Re-enable delivery for ``port`` (fires at once if notified meanwhile)."""
        self._checked("xenevtchn_unmask", self._lib.xenevtchn_unmask(self._handle(), port))

    async def wait(self, timeout: float | None = None) -> int:
        """Await a pending port; :class:`TimeoutError` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            port = self.pending(0.0)
            if port is not None:
                return port
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            await wait_readable(self._fd, left)

    def unbind(self, port: int) -> None:
        """Close local ``port``; the remote end goes back to unbound."""
        self._checked("xenevtchn_unbind", self._lib.xenevtchn_unbind(self._handle(), port))

    def close(self) -> None:
        """Close every port of this handle (idempotent)."""
        if self._h is not None:
            self._lib.xenevtchn_close(self._h)
            self._h = None

"""One port dispatcher per event-channel handle: the handle's pending ports, demultiplexed.

Why here
--------
An event-channel handle (:class:`~xenpv.platforms.base.EventChannels`) has one pollable
fd for all of its ports, and an asyncio loop holds one reader per fd: if two drivers each
installed their own reader on it, the second would silently replace the first.  So the
demultiplexing belongs with the handle, below every driver: this module sits in the
platform layer, works over the :class:`EventChannels` interface alone (any platform), and
every driver that waits on ports (console frontend and backend, vchan endpoints, the
vchan proxy) goes through it.  It knows nothing of rings or devices.

Theory of operation
-------------------
:meth:`PortDispatcher.attach` returns the dispatcher of a handle, counted per user
(:meth:`~PortDispatcher.detach` balances it).  The dispatcher belongs to the handle: each
:class:`~xenpv.platforms.base.EventChannels` implementation makes one on first use and
offers it as its ``dispatcher`` attribute (:class:`DispatchedEvents` does that for it), so
it lives exactly as long as the handle and needs no registry.

* asyncio: :meth:`~PortDispatcher.watch` registers a callback for a port in the running
  loop; the first one installs the loop reader on the handle's fd, the last
  :meth:`~PortDispatcher.unwatch` removes it.  All ports of one handle must be watched
  from one loop (another loop gets a :class:`~xenpv.errors.LocalError`).  Each wake-up
  takes at most :attr:`~PortDispatcher.EVENTS_PER_WAKEUP` deliveries (bounded work under
  an event storm, R3/R10) and leaves the rest for the next one.
* blocking: :meth:`~PortDispatcher.wait` takes deliveries from the handle in the calling
  thread until the wanted port fires; deliveries of other ports go to their callbacks
  (through the loop's thread-safe queue when called from another thread) or are
  remembered.

A delivered port arrives masked (``/dev/xen/evtchn``).  Who unmasks it is chosen per
port at :meth:`~PortDispatcher.watch`: with ``unmask=True`` (vchan) the dispatcher
unmasks it *before* the callback runs, so that a notification racing with the callback's
look at its ring fires again (xen-protocols.md §12, pitfall 7); with ``unmask=False``
(console) the callback gets it still masked and unmasks it itself, which is how a
per-port event budget keeps a storming port masked until its period ends (late EOI).
A port that fires with no callback is unmasked and remembered: :meth:`take` and
:meth:`wait` consume that, and a later :meth:`watch` hands it to the new callback (soon,
in the loop), so no firing is lost between a port's setup and its first watch.

When the handle is closed underneath (``pending`` fails), the wake-up ends, the reader
is removed and the dispatcher forgets its loop; the ports' owners learn of the close
through their own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, cast

from xenpv.errors import LocalError, PlatformError

if TYPE_CHECKING:
    from xenpv.platforms.base import EventChannels

__all__ = ["DispatchedEvents", "PortDispatcher"]

_HANDLE_ERRORS = (LocalError, PlatformError, OSError)


class PortDispatcher:
    """Hands the ports delivered on one event-channel handle to their owners.

    Get it with :meth:`attach` (one per handle); ``events`` is the handle.  See the
    module docstring for the unmask rules and the blocking/asyncio split.
    """

    #: Deliveries taken per wake-up of the loop reader before yielding to the loop.
    EVENTS_PER_WAKEUP: ClassVar[int] = 64

    def __init__(self, events: EventChannels) -> None:
        """Dispatch for ``events`` (handles make theirs; drivers use :meth:`attach`)."""
        self.events = events
        #: port -> callback of the ports watched in the loop.
        self.callbacks: dict[int, Callable[[], None]] = {}
        #: Watched ports whose callback unmasks them itself (``unmask=False``).
        self.late_unmask: set[int] = set()
        #: Ports that fired with nobody watching (already unmasked).
        self.fired: set[int] = set()
        #: Users counted by :meth:`attach` / :meth:`detach`.
        self.users = 0
        #: Deliveries taken from the handle (diagnostics: a storm shows up here).
        self.deliveries = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop whose reader is on the handle's fd (None while no port is watched)."""
        return self._loop

    @staticmethod
    def attach(events: EventChannels) -> PortDispatcher:
        """The dispatcher of ``events`` (its ``dispatcher``), counted as one more user;
        balance with :meth:`detach`."""
        hub = events.dispatcher
        hub.users += 1
        return hub

    def detach(self, port: int | None = None) -> None:
        """One user fewer; forget ``port`` (its callback and any remembered firing)."""
        if port is not None:
            self.fired.discard(port)
            self.unwatch(port)
        self.users -= 1

    # -- delivery
    def _deliver(self, port: int, in_loop: bool) -> None:
        """One port taken from the handle (masked): to its callback, or remembered.
        ``in_loop``: called by the loop reader (else by a blocking waiter)."""
        self.deliveries += 1
        if port not in self.late_unmask:
            with contextlib.suppress(*_HANDLE_ERRORS):
                self.events.unmask(port)  # before anyone re-examines the ring
        cb = self.callbacks.get(port)
        if cb is None:
            self.fired.add(port)
            return
        loop = self._loop
        if in_loop or loop is None or _running_loop() is loop:
            cb()
            return
        try:
            loop.call_soon_threadsafe(cb)  # a blocking waiter in another thread took it
        except RuntimeError:  # that loop is closed: nobody will run the callback
            if port in self.late_unmask:
                with contextlib.suppress(*_HANDLE_ERRORS):
                    self.events.unmask(port)

    def take(self, port: int) -> bool:
        """True (once) if ``port`` fired with nobody watching since the last call."""
        if port in self.fired:
            self.fired.discard(port)
            return True
        return False

    # -- blocking
    def wait(self, port: int, timeout: float | None) -> bool:
        """Block until ``port`` fires (True) or ``timeout`` seconds pass (False;
        ``None`` waits for ever).  Other ports delivered meanwhile are dispatched."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.take(port):
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            got = self.events.pending(remaining)
            if got is None:
                return self.take(port)
            self._deliver(got, False)

    # -- asyncio
    def watch(self, port: int, callback: Callable[[], None], *, unmask: bool = True) -> None:
        """Call ``callback()`` in the running loop whenever ``port`` fires.

        ``unmask=True``: the port is unmasked before the callback runs; ``unmask=False``:
        it reaches the callback still masked and its owner unmasks it.  A firing
        remembered from before is handed to ``callback`` soon.  :class:`LocalError` if
        another loop already watches ports of this handle."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            fd = self.events.fileno()
            loop.add_reader(fd, self._on_readable)
            self._fd, self._loop = fd, loop
        elif self._loop is not loop:
            raise LocalError("the ports of one event-channel handle must be watched from one "
                             "event loop")
        self.callbacks[port] = callback
        if unmask:
            self.late_unmask.discard(port)
        else:
            self.late_unmask.add(port)
        if self.take(port):
            loop.call_soon(callback)

    def unwatch(self, port: int) -> None:
        """Stop calling back for ``port``; the last port removes the loop reader."""
        self.callbacks.pop(port, None)
        self.late_unmask.discard(port)
        if not self.callbacks:
            self._remove_reader()

    def _remove_reader(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):  # the loop or the fd may be gone already
                self._loop.remove_reader(self._fd)
            self._loop = None

    def _on_readable(self) -> None:
        for _ in range(self.EVENTS_PER_WAKEUP):
            try:
                port = self.events.pending(0)
            except _HANDLE_ERRORS:
                self._remove_reader()  # the handle is closed: its fd must not stay watched
                return
            if port is None:
                return
            self._deliver(port, True)


class DispatchedEvents:
    """Mixin for event-channel handles: the handle's own :class:`PortDispatcher`,
    made on first use."""

    _dispatcher: PortDispatcher | None = None

    @property
    def dispatcher(self) -> PortDispatcher:
        """The one dispatcher of this handle (see :mod:`xenpv.platforms.dispatch`)."""
        hub = self._dispatcher
        if hub is None:
            hub = self._dispatcher = PortDispatcher(cast("EventChannels", self))
        return hub


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

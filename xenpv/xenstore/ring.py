"""The xenstore shared ring (``xenstore_domain_interface``) and the guest's client over it.

Theory of operation
-------------------
A domain's xenstore connection on Xen is one shared page and one event channel, not a
socket.  The page (xen-protocols.md §4.9) holds two byte rings of 1024 bytes with
free-running u32 indexes — ``req`` (guest → xenstored) and ``rsp`` (xenstored → guest,
replies and watch events) — followed by three words: ``server_features`` (bits the server
sets once, never clears), ``connection`` (0 connected, 1 reconnect requested) and
``error`` (why the server stopped serving the ring).  The bytes carried are exactly those
of the socket framing (:mod:`xenpv.xenstore.wire`); a message may span chunks and wrap.
The domain builder puts the page at grant ref 1 (``GNTTAB_RESERVED_XENSTORE``) and in a
guest frame, allocates an unbound port for dom0 and gives both to dom0's xenstored in
``INTRODUCE``.

:class:`~xenpv.xenstore.page.XsRingPage` (sans-IO; :mod:`xenpv.xenstore.page` also holds
the layout's constants) wraps the page for either side over :class:`~xenpv.rings.ByteRing`
(``on_insane="error"``: an index pair claiming more than 1024 bytes breaks the ring for
good, until a reconnection resets it).  The server half is
:mod:`xenpv.xenstore.ringserver`; the guest half is here: :class:`RingTransport`, an
:class:`asyncio.Transport` over the page and the port that the asyncio client's protocol
object runs on unchanged, and :func:`connect_ring`, which returns a
:class:`~xenpv.xenstore.client.XenstoreClient` on it — the same operations, watches and
transactions as over a socket; :class:`BlockingRingClient` is the blocking client on the
same page (its I/O replaced by ring reads and writes and waits on the port).

Reconnection (what a guest does when it takes over a ring that another kernel or process
used before): if the server advertises ``FEATURE_RECONNECTION``, the guest writes
``connection = XS_RECONNECT`` and signals; the server empties both rings, drops the
connection's watches, transactions and queued output, sets ``connection =
XS_CONNECTED`` and signals back.  :func:`connect_ring` does this by default, so a new
client never sees a predecessor's replies or events.

Notifications follow the rule a Linux guest's xenbus driver uses: after producing, signal
if the server had consumed everything before (read its index after publishing ours, so a
server that had not caught up finds the new bytes in the pass that takes the old ones);
after consuming, signal if the ring was full (the server may be waiting for room).  The
server signals after every index update it makes.  The transport reads at most what the
ring holds per event, so an event flood costs one look at two indexes per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from xenpv.errors import PeerError, PlatformError, RingOverflowError
from xenpv.xenstore.blocking import BlockingClient
from xenpv.xenstore.client import XenstoreClient, _Connection, _Transport
from xenpv.xenstore.ops import XenstoreConnectionError
from xenpv.xenstore.page import (
    ERROR_NONE,
    FEATURE_ERROR,
    FEATURE_RECONNECTION,
    XS_CONNECTED,
    XS_RECONNECT,
    XsRingPage,
)

__all__ = ["BlockingRingClient", "RingTransport", "connect_ring"]

#: Bytes the guest transport hands to its protocol per event before yielding.
_PASS_BYTES = 1 << 16


def attach_dispatcher(events: Any) -> Any:
    """The port dispatcher of event-channel handle ``events`` (its ``dispatcher``: see
    :mod:`xenpv.platforms.dispatch`), counted as one more user; balance with its
    ``detach``.  Reached through the handle, so this layer imports no platform code."""
    hub = events.dispatcher
    hub.users += 1
    return hub


class RingTransport(_Transport):
    """The guest's end of a xenstore ring as an :class:`asyncio.Transport`.

    ``protocol`` is an :class:`asyncio.BufferedProtocol` (the client's connection object).
    Writes go into ``req`` at once; what does not fit waits (unbounded, like a socket
    transport's buffer: the client bounds what it sends) for the server to consume and
    signal.  Each event moves ``rsp`` bytes to the protocol and flushes waiting writes.
    A corrupt ring, a server that reports ``error``, or a closed event channel closes the
    transport with a :class:`~xenpv.errors.PeerError`.  ``on_close`` runs once when the
    transport closes (the page and port belong to the caller, who releases them there).
    """

    def __init__(self, page: XsRingPage, events: Any, port: int,
                 protocol: asyncio.BufferedProtocol, *,
                 on_close: Callable[[], None] | None = None) -> None:
        """Start: watch ``port`` and examine the ring once (in the running loop)."""
        super().__init__(asyncio.get_running_loop(), protocol)
        self.page = page
        self.events = events
        self.port = port
        self._on_close = on_close
        #: Events taken, and those that found nothing to do.
        self.stats = {"events": 0, "spurious": 0, "notifies": 0}
        self._hub = attach_dispatcher(events)
        self._hub.watch(port, self._on_event)
        protocol.connection_made(self)
        self._loop.call_soon(self._on_event)

    def _notify(self) -> None:
        self.stats["notifies"] += 1
        self.events.notify(self.port)

    def _on_event(self) -> None:
        if self._closing:
            return
        self.stats["events"] += 1
        page = self.page
        try:
            if page.connection != XS_CONNECTED:
                return  # a reconnection is in progress: only `connection` matters now
            if page.error != ERROR_NONE and page.features & FEATURE_ERROR:
                raise PeerError(f"the xenstore server stopped serving this ring "
                                f"(error {page.error})")
            moved = self._flush()
            buf = self._protocol.get_buffer(-1)
            got = 0
            while got < _PASS_BYTES:
                n, wake = page.read_into_wake(buf)
                if not n:
                    break
                got += n
                if wake:
                    # the ring was (or became) full: the server may be waiting for room
                    self._notify()
                self._protocol.buffer_updated(n)
                if self._closing:
                    return
            if got:
                moved = True
                # Space may have been freed meanwhile by the server for our writes too.
                self._flush()
            if not moved:
                self.stats["spurious"] += 1
        except (RingOverflowError, PeerError) as exc:
            self._close(exc)
        except PlatformError as exc:
            self._close(exc)

    def _flush(self) -> bool:
        """Move waiting writes into ``req``; True if any moved (the peer was notified)."""
        if not self._out:
            return False
        n, wake = self.page.write_wake(self._out)
        if not n:
            return False
        del self._out[:n]
        if wake:
            self._notify()
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; it enters the ring at once if there is room."""
        if self._closing:
            return
        self._out += data
        try:
            self._flush()
        except (RingOverflowError, PlatformError) as exc:
            self._close(exc)

    def _let_go(self) -> None:
        self._hub.detach(self.port)
        self.page.release()
        if self._on_close is not None:
            with contextlib.suppress(Exception):
                self._on_close()


async def reconnect(page: XsRingPage, events: Any, port: int, timeout: float = 10.0) -> None:
    """Ask the server to reset the ring's connection and wait until it has (a
    :class:`TimeoutError` after ``timeout`` seconds).  The caller must not be using
    the ring meanwhile."""
    hub = attach_dispatcher(events)
    woken = asyncio.Event()
    hub.watch(port, woken.set)
    try:
        page.connection = XS_RECONNECT
        events.notify(port)
        async with asyncio.timeout(timeout):
            while page.connection != XS_CONNECTED:
                woken.clear()
                await woken.wait()
    finally:
        hub.detach(port)


async def connect_ring(mem: Any, events: Any, port: int, *, timeout: float | None = None,
                       reset: bool = True, on_close: Callable[[], None] | None = None,
                       reset_timeout: float = 10.0) -> Any:
    """A :class:`~xenpv.xenstore.client.XenstoreClient` over the xenstore page ``mem``
    (mapped writable) and the bound event-channel ``port`` of ``events``.

    ``timeout`` is the client's default per request.  With ``reset`` (the default) and a
    server that advertises ``FEATURE_RECONNECTION``, the connection is reset first
    (see the module docstring).  ``on_close`` runs when the client's connection closes.
    """
    page = XsRingPage(mem, server=False)
    try:
        if reset and page.features & FEATURE_RECONNECTION:
            await reconnect(page, events, port, reset_timeout)
    except BaseException:
        page.release()
        raise
    conn = _Connection()
    RingTransport(page, events, port, conn, on_close=on_close)
    return XenstoreClient(conn, timeout)


class BlockingRingClient(BlockingClient):
    """The blocking client (:class:`~xenpv.xenstore.blocking.BlockingClient`) over a
    xenstore ring: the page ``mem`` and the bound ``port`` of ``events``.

    Everything but the I/O is the blocking client's (operations, transactions, watch
    events, timeouts, threads).  A request is written into ``req`` as room allows, the
    reply taken from ``rsp``; waiting is on the port (the handle's dispatcher, so other
    ports of the handle keep working).  With ``reset`` the connection is reset first, as
    :func:`connect_ring` does.  ``on_close`` runs once when the client closes.  A
    :meth:`~xenpv.xenstore.blocking.BlockingClient.close` from another thread takes
    effect when the thread blocked on the ring wakes (next event or its deadline).  A
    reply not there yet gets one ``sched_yield`` before the wait: on a CPU shared with the
    server just signalled, the server answers meanwhile and no wake-up is needed.
    """

    def __init__(self, mem: Any, events: Any, port: int, *, timeout: float | None = None,
                 max_pending: int = 1024, reset: bool = True,
                 on_close: Callable[[], None] | None = None,
                 reset_timeout: float = 10.0) -> None:
        """Take the ring (see the class docstring)."""
        self._page = XsRingPage(mem, server=False)
        self._evtchn = events
        self._port = port
        self._on_close = on_close
        self._released = False
        self._hub = attach_dispatcher(events)
        super().__init__(None, timeout=timeout, max_pending=max_pending)
        try:
            if reset and self._page.features & FEATURE_RECONNECTION:
                self._reconnect(time.monotonic() + reset_timeout)
        except BaseException:
            self._close_fd()
            raise

    def _connect(self, path: str | None) -> tuple[int, None]:
        return -1, None

    def fileno(self) -> int:
        """The event-channel handle's descriptor (readable when the server signalled)."""
        return int(self._evtchn.fileno())

    def _close_fd(self) -> None:
        if getattr(self, "_released", True):
            return
        self._released = True
        self._hub.detach(self._port)
        self._page.release()
        if self._on_close is not None:
            with contextlib.suppress(Exception):
                self._on_close()

    def _reconnect(self, deadline: float) -> None:
        page = self._page
        page.connection = XS_RECONNECT
        self._evtchn.notify(self._port)
        while page.connection != XS_CONNECTED:
            self._await_event(deadline)

    def _await_event(self, deadline: float | None) -> None:
        """Wait for the port to fire; :class:`TimeoutError` at ``deadline``."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError
        if not self._hub.wait(self._port, left) and deadline is not None:
            if time.monotonic() >= deadline:
                raise TimeoutError

    def _ring_lost(self, why: str) -> XenstoreConnectionError:
        err = XenstoreConnectionError(f"xenstore ring: {why}")
        self._fail(err)
        return err

    def _check(self) -> None:
        if self._released or self.error is not None:
            raise self.error or self._ring_lost("closed")
        page = self._page
        # (``error`` first: it is almost always clear, and each word is a load)
        if page.error != ERROR_NONE and page.features & FEATURE_ERROR:
            raise self._ring_lost(f"the server stopped serving it (error {page.error})")

    def _send(self, data: bytes, deadline: float | None) -> None:
        view = memoryview(data)
        try:
            while view:
                self._check()
                if self._page.connection == XS_CONNECTED:
                    try:
                        n, wake = self._page.write_wake(view)
                    except RingOverflowError as exc:
                        raise self._ring_lost(str(exc)) from None
                    if n:
                        view = view[n:]
                        if wake:
                            self._evtchn.notify(self._port)
                        continue
                self._await_event(deadline)
        except BaseException:
            if 0 < len(view) < len(data):
                self._fail(XenstoreConnectionError("xenstore request left half-written"))
            raise

    def _read_some(self, deadline: float | None) -> int:
        yielded = False
        while True:
            self._check()
            if self._page.connection == XS_CONNECTED:
                try:
                    n, wake = self._page.read_into_wake(self._rview[self._end:])
                except RingOverflowError as exc:
                    raise self._ring_lost(str(exc)) from None
                if n:
                    if wake:  # it was (or became) full: the server may wait for room
                        self._evtchn.notify(self._port)
                    return n
                if not yielded:
                    # Nothing yet: let the server we just signalled run first (on a
                    # shared CPU it answers meanwhile and we need not sleep; elsewhere
                    # this costs one system call).
                    yielded = True
                    os.sched_yield()
                    continue
            self._await_event(deadline)

"""The embedded xenstored's side of guests' xenstore rings.

Theory of operation
-------------------
A server given dom0's platform (``XenstoredServer(platform=...)``) serves, besides its
sockets, one *ring connection* per introduced domain, as C xenstored does.  ``INTRODUCE
<domid> <gfn> <port>`` from dom0 runs :meth:`RingService.introduce` before the domain
counts as introduced: the page is mapped at the guest's grant ref 1
(:data:`~xenpv.xenstore.page.GNTTAB_RESERVED_XENSTORE`), or, if that fails, as guest
frame ``gfn`` through the platform's foreign map; the guest's unbound ``port`` is bound;
``server_features`` gets the reconnection and error bits; ``connection`` is set to
``XS_CONNECTED`` and the guest is signalled.  A failure answers the INTRODUCE with
``EINVAL`` and introduces nothing.  Introducing a domain again with the same frame
re-binds its event channel (the guest may have re-made its port); with another frame it
is ``EINVAL``.

A :class:`RingConnection` is a :class:`~xenpv.xenstore.server._XsConnection` whose bytes
come from the ``req`` ring and go to the ``rsp`` ring instead of a socket, so it obeys
exactly the socket connections' rules: it acts as its domain (permissions, quotas, write
rate limit, bounded watch-event queue, backpressure once unread output passes the mark),
and its watches and transactions are its own.  Each event on the port is one service
pass: check ``connection``, move waiting output into ``rsp``, take what ``req`` holds
(at most 1024 bytes), handle the whole requests in it (a batch: straight from the bytes
taken when nothing older waits, else through the decoder, as for sockets), signal after
producing replies (and after consuming only if ``req`` was full, when the guest may be
waiting for room), and look once more on the loop's next pass if the guest published
more meanwhile.  Work per event is bounded, so an event flood costs the flooder's share of
the loop and no more; other connections keep being served.

The common case of a pass — the ring connected, nothing older waiting, ``req`` holding
only whole requests within a batch and the rate limit — is compiled
(``cython/xsring.pyx``: the port's callback is the compiled ``RingPass``, which copies
the requests out of ``req``, hands them to the store, copies the replies into ``rsp`` and
signals, with no Python frame of ours in between; with the server's ``spin_us`` it then
polls ``req`` that long for the guest's next request, as the sockets are polled, at most
``_READ_AGAIN`` passes per event).  Anything else, before a byte is
consumed, goes to the Python pass (:meth:`RingConnection._service_general`), which is
also every pass when the extension is not built or ``XENPV_PURE_PYTHON=1``;
``tests/property/test_xs_ring_pass.py`` checks that both answer alike.

Faults (hostile-inputs scenarios 21-25 over the ring): a corrupt index pair
(``prod - cons > 1024``) sets ``error = XENSTORE_ERROR_RINGIDX``; a framing violation
(a length over 4096) sets ``XENSTORE_ERROR_PROTO``.  Either way the connection is
*ignored* from then on: its watches and transactions are dropped, nothing more is read
or written, and events on its port cost one load of ``connection``.  The domain itself
stays introduced (its nodes stay) until it is released.  A reconnection
(``connection = XS_RECONNECT``) is the guest's way back: all four indexes are set to 0,
the connection's watches, transactions, partial input and unsent output are dropped, the
error is cleared, and ``connection`` goes back to ``XS_CONNECTED`` with a signal.

``RELEASE`` (or :meth:`~xenpv.xenstore.server.XenstoredServer.release_domain` when the
domain dies) tears the ring connection down — port unbound, page unmapped — and fires
``@releaseDomain`` like any release.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from xenpv.compiled import pure_python
from xenpv.errors import PlatformError, RingOverflowError
from xenpv.xenstore.page import (
    ERROR_NONE,
    ERROR_PROTO,
    ERROR_RINGIDX,
    FEATURE_ERROR,
    FEATURE_RECONNECTION,
    GNTTAB_RESERVED_XENSTORE,
    XS_CONNECTED,
    XS_RECONNECT,
    XsRingPage,
)
from xenpv.xenstore.ring import attach_dispatcher
from xenpv.xenstore.server import (
    _LIMITED_TYPES,
    _MAX_BUFFERED_INPUT,
    _READ_AGAIN,
    _XsConnection,
)
from xenpv.xenstore.wire import HEADER, HEADER_SIZE, PAYLOAD_MAX, Decoder

if TYPE_CHECKING:
    from xenpv.xenstore.server import XenstoredServer

__all__ = ["RingConnection", "RingService"]

log = logging.getLogger(__name__)

_ERRNAMES = {ERROR_RINGIDX: "corrupt ring indexes", ERROR_PROTO: "a protocol violation"}


def _compiled_pass() -> Any:
    """The compiled service pass (``cython/xsring.pyx``), unless it is missing or
    ``XENPV_PURE_PYTHON=1``."""
    if pure_python():
        return None
    try:
        from xenpv.xenstore._xsring import RingPass
    except ImportError:
        return None
    return RingPass


#: The class of the compiled service pass, or None for the pure-Python pass only (read
#: when a connection starts: tests set it to None to run the Python twin).
_RingPass: Any = _compiled_pass()
#: Which pass serves rings in their common case: ``"cython"`` or ``"python"``.
RING_IMPL = "python" if _RingPass is None else "cython"


class RingConnection(_XsConnection):
    """One domain's xenstore ring, served like a socket connection (module docstring)."""

    counted = False

    def __init__(self, service: RingService, domid: int, gfn: int, mapping: Any,
                 port: int, remote_port: int, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the mapped page ``mapping`` with local ``port`` (call :meth:`start`)."""
        self._init_state(service.server, domid, loop)
        self.fd = -1
        self.service = service
        self.gfn = gfn
        self.mapping = mapping
        self.port = port
        self.remote_port = remote_port
        self.page = XsRingPage(mapping.mem, server=True)
        #: True once a fault made the server stop serving the ring (until a reconnection).
        self.ignored = False
        #: Counters: events taken, reconnections, faults.
        self.stats = {"events": 0, "reconnects": 0, "faults": 0, "notifies": 0}
        self._hub: Any = None
        #: The compiled pass over the page (None: every pass is the Python one).
        self._fast: Any = (None if _RingPass is None
                           else _RingPass(self, mapping.mem, _READ_AGAIN))

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        """Attach to the store, advertise the features, signal the guest."""
        server = self.server
        self.conn = server.store.connect(self.domid)
        server._register(self)
        self.reading = True
        page = self.page
        page.add_features(FEATURE_RECONNECTION | FEATURE_ERROR)
        page.connection = XS_CONNECTED
        self._hub = attach_dispatcher(self.service.events)
        self._hub.watch(self.port, self._fast or self._on_event)
        self._notify()

    def rebind(self, remote_port: int) -> None:
        """Re-create the event channel (a repeated INTRODUCE): let go of the current
        port, then bind the guest's unbound ``remote_port`` — which may be the same one,
        unbound again by our letting go.  If that fails the ring has no port until the
        next INTRODUCE (the error propagates)."""
        events = self.service.events
        hub = self._hub
        if self.port >= 0:
            if hub is not None:
                hub.unwatch(self.port)
            with contextlib.suppress(PlatformError):
                events.unbind(self.port)
            self.port = -1
        port = events.bind_interdomain(self.domid, remote_port)
        self.port, self.remote_port = port, remote_port
        if hub is not None:
            hub.watch(port, self._fast or self._on_event)
        self._notify()

    def abort(self) -> None:
        """Tear down when the domain is gone or the server closes; otherwise (a framing
        violation found by the general path) stop serving the ring: ``ERROR_PROTO``."""
        if self.closed:
            return
        rec = self.server.store.domains.get(self.domid)
        if self.server._closed or rec is None or not rec.introduced:
            self.teardown()
        else:
            self._ignore(ERROR_PROTO)

    def teardown(self) -> None:
        """Unbind the port, unmap the page, leave the store (idempotent)."""
        if self.closed:
            return
        self.closed = self.closing = True
        self.reading = False
        self.out.clear()
        self.queue.clear()
        service = self.service
        if self._hub is not None:
            self._hub.detach(self.port if self.port >= 0 else None)
            self._hub = None
        if self.port >= 0:
            with contextlib.suppress(PlatformError):
                service.events.unbind(self.port)
        self.page.release()
        if self._fast is not None:
            self._fast.release()
            self._fast = None
        with contextlib.suppress(PlatformError):
            service.grants.unmap(self.mapping)
        if service.rings.get(self.domid) is self:
            del service.rings[self.domid]
        self.loop.call_soon(self._lost)

    def _lost(self) -> None:
        if self.conn is not None:
            self.server._unregister(self)
            self.server.store.disconnect(self.conn)
            self.conn = None
        self.queue.clear()

    def _ignore(self, error: int) -> None:
        """Stop serving the ring (a fault): set ``error``, drop the connection's state."""
        if self.ignored or self.closed:
            return
        self.ignored = True
        self.stats["faults"] += 1
        log.warning("xenstore ring of domain %d ignored: %s", self.domid, _ERRNAMES[error])
        self.closing = True
        self.reading = False
        self.out.clear()
        self.queue.clear()
        self.held = None
        self.page.error = error
        self._notify()
        self.loop.call_soon(self._drop, self.conn)

    def _drop(self, conn: Any) -> None:
        if conn is not None and self.conn is conn and self.ignored:
            self._lost()

    def _reset(self) -> None:
        """The reconnection protocol: empty both rings and start a fresh connection."""
        self.stats["reconnects"] += 1
        server = self.server
        if self.conn is not None:
            server._unregister(self)
            server.store.disconnect(self.conn)
            self.conn = None
        self.decoder = Decoder(PAYLOAD_MAX)
        self.out.clear()
        self.queue.clear()
        self.held = None
        self.write_paused = self.throttled = self.closing = self.ignored = False
        self.page.reset_indexes()
        self.page.error = ERROR_NONE
        self.conn = server.store.connect(self.domid)
        server._register(self)
        self.reading = True
        self.page.connection = XS_CONNECTED
        self._notify()

    # -- events and ring I/O -----------------------------------------------------------
    def _notify(self) -> None:
        if self.port < 0:
            return
        self.stats["notifies"] += 1
        try:
            self.service.events.notify(self.port)
        except PlatformError:
            pass

    def _on_event(self) -> None:
        self.stats["events"] += 1
        fast = self._fast
        if fast is None or not fast.serve(self):
            self._service_general()

    def _service(self) -> None:
        """One service pass (see the module docstring): the compiled one in its common
        case (``cython/xsring.pyx``), else :meth:`_service_general`."""
        fast = self._fast
        if fast is None or not fast.serve(self):
            self._service_general()

    def _service_general(self) -> None:
        """One service pass in Python (every case; the compiled pass's twin)."""
        if self.closed:
            return
        if self.page.connection == XS_RECONNECT:
            self._reset()
            return
        if self.ignored:
            return
        self._flush_out()
        if self.reading and not self.is_closing():
            self._read_general()
            # A guest that signals only when we had caught up (Linux's rule) may have
            # published more while we were taking the last bytes: look again, on the
            # loop's next pass (so one guest never holds the loop).
            try:
                more = self.reading and not self.is_closing() and self.page.readable()
            except RingOverflowError:
                self._ignore(ERROR_RINGIDX)
                return
            if more and not self.scheduled:
                self.loop.call_soon(self._service)

    def _on_readable(self) -> None:
        self._service()

    def _read_general(self) -> None:
        try:
            data, wake = self.page.read_wake()
        except RingOverflowError:
            self._ignore(ERROR_RINGIDX)
            return
        if data:
            if wake:
                # the ring was (or became) full: the guest may be waiting for room (a guest that
                # is not learns of the consumed bytes from the reply's notification)
                self._notify()
            decoder = self.decoder
            if not (decoder.buffered or self.held is not None or self.write_paused
                    or self.throttled or self.out or self.queue):
                # Nothing older waits: hand the whole requests straight to the store (as
                # the sockets' direct path does); the rest goes through the decoder.
                out, pos = self._direct(data)
                if pos == len(data) and out:
                    # all of it handled: send the replies (and the events they caused)
                    self.write(out[0] if len(out) == 1 else b"".join(out))
                    store = self.server.store
                    if store.dirty or store.released:
                        self.server._after_batch()
                    return
                if pos < len(data):
                    decoder.feed(memoryview(data)[pos:])
                self._process(out)
                return
            decoder.feed(data)
            if decoder.buffered > _MAX_BUFFERED_INPUT:
                self._pause_reading()
        self._process()

    def _direct(self, data: bytes) -> tuple[list[bytes], int]:
        """Handle the whole requests at the start of ``data`` (up to a batch, stopping
        at a rate-limited one or a bad length); their replies and where the rest begins."""
        conn = self.conn
        assert conn is not None
        handle = self.server.store.handle
        limited = self.limited
        unpack = HEADER.unpack_from
        out: list[bytes] = []
        pos, n, batch = 0, len(data), self.batch
        while n - pos >= HEADER_SIZE and len(out) < batch:
            type_, req_id, tx_id, length = unpack(data, pos)
            end = pos + HEADER_SIZE + length
            if length > PAYLOAD_MAX or end > n or (limited and type_ in _LIMITED_TYPES):
                break
            out.append(handle(conn, type_, req_id, tx_id, data[pos + HEADER_SIZE:end]))
            pos = end
        return out, pos

    def write(self, data: bytes) -> None:
        """Put ``data`` into ``rsp`` as far as it fits; keep the rest (backpressure past
        the mark, as for a socket)."""
        if self.is_closing():
            return
        if not self.out:
            try:
                n = self.page.write(data)
            except RingOverflowError:
                self._ignore(ERROR_RINGIDX)
                return
            if n:
                self._notify()
            if n == len(data):
                return
            data = data[n:]
        self._keep(data)

    def _keep(self, rest: bytes | memoryview) -> None:
        self.out += rest
        if not self.write_paused and len(self.out) > self.high_water:
            self.write_paused = True
            self._pause_reading()

    def _flush_out(self) -> None:
        out = self.out
        if out:
            try:
                n = self.page.write(out)
            except RingOverflowError:
                self._ignore(ERROR_RINGIDX)
                return
            if n:
                del out[:n]
                self._notify()
        if self.write_paused and len(out) <= self.low_water:
            self.write_paused = False
            self._flush_queue()
            self._schedule()

    def _on_writable(self) -> None:
        self._flush_out()

    def _pause_reading(self) -> None:
        self.reading = False

    def _resume_reading(self) -> None:
        if not self.reading and not self.is_closing():
            self.reading = True
            self.loop.call_soon(self._service)  # the ring may hold requests already

    def buffered_output(self) -> int:
        """Bytes of replies and events not yet in the ring."""
        return len(self.out)


class RingService:
    """Dom0's end of every guest's xenstore ring for one server (module docstring).

    ``platform`` is dom0's :class:`~xenpv.platforms.base.Platform` (in the emulator's own
    process, an in-process platform of its hypervisor; elsewhere any platform whose
    handles the server's loop may use).  The service does not own it.
    """

    def __init__(self, server: XenstoredServer, platform: Any) -> None:
        """Serve rings for ``server`` through ``platform``'s grants and events."""
        self.server = server
        self.grants = platform.grants
        self.events = platform.events
        #: The ring connection of each domain served over its ring.
        self.rings: dict[int, RingConnection] = {}

    def introduce(self, domid: int, gfn: int, port: int) -> str | None:
        """Map ``domid``'s page and bind ``port`` (INTRODUCE); an errno name on failure."""
        ring = self.rings.get(domid)
        if ring is not None:
            if ring.gfn != gfn:
                return "EINVAL"
            try:
                ring.rebind(port)
            except PlatformError as exc:
                log.info("xenstore ring of domain %d: cannot bind port %d: %s",
                         domid, port, exc)
                return "EINVAL"
            return None
        mapping = self._map(domid, gfn)
        if mapping is None:
            return "EINVAL"
        try:
            local = self.events.bind_interdomain(domid, port)
        except PlatformError as exc:
            log.info("xenstore ring of domain %d: cannot bind port %d: %s", domid, port, exc)
            self.grants.unmap(mapping)
            return "EINVAL"
        conn = RingConnection(self, domid, gfn, mapping, local, port,
                              asyncio.get_running_loop())
        self.rings[domid] = conn
        conn.start()
        return None

    def _map(self, domid: int, gfn: int) -> Any:
        """The page at grant ref 1, else guest frame ``gfn`` (None if neither maps)."""
        try:
            return self.grants.map(domid, [GNTTAB_RESERVED_XENSTORE])
        except PlatformError as exc:
            first = exc
        foreign = getattr(self.grants, "foreign_map", None)
        if foreign is not None:
            try:
                return foreign(domid, [gfn])
            except PlatformError as exc:
                first = exc
        log.info("xenstore ring of domain %d: cannot map its page: %s", domid, first)
        return None

    def close(self) -> None:
        """Tear every ring connection down."""
        for ring in list(self.rings.values()):
            ring.teardown()

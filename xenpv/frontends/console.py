"""Console frontend: the guest side of ``io/console.h`` consoles, as asyncio streams.

Theory of operation
-------------------
A console is one shared page (``xencons_interface``, xen-protocols.md §8.1) holding two
byte rings with free-running u32 indexes: ``out`` (2048 bytes, guest → backend) and ``in``
(1024 bytes, backend → guest), plus one event channel.  The guest produces into ``out`` and
consumes ``in``.  :class:`ConsoleRing` wraps both rings of a page for either side over the
shared :class:`~xenpv.rings.ByteRing` (compiled or reference): each call loads the peer's
index once (single fetch, R1), and a corrupt index pair (``prod - cons`` larger than the
ring) reads as "nothing there" and is counted, never raised (§8.1: ignored; scenario 27).

:class:`ConsoleTransport` is an :class:`asyncio.Transport` over one ring page and one
port (a :class:`~xenpv.drivers.streams.RingStreamTransport`, the base it shares with vchan's
streams), so the standard :class:`asyncio.StreamReader`/:class:`asyncio.StreamWriter` pair
works unchanged (:func:`open_console_streams`).  Every notification runs one service
pass: flush buffered writes into the ring, move readable bytes to the protocol (bounded
per pass), notify the peer after any index update.  Event storms are bounded by an
:class:`EventRateLimiter` (R10): beyond ``allowance`` events per ``period`` the port stays
masked until the period ends (late EOI), then the ring is re-examined once.

Two kinds of console (§8.2, §8.3):

* **primary** (:class:`PrimaryConsole`): no xenbus handshake.  On the loopback emulator the
  guest shares its page at the reserved grant ref 0 (``GNTTAB_RESERVED_CONSOLE``, what
  Xen's domain builder does) and allocates an unbound port for the console backend's
  domain; the toolstack then publishes ``/local/domain/<d>/console`` (read-only to the
  guest) with :func:`xenpv.backends.console.publish_primary_console`.  With
  ``frame=True`` the page is a guest frame (``FRAME_ALLOC``), so ``ring-ref`` is its real
  frame number, as on Xen: backends that map frames (``xenforeignmemory_map``: QEMU,
  xenconsoled's fallback) reach it, and unless ``grant_ref0=False`` the same frame is also
  granted at ref 0 for backends that prefer the grant (xenconsoled, ours).
* **secondary** (:class:`ConsoleFrontend`): a normal xenbus device under
  ``device/console/<n>`` (n ≥ 1): on backend InitWait (or at once) the frontend grants a
  page (refs ≥ 8) and allocates a port, writes ``ring-ref`` and ``port`` and goes
  Initialised; it opens the streams once both sides are Connected.

Event channels: each console takes deliveries from the platform's event handle through
the handle's :class:`~xenpv.platforms.dispatch.PortDispatcher` (one per handle, shared
with every other driver on that handle, vchan included), which hands the fired port to its
console still masked; :class:`EventPump`, shared with the backend's sessions, decides
when to unmask.
Each ring is written by its producer with a single aligned index store
after the data (and read by its consumer after one index load), through the ring layer's
barriers; the notification follows the index store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from xenpv.drivers.streams import RingStreamTransport
from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.dispatch import PortDispatcher
from xenpv.protocols.console import (
    KEY_PORT,
    KEY_RING_REF,
    XENCONS_IN_CONS_OFFSET,
    XENCONS_IN_OFFSET,
    XENCONS_IN_PROD_OFFSET,
    XENCONS_IN_SIZE,
    XENCONS_OUT_CONS_OFFSET,
    XENCONS_OUT_OFFSET,
    XENCONS_OUT_PROD_OFFSET,
    XENCONS_OUT_SIZE,
)
from xenpv.rings import ByteRing
from xenpv.xenbus.driver import FrontendDriver, PeerKeys
from xenpv.xenbus.machine import FrontendStyle

__all__ = [
    "GNTTAB_RESERVED_CONSOLE",
    "ConsoleFrontend",
    "ConsoleRing",
    "ConsoleTransport",
    "EventPump",
    "EventRateLimiter",
    "PortDispatcher",
    "PrimaryConsole",
    "open_console_streams",
]

log = logging.getLogger(__name__)

#: grant_table.h: GNTTAB_RESERVED_CONSOLE, the primary console page of every guest.
GNTTAB_RESERVED_CONSOLE = 0
#: Bytes handed to the protocol per service pass before yielding to the loop.
_PASS_BYTES = 1 << 16
_HIGH_WATER = 1 << 16
_LOW_WATER = 1 << 14
#: xenconsoled's event budget: 30 events per 200 ms, then the port stays masked.
RATE_LIMIT_ALLOWANCE = 30
RATE_LIMIT_PERIOD = 0.2


class ConsoleRing:
    """The two byte rings of one ``xencons_interface`` page, seen from one side.

    ``backend=False`` (guest): :meth:`write` produces into ``out``, :meth:`read` consumes
    ``in``.  ``backend=True``: :meth:`read` consumes ``out``, :meth:`write` produces into
    ``in``.  Indexes are loaded once per call; an insane index pair reads as empty/full
    and bumps :attr:`insane`.
    """

    def __init__(self, mem: Any, *, backend: bool) -> None:
        """Place the rings in ``mem`` (at least the 3088 bytes of the 4.17 page)."""
        # io/console.h: in[1024] @0, out[2048] @1024, in_cons, in_prod, out_cons, out_prod
        inring = ByteRing(mem, data_offset=XENCONS_IN_OFFSET, size=XENCONS_IN_SIZE,
                          prod_offset=XENCONS_IN_PROD_OFFSET,
                          cons_offset=XENCONS_IN_CONS_OFFSET, on_insane="zero")
        outring = ByteRing(mem, data_offset=XENCONS_OUT_OFFSET, size=XENCONS_OUT_SIZE,
                           prod_offset=XENCONS_OUT_PROD_OFFSET,
                           cons_offset=XENCONS_OUT_CONS_OFFSET, on_insane="zero")
        self.backend = backend
        self._rx, self._tx = (outring, inring) if backend else (inring, outring)

    def write(self, data: Any) -> int:
        """Copy as much of ``data`` as fits into the ring we produce; returns bytes."""
        return self._tx.write(data)

    def read(self, max_n: int = -1) -> bytes:
        """Take up to ``max_n`` bytes from the ring we consume."""
        return self._rx.read(max_n)

    def readable(self) -> int:
        """Bytes waiting in the ring we consume (0 if its indexes are corrupt)."""
        return self._rx.available()

    def writable(self) -> int:
        """Free bytes in the ring we produce (0 if its indexes are corrupt)."""
        return self._tx.free()

    @property
    def insane(self) -> int:
        """How many times a corrupt index pair was seen (and ignored)."""
        return int(self._rx.insane_count + self._tx.insane_count)

    def release(self) -> None:
        """Let go of the page memory (idempotent)."""
        self._rx.release()
        self._tx.release()


class EventRateLimiter:
    """Per-port event budget (R10): ``allowance`` events per ``period`` seconds.

    :meth:`admit` is called for each delivered event; it returns True while the budget
    lasts (unmask at once) and False once it is spent (leave the port masked until
    :meth:`period_end`).  ``clock`` is injectable for tests.
    """

    def __init__(self, allowance: int = RATE_LIMIT_ALLOWANCE, period: float = RATE_LIMIT_PERIOD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """A fresh budget."""
        if allowance < 1 or period <= 0:
            raise LocalError("rate limit needs allowance >= 1 and period > 0")
        self.allowance = allowance
        self.period = period
        self._clock = clock
        self._start = clock()
        self.count = 0
        #: Events seen in total, and periods in which the budget ran out.
        self.events = 0
        self.limited_periods = 0

    def period_end(self) -> float:
        """Clock time at which the current period ends."""
        return self._start + self.period

    def admit(self) -> bool:
        """Account one event; False means "stay masked until :meth:`period_end`"."""
        now = self._clock()
        if now >= self._start + self.period:
            self._start = now
            self.count = 0
        self.events += 1
        self.count += 1
        if self.count == self.allowance + 1:
            self.limited_periods += 1
        return self.count <= self.allowance


class EventPump:
    """Event handling of one console port, shared by both halves (R10, late EOI).

    A delivered port arrives masked.  Within the :class:`EventRateLimiter` budget it is
    unmasked at once; past it, it stays masked until the period ends and the ring is
    examined once more then.  Each delivery runs :meth:`_service`; one that moved no
    byte is counted as spurious.  Subclasses provide ``events``, ``port``, ``limiter``,
    ``stats`` (with ``events``, ``rate_limited``, ``spurious``, ``notifies``),
    :meth:`_pump_loop`, :attr:`_stopped` and :meth:`_service`.
    """

    events: Any
    port: int
    limiter: EventRateLimiter
    stats: dict[str, int]
    _unmask_handle: asyncio.TimerHandle | None = None
    _scheduled = False
    _dispatch: PortDispatcher | None = None

    @property
    def _stopped(self) -> bool:
        raise NotImplementedError

    def _service(self) -> bool:
        """One pass over the rings; True if any byte moved."""
        raise NotImplementedError

    def _pump_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop serving the port (None before it started)."""
        raise NotImplementedError

    def _watch_port(self) -> None:
        # the port reaches _event still masked: the event budget decides when to unmask
        dispatch = PortDispatcher.attach(self.events)
        try:
            dispatch.watch(self.port, self._event, unmask=False)
        except BaseException:
            dispatch.detach()
            raise
        self._dispatch = dispatch

    def _unwatch_port(self) -> None:
        if self._dispatch is not None:
            dispatch, self._dispatch = self._dispatch, None
            dispatch.detach(self.port)
        if self._unmask_handle is not None:
            self._unmask_handle.cancel()
            self._unmask_handle = None

    def _event(self) -> None:
        if self._stopped:
            return
        self.stats["events"] += 1
        if self.limiter.admit():
            self._unmask()
        else:
            self.stats["rate_limited"] += 1
            loop = self._pump_loop()
            if self._unmask_handle is None and loop is not None:
                delay = max(0.0, self.limiter.period_end() - time.monotonic())
                self._unmask_handle = loop.call_later(delay, self._period_over)
        if not self._service():
            self.stats["spurious"] += 1

    def _period_over(self) -> None:
        self._unmask_handle = None
        if not self._stopped:
            self._unmask()
            self._service()

    def _unmask(self) -> None:
        with contextlib.suppress(LocalError, PlatformError, OSError):
            self.events.unmask(self.port)

    def _notify(self) -> None:
        self.stats["notifies"] += 1
        with contextlib.suppress(PlatformError, OSError):
            self.events.notify(self.port)

    def _schedule(self) -> None:
        loop = self._pump_loop()
        if not self._scheduled and not self._stopped and loop is not None:
            self._scheduled = True
            loop.call_soon(self._scheduled_pass)

    def _scheduled_pass(self) -> None:
        self._scheduled = False
        self._service()


class ConsoleTransport(RingStreamTransport, EventPump):
    """An asyncio transport over one console ring page and its event channel.

    ``backend`` selects the side (the guest is ``False``).  ``on_close`` runs once when
    the transport is lost (release the page and port there).  The transport API itself
    is :class:`~xenpv.drivers.streams.RingStreamTransport`'s.
    """

    write_high_water = _HIGH_WATER
    write_low_water = _LOW_WATER
    kind = "console"

    def __init__(self, ring: ConsoleRing, events: Any, port: int,
                 protocol: asyncio.BaseProtocol, *,
                 limiter: EventRateLimiter | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        """Start serving: the port is watched and the ring examined once at once."""
        super().__init__(protocol, {"console_port": port})
        self.ring = ring
        self.events = events
        self.port = port
        self.limiter = limiter or EventRateLimiter()
        self._on_close = on_close
        #: Counters: bytes each way, events, notifications sent, spurious wake-ups.
        self.stats = {"sent": 0, "received": 0, "events": 0, "rate_limited": 0,
                      "notifies": 0, "spurious": 0}
        self._watch_port()
        self._protocol.connection_made(self)
        self._schedule()

    @property
    def _stopped(self) -> bool:
        return self._lost

    def _pump_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _service(self) -> bool:
        """One pass: flush writes, deliver reads; True if any byte moved."""
        if self._lost:
            return False
        moved = self._flush()
        delivered = 0
        while self._reading and delivered < _PASS_BYTES:
            data = self.ring.read(_PASS_BYTES - delivered)
            if not data:
                break
            delivered += len(data)
            self.stats["received"] += len(data)
            self._notify()  # io/console.h: tell the producer after the cons update
            self._protocol.data_received(data)
            if self._lost:
                return True
        if delivered >= _PASS_BYTES:
            self._schedule()  # more may wait: continue after other callbacks ran
        self._close_if_flushed()
        return bool(moved or delivered)

    def _send(self, data: Any) -> int:
        n = self.ring.write(data)
        if n:
            self.stats["sent"] += n
            self._notify()  # after the prod update
        return n

    def _flush(self) -> int:
        if not self._wbuf:
            return 0
        n = self._send(self._wbuf)
        if n:
            del self._wbuf[:n]
            self._check_water()
        return n

    def _teardown(self) -> None:
        self._unwatch_port()
        if self._on_close is not None:
            self._on_close()

    def _write_refused(self) -> None:
        raise LocalError("console transport is closing")


def open_console_streams(ring: ConsoleRing, events: Any, port: int, *,
                         limiter: EventRateLimiter | None = None,
                         on_close: Callable[[], None] | None = None,
                         limit: int = 1 << 16,
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over a console ring (call from a running loop)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = ConsoleTransport(ring, events, port, protocol, limiter=limiter,
                                 on_close=on_close)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


class _Resources:
    """The page, port and ring of one frontend console; released once (R13)."""

    def __init__(self, platform: Any, backend_domid: int, grants: Any = None) -> None:
        self.platform = platform
        #: the grant table the page is shared through (the platform's unless a domain
        #: builder places the page, see :class:`PrimaryConsole`)
        self.grants = platform.grants if grants is None else grants
        self.backend_domid = backend_domid
        self.pages: Any = None
        self.frames: Any = None  # the page as a guest frame (primary console, frame mode)
        self.port: int | None = None
        self.ring: ConsoleRing | None = None
        self.quarantined: list[Any] = []

    def allocate(self, reserved: bool) -> None:
        gt = self.grants
        if reserved:
            if not hasattr(gt, "grant_reserved"):
                raise LocalError("this grant table cannot place a page at the reserved console "
                                 "ref (give PrimaryConsole the domain builder's: builder=)")
            self.pages = gt.grant_reserved(GNTTAB_RESERVED_CONSOLE, self.backend_domid)
        else:
            self.pages = gt.grant(self.backend_domid, 1)
        self.port = self.platform.events.alloc_unbound(self.backend_domid)
        self.ring = ConsoleRing(self.pages.mem, backend=False)

    def allocate_frame(self, grant_ref0: bool) -> None:
        """The page as a guest frame, also granted at ref 0 if ``grant_ref0``."""
        gt = self.grants
        if not hasattr(gt, "alloc_frames") or (grant_ref0 and not hasattr(gt, "grant_frame")):
            raise LocalError("this grant table has no guest frames for the console page")
        self.frames = gt.alloc_frames(1)
        if grant_ref0:
            # what Xen's domain builder does: grant entry 0 names the console frame
            self.pages = gt.grant_frame(self.frames.refs[0], self.backend_domid,
                                        ref=GNTTAB_RESERVED_CONSOLE)
        self.port = self.platform.events.alloc_unbound(self.backend_domid)
        self.ring = ConsoleRing(self.frames.mem, backend=False)

    @property
    def ring_ref(self) -> int:
        """What ``console/ring-ref`` names: the frame number, else the grant ref."""
        if self.frames is not None:
            return int(self.frames.refs[0])
        return self.ref

    @property
    def ref(self) -> int:
        if self.pages is None:
            raise LocalError("console not set up")
        return int(self.pages.refs[0])

    def release(self) -> None:
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        if self.port is not None:
            port, self.port = self.port, None
            with contextlib.suppress(LocalError, PlatformError):
                self.platform.events.unbind(port)
        if self.pages is not None:
            pages, self.pages = self.pages, None
            try:
                self.grants.end_access(pages)
            except PlatformError as exc:  # GrantInUse: the backend still maps it (R8)
                log.warning("console page still mapped by the backend (%s); quarantined", exc)
                self.quarantined.append(pages)
        if self.frames is not None:
            frames, self.frames = self.frames, None
            # a frame a backend still maps stays until it unmaps it, then goes (no reuse)
            with contextlib.suppress(LocalError, PlatformError):
                self.grants.free_frames(frames)

    def retry_quarantine(self) -> int:
        """End quarantined pages whose grantee let go; returns how many remain."""
        left = []
        for pages in self.quarantined:
            try:
                self.grants.end_access(pages)
            except PlatformError:
                left.append(pages)
        self.quarantined = left
        return len(left)


class PrimaryConsole:
    """The guest side of console 0 (§8.2): no xenbus handshake.

    :meth:`setup` shares the ring page at grant ref 0 and allocates the port; the
    toolstack publishes ``ring-ref``/``port`` (the guest cannot write them); then
    :meth:`open` gives the streams.  :meth:`close` releases everything (idempotent).

    ``frame=True`` makes the page a guest frame (a platform with ``alloc_frames``, the
    loopback emulator): :attr:`ring_ref` is then its frame number, for backends that map
    frames (``xenforeignmemory_map``); the frame is also granted at ref 0 unless
    ``grant_ref0=False`` (then only frame-mapping backends can reach it).

    ``builder`` is the grant table that places the page (``grant_reserved`` or
    ``alloc_frames``/``grant_frame``), when that is not the platform's own: on Xen, grant
    entry 0 is written by the domain builder, and Xen's library API
    (``xengntshr_share_pages``) only hands out free refs, so a platform on that API
    (:class:`~xenpv.platforms.xen.XenPlatform`) takes the page from the builder and
    keeps its event channel.
    """

    def __init__(self, platform: Any, backend_domid: int = 0, *, frame: bool = False,
                 grant_ref0: bool = True, builder: Any = None) -> None:
        """Prepare; nothing is allocated until :meth:`setup`."""
        if not (frame or grant_ref0):
            raise LocalError("the console page needs a frame, grant ref 0, or both")
        self._res = _Resources(platform, backend_domid, builder)
        self._frame = frame
        self._grant_ref0 = grant_ref0
        self.transport: ConsoleTransport | None = None

    def setup(self) -> PrimaryConsole:
        """Allocate the page (at ref 0 and/or as a frame) and the port (for the
        backend's domain)."""
        try:
            if self._frame:
                self._res.allocate_frame(self._grant_ref0)
            else:
                self._res.allocate(reserved=True)
        except BaseException:
            self._res.release()
            raise
        return self

    @property
    def ring_ref(self) -> int:
        """What the toolstack publishes as ``console/ring-ref``: the page's frame number
        (frame mode), else its grant ref (always 0, ``GNTTAB_RESERVED_CONSOLE``)."""
        return self._res.ring_ref

    @property
    def port(self) -> int:
        """The guest-side port (unbound until the backend binds)."""
        if self._res.port is None:
            raise LocalError("console not set up")
        return self._res.port

    @property
    def ring(self) -> ConsoleRing:
        """The ring page."""
        if self._res.ring is None:
            raise LocalError("console not set up")
        return self._res.ring

    async def open(self, *, limiter: EventRateLimiter | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The console as an asyncio stream pair."""
        if self.transport is not None:
            raise LocalError("console already open")
        reader, writer = open_console_streams(self.ring, self._res.platform.events, self.port,
                                              limiter=limiter)
        self.transport = writer.transport  # type: ignore[assignment]
        return reader, writer

    def close(self) -> None:
        """Stop the streams and release the page and the port."""
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self._res.release()

    def __enter__(self) -> PrimaryConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConsoleFrontend(FrontendDriver):
    """A secondary console (``device/console/<n>``) driven by the xenbus handshake.

    ``platform`` gives the grant table and event channels; ``client`` is the guest's
    xenstore client.  After :meth:`start`, await :meth:`streams` for the stream pair
    (available once Connected).
    """

    style = FrontendStyle.STANDARD

    def __init__(self, platform: Any, client: Any, path: str, **kw: Any) -> None:
        """Serve the frontend directory ``path`` (see :class:`FrontendDriver`)."""
        super().__init__(client, path, **kw)
        self.platform = platform
        self._res: _Resources | None = None
        self._streams: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None
        self._streams = None
        self.transport: ConsoleTransport | None = None

    async def publish(self, backend: PeerKeys) -> None:
        """Grant the ring page, allocate the port, write ``ring-ref`` and ``port``."""
        res = self._res = _Resources(self.platform, self.peer_domid)
        res.allocate(reserved=False)
        assert res.port is not None
        await self.write_keys({KEY_RING_REF: res.ref, KEY_PORT: res.port})

    async def connect(self, peer: PeerKeys) -> None:
        """Both sides are up: open the stream pair."""
        res = self._res
        if res is None or res.ring is None or res.port is None:
            raise LocalError("connect before publish")
        reader, writer = open_console_streams(res.ring, self.platform.events, res.port)
        self.transport = writer.transport  # type: ignore[assignment]
        self._future().set_result((reader, writer))

    async def disconnect(self) -> None:
        """Stop the streams, release page and port (quarantine a still-mapped page)."""
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        fut = self._streams
        if fut is not None and not fut.done():
            fut.set_exception(LocalError("console disconnected"))
            fut.exception()  # retrieved here: nobody may be waiting for it
        self._streams = None
        if self._res is not None:
            self._res.release()

    def _future(self) -> asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        if self._streams is None or self._streams.done():
            self._streams = asyncio.get_running_loop().create_future()
        return self._streams

    async def streams(self, timeout: float = 10.0
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The stream pair, once the device is Connected (at most ``timeout`` s)."""
        if self._streams is None:
            self._future()
        assert self._streams is not None
        return await asyncio.wait_for(asyncio.shield(self._streams), timeout)

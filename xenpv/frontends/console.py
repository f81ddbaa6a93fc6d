"""Console frontend: the guest side of ``io/console.h`` consoles, as asyncio streams.

Theory of operation
-------------------
A console is one shared page (``xencons_interface``, xen-protocols.md §8.1) holding two
byte rings with free-running u32 indexes: ``out`` (2048 bytes, guest → backend) and ``in``
(1024 bytes, backend → guest), plus one event channel.  The guest produces into ``out`` and
consumes ``in``.  :class:`~xenpv.drivers.consolering.ConsoleRing` wraps both rings of a page for either
side: each call loads the peer's index once (single fetch, R1), and a corrupt index pair
(``prod - cons`` larger than the ring) reads as "nothing there" and is counted, never
raised (§8.1: ignored; scenario 27).

:class:`ConsoleTransport` is an :class:`asyncio.Transport` over one ring page and one
port (a :class:`~xenpv.drivers.streams.RingStreamTransport`, the base it shares with vchan's
streams), so the standard :class:`asyncio.StreamReader`/:class:`asyncio.StreamWriter` pair
works unchanged (:func:`open_console_streams`).  Every notification runs one service
pass: flush buffered writes into the ring, move readable bytes to the protocol (bounded
per pass), notify the peer after any index update.  Event storms are bounded by an
:class:`~xenpv.drivers.events.EventRateLimiter` (R10): beyond ``allowance`` events per ``period`` the port stays
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
console still masked; :class:`~xenpv.drivers.events.EventPump`, shared with the
backend's sessions, decides when to unmask.  The page and the port are held in a
:class:`~xenpv.drivers.resources.DeviceResources`; a page the backend still maps when the
console closes goes to the console's :class:`~xenpv.drivers.quarantine.GrantQuarantine`.
Each ring is written by its producer with a single aligned index store
after the data (and read by its consumer after one index load), through the ring layer's
barriers; the notification follows the index store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from xenpv.drivers.consolering import ConsoleRing
from xenpv.drivers.events import EventPump, EventRateLimiter
from xenpv.drivers.quarantine import GrantQuarantine
from xenpv.drivers.resources import DeviceResources
from xenpv.drivers.streams import RingStreamTransport
from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    GNTTAB_RESERVED_CONSOLE,
    EventChannels,
    GrantTable,
    GuestFrames,
    Platform,
    ReservedGrants,
    SharedPages,
)
from xenpv.protocols.console import (
    KEY_PORT,
    KEY_RING_REF,
)
from xenpv.xenbus.driver import FrontendDriver, PeerKeys
from xenpv.xenbus.machine import FrontendStyle
from xenpv.xenstore.client import XenstoreClient as XenbusClient

__all__ = [
    "GNTTAB_RESERVED_CONSOLE",
    "ConsoleFrontend",
    "ConsoleTransport",
    "PrimaryConsole",
    "open_console_streams",
]

#: Bytes handed to the protocol per service pass before yielding to the loop.
_PASS_BYTES = 1 << 16
_HIGH_WATER = 1 << 16
_LOW_WATER = 1 << 14


class ConsoleTransport(RingStreamTransport, EventPump):
    """An asyncio transport over one console ring page and its event channel.

    ``backend`` selects the side (the guest is ``False``).  ``on_close`` runs once when
    the transport is lost (release the page and port there).  The transport API itself
    is :class:`~xenpv.drivers.streams.RingStreamTransport`'s.
    """

    write_high_water = _HIGH_WATER
    write_low_water = _LOW_WATER
    kind = "console"

    def __init__(self, ring: ConsoleRing, events: EventChannels, port: int,
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

    def _send(self, data: bytes | bytearray | memoryview) -> int:
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


def open_console_streams(ring: ConsoleRing, events: EventChannels, port: int, *,
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


def _transport_of(writer: asyncio.StreamWriter) -> ConsoleTransport:
    transport = writer.transport
    assert isinstance(transport, ConsoleTransport)
    return transport


class _ConsolePage:
    """The page, port and ring of one frontend console, in a :class:`DeviceResources`
    (released once, R13); the frame of a frame-mode primary console beside it."""

    def __init__(self, platform: Platform, backend_domid: int,
                 grants: GrantTable | None = None,
                 quarantine: GrantQuarantine | None = None) -> None:
        #: the grant table the page is shared through (the platform's unless a domain
        #: builder places the page, see :class:`PrimaryConsole`)
        self.grants = platform.grants if grants is None else grants
        self.events = platform.events
        self.backend_domid = backend_domid
        self.res = DeviceResources(self.grants, self.events, quarantine)
        self.pages: SharedPages | None = None
        self.frames: SharedPages | None = None  # the page as a guest frame (frame mode)
        self.port: int | None = None
        self.ring: ConsoleRing | None = None

    def allocate(self, reserved: bool) -> None:
        """Share the page (at the reserved console ref, or any ref) and allocate the port."""
        gt = self.grants
        with self.res.undo_on_error():
            if reserved:
                if not isinstance(gt, ReservedGrants):
                    raise LocalError("this grant table cannot place a page at the reserved "
                                     "console ref (give PrimaryConsole the domain builder's: "
                                     "builder=)")
                self.pages = self.res.adopt(
                    gt.grant_reserved(GNTTAB_RESERVED_CONSOLE, self.backend_domid))
            else:
                self.pages = self.res.grant(self.backend_domid, 1)
            self.port = self.res.alloc_unbound(self.backend_domid)
            self.ring = ConsoleRing(self.pages.mem, backend=False)

    def allocate_frame(self, grant_ref0: bool) -> None:
        """The page as a guest frame, also granted at ref 0 if ``grant_ref0``."""
        gt = self.grants
        if not isinstance(gt, GuestFrames):
            raise LocalError("this grant table has no guest frames for the console page")
        self.frames = gt.alloc_frames(1)
        with self.res.undo_on_error():
            if grant_ref0:
                # what Xen's domain builder does: grant entry 0 names the console frame
                self.pages = self.res.adopt(gt.grant_frame(
                    self.frames.refs[0], self.backend_domid, ref=GNTTAB_RESERVED_CONSOLE))
            self.port = self.res.alloc_unbound(self.backend_domid)
            self.ring = ConsoleRing(self.frames.mem, backend=False)

    @property
    def ring_ref(self) -> int:
        """What ``console/ring-ref`` names: the frame number, else the grant ref."""
        if self.frames is not None:
            return int(self.frames.refs[0])
        return self.ref

    @property
    def ref(self) -> int:
        """The grant ref of the page."""
        if self.pages is None:
            raise LocalError("console not set up")
        return int(self.pages.refs[0])

    def release(self) -> None:
        """Release ring, port and page (a page still mapped goes to the quarantine),
        then the frame (idempotent)."""
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        self.port = self.pages = None
        self.res.release()
        if self.frames is not None:
            frames, self.frames = self.frames, None
            gt = self.grants
            assert isinstance(gt, GuestFrames)
            # a frame a backend still maps stays until it unmaps it, then goes (no reuse)
            with contextlib.suppress(LocalError, PlatformError):
                gt.free_frames(frames)


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

    A page the backend still maps at :meth:`close` is kept in :attr:`quarantine` (the
    one given, else the console's own) until the backend lets go.
    """

    def __init__(self, platform: Platform, backend_domid: int = 0, *, frame: bool = False,
                 grant_ref0: bool = True, builder: GrantTable | None = None,
                 quarantine: GrantQuarantine | None = None) -> None:
        """Prepare; nothing is allocated until :meth:`setup`."""
        if not (frame or grant_ref0):
            raise LocalError("the console page needs a frame, grant ref 0, or both")
        self._res = _ConsolePage(platform, backend_domid, builder, quarantine)
        #: Where a page still mapped at close waits (R8).
        self.quarantine = self._res.res.quarantine
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
        reader, writer = open_console_streams(self.ring, self._res.events, self.port,
                                              limiter=limiter)
        self.transport = _transport_of(writer)
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

    def __init__(self, platform: Platform, client: XenbusClient, path: str, *,
                 quarantine: GrantQuarantine | None = None, **kw: Any) -> None:
        """Serve the frontend directory ``path`` (see :class:`FrontendDriver`)."""
        super().__init__(client, path, **kw)
        self.platform = platform
        #: Pages the backend still mapped when a connection ended (R8), retried at the
        #: next setup and teardown.
        self.quarantine = quarantine if quarantine is not None else GrantQuarantine(
            platform.grants)
        self._res: _ConsolePage | None = None
        self._streams: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None
        self._streams = None
        self.transport: ConsoleTransport | None = None

    async def publish(self, backend: PeerKeys) -> None:
        """Grant the ring page, allocate the port, write ``ring-ref`` and ``port``."""
        self.quarantine.reap()
        res = self._res = _ConsolePage(self.platform, self.peer_domid,
                                       quarantine=self.quarantine)
        res.allocate(reserved=False)
        assert res.port is not None
        await self.write_keys({KEY_RING_REF: res.ref, KEY_PORT: res.port})

    async def connect(self, peer: PeerKeys) -> None:
        """Both sides are up: open the stream pair."""
        res = self._res
        if res is None or res.ring is None or res.port is None:
            raise LocalError("connect before publish")
        reader, writer = open_console_streams(res.ring, self.platform.events, res.port)
        self.transport = _transport_of(writer)
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

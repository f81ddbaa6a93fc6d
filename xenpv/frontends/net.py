"""Net frontend: a vif as an asyncio port that sends and receives Ethernet frames.

Theory of operation
-------------------
:class:`NetFrontend` is a :class:`~xenpv.xenbus.driver.FrontendDriver` for one
``device/vif/<devid>`` directory (xen-protocols.md §7):

* ``publish`` (backend in InitWait): requires ``feature-rx-copy``; reads
  ``feature-sg``, ``feature-gso-tcpv4``/``-v6``, ``feature-ipv6-csum-offload``,
  ``feature-split-event-channels`` and ``multi-queue-max-queues``; builds
  ``min(ours, theirs)`` queues, each a TX and an RX ring
  (:class:`~xenpv.drivers.ringchannel.FrontChannel`, split event channels when both
  sides want them, else one port for both rings), and writes in one transaction the
  ring keys (top level for one queue, ``queue-K/`` for several, and
  ``multi-queue-num-queues`` whenever the backend offered multi-queue),
  ``request-rx-copy`` = 1, ``feature-rx-notify`` = 1 and what it can receive:
  ``feature-sg``, ``feature-gso-tcpv4``/``-v6``, ``feature-ipv6-csum-offload``,
  ``feature-no-csum-offload`` (:class:`NetFrontConfig`);
* ``connect`` (right after ``publish``, as Linux's netfront does: the frontend goes from
  Initialising straight to Connected, and the backend connects when it sees that):
  starts a :class:`~xenpv.drivers.ringservice.RingClient` per ring and posts one RX page
  per RX slot.  :meth:`NetFrontend.ready` also waits for the backend's Connected.

Buffers: each queue grants its TX pages (read-only) and RX pages (writable) once and
reuses them; a TX page is free again when its slot is answered, an RX page is posted
again as soon as its chain's data was copied out (once).

Sending (:meth:`NetFrontend.send`): a frame is first adapted to what the backend accepts
(GSO segmented in software without the backend's ``feature-gso-*`` or ``feature-sg``; an
IPv6 blank checksum completed without its ``feature-ipv6-csum-offload``), then written
into pages of up to 4096 bytes as one chain (first slot: the total size and the checksum
flags; a GSO extra-info slot; ``NETTXF_more_data`` on all but the last), on the queue its
flow hashes to, waiting (bounded by ``send_timeout``) for slots and pages.  Each queue's
TX table (``cython/netfronttx.pyx``, readable twin :mod:`xenpv.frontends.nettx`) holds the free
pages, builds the slots as whole slots (one ``submit_slots`` per push) and checks the TX
answers in one call.  The answers are taken when a sender is short of room (and by
:meth:`NetFrontend.info`), not on a notification per pass: the TX ring client is lazy
(:attr:`~xenpv.drivers.ringservice.RingClient.lazy`), and only a sender that must wait
asks for a notification, at the answers it needs.  :class:`TapBridge` reads the guest's
TAP straight into TX pages (``readv``) when the backend takes its frames as they are.

Receiving (:meth:`NetFrontend.recv`, or a ``receiver`` callback): responses are taken in
ring order; the RX page of each slot is the one posted at that ring index (the slot
identity rule), and a data response must carry that page's id (R6).  A chain is
``NETRXF_more_data`` slots with extra-info slots after any response flagged
``NETRXF_extra_info``; a negative status drops the packet (counted); a response running
past its page, an unknown status, an invalid extra-info record or a chain longer than
``XEN_NETIF_NR_SLOTS_MIN`` + extras fails the device closed (hostile scenario 15: error
node, Closing, every waiter gets :class:`NetPeerError`).  The responses of a ring pass
are checked and their frames gathered by one scan
(:func:`~xenpv.protocols.netif.scan_rx`, compiled; the readable twin is
:func:`~xenpv.protocols.netif.scan_rx_reference`); the slots of a chain the pass leaves
unfinished wait for the next pass, their pages still taken.  Received frames wait in a
queue bounded by ``rx_queue_frames`` (beyond it they are dropped and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import functools
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from xenpv.compiled import compiled_attr
from xenpv.drivers.quarantine import GrantQuarantine
from xenpv.drivers.ringchannel import FrontChannel
from xenpv.drivers.ringservice import RingClient
from xenpv.drivers.sharedport import share_port
from xenpv.drivers.tap import TapDevice, TapPump, frame_flow_hash, vnet_meta
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.frontends import nettx
from xenpv.platforms.base import Platform, SharedPages
from xenpv.platforms.dispatch import PortDispatcher
from xenpv.protocols.ethernet import (
    GSO_NONE,
    GSO_TCPV4,
    NetFrame,
    complete_checksum,
    l4_info,
    mac_bytes,
    segment_tcp,
)
from xenpv.protocols.layout import XEN_PAGE_SIZE
from xenpv.protocols.netif import (
    CTRL_REQUEST_STRUCT,
    CTRL_RESPONSE_STRUCT,
    CTRL_RING,
    NETIF_RSP_OKAY,
    RX_REQUEST_STRUCT,
    RX_RESPONSE_STRUCT,
    RX_RING,
    TX_RING,
    XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ,
    XEN_NETIF_CTRL_STATUS_SUCCESS,
    XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM,
    XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS,
    XEN_NETIF_CTRL_TYPE_SET_HASH_KEY,
    XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING,
    XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
    XEN_NETIF_MAX_TX_SIZE,
    XEN_NETIF_NR_SLOTS_MIN,
    GsoExtra,
    McastExtra,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    TxRequest,
    scan_rx,
)
from xenpv.xenbus import XenbusState
from xenpv.xenbus.driver import FrontendDriver, PeerKeys
from xenpv.xenbus.machine import FrontendStyle
from xenpv.xenstore.client import XenstoreClient as XenbusClient

__all__ = ["NetCtrlError", "NetFrontConfig", "NetFrontend", "NetPeerError", "TapBridge"]

log = logging.getLogger(__name__)

_TX_SLOT = TX_RING.slot_size
_RX_SLOT = RX_RING.slot_size
_CTRL_SLOT = CTRL_RING.slot_size
_CTRL_REQ = CTRL_REQUEST_STRUCT
_CTRL_RSP = CTRL_RESPONSE_STRUCT
_RX_REQ = RX_REQUEST_STRUCT
_RX_RSP = RX_RESPONSE_STRUCT


_MAX_FRAME_PAGES = nettx.MAX_FRAME_PAGES
_VNET_HDR_SIZE = nettx.VNET_HDR_SIZE


def _tx_table_class() -> Any:
    """The compiled TX table (``cython/netfronttx.pyx``), or its readable twin
    :class:`xenpv.frontends.nettx.TxTable` (not built, or ``XENPV_PURE_PYTHON=1``)."""
    return compiled_attr("xenpv.frontends._nettx", "TxTable", nettx.TxTable)


_TX_TABLE = _tx_table_class()


@functools.lru_cache(maxsize=64)
def _gso_slot(gso_type: int, size: int) -> bytes:
    """The TX slot of a GSO extra-info record (the same few for a whole stream: packed
    once each)."""
    return GsoExtra(XEN_NETIF_EXTRA_TYPE_GSO, 0, size, gso_type, 0).pack()


class NetPeerError(PeerError):
    """The backend broke the protocol; the device failed closed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EPROTO


class NetCtrlError(LocalError):
    """The backend refused a control request: ``status`` is its
    ``XEN_NETIF_CTRL_STATUS_*``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NetFrontConfig:
    """What this frontend asks for and its buffers (each feature also needs the
    backend's)."""

    sg: bool = True
    gso_tcpv4: bool = True
    gso_tcpv6: bool = True
    csum: bool = True
    ipv6_csum: bool = True
    split_events: bool = True
    #: Set up the control ring when the backend offers one (hash and queue mapping).
    ctrl_ring: bool = False
    #: Ask for multicast filtering (``request-multicast-control``) when offered.
    multicast_control: bool = False
    max_queues: int = 4
    #: TX pages per queue (data slots in flight) and RX pages posted per queue.
    tx_pages: int = 256
    rx_pages: int = 256
    rx_queue_frames: int = 1024
    send_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_queues <= 64:
            raise LocalError("max_queues must be 1..64")
        if not XEN_NETIF_NR_SLOTS_MIN <= self.tx_pages <= 256 or \
                not XEN_NETIF_NR_SLOTS_MIN + 2 <= self.rx_pages <= 256:
            raise LocalError("tx_pages must be 18..256 and rx_pages 20..256")
        if self.rx_queue_frames < 1:
            raise LocalError("rx_queue_frames must be positive")


class _Queue:
    """One queue: TX and RX channels, clients, pages and bookkeeping."""

    def __init__(self, index: int, tx: FrontChannel, rx: FrontChannel,
                 tx_pages: SharedPages, rx_pages: SharedPages) -> None:
        self.index = index
        self.tx_channel = tx
        self.rx_channel = rx
        self.tx_pages = tx_pages
        self.rx_pages = rx_pages
        self.tx_client: RingClient | None = None
        self.rx_client: RingClient | None = None
        #: Free TX pages, staged TX slots, checks on the TX answers.
        self.tx = _TX_TABLE(tx_pages.mem, list(tx_pages.refs), tx.ring.nr_ents)
        self.rx_posted: deque[int] = deque()
        #: each RX page's request, packed once
        self.rx_reqs = [_RX_REQ.pack(idx, ref) for idx, ref in enumerate(rx_pages.refs)]
        self.rx_frames = 0
        #: the slots of a chain a ring pass left unfinished (at most a chain's)
        self.rx_pending = b""
        self.hub: PortDispatcher | None = None
        self.guard: asyncio.Task[None] | None = None

    @property
    def split(self) -> bool:
        return self.rx_channel.port != self.tx_channel.port


class NetFrontend(FrontendDriver):
    """The frontend of one vif; see the module docstring.  After :meth:`start`,
    ``await fe.ready()``, then :meth:`send` and :meth:`recv` frames (or set
    :attr:`receiver` to get each frame as it arrives).

    Like Linux's netfront it goes from Initialising straight to Connected once its keys
    are written (:attr:`FrontendStyle.DIRECT`): Linux netback and QEMU's xen-net-device
    connect only when they see the frontend Connected, never on Initialised."""

    style = FrontendStyle.DIRECT

    def __init__(self, platform: Platform, client: XenbusClient, path: str, *,
                 config: NetFrontConfig | None = None,
                 quarantine: GrantQuarantine | None = None, **kw: Any) -> None:
        """Serve the frontend directory ``path`` (see :class:`FrontendDriver`)."""
        super().__init__(client, path, **kw)
        self.platform = platform
        self.config = config or NetFrontConfig()
        self.quarantine = quarantine if quarantine is not None else GrantQuarantine(
            platform.grants)
        self.queues: list[_Queue] = []
        #: What the backend accepts from us (TX).
        self.backend_features: dict[str, bool] = {}
        self.mac: bytes | None = None
        #: Called with each received frame instead of queueing it for :meth:`recv`.
        self.receiver: Callable[[NetFrame], object] | None = None
        self.ctrl_channel: FrontChannel | None = None
        self.ctrl_client: RingClient | None = None
        self._ctrl_page: SharedPages | None = None
        self._ctrl_waiting: dict[int, tuple[int, asyncio.Future[int]]] = {}
        self._ctrl_ids = 0
        self._ctrl_lock = asyncio.Lock()
        self._tx_waiting: dict[tuple[int, int], asyncio.Future[int]] = {}
        self._rx: deque[NetFrame] = deque()
        self._rx_ready = asyncio.Event()
        self._space = asyncio.Event()
        self._connected: asyncio.Future[None] | None = None
        #: The protocol violation that failed the device (None while healthy).
        self.error: NetPeerError | None = None
        self.net_stats = dict.fromkeys(
            ("tx_packets", "tx_bytes", "tx_errors", "tx_refused", "tx_gso", "tx_segmented",
             "tx_csum_completed",
             "rx_packets", "rx_bytes", "rx_errors", "rx_queue_full", "rx_gso",
             "rx_csum_blank"), 0)

    # -- xenbus hooks
    async def publish(self, backend: PeerKeys) -> None:
        """Read the backend's offer, build the queues, write the keys (one transaction)."""
        self.quarantine.reap()
        self.error = None
        if not await backend.feature("feature-rx-copy"):
            raise NetPeerError("the backend does not offer feature-rx-copy")
        c = self.config
        offered_mq = await backend.raw("multi-queue-max-queues") is not None
        be_queues = await backend.uint("multi-queue-max-queues", 0, 1 << 16, default=1)
        f = {name: await backend.feature(f"feature-{name}") for name in
             ("sg", "gso-tcpv4", "gso-tcpv6", "ipv6-csum-offload", "split-event-channels",
              "multicast-control", "dynamic-multicast-control")}
        self.backend_features = f
        split = c.split_events and f["split-event-channels"]
        count = max(1, min(c.max_queues, be_queues))
        raw_mac = await self._read(f"{self.path}/mac")
        try:
            self.mac = mac_bytes(raw_mac.decode("ascii")) if raw_mac else None
        except (LocalError, UnicodeDecodeError):
            self.mac = None
        try:
            for k in range(count):
                self.queues.append(self._make_queue(k, split))
        except PlatformError:
            self._release_queues()
            raise
        keys: dict[str, str | int] = {
            "request-rx-copy": 1, "feature-rx-notify": 1, "feature-sg": int(c.sg),
            "feature-gso-tcpv4": int(c.sg and c.gso_tcpv4),
            "feature-gso-tcpv6": int(c.sg and c.gso_tcpv6),
            "feature-ipv6-csum-offload": int(c.ipv6_csum),
            "feature-no-csum-offload": int(not c.csum),
        }
        if offered_mq:
            keys["multi-queue-num-queues"] = count
        if c.multicast_control and f.get("multicast-control"):
            keys["request-multicast-control"] = 1
        if c.ctrl_ring and await backend.feature("feature-ctrl-ring"):
            try:
                self.ctrl_channel = FrontChannel.create(self.platform, self.peer_domid,
                                                        slot_size=_CTRL_SLOT,
                                                        quarantine=self.quarantine)
                self._ctrl_page = self.platform.grants.grant(self.peer_domid, 1,
                                                             writable=False)
            except PlatformError:
                self._release_queues()
                raise
            keys["ctrl-ring-ref"] = self.ctrl_channel.refs[0]
            keys["event-channel-ctrl"] = self.ctrl_channel.port
        for q in self.queues:
            prefix = "" if count == 1 else f"queue-{q.index}/"
            if prefix:
                keys[prefix.rstrip("/")] = ""
            keys[f"{prefix}tx-ring-ref"] = q.tx_channel.refs[0]
            keys[f"{prefix}rx-ring-ref"] = q.rx_channel.refs[0]
            if q.split:
                keys[f"{prefix}event-channel-tx"] = q.tx_channel.port
                keys[f"{prefix}event-channel-rx"] = q.rx_channel.port
            else:
                keys[f"{prefix}event-channel"] = q.tx_channel.port
        await self.write_keys(keys)

    def _make_queue(self, index: int, split: bool) -> _Queue:
        dom, quar = self.peer_domid, self.quarantine
        held: list[Any] = []
        try:
            tx = FrontChannel.create(self.platform, dom, slot_size=_TX_SLOT, quarantine=quar)
            held.append(tx)
            rx = FrontChannel.create(self.platform, dom, slot_size=_RX_SLOT, quarantine=quar,
                                     shared_port=None if split else tx.port)
            held.append(rx)
            tx_pages = self.platform.grants.grant(dom, self.config.tx_pages, writable=False)
            held.append(tx_pages)
            rx_pages = self.platform.grants.grant(dom, self.config.rx_pages, writable=True)
        except BaseException:
            for h in reversed(held):
                if isinstance(h, FrontChannel):
                    h.close()
                else:
                    with contextlib.suppress(LocalError, PlatformError):
                        self.quarantine.end(h)
            raise
        return _Queue(index, tx, rx, tx_pages, rx_pages)

    async def connect(self, peer: PeerKeys) -> None:
        """Start the rings and post the RX pages."""
        for q in self.queues:
            q.tx_client = RingClient(q.tx_channel, functools.partial(self._on_tx, q), lazy=True)
            q.rx_client = RingClient(q.rx_channel, functools.partial(self._on_rx, q))
            q.tx_client.start()
            q.rx_client.start()
            if not q.split:
                q.hub = share_port(q.tx_channel.res.events, q.tx_channel.port,
                                    [q.tx_client, q.rx_client])
            self._post_rx(q, range(len(q.rx_pages.refs)))
            q.guard = asyncio.create_task(self._watch_rings(q))
        if self.ctrl_channel is not None:
            self.ctrl_client = RingClient(self.ctrl_channel, self._on_ctrl)
            self.ctrl_client.start()
        self._future().set_result(None)
        self._space.set()

    async def disconnect(self) -> None:
        """Stop the queues, fail the waiters, release pages, rings and ports."""
        fut = self._connected
        if fut is not None and not fut.done():
            fut.set_exception(LocalError("net device disconnected"))
            fut.exception()
        self._connected = None
        self._release_queues()

    async def _watch_rings(self, q: _Queue) -> None:
        """A ring the backend broke (an index outside the ring) fails the device."""
        clients = [c for c in (q.tx_client, q.rx_client) if c is not None]
        waits = [asyncio.ensure_future(c.wait_stopped()) for c in clients]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        errors = [c.error for c in clients if c.error is not None]
        if errors:
            self._peer_failed(f"queue {q.index}: {errors[0]}")

    def _release_queues(self) -> None:
        for q in self.queues:
            if q.guard is not None:
                q.guard.cancel()
                q.guard = None
            for c in (q.tx_client, q.rx_client):
                if c is not None:
                    c.stop()
            if q.hub is not None:
                q.hub.detach(q.tx_channel.port)
                q.hub = None
            q.rx_channel.close()
            q.tx_channel.close()
            for pages in (q.tx_pages, q.rx_pages):
                with contextlib.suppress(LocalError, PlatformError):
                    self.quarantine.end(pages)
        self.queues = []
        if self.ctrl_client is not None:
            self.ctrl_client.stop()
            self.ctrl_client = None
        if self.ctrl_channel is not None:
            self.ctrl_channel.close()
            self.ctrl_channel = None
        if self._ctrl_page is not None:
            with contextlib.suppress(LocalError, PlatformError):
                self.quarantine.end(self._ctrl_page)
            self._ctrl_page = None
        for fut in self._tx_waiting.values():
            if not fut.done():
                fut.set_exception(self.error or LocalError("net device disconnected"))
                fut.exception()
        self._tx_waiting = {}
        waiting, self._ctrl_waiting = self._ctrl_waiting, {}
        for _typ, fut in waiting.values():
            if not fut.done():
                fut.set_exception(self.error or LocalError("net device disconnected"))
                fut.exception()
        self._space.set()
        self._rx_ready.set()

    def _future(self) -> asyncio.Future[None]:
        if self._connected is None or self._connected.done():
            self._connected = asyncio.get_running_loop().create_future()
        return self._connected

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout`` s) until the vif is connected and usable: our rings
        are up and the backend says Connected."""
        if self._connected is None:
            self._future()
        assert self._connected is not None
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._connected)
            await self.wait_peer_state(XenbusState.Connected, timeout=timeout)

    # -- failing closed
    def _peer_failed(self, message: str) -> None:
        if self.error is not None:
            return
        self.error = NetPeerError(message)
        log.warning("%s: backend misbehaved: %s", self.path, message)
        for q in self.queues:
            for c in (q.tx_client, q.rx_client):
                if c is not None:
                    c.stop()
        self._space.set()
        self._rx_ready.set()
        machine, error = self.machine, self.error
        if machine is not None and not machine.destroyed:
            self._post(lambda: machine.peer_error(error))  # error node, then Closing

    # -- RX
    def _post_rx(self, q: _Queue, pages: Iterable[int]) -> None:
        """Post RX pages ``pages`` of ``q`` (in this order): their requests (packed once
        per page) laid out as whole slots, one push."""
        client = q.rx_client
        if client is None or self.error is not None:
            return
        reqs = q.rx_reqs
        pages = list(pages)
        q.rx_posted.extend(pages)
        with contextlib.suppress(LocalError):
            client.submit_slots(memoryview(b"".join([reqs[idx] for idx in pages])), len(pages))

    def _on_rx(self, q: _Queue, batch: memoryview, count: int) -> None:
        """The responses of a ring pass, after the slots of a chain a former pass left
        unfinished: every complete chain checked and its frame delivered by one scan
        (:func:`~xenpv.protocols.netif.scan_rx`, compiled), their pages posted again in
        one push; an unfinished chain's slots wait (its pages stay taken) for the next
        pass; a chain that breaks the protocol fails the device after the frames before
        it."""
        if self.error is not None:
            return
        if q.rx_pending:
            buf: bytes | memoryview = q.rx_pending + bytes(batch[:count * _RX_SLOT])
            count = len(buf) // _RX_SLOT
        else:
            buf = batch
        posted = q.rx_posted
        frames, used, error = scan_rx(buf, count, posted, q.rx_pages.mem)
        q.rx_pending = bytes(buf[used * _RX_SLOT:count * _RX_SLOT]) if used < count else b""
        repost = [posted.popleft() for _ in range(used)]
        stats = self.net_stats
        for data, flags, gso_type, gso_size, rss_hash, rss_type in frames:
            if data is None:
                stats["rx_errors"] += 1
            else:
                self._frame(q, data, flags, gso_type, gso_size, rss_hash, rss_type)
        if error is not None:
            self._peer_failed(f"queue {q.index} rx: {error}")
            return
        if repost:
            self._post_rx(q, repost)

    def _frame(self, q: _Queue, data: bytes, flags: int, gso_type: int, gso_size: int,
               rss_hash: int | None, rss_type: int) -> None:
        """Deliver a received frame (not empty) with its first data slot's ``flags``,
        its GSO type and size and its hash."""
        q.rx_frames += 1
        csum_blank = bool(flags & NETRXF_csum_blank)
        frame = NetFrame(data, csum_blank, bool(flags & NETRXF_data_validated), gso_type,
                         gso_size, rss_hash, rss_type)
        stats = self.net_stats
        stats["rx_packets"] += 1
        stats["rx_bytes"] += len(data)
        stats["rx_gso"] += gso_type != GSO_NONE
        stats["rx_csum_blank"] += csum_blank
        if self.receiver is not None:
            try:
                self.receiver(frame)
            except (LocalError, PlatformError, OSError) as exc:
                log.debug("%s: receiver refused a frame: %s", self.path, exc)
            return
        if len(self._rx) >= self.config.rx_queue_frames:
            stats["rx_queue_full"] += 1
            return
        self._rx.append(frame)
        self._rx_ready.set()

    async def recv(self, timeout: float | None = None) -> NetFrame:
        """The next received frame (waits at most ``timeout`` s: TimeoutError)."""
        async with asyncio.timeout(timeout):
            while not self._rx:
                if self.error is not None:
                    raise self.error
                self._rx_ready.clear()
                await self._rx_ready.wait()
        return self._rx.popleft()

    def pending_frames(self) -> int:
        """Received frames not taken yet."""
        return len(self._rx)

    # -- TX
    def _on_tx(self, q: _Queue, batch: memoryview, count: int) -> None:
        if self.error is not None:
            return
        errors, answered, bad = q.tx.reap(batch, count)
        self.net_stats["tx_errors"] += errors
        for rid, status in answered:
            waiter = self._tx_waiting.pop((q.index, rid), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(status)
            elif status != NETIF_RSP_OKAY:
                self.net_stats["tx_errors"] += 1
        if bad is not None:
            self._peer_failed(f"queue {q.index} tx: {bad}")
            return
        self._space.set()

    def _adapt(self, frame: NetFrame) -> list[NetFrame]:
        f = self.backend_features
        frames = [frame]
        if frame.gso_type != GSO_NONE:
            key = "gso-tcpv4" if frame.gso_type == GSO_TCPV4 else "gso-tcpv6"
            if not (f.get(key) and f.get("sg")):
                frames = segment_tcp(frame)
                self.net_stats["tx_segmented"] += 1
        out = []
        for fr in frames:
            if fr.csum_blank and not f.get("ipv6-csum-offload"):
                info = l4_info(fr.data)
                if info is not None and info.version == 6:
                    done = complete_checksum(fr)
                    if done is not None:
                        fr = done
                        self.net_stats["tx_csum_completed"] += 1
            if len(fr.data) > XEN_NETIF_MAX_TX_SIZE or not fr.data:
                raise LocalError(f"a frame of {len(fr.data)} bytes cannot be sent")
            if len(fr.data) > XEN_PAGE_SIZE and not f.get("sg"):
                raise LocalError(f"a frame of {len(fr.data)} bytes needs feature-sg, which "
                                 "the backend does not offer")
            out.append(fr)
        return out

    async def send(self, frame: NetFrame) -> None:
        """Queue ``frame`` for the backend (waits for ring space, at most
        ``send_timeout``); LocalError for a frame that cannot be sent,
        :class:`NetPeerError` once the device failed."""
        await self._send_frames(self._adapt(frame))

    async def send_many(self, frames: Iterable[NetFrame]) -> int:
        """Queue ``frames`` in order with one ring push per queue (and a notification
        only where the ring asks for one) for all that fit, waiting for room (at most
        ``send_timeout`` each time, TimeoutError) only when the ring or the pages run
        out.  A frame that cannot be sent is skipped and counted (``tx_refused``);
        returns how many were skipped.  :class:`NetPeerError` once the device failed."""
        out, refused = self._adapt_many(frames)
        await self._send_frames(out)
        return refused

    def _adapt_many(self, frames: Iterable[NetFrame]) -> tuple[list[NetFrame], int]:
        """``frames`` adapted to the backend, and how many were refused (counted)."""
        out: list[NetFrame] = []
        refused = 0
        for frame in frames:
            try:
                out += self._adapt(frame)
            except LocalError as exc:
                refused += 1
                log.debug("%s: frame not sent: %s", self.path, exc)
        self.net_stats["tx_refused"] += refused
        return out, refused

    def _tx_room(self, q: _Queue, slots: int, pages: int) -> RingClient | None:
        """``q``'s TX client if it has ``slots`` free slots (beyond those staged, not
        pushed yet) and ``pages`` free pages now, else None; raises once the device
        failed or is not connected."""
        if self.error is not None:
            raise self.error
        client = q.tx_client
        queues = self.queues
        if client is None or q.index >= len(queues) or queues[q.index] is not q:
            raise LocalError("net device not connected")  # or reconnected meanwhile
        if client.free() - q.tx.staged >= slots and q.tx.free_pages() >= pages:
            return client
        return None

    def _send_ready(self, frames: list[NetFrame], start: int = 0) -> int:
        """Fill the TX slots of ``frames[start:]`` (adapted already) in order while there
        is room, push each queue's requests once; the index of the first frame that found
        no room (``len(frames)``: all went)."""
        if self.error is not None:
            raise self.error
        queues = self.queues
        if not queues or queues[0].tx_client is None:
            raise LocalError("net device not connected")
        filled: set[_Queue] = set()
        try:
            for k in range(start, len(frames)):
                frame = frames[k]
                data = frame.data
                q = queues[frame_flow_hash(data) % len(queues)] if len(queues) > 1 else queues[0]
                pages = -(-len(data) // XEN_PAGE_SIZE)
                if not self._tx_space(q, pages + (frame.gso_type != GSO_NONE), pages):
                    return k
                filled.add(q)
                self._fill_tx(q, frame)
            return len(frames)
        finally:
            self._push_filled(filled)

    def _tx_space(self, q: _Queue, slots: int, pages: int) -> bool:
        """Whether ``q`` has room for ``slots`` slots and ``pages`` pages, taking the TX
        answers there when short (they are taken only then, or by a waiting sender)."""
        if self._tx_room(q, slots, pages) is not None:
            return True
        client = q.tx_client
        assert client is not None  # _tx_room checked it
        return bool(client.reap()) and self._tx_room(q, slots, pages) is not None

    async def _send_frames(self, frames: list[NetFrame]) -> None:
        """Fill the TX slots of ``frames`` (adapted already) in order and push each
        queue's requests once; when a frame finds no room, what was filled is pushed
        first and the wait is bounded by ``send_timeout``."""
        k = self._send_ready(frames)
        while k < len(frames):
            await self._wait_room(frames[k])
            k = self._send_ready(frames, k)

    async def _wait_room(self, frame: NetFrame) -> None:
        """Wait (at most ``send_timeout``: TimeoutError) until ``frame``'s queue has room
        for it; raises once the device failed or is not connected."""
        data = frame.data
        pages = -(-len(data) // XEN_PAGE_SIZE)
        slots = pages + (frame.gso_type != GSO_NONE)
        async with asyncio.timeout(self.config.send_timeout):
            while True:
                if self.error is not None:
                    raise self.error
                queues = self.queues  # it may have reconnected meanwhile
                if not queues:
                    raise LocalError("net device not connected")
                q = queues[frame_flow_hash(data) % len(queues)] if len(queues) > 1 else queues[0]
                if await self._tx_wait(q, slots, pages):
                    return

    async def _tx_wait(self, q: _Queue, slots: int, pages: int) -> bool:
        """True if ``q`` has room for ``slots`` slots and ``pages`` pages; else ask for a
        notification once enough answers may be there (each frees a slot, at most one
        page), take those already there, and wait for a change (False: look again)."""
        if self._tx_room(q, slots, pages) is not None:
            return True
        client = q.tx_client
        assert client is not None  # _tx_room checked it
        self._space.clear()
        if not client.arm(max(slots - client.free() + q.tx.staged,
                              pages - q.tx.free_pages())):
            await self._space.wait()
        return False

    def _push_filled(self, filled: Iterable[_Queue]) -> None:
        """Push the slots staged on each queue (one push, and a notification if the ring
        asks, per queue); not to a device that failed or a queue released since."""
        for q in filled:
            table = q.tx
            if table.staged and self.error is None and q.tx_client is not None and \
                    q.index < len(self.queues) and self.queues[q.index] is q:
                with contextlib.suppress(LocalError):  # the channel closed underneath
                    q.tx_client.submit_slots(table.out, table.staged)
            table.pushed()

    def _fill_tx(self, q: _Queue, frame: NetFrame) -> None:
        """Take ``frame``'s TX pages, copy it in and stage its slots (room was
        checked)."""
        gso = frame.gso_type != GSO_NONE
        flags = (NETTXF_csum_blank if frame.csum_blank else 0) | \
            (NETTXF_data_validated if frame.data_validated else 0)
        try:
            q.tx.fill(frame.data, flags, _gso_slot(frame.gso_type, frame.gso_size) if gso
                      else None)
        except ValueError as exc:
            raise LocalError(str(exc)) from None
        stats = self.net_stats
        stats["tx_gso"] += gso
        stats["tx_packets"] += 1
        stats["tx_bytes"] += len(frame.data)

    # -- multicast filter (feature-multicast-control)
    async def _mcast(self, kind: int, mac: bytes) -> None:
        if len(mac) != 6 or not mac[0] & 1:
            raise LocalError("a multicast filter entry must be a group MAC address")
        if not self.backend_features.get("multicast-control"):
            raise LocalError("the backend does not offer feature-multicast-control")
        async with asyncio.timeout(self.config.send_timeout):
            while True:
                if self.error is not None:
                    raise self.error
                if not self.queues or self.queues[0].tx_client is None:
                    raise LocalError("net device not connected")
                q = self.queues[0]
                client = q.tx_client
                assert client is not None  # checked above
                if await self._tx_wait(q, 2, 1):
                    break
            idx = q.tx.take()
            q.tx.watch(idx)
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._tx_waiting[(q.index, idx)] = fut
            client.lazy = False  # its answer is waited for: notifications until it came
            try:
                client.submit([TxRequest(q.tx_pages.refs[idx], 0, NETTXF_extra_info, idx,
                                         0).pack(), McastExtra(kind, 0, mac).pack()])
                client.arm()
                status = await fut
            finally:
                client.lazy = not any(i == q.index for i, _ in self._tx_waiting)
        if status != NETIF_RSP_OKAY:
            raise LocalError(f"the backend refused the multicast filter change ({status})")

    async def multicast_add(self, mac: bytes) -> None:
        """Receive multicast frames to ``mac`` while filtering is on (MCAST_ADD)."""
        await self._mcast(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, mac)

    async def multicast_del(self, mac: bytes) -> None:
        """Stop receiving multicast frames to ``mac`` (MCAST_DEL)."""
        await self._mcast(XEN_NETIF_EXTRA_TYPE_MCAST_DEL, mac)

    async def set_multicast_control(self, on: bool) -> None:
        """Turn filtering on or off while connected (needs the backend's
        ``feature-dynamic-multicast-control`` to take effect before a reconnect)."""
        await self.write_keys({"request-multicast-control": int(on)})

    # -- control ring
    def _on_ctrl(self, batch: memoryview, count: int) -> None:
        for j in range(count):
            rid, typ, status, data = _CTRL_RSP.unpack_from(batch, j * _CTRL_SLOT)
            waiting = self._ctrl_waiting.pop(rid, None)
            if waiting is None or waiting[0] != typ:
                self._peer_failed(f"control response {rid} (type {typ}) matches no request")
                return
            fut = waiting[1]
            if status != XEN_NETIF_CTRL_STATUS_SUCCESS:
                fut.set_exception(NetCtrlError(f"control request type {typ} refused with "
                                               f"status {status}", status))
                fut.exception()
            else:
                fut.set_result(data)

    async def ctrl(self, typ: int, d0: int = 0, d1: int = 0, d2: int = 0,
                   timeout: float = 5.0) -> int:
        """One control request (``XEN_NETIF_CTRL_TYPE_*``); the response's data, or
        :class:`NetCtrlError` with the backend's status.  LocalError without a control
        ring (not asked for, or not offered)."""
        client = self.ctrl_client
        if self.error is not None:
            raise self.error
        if client is None:
            raise LocalError("no control ring (NetFrontConfig.ctrl_ring, feature-ctrl-ring)")
        self._ctrl_ids = (self._ctrl_ids + 1) & 0xFFFF
        rid = self._ctrl_ids
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._ctrl_waiting[rid] = (typ, fut)
        if client.submit([_CTRL_REQ.pack(rid, typ, d0, d1, d2)]) != 1:
            del self._ctrl_waiting[rid]
            raise LocalError("control ring full")
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._ctrl_waiting.pop(rid, None)

    async def set_toeplitz(self, key: bytes, flags: int, mapping: list[int] | None = None
                           ) -> None:
        """Ask the backend to pick RX queues by Toeplitz hash under ``key`` for the hash
        types ``flags`` (``XEN_NETIF_CTRL_HASH_TYPE_*`` masks), through ``mapping``
        (hash modulo its size -> queue) if given."""
        page = self._ctrl_page
        if page is None:
            raise LocalError("no control ring (NetFrontConfig.ctrl_ring, feature-ctrl-ring)")
        async with self._ctrl_lock:  # one page carries key and mapping: one at a time
            await self.ctrl(XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM,
                            XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ)
            page.mem[:len(key)] = key
            await self.ctrl(XEN_NETIF_CTRL_TYPE_SET_HASH_KEY, page.refs[0], len(key))
            if mapping:
                await self.ctrl(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE, len(mapping))
                page.mem[:4 * len(mapping)] = struct.pack(f"<{len(mapping)}I", *mapping)
                await self.ctrl(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING, page.refs[0], 0,
                                len(mapping))
            await self.ctrl(XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS, flags)

    # -- introspection
    def info(self) -> dict[str, Any]:
        """Negotiated features, queues and counters (the TX answers there taken first)."""
        for q in self.queues:
            if q.tx_client is not None and self.error is None:
                q.tx_client.reap()
        return {
            "path": self.path,
            "state": self.state.name,
            "mac": None if self.mac is None else ":".join(f"{b:02x}" for b in self.mac),
            "backend_features": dict(self.backend_features),
            "queues": len(self.queues),
            "split_event_channels": bool(self.queues) and self.queues[0].split,
            "stats": dict(self.net_stats),
            "rings": [{"tx": q.tx_client.info() if q.tx_client else None,
                       "rx": q.rx_client.info() if q.rx_client else None,
                       "tx_inflight": q.tx.outstanding(), "rx_posted": len(q.rx_posted),
                       "rx_frames": q.rx_frames}
                      for q in self.queues],
            "error": None if self.error is None else str(self.error),
        }



class TapBridge:
    """A TAP device on top of a frontend: frames the kernel sends are sent on the vif
    (waiting for ring space: the TAP is read no faster than the ring drains), frames
    received on the vif go to the kernel — a kernel stack, possibly in another network
    namespace, runs on our frontend.  While the backend takes the TAP's frames as they
    are (sg, GSO, IPv6 checksum offload), each is read straight into TX pages
    (:meth:`_drain`); otherwise frames are read and adapted as for :meth:`NetFrontend.send`."""

    def __init__(self, frontend: NetFrontend, tap: TapDevice) -> None:
        """Bridge ``frontend`` and ``tap``; :meth:`start` begins."""
        self.frontend = frontend
        self.tap = tap
        self.refused = 0
        self.pump: TapPump = _BridgePump(tap, self._forward, self)
        self._fd_queue: dict[int, int] = {}

    def _drain(self, fd: int) -> bool | Awaitable[bool] | None:
        """Read the TAP fd ``fd`` straight into TX pages and stage each frame's slots
        (one push per queue at the end): no ``bytes`` object, no second copy.  Only while
        the backend takes every frame as the TAP gives it (sg, GSO, IPv6 checksum
        offload) and the device is connected; else None, and the pump reads frames.
        Each frame is read into the queue its fd's last frame went to, and copied to
        another queue when its flow hashes there.  Short of room for the largest
        frame, an awaitable that waits for it (the pump reads nothing meanwhile)."""
        fe = self.frontend
        f = fe.backend_features
        queues = fe.queues
        if fe.error is not None or not queues or queues[0].tx_client is None or not (
                f.get("sg") and f.get("gso-tcpv4") and f.get("gso-tcpv6")
                and f.get("ipv6-csum-offload")):
            return None
        stats, net = self.tap.stats, fe.net_stats
        count = len(queues)
        q = queues[self._fd_queue.get(fd, 0) % count]
        filled: set[_Queue] = set()
        try:
            for _ in range(self.pump.batch):
                if not fe._tx_space(q, _MAX_FRAME_PAGES + 1, _MAX_FRAME_PAGES):
                    fe._push_filled(filled)
                    return self._room_for(q)
                table = q.tx
                try:
                    n = table.read_frame(fd)
                except OSError as exc:
                    raise LocalError(f"TAP {self.tap.name}: read failed: {exc.strerror}") \
                        from None
                if n < 0:
                    break
                size = n - _VNET_HDR_SIZE
                meta = vnet_meta(table.hdr) if size >= 14 else None
                if meta is None:
                    stats["rx_refused"] += 1
                    continue
                stats["rx_frames"] += 1
                stats["rx_bytes"] += size
                blank, valid, kind, gso_size = meta
                if count > 1:
                    target = queues[frame_flow_hash(table.head(size)) % count]
                    if target is not q:  # another flow: copied there, read there next
                        self._fd_queue[fd] = target.index
                        frame = NetFrame(table.frame(size), blank, valid, kind, gso_size)
                        fe._push_filled(filled)
                        q = target
                        try:
                            if fe._send_ready([frame]) == 0:
                                return self._send_rest([frame])
                        except NetPeerError:
                            raise
                        except LocalError as exc:
                            self.refused += 1
                            log.debug("tap %s: frame not sent: %s", self.tap.name, exc)
                        continue
                table.commit(size, (NETTXF_csum_blank if blank else 0)
                             | (NETTXF_data_validated if valid else 0),
                             _gso_slot(kind, gso_size) if kind != GSO_NONE else None)
                filled.add(q)
                net["tx_packets"] += 1
                net["tx_bytes"] += size
                net["tx_gso"] += kind != GSO_NONE
        except NetPeerError:
            return False
        finally:
            fe._push_filled(filled)
        return True

    async def _room_for(self, q: _Queue) -> bool:
        """Wait until ``q`` has room for the largest frame (at most ``send_timeout``);
        False once the device failed."""
        fe = self.frontend
        try:
            async with asyncio.timeout(fe.config.send_timeout):
                while not await fe._tx_wait(q, _MAX_FRAME_PAGES + 1, _MAX_FRAME_PAGES):
                    pass
        except NetPeerError:
            return False
        except (LocalError, TimeoutError) as exc:  # the next read looks again
            log.debug("tap %s: no room: %s", self.tap.name, exc)
        return True

    def _forward(self, frames: list[NetFrame]) -> bool | Awaitable[bool]:
        """Send the frames of one TAP read pass (one ring push per queue) at once when
        they fit; else an awaitable that sends the rest as room comes (the pump reads
        nothing more meanwhile)."""
        fe = self.frontend
        try:
            out, refused = fe._adapt_many(frames)
            self.refused += refused
            k = fe._send_ready(out)
        except NetPeerError:
            return False
        except LocalError as exc:
            self.refused += 1
            log.debug("tap %s: frames not sent: %s", self.tap.name, exc)
            return True
        if k == len(out):
            return True
        return self._send_rest(out[k:])

    async def _send_rest(self, frames: list[NetFrame]) -> bool:
        try:
            await self.frontend._send_frames(frames)
        except NetPeerError:
            return False
        except (LocalError, TimeoutError) as exc:
            self.refused += 1
            log.debug("tap %s: frames not sent: %s", self.tap.name, exc)
        return True

    def start(self) -> None:
        """Deliver received frames to the TAP and read it, in the running loop."""
        self.frontend.receiver = self.tap.write
        self.pump.start()

    async def close(self) -> None:
        """Stop, detach from the frontend, close the TAP."""
        await self.pump.close()
        if self.frontend.receiver == self.tap.write:
            self.frontend.receiver = None


class _BridgePump(TapPump):
    """A :class:`~xenpv.drivers.tap.TapPump` that reads the TAP straight into the
    frontend's TX pages when it can (:meth:`TapBridge._drain`)."""

    def __init__(self, tap: TapDevice, forward: Callable[[list[NetFrame]],
                                                         bool | Awaitable[bool]],
                 bridge: TapBridge) -> None:
        super().__init__(tap, forward)
        self.bridge = bridge

    def _drain(self, fd: int) -> bool | Awaitable[bool]:
        done = self.bridge._drain(fd)
        return super()._drain(fd) if done is None else done

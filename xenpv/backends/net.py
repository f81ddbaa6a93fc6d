"""Net backend: serves netif frontends (vifs) and joins them to a userspace switch.

Theory of operation
-------------------
:class:`NetBackendDriver` is a :class:`~xenpv.xenbus.driver.BackendDriver` for one
``backend/vif/<fe>/<devid>`` directory (xen-protocols.md §7):

* before InitWait (``publish_features``) it advertises, as its :class:`NetConfig`
  allows, ``feature-sg``, ``feature-gso-tcpv4``, ``feature-gso-tcpv6``,
  ``feature-ipv6-csum-offload``, ``feature-rx-copy`` = 1 (``feature-rx-flip`` = 0),
  ``feature-split-event-channels``, ``multi-queue-max-queues``, ``feature-ctrl-ring`` and
  ``feature-multicast-control`` + ``feature-dynamic-multicast-control``;
* on connect it reads the frontend's keys strictly: ``request-rx-copy`` and
  ``feature-rx-notify`` are required (this backend only copies, and never polls the RX
  ring); ``feature-sg``, ``feature-gso-tcpv4``/``-v6``, ``feature-ipv6-csum-offload`` and
  ``feature-no-csum-offload`` say what the frontend can *receive*;
  ``multi-queue-num-queues`` (absent: 1; 0 or above what was offered: refused) and per
  queue ``tx-ring-ref``, ``rx-ring-ref`` and ``event-channel`` (or, split,
  ``event-channel-tx`` + ``event-channel-rx``), at the top level for one queue and under
  ``queue-K/`` for several.  Each ring is a
  :class:`~xenpv.drivers.ringchannel.BackChannel` (unsplit: the RX ring shares the TX
  ring's port) served by a :class:`~xenpv.drivers.ringservice.RingService`.

TX (:class:`NetTx`, frontend → backend): the ring service hands batches of slots, already
copied out of the shared page once (R1); a chain whose end has not arrived yet is kept
(privately) for the next batch.  Each chain is checked once
(:func:`~xenpv.protocols.netif.parse_tx_packet` plus: no empty fragment, the Ethernet
header in the first slot, multi-slot only with ``feature-sg``, GSO only of an offered
type).  The plain chains of a batch (no extra-info, one slot or scatter-gather, nothing
unusual) are accepted by one compiled pass, :func:`~xenpv.protocols.netif.scan_tx`,
which stops at the first other chain; that one goes through the checks above, so the
compiled pass never accepts more.  A bad chain is dropped, counted and answered
``NETIF_RSP_ERROR`` in every slot
(``NETIF_RSP_NULL`` in extra-info slots); more than ``fatal_slots`` slots or a fragment
crossing its page marks the frontend misbehaving (the queue stops and the device goes
Closing with an ``error`` node, R4).  Data is pulled with grant copies (no mapping is
ever held), the frame goes to the vif's *port* (a :class:`~.netswitch.SwitchPort` or
any callable), every slot is answered in the order taken.  Where the queue stages its
copies in own frames, the chains the scan accepted go through the compiled copy group of
:mod:`.nettx` (one ``copy_pieces`` call per group; the answers as whole slots for the
ring service's ``respond_slots``); the others through ``GrantCopy`` segments.

RX (:class:`NetRx`, backend → frontend): the RX ring's requests are the frontend's empty
pages, remembered in order.  A frame for the guest is first adapted to what the
frontend negotiated (GSO frames segmented in software for a frontend without that GSO
type or without ``feature-sg``; a blank checksum completed for a frontend without
checksum offload for that IP version; a frame needing more than one page dropped for a
frontend without ``feature-sg``), then copied into as many posted pages as it needs
(grant copies), with a GSO extra-info slot after the first when kept, each response
written at the ring index of the request it consumed (the slot identity rule).  Frames
wait in a backlog bounded in frames and bytes while pages are missing (beyond it they
are dropped and counted); if no frame could be delivered for ``stall_timeout`` seconds
the backlog is dropped and the carrier is off (frames dropped at once) until the
frontend posts pages again (hostile scenario 7).

Queue selection for RX is a flow hash (:func:`~xenpv.protocols.ethernet.flow_hash`;
compiled: :data:`xenpv.drivers.tap.frame_flow_hash`), so a flow stays in order — or, when the frontend set one up on the control ring
(``feature-ctrl-ring``, :class:`NetCtrl`), its Toeplitz hash, key and mapping table.

Multicast control (:class:`MulticastFilter`): while the frontend's
``request-multicast-control`` is 1 (watched while connected: the dynamic variant),
multicast frames reach the guest only for the addresses it added with dummy TX requests
carrying MCAST_ADD/MCAST_DEL extras (at most 64; broadcast always passes).

The toolstack's ``rate`` node (``BYTES,USECS``) is a credit limit on TX per queue: a
packet larger than the credit left waits (answered later, in order, by a timer at the
end of the window); each window adds ``BYTES`` of credit, up to a burst of
``max(BYTES, 128 KiB)``.  :class:`NetBackend` serves every vif of a backend domain and owns
the switches (one per ``bridge`` name) the vifs join.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno as _errno
import functools
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from xenpv.backends.netswitch import NetSwitch, SwitchPort
from xenpv.backends.nettx import tx_group
from xenpv.drivers.ringchannel import BackChannel, RingPlacement
from xenpv.drivers.ringservice import RingService
from xenpv.drivers.sharedport import share_port
from xenpv.drivers.tap import frame_flow_hash
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.base import (
    GrantCopy,
    GrantPtr,
    GrantTable,
    GuestFrames,
    LocalPtr,
    PieceCopies,
    Platform,
    SharedPages,
    copy_pieces_as_segments,
)
from xenpv.platforms.dispatch import PortDispatcher
from xenpv.protocols import ProtocolError
from xenpv.protocols.ethernet import (
    ETH_HLEN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NetFrame,
    complete_checksum,
    l4_info,
    segment_tcp,
    toeplitz,
    toeplitz_input,
)
from xenpv.protocols.layout import XEN_PAGE_SIZE
from xenpv.protocols.netif import (
    CTRL_REQUEST_STRUCT,
    CTRL_RESPONSE_STRUCT,
    CTRL_RING,
    FATAL_SKB_SLOTS_DEFAULT,
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    RX_REQUEST_STRUCT,
    RX_RESPONSE_STRUCT,
    RX_RING,
    SCAN_GSO_TCPV4,
    SCAN_GSO_TCPV6,
    TX_RESPONSE_STRUCT,
    TX_RING,
    XEN_NETIF_CTRL_HASH_ALGORITHM_NONE,
    XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ,
    XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW,
    XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER,
    XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED,
    XEN_NETIF_CTRL_STATUS_SUCCESS,
    XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS,
    XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE,
    XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM,
    XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS,
    XEN_NETIF_CTRL_TYPE_SET_HASH_KEY,
    XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING,
    XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_HASH,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
    XEN_NETIF_NR_SLOTS_MIN,
    GsoExtra,
    HashExtra,
    McastExtra,
    NetifFatalError,
    NetifPacketError,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    TxPacket,
    parse_tx_packet,
    scan_tx,
)
from xenpv.xenbus import keys as _keys
from xenpv.xenbus.driver import BackendDriver, PeerKeys
from xenpv.xenbus.watcher import BackendWatcher
from xenpv.xenstore.client import XenstoreClient as XenbusClient

#: What one batched grant copy carries at most, counted as data bytes plus
#: :data:`COPY_SEG_COST` per segment: packets of a ring pass are copied together up to
#: this, a larger packet alone.  The loopback daemon's messages are 128 KiB with their
#: headers (24 bytes per segment in a request, 4 in a reply): 120 KiB so counted fits.
COPY_BATCH = 120 << 10
COPY_SEG_COST = 32
#: Pages of own memory each direction of a queue stages its batched copies in, where the
#: platform gives the backend frames of its own (:class:`GuestFrames`): on the loopback
#: emulator a grant copy names such pages instead of carrying their bytes over the
#: daemon's socket.  A batch is cut when it does not fit any more.
STAGING_PAGES = 128

__all__ = [
    "MulticastFilter",
    "NetBackend",
    "NetBackendDriver",
    "NetConfig",
    "NetCtrl",
    "NetFeatures",
    "NetQueue",
    "NetRx",
    "NetTx",
    "NetVif",
    "read_queue_keys",
]

log = logging.getLogger(__name__)

_TX_RSP = TX_RESPONSE_STRUCT
_TX_ID = struct.Struct("<H")
_TX_NULL = TX_RESPONSE_STRUCT.pack(0, NETIF_RSP_NULL)
_RX_REQ = RX_REQUEST_STRUCT
_RX_RSP = RX_RESPONSE_STRUCT
_TX_SLOT = TX_RING.slot_size
_RX_SLOT = RX_RING.slot_size
_CTRL_SLOT = CTRL_RING.slot_size
_CTRL_REQ = CTRL_REQUEST_STRUCT
_CTRL_RSP = CTRL_RESPONSE_STRUCT
#: Longest Toeplitz key and largest queue mapping table (Linux netback's limits).
MAX_HASH_KEY = 40
MAX_HASH_MAPPING = 128
#: Hash types this backend computes (IPv4, IPv4+TCP, IPv6, IPv6+TCP).
HASH_TYPES = 0xF
#: Most multicast addresses a frontend may subscribe (Linux netback's limit).
MAX_MCAST = 64
#: Staged TX copy records a queue keeps for reuse (``NetTx._made``).
_MADE_KEPT = 16384
#: Staged RX copy records a queue keeps for reuse (``NetRx._made``): fewer than TX's,
#: whose records share the platform's cache of encodings.
_RX_MADE_KEPT = 4096
#: The most TX chain slots kept between batches (a chain, its extras and one more).
_MAX_PENDING_SLOTS = FATAL_SKB_SLOTS_DEFAULT + 8


@dataclass(frozen=True)
class NetConfig:
    """What a net backend offers and its bounds (host decisions, never the frontend's).

    ``max_slots``: data slots a TX packet may use (more: dropped); ``fatal_slots``: slots
    after the first beyond which the frontend is misbehaving.  ``backlog_frames`` and
    ``backlog_bytes`` bound the frames waiting for RX pages per queue;
    ``stall_timeout`` is how long they may wait without progress.  ``staging_pages``:
    own frames per queue and direction that batched copies are staged in where the
    platform has them (0: private buffers only).
    """

    sg: bool = True
    ctrl_ring: bool = True
    multicast_control: bool = True
    gso_tcpv4: bool = True
    gso_tcpv6: bool = True
    ipv6_csum: bool = True
    split_events: bool = True
    max_queues: int = 4
    max_slots: int = XEN_NETIF_NR_SLOTS_MIN
    fatal_slots: int = FATAL_SKB_SLOTS_DEFAULT
    backlog_frames: int = 256
    backlog_bytes: int = 4 << 20
    stall_timeout: float = 60.0
    staging_pages: int = STAGING_PAGES

    def __post_init__(self) -> None:
        if not 0 <= self.staging_pages <= 250:
            raise LocalError("staging_pages must be 0..250")
        if not 1 <= self.max_queues <= 64:
            raise LocalError("max_queues must be 1..64")
        if not 1 <= self.max_slots <= self.fatal_slots + 1 <= _MAX_PENDING_SLOTS - 6:
            raise LocalError("need 1 <= max_slots <= fatal_slots + 1 <= "
                             f"{_MAX_PENDING_SLOTS - 6}")
        if self.backlog_frames < 1 or self.backlog_bytes < XEN_PAGE_SIZE:
            raise LocalError("the RX backlog must hold at least one frame and one page")
        if self.stall_timeout <= 0:
            raise LocalError("stall_timeout must be positive")


@dataclass(frozen=True)
class NetFeatures:
    """What the frontend said it can receive (RX side of the negotiation)."""

    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    csum: bool = True
    ipv6_csum: bool = False

    def as_dict(self) -> dict[str, bool]:
        """For ``info``."""
        return {"sg": self.sg, "gso_tcpv4": self.gso_tcpv4, "gso_tcpv6": self.gso_tcpv6,
                "csum": self.csum, "ipv6_csum": self.ipv6_csum}


class MulticastFilter:
    """The multicast addresses a frontend subscribed (``feature-multicast-control``):
    while ``enabled`` (its ``request-multicast-control``), a multicast frame for the
    guest is delivered only if its destination was added; broadcast always is."""

    def __init__(self) -> None:
        """Empty and off."""
        self.enabled = False
        self.macs: set[bytes] = set()

    def change(self, extra: McastExtra) -> bool:
        """Apply an MCAST_ADD/DEL extra; False if refused (not a group address, full)."""
        mac = bytes(extra.addr)
        if not mac[0] & 1:
            return False
        if extra.type == XEN_NETIF_EXTRA_TYPE_MCAST_DEL:
            self.macs.discard(mac)
            return True
        if mac not in self.macs and len(self.macs) >= MAX_MCAST:
            return False
        self.macs.add(mac)
        return True

    def passes(self, dst: bytes) -> bool:
        """Whether a frame to ``dst`` may be delivered."""
        if not self.enabled or not dst[0] & 1 or dst == b"\xff" * 6:
            return True
        return dst in self.macs


class _NetPeerError(PeerError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EINVAL


# --------------------------------------------------------------------------- staging


class _Staging:
    """Own frames that one direction of a queue stages its batched copies in.

    The frames are allocated at the first copy (a queue that carries nothing holds
    none).  Each copied piece (at most a page, as a grant copy segment is) is placed so
    that it does not cross a page of the staging area (each guest frame may be its own
    memory): one after the other, each page taken in order; a whole page that comes with a
    key (the TX side gives the frontend's grant reference) goes to the first page free in
    this batch from ``key`` modulo the pages on, so that the same guest page mostly lands
    on the same staging page and its copy record serves again (``NetTx._made``).
    :meth:`reset` starts again once a batch is done.  Grant copies never map anything of
    the guest: the guest side stays a grant."""

    def __init__(self, grants: GuestFrames, pages: int) -> None:
        self._grants: GuestFrames | None = grants
        self._pages = pages
        self.frames: SharedPages | None = None
        self.mem = memoryview(b"")
        self.size = 0
        #: the layout and the TX copy group over the frames (:mod:`.nettx`), made with them
        self.group: Any = None

    @classmethod
    def for_platform(cls, grants: GrantTable, pages: int) -> _Staging | None:
        """Staging of ``pages`` own frames, or None where the platform has no frames of
        its own to give: copies then go through private buffers."""
        if pages <= 0 or not isinstance(grants, GuestFrames):
            return None
        return cls(grants, pages)

    def _ready(self) -> bool:
        if self.frames is None and self._grants is not None:
            try:
                self.frames = self._grants.alloc_frames(self._pages)
            except (PlatformError, LocalError) as exc:  # none left: private buffers
                log.debug("no staging frames (%s): copies use private buffers", exc)
                self._grants = None
                return False
            self.mem = self.frames.mem
            self.size = len(self.mem)
            pages = min(self._pages, self.size // XEN_PAGE_SIZE)
            if pages < 1:
                self._grants = None
                return False
            self.group = tx_group(pages)
        return self.frames is not None and self._grants is not None

    def _layout(self, lengths: Sequence[int], keys: Sequence[int | None] | None,
                commit: bool) -> list[int] | None:
        """Where pieces of ``lengths`` (``keys[i]``: the key of a whole page, or None) go
        after what is placed, or None if they do not all fit; taken only with
        ``commit`` (the group's layout)."""
        layout: list[int] | None = self.group.layout(lengths, keys, commit)
        return layout

    def state(self) -> tuple[int, int, int, bytes]:
        """The layout's state (see :meth:`.nettx.TxGroupReference.state`; for tests)."""
        state: tuple[int, int, int, bytes] = self.group.state()
        return state

    def fits(self, lengths: Sequence[int], keys: Sequence[int | None] | None = None) -> bool:
        """Whether pieces of ``lengths`` (``keys``: as for :meth:`place`) all fit after
        what is placed (always, where there is no staging: the private buffers take
        anything)."""
        return not self._ready() or self._layout(lengths, keys, False) is not None

    def place(self, lengths: Sequence[int],
              keys: Sequence[int | None] | None = None) -> list[int] | None:
        """Offsets for pieces of ``lengths`` (each at most a page; ``keys``: see the
        class), or None (nothing placed) if they do not all fit or there is no
        staging."""
        if not self._ready():
            return None
        return self._layout(lengths, keys, True)

    @property
    def ready(self) -> bool:
        """Whether there is staging (allocated at the first use; None left: never)."""
        return self._ready()

    def reset(self) -> None:
        """The batch is done: place from the start again."""
        if self.group is not None:
            self.group.reset()

    def close(self) -> None:
        """Give the frames back (idempotent); nothing is staged afterwards."""
        grants, self._grants = self._grants, None
        if grants is not None and self.frames is not None:
            with contextlib.suppress(PlatformError, LocalError):
                grants.free_frames(self.frames)


# --------------------------------------------------------------------------- TX


class NetTx:
    """The TX ring handler of one queue (sans-IO apart from grant copies); see the
    module docstring.  ``port`` takes every accepted frame."""

    def __init__(self, platform: Platform, frontend_domid: int, config: NetConfig,
                 port: Callable[[NetFrame], object],
                 rate: tuple[int, int] | None = None,
                 mcast: MulticastFilter | None = None) -> None:
        """Check chains of ``frontend_domid`` against ``config``; ``rate`` is the credit
        limit (bytes, microseconds) of the toolstack's ``rate`` node, or None;
        ``mcast`` takes the frontend's multicast filter requests (None: refused)."""
        self.mcast = mcast
        self.grants = platform.grants
        self.domid = frontend_domid
        self.config = config
        self.port = port
        self._pending = b""
        self.stats = dict.fromkeys(("packets", "bytes", "dropped", "fatal", "copy_errors",
                                    "port_errors", "gso", "csum_blank", "rate_limited",
                                    "mcast_requests", "copies"), 0)
        #: Why the last packet was dropped (diagnostics).
        self.last_drop = ""
        #: Answers given later (``rate``): the queue's :meth:`RingService.respond`.
        self.respond: Callable[[list[bytes]], int] | None = None
        #: The queue's :meth:`RingService.respond_slots`: a pass's answers as whole slots
        #: (None: :meth:`handle` returns them as a list).
        self.respond_slots: Callable[[bytearray, int], None] | None = None
        #: the answers of this pass laid out as whole slots, in slot order
        self._slots = bytearray()
        self.rate = rate
        self.credit = rate[0] if rate else 0
        self._window = -1.0  # the first window starts with the first packet
        self._held: deque[tuple[TxPacket | None, bytes | list[bytes]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._stage = _Staging.for_platform(self.grants, config.staging_pages)
        #: the platform's compact copy, for the grant table ``_copy_for`` (checked once
        #: per table: a protocol check costs per call)
        self._copy_for: GrantTable | None = None
        self._copy_pieces: Callable[[int, Any, int, Any], Sequence[int]] = \
            functools.partial(copy_pieces_as_segments, self.grants)
        #: Staged copy records by (gref, offset, staging place, length) (bounded).
        self._made: dict[tuple[int, int, int, int], GrantCopy] = {}
        #: The GSO types the compiled scan may accept (those offered).
        self._gso_mask = (SCAN_GSO_TCPV4 if config.gso_tcpv4 else 0) | \
            (SCAN_GSO_TCPV6 if config.gso_tcpv6 else 0)

    def handle(self, batch: memoryview, count: int) -> list[bytes]:
        """Take ``count`` slots; answer every complete chain (in order): through
        :attr:`respond_slots` where set (returning nothing), else returned."""
        buf = self._pending + bytes(batch[: count * _TX_SLOT])
        n = len(buf) // _TX_SLOT
        view = memoryview(buf)
        out: list[bytes] = []
        group: list[_TxCopy] = []  # packets whose data is copied in one call
        group_bytes = pos = 0
        try:
            while pos < n:
                if self.rate is None:  # plain chains of the pass: one compiled scan
                    pos, group_bytes = self._take_plain(view, pos, n, group, group_bytes,
                                                        out)
                    if pos >= n:
                        break
                    self._flush_group(out)  # the chain below places in the same staging
                rest = view[pos * _TX_SLOT:]
                try:
                    pkt = parse_tx_packet(rest, n - pos, max_slots=self.config.max_slots,
                                          fatal_slots=self.config.fatal_slots)
                except NetifPacketError as exc:
                    self._drop(str(exc))
                    out += self._copy_group(group)  # answers stay in slot order
                    group_bytes = 0
                    out += _error_responses(rest, exc.slots, len(exc.ids))
                    pos += exc.slots
                    continue
                except NetifFatalError:
                    self.stats["fatal"] += 1
                    self._pending = b""
                    self._copy_group(group)  # the packets before it still go out
                    raise
                if pkt is None:
                    break
                if self.rate is None:
                    if group and any(isinstance(e, McastExtra) for e in pkt.extras):
                        out += self._copy_group(group)  # the filter changes after them
                        group_bytes = 0
                    pieces = [f.length for f in pkt.fragments if f.length]
                    cost = pkt.size + COPY_SEG_COST * len(pieces)
                    if group and (group_bytes + cost > COPY_BATCH or
                                  (self._stage is not None and
                                   not self._stage.fits(pieces))):
                        out += self._copy_group(group)  # before this packet is placed
                        group_bytes = 0
                    prepared = self._prepare(pkt, rest)
                    if isinstance(prepared, list):  # answered without a copy
                        out += self._copy_group(group)
                        group_bytes = 0
                        out += prepared
                    else:
                        group.append(prepared)
                        group_bytes += cost
                else:  # answered in order, as credit allows
                    self._held.append((pkt, bytes(rest[:pkt.slots * _TX_SLOT])))
                pos += pkt.slots
            out += self._copy_group(group)
            self._flush_group(out)
        except NetifFatalError:
            self._flush_group(out)  # the packets before it still go out
            self._slots = bytearray()
            raise
        self._pending = buf[pos * _TX_SLOT:]
        if len(self._pending) > _MAX_PENDING_SLOTS * _TX_SLOT:  # parse bounds this
            self._slots = bytearray()
            raise ProtocolError("TX chain longer than any allowed")
        if self.rate is not None:
            if out:  # dropped chains keep their place behind held packets
                self._held.append((None, out))
            return self._release()
        return self._answers(out)

    def _answers(self, out: list[bytes]) -> list[bytes]:
        """The pass's answers: the slots laid out (then ``out``, answered after them) go
        to :attr:`respond_slots` where set; else all of them are returned."""
        slots = self._slots
        if not slots:
            return out
        self._slots = bytearray()
        if out:
            slots += b"".join(r.ljust(_TX_SLOT, b"\0") for r in out)
        if self.respond_slots is not None:
            self.respond_slots(slots, len(slots) // _TX_SLOT)
            return []
        return [bytes(slots[k:k + _TX_RSP.size]) for k in range(0, len(slots), _TX_SLOT)]

    # -- credit limit (the toolstack's rate node: bytes per microseconds)
    def _replenish(self) -> None:
        assert self.rate is not None
        nbytes, usecs = self.rate
        now = time.monotonic()
        if self._window < 0:
            self._window = now
        elif now >= self._window + usecs / 1e6:
            self._window = now
            burst = max(nbytes, 128 << 10)  # a large packet must pass eventually
            self.credit = min(self.credit + nbytes, burst)

    def _release(self) -> list[bytes]:
        """Serve held packets in order while the credit lasts; arm the timer if not."""
        out: list[bytes] = []
        self._replenish()
        while self._held:
            pkt, data = self._held[0]
            if pkt is None:
                assert isinstance(data, list)
                out += data
            else:
                assert isinstance(data, bytes)
                if pkt.size > self.credit:
                    self.stats["rate_limited"] += 1
                    self._arm()
                    break
                self.credit -= pkt.size
                out += self._serve(pkt, memoryview(data))
            self._held.popleft()
        return out

    def _arm(self) -> None:
        if self._timer is not None or self.closed or self.rate is None:
            return
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            due = self._window + self.rate[1] / 1e6 - time.monotonic()
            self._timer = loop.call_later(max(due, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        out = self._release()
        if out and self.respond is not None:
            with contextlib.suppress(LocalError, PeerError):
                self.respond(out)

    @property
    def held(self) -> int:
        """Packets waiting for credit."""
        return sum(1 for p, _d in self._held if p is not None)

    def close(self) -> None:
        """Stop the credit timer; held packets are never answered."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held.clear()
        stage, self._stage = self._stage, None
        if stage is not None:
            stage.close()

    def _drop(self, why: str) -> None:
        self.stats["dropped"] += 1
        self.last_drop = why
        log.debug("dom%d tx: packet dropped: %s", self.domid, why)

    def _check(self, pkt: TxPacket) -> tuple[int, int] | str:
        """(gso type, gso size) of an acceptable packet, or why it is not."""
        frags = pkt.fragments
        if pkt.size < ETH_HLEN:
            return f"runt packet of {pkt.size} bytes"
        if frags[0].length < ETH_HLEN:
            return f"first slot holds {frags[0].length} bytes, less than the Ethernet header"
        if any(f.length == 0 for f in frags[1:]):
            return "empty fragment"
        if len(frags) > 1 and not self.config.sg:
            return "multi-slot packet without feature-sg"
        gso_type, gso_size = GSO_NONE, 0
        for extra in pkt.extras:
            if isinstance(extra, GsoExtra):
                offered = (self.config.gso_tcpv4 if extra.gso_type == GSO_TCPV4
                           else self.config.gso_tcpv6)
                if not offered:
                    return f"GSO type {extra.gso_type} not offered"
                gso_type, gso_size = extra.gso_type, extra.size
            elif extra.type != XEN_NETIF_EXTRA_TYPE_GSO:
                return f"extra-info type {extra.type} not offered"
        return gso_type, gso_size

    def _filter_request(self, pkt: TxPacket) -> list[bytes] | None:
        """Answers to a multicast filter request (a dummy packet with MCAST extras), or
        None if ``pkt`` is not one."""
        changes = [e for e in pkt.extras if isinstance(e, McastExtra)]
        if not changes:
            return None
        self.stats["mcast_requests"] += 1
        ok = self.mcast is not None and all(self.mcast.change(e) for e in changes)
        status = NETIF_RSP_OKAY if ok else NETIF_RSP_ERROR
        out = [_TX_RSP.pack(pkt.requests[0].id, status)]
        out += [_TX_RSP.pack(0, NETIF_RSP_NULL)] * len(pkt.extras)
        out += [_TX_RSP.pack(r.id, status) for r in pkt.requests[1:]]
        return out

    def _serve(self, pkt: TxPacket, slots: memoryview) -> list[bytes]:
        prepared = self._prepare(pkt, slots)
        return prepared if isinstance(prepared, list) else self._copy_group([prepared])

    def _prepare(self, pkt: TxPacket, slots: memoryview) -> list[bytes] | _TxCopy:
        """The answers to a packet served without a copy (a filter request, a dropped
        chain), or the copy that brings its data in."""
        answered = self._filter_request(pkt)
        if answered is not None:
            return answered
        checked = self._check(pkt)
        if isinstance(checked, str):
            self._drop(checked)
            return _error_responses(slots, pkt.slots, len(pkt.requests))
        frags = [(f.gref, f.offset, f.length) for f in pkt.fragments if f.length]
        return self._place(pkt.flags, pkt.size, tuple(r.id for r in pkt.requests),
                           len(pkt.extras), frags, slots, checked)

    def _take_plain(self, view: memoryview, pos: int, n: int, group: list[_TxCopy],
                    group_bytes: int, out: list[bytes]) -> tuple[int, int]:
        """Add the plain chains from slot ``pos`` on (:func:`scan_tx`, compiled) to the
        staging's TX group (:mod:`.nettx`), or where there is no staging to ``group``
        (copying the group first when full, answers to ``out``); the slot after them and
        ``group``'s bytes."""
        config = self.config
        stage = self._stage
        chains = scan_tx(view[pos * _TX_SLOT:], n - pos, max_slots=config.max_slots,
                         fatal_slots=config.fatal_slots, sg=config.sg, gso=self._gso_mask)
        if not chains:
            return pos, group_bytes
        if stage is not None and stage.ready:
            fast = stage.group
            if group:  # it shares the staging: copied first
                out += self._copy_group(group)
                group_bytes = 0
            for chain in chains:
                frags = chain[4]
                if fast.chains and (fast.count + len(frags)) * COPY_SEG_COST > COPY_BATCH:
                    self._flush_group(out)
                if not fast.add(chain):
                    self._flush_group(out)  # full: copy what it holds first
                    if not fast.add(chain):  # larger than the whole area: alone, privately
                        flags, size, used, ids, _f, gso = chain
                        group.append(self._place(flags, size, ids, used - len(ids), frags,
                                                 view[pos * _TX_SLOT:], gso, None,
                                                 placed=True))
                        out += self._copy_group(group)
                pos += chain[2]
            return pos, group_bytes
        for flags, size, used, ids, frags, gso in chains:
            at = None
            if stage is not None:
                lengths = [f[2] for f in frags]
                keys = [f[0] if not f[1] else None for f in frags]  # whole pages by gref
                at = stage.place(lengths, keys)
                if at is None and group and stage.ready:  # full: copy what it holds first
                    out += self._copy_group(group)
                    group_bytes = 0
                    at = stage.place(lengths, keys)
            # a staged packet's bytes do not travel with the copy: only its segments count
            cost = COPY_SEG_COST * len(frags) + (size if at is None else 0)
            if group and group_bytes + cost > COPY_BATCH:
                out += self._copy_group(group)  # it starts the staging area again
                group_bytes = 0
                if at is not None:
                    assert stage is not None
                    at = stage.place(lengths, keys)
            group.append(self._place(flags, size, ids, used - len(ids), frags,
                                     view[pos * _TX_SLOT:], gso, at, placed=True))
            group_bytes += cost
            pos += used
        return pos, group_bytes

    def _flush_group(self, out: list[bytes]) -> None:
        """Copy the staging's TX group in one call (:func:`copy_pieces`), hand each
        frame to the port and lay the answers out after those of ``out`` (a chain whose
        copy failed is dropped alone)."""
        stage = self._stage
        if stage is None or stage.group is None or not stage.group.chains:
            return
        fast = stage.group
        self.stats["copies"] += 1
        try:
            if self._copy_for is not self.grants:
                self._copy_for = grants = self.grants
                self._copy_pieces = (grants.copy_pieces if isinstance(grants, PieceCopies)
                                     else functools.partial(copy_pieces_as_segments, grants))
            statuses = self._copy_pieces(self.domid, fast.pieces, fast.count, stage.mem)
        except (PlatformError, LocalError) as exc:
            log.debug("grant copy of %d pieces failed: %s", fast.count, exc)
            statuses = array.array("i", [-1]) * fast.count
        frames, answers = fast.finish(stage.mem, statuses)
        stats, port = self.stats, self.port
        for data, flags, gso_type, gso_size in frames:
            if data is None:
                stats["copy_errors"] += 1
                self._drop("a fragment's grant could not be copied")
                continue
            frame = NetFrame(data, csum_blank=bool(flags & NETTXF_csum_blank),
                             data_validated=bool(flags & NETTXF_data_validated),
                             gso_type=gso_type, gso_size=gso_size)
            stats["packets"] += 1
            stats["bytes"] += len(data)
            stats["gso"] += gso_type != GSO_NONE
            stats["csum_blank"] += frame.csum_blank
            try:
                port(frame)
            except (LocalError, PeerError, PlatformError) as exc:
                stats["port_errors"] += 1
                log.debug("dom%d tx: the port refused a frame: %s", self.domid, exc)
        if out:  # answered before these: laid out first
            self._slots += b"".join(r.ljust(_TX_SLOT, b"\0") for r in out)
            out.clear()
        self._slots += answers

    def _place(self, flags: int, size: int, ids: tuple[int, ...], extras: int,
               frags: Sequence[tuple[int, int, int]], slots: memoryview,
               gso: tuple[int, int], at: list[int] | None = None, *,
               placed: bool = False) -> _TxCopy:
        """The copy that brings in a checked packet's (gref, offset, length) fragments:
        into staging frames where they fit, else into a private buffer (``placed``:
        the caller placed them already, at ``at``)."""
        if not placed and self._stage is not None:
            at = self._stage.place([f[2] for f in frags])
        domid = self.domid
        if at is not None:  # staged in own frames: the copy carries no bytes (loopback)
            assert self._stage is not None
            mem, made = self._stage.mem, self._made
            segs, places = [], []
            for (g, o, length), a in zip(frags, at, strict=True):
                # the frontend's pages and the staging places recur: the same records
                # (whose encoding the platform may keep) serve again
                seg = made.get((g, o, a, length))
                if seg is None:
                    if len(made) >= _MADE_KEPT:
                        made.clear()
                    seg = made[g, o, a, length] = GrantCopy(GrantPtr(domid, g, o),
                                                           LocalPtr(mem, a), length)
                segs.append(seg)
                places.append((a, length))
            return _TxCopy(flags, size, ids, extras, slots, gso, None, segs, mem, places)
        data = bytearray(size)
        segs, pos = [], 0
        for g, o, length in frags:
            segs.append(GrantCopy(GrantPtr(domid, g, o), LocalPtr(data, pos), length))
            pos += length
        return _TxCopy(flags, size, ids, extras, slots, gso, data, segs)

    def _copy_group(self, group: list[_TxCopy]) -> list[bytes]:
        """Copy the data of every packet of ``group`` in one call, hand each to the port
        and answer them in order (a packet whose copy failed is dropped alone); empties
        ``group``."""
        if not group:
            return []
        out: list[bytes] = []
        self.stats["copies"] += 1
        for p, failed in zip(group, _copy_batch(self.grants, group), strict=True):
            out += self._finish(p, failed)
        group.clear()
        if self._stage is not None:
            self._stage.reset()
        return out

    def _finish(self, p: _TxCopy, failed: bool) -> list[bytes]:
        ids = p.ids
        if failed:
            self.stats["copy_errors"] += 1
            self._drop("a fragment's grant could not be copied")
            return _error_responses(p.slots, len(ids) + p.extras, len(ids))
        flags = p.flags
        frame = NetFrame(_gathered(p), csum_blank=bool(flags & NETTXF_csum_blank),
                         data_validated=bool(flags & NETTXF_data_validated),
                         gso_type=p.gso[0], gso_size=p.gso[1])
        self.stats["packets"] += 1
        self.stats["bytes"] += p.size
        self.stats["gso"] += frame.gso_type != GSO_NONE
        self.stats["csum_blank"] += frame.csum_blank
        try:
            self.port(frame)
        except (LocalError, PeerError, PlatformError) as exc:
            self.stats["port_errors"] += 1
            log.debug("dom%d tx: the port refused a frame: %s", self.domid, exc)
        if len(ids) == 1 and not p.extras:
            return [_TX_RSP.pack(ids[0], NETIF_RSP_OKAY)]
        out = [_TX_RSP.pack(ids[0], NETIF_RSP_OKAY)]
        out += [_TX_NULL] * p.extras
        out += [_TX_RSP.pack(i, NETIF_RSP_OKAY) for i in ids[1:]]
        return out


def _copy_batch(grants: GrantTable, group: Sequence[_TxCopy | _RxCopy]) -> list[bool]:
    """One grant-copy call for the segments of every item of ``group``; whether each
    item's copy failed (all of them if the call itself failed)."""
    segs = [s for c in group for s in c.segs]
    try:
        statuses = grants.copy(segs)
    except (PlatformError, LocalError) as exc:
        log.debug("grant copy of %d segments failed: %s", len(segs), exc)
        statuses = [-1] * len(segs)
    failed: list[bool] = []
    k = 0
    for c in group:
        failed.append(any(statuses[k:k + len(c.segs)]))
        k += len(c.segs)
    return failed


class _RxCopy(NamedTuple):
    """A frame for the guest and the posted pages it took: its (offset, length) chunks,
    extra-info records, the (id, gref) of its data pages and the copies into them."""

    frame: NetFrame
    chunks: list[tuple[int, int]]
    extras: list[bytes]
    data_reqs: list[tuple[int, int]]
    segs: list[GrantCopy]


class _TxCopy(NamedTuple):
    """A checked TX packet waiting for its data: its first slot's flags, its size, the
    ids of its data slots, how many extra-info slots follow the first, the slots it
    used (for error answers), its (GSO type, GSO size), its private buffer (None:
    staged, the copies' destinations hold it) and the grant copies that fill it."""

    flags: int
    size: int
    ids: tuple[int, ...]
    extras: int
    slots: memoryview
    gso: tuple[int, int]
    data: bytearray | None
    segs: list[GrantCopy]
    #: staged: the staging memory and where each piece is in it, (offset, length)
    staging: memoryview | None = None
    places: list[tuple[int, int]] | None = None


def _gathered(p: _TxCopy) -> bytes:
    """The packet's bytes once its copies are done."""
    if p.data is not None:
        return bytes(p.data)
    mem, places = p.staging, p.places
    if mem is None or places is None:  # where each piece is: from the copies
        first = p.segs[0].dest
        assert isinstance(first, LocalPtr)
        mem = memoryview(first.buffer)
        places = []
        for s in p.segs:
            assert isinstance(s.dest, LocalPtr) and s.dest.buffer is first.buffer
            places.append((s.dest.offset, s.length))
    start = pos = places[0][0]
    for at, n in places:  # placed in order without gaps: one slice
        if at != pos:
            break
        pos += n
    else:
        if pos - start == p.size:
            return bytes(mem[start:pos])
    return b"".join([mem[at:at + n] for at, n in places])


def _rx_flags(frame: NetFrame) -> int:
    """The checksum flags of a frame's first RX response."""
    if frame.csum_blank:
        return NETRXF_csum_blank | NETRXF_data_validated
    return NETRXF_data_validated if frame.data_validated else 0


def _chunks(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the page-sized pieces a frame of ``size`` bytes fills posted
    pages with."""
    return [(off, min(XEN_PAGE_SIZE, size - off)) for off in range(0, size, XEN_PAGE_SIZE)]


def _error_responses(slots: memoryview, used: int, data_slots: int) -> list[bytes]:
    """ERROR for every data slot of a dropped chain, NULL for its extra-info slots
    (which follow the first)."""
    extras = used - data_slots
    out = []
    for j in range(used):
        if 1 <= j <= extras:
            out.append(_TX_RSP.pack(0, NETIF_RSP_NULL))
        else:
            out.append(_TX_RSP.pack(_TX_ID.unpack_from(slots, j * _TX_SLOT + 8)[0],
                                    NETIF_RSP_ERROR))
    return out


# --------------------------------------------------------------------------- RX


class NetRx:
    """The RX ring handler of one queue: posted pages in, frames out; see the module
    docstring.  ``respond_slots`` is set to the queue's
    :meth:`RingService.respond_slots`."""

    def __init__(self, platform: Platform, frontend_domid: int, config: NetConfig,
                 features: NetFeatures, mcast: MulticastFilter | None = None) -> None:
        """Deliver to ``frontend_domid`` as ``features`` (and ``mcast``) allow."""
        self.mcast = mcast
        self.grants = platform.grants
        self.domid = frontend_domid
        self.config = config
        self.features = features
        self.respond_slots: Callable[[bytearray, int], None] | None = None
        self.posted: deque[tuple[int, int]] = deque()
        self.backlog: deque[tuple[NetFrame, int]] = deque()
        self.backlog_bytes = 0
        self.carrier = True
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None  # a push due in this loop iteration
        self._progress = time.monotonic()
        self._stage = _Staging.for_platform(self.grants, config.staging_pages)
        #: Staged copy records by (staging place, gref, length) (bounded).
        self._made: dict[tuple[int, int, int], GrantCopy] = {}
        self._out = bytearray()  # the responses of a pass, as whole slots
        #: Backlog bytes that are sent at once rather than at the end of the loop
        #: iteration: a copy call's worth (staged frames carry no bytes: what the
        #: staging holds).
        self._push_at = COPY_BATCH if self._stage is None else \
            max(COPY_BATCH, config.staging_pages * XEN_PAGE_SIZE)
        self.stats = dict.fromkeys(("packets", "bytes", "dropped", "backlog_full",
                                    "too_big", "segmented", "csum_completed",
                                    "copy_errors", "stalls", "carrier_drops",
                                    "unparseable", "mcast_filtered", "copies"), 0)

    # -- ring side
    def handle(self, batch: memoryview, count: int) -> list[bytes]:
        """Remember ``count`` posted pages; deliver what waited for them (answered here,
        as whole slots: nothing is returned)."""
        self.posted.extend(_RX_REQ.iter_unpack(batch[:count * _RX_SLOT]))
        if count and not self.carrier:
            self.carrier = True
        self._send()
        return []

    # -- frames
    def deliver(self, frame: NetFrame, rss: tuple[int, int] | None = None) -> None:
        """Queue a frame for the guest (adapted to its features) and send what fits;
        ``rss`` (hash type mask, value) goes with it in a HASH extra-info slot."""
        if self.closed:
            return
        if not self.carrier:
            self.stats["carrier_drops"] += 1
            return
        if self.mcast is not None and not self.mcast.passes(frame.dst):
            self.stats["mcast_filtered"] += 1
            return
        size = len(frame.data)
        if rss is None and frame.gso_type == GSO_NONE and frame.rss_hash is None and \
                0 < size <= XEN_PAGE_SIZE and (not frame.csum_blank or self._csum_ok(frame)):
            # the common small frame: nothing to adapt, one slot
            if len(self.backlog) >= self.config.backlog_frames or \
                    self.backlog_bytes + size > self.config.backlog_bytes:
                self.stats["backlog_full"] += 1
                self.stats["dropped"] += 1
            else:
                self.backlog.append((frame, 1))
                self.backlog_bytes += size
            self._due()
            return
        for f in self._adapt(frame):
            if rss is not None:
                f = replace(f, rss_type=rss[0], rss_hash=rss[1])
            need = self._slots(f)
            if len(self.backlog) >= self.config.backlog_frames or \
                    self.backlog_bytes + len(f.data) > self.config.backlog_bytes:
                self.stats["backlog_full"] += 1
                self.stats["dropped"] += 1
                continue
            self.backlog.append((f, need))
            self.backlog_bytes += len(f.data)
        self._due()

    def _due(self) -> None:
        """Send the backlog now, or at the end of this loop iteration (what else is
        delivered in it goes in the same copy call)."""
        if self._soon is not None and self.backlog_bytes < self._push_at:
            return  # a push is due in this loop iteration: copied together with it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self.backlog_bytes >= self._push_at:
            self._push()
        else:  # frames delivered in this iteration (a TX ring pass) go in one copy
            self._soon = loop.call_soon(self._push)

    def _push(self) -> None:
        """Send what fits of the backlog (answers to the ring) and watch for a stall."""
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if self.closed:
            return
        self._send()
        if self.backlog:
            self._arm()

    def _send(self) -> None:
        """Copy what fits of the backlog into posted pages and answer their slots."""
        out = self._out
        out.clear()
        self._drain(out)
        if out and self.respond_slots is not None:
            with contextlib.suppress(LocalError, PeerError):
                self.respond_slots(out, len(out) // _RX_SLOT)

    def _adapt(self, frame: NetFrame) -> list[NetFrame]:
        f = self.features
        frames = [frame]
        if frame.gso_type != GSO_NONE:
            can = f.sg and (f.gso_tcpv4 if frame.gso_type == GSO_TCPV4 else
                            f.gso_tcpv6 if frame.gso_type == GSO_TCPV6 else False)
            if not can:
                try:
                    frames = segment_tcp(frame)
                except LocalError:
                    self.stats["unparseable"] += 1
                    self.stats["dropped"] += 1
                    return []
                self.stats["segmented"] += 1
        out = []
        for fr in frames:
            if fr.csum_blank:
                if not self._csum_ok(fr):
                    done = complete_checksum(fr)
                    if done is None:
                        self.stats["unparseable"] += 1
                        self.stats["dropped"] += 1
                        continue
                    self.stats["csum_completed"] += 1
                    fr = done
            if (len(fr.data) > XEN_PAGE_SIZE and not f.sg) or \
                    len(fr.data) > XEN_NETIF_NR_SLOTS_MIN * XEN_PAGE_SIZE or not fr.data:
                self.stats["too_big"] += 1
                self.stats["dropped"] += 1
                continue
            out.append(fr)
        return out

    def _csum_ok(self, frame: NetFrame) -> bool:
        """Whether the frontend takes ``frame``'s blank checksum as it is (its headers
        located, offload negotiated for its IP version)."""
        info = l4_info(frame.data)
        f = self.features
        return info is not None and (f.ipv6_csum if info.version == 6 else f.csum)

    @staticmethod
    def _extras(frame: NetFrame) -> list[bytes]:
        """The extra-info records that follow the first slot (chained by MORE), each
        padded to a whole slot."""
        out: list[GsoExtra | HashExtra] = []
        if frame.gso_type != GSO_NONE:
            out.append(GsoExtra(XEN_NETIF_EXTRA_TYPE_GSO, 0, frame.gso_size, frame.gso_type,
                                0))
        if frame.rss_hash is not None and frame.rss_type:
            out.append(HashExtra(XEN_NETIF_EXTRA_TYPE_HASH, 0, frame.rss_type.bit_length() - 1,
                                 XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ, frame.rss_hash))
        return [replace(e, flags=XEN_NETIF_EXTRA_FLAG_MORE if k < len(out) - 1 else 0).pack()
                .ljust(_RX_SLOT, b"\0") for k, e in enumerate(out)]

    @classmethod
    def _slots(cls, frame: NetFrame) -> int:
        data_slots = -(-len(frame.data) // XEN_PAGE_SIZE)
        return data_slots + (frame.gso_type != GSO_NONE) + \
            (frame.rss_hash is not None and frame.rss_type != 0)

    def _drain(self, out: bytearray) -> None:
        """Claim posted pages for the backlog's frames in order while they last and copy
        them in, one copy call per batch (cut at ``COPY_BATCH`` or a full staging
        area); their responses, in ring order, are added to ``out`` as whole slots."""
        group: list[_RxCopy | tuple[int, int, int]] = []  # frames copied in one call
        segs: list[GrantCopy] = []  # their copies, in order
        group_bytes = 0
        backlog, posted, stage = self.backlog, self.posted, self._stage
        while backlog and backlog[0][1] <= len(posted):
            frame, need = backlog.popleft()
            data = frame.data
            size = len(data)
            self.backlog_bytes -= size
            self._progress = time.monotonic()
            if need == 1:  # one page, no extra-info: the common small frame
                cost = size + COPY_SEG_COST
                if group and group_bytes + cost > COPY_BATCH:
                    self._fill(group, segs, out)
                    group_bytes = 0
                at = stage.place([size]) if stage is not None else None
                if at is None and group and stage is not None and stage.ready:
                    self._fill(group, segs, out)  # the staging is full: copy what it has
                    group_bytes = 0
                    at = stage.place([size])
                rid, gref = posted.popleft()
                if at is not None:  # staged: the copy carries no bytes (loopback)
                    assert stage is not None
                    a = at[0]
                    stage.mem[a:a + size] = data
                    segs.append(self._staged_copy(a, gref, size))
                else:
                    segs.append(GrantCopy(LocalPtr(data, 0), GrantPtr(self.domid, gref, 0),
                                          size))
                group.append((rid, _rx_flags(frame), size))
                group_bytes += cost
                continue
            chunks = _chunks(size)
            lengths = [n for _o, n in chunks]
            # the grant of each data page (the first, then after the extra-info slots)
            extras = need - len(chunks)
            keys: list[int | None] = [posted[0][1]]
            keys += [posted[k + extras][1] for k in range(1, len(chunks))]
            staged = stage is not None and stage.ready
            # staged, the bytes do not travel: only the segments count against the batch
            cost = COPY_SEG_COST * len(chunks) + (0 if staged else size)
            if group and (group_bytes + cost > COPY_BATCH or (
                    stage is not None and not stage.fits(lengths, keys))):
                self._fill(group, segs, out)  # before this frame is placed
                group_bytes = 0
            claimed = self._claim(frame, chunks, lengths, keys)
            segs += claimed.segs
            group.append(claimed)
            group_bytes += cost
        self._fill(group, segs, out)

    def _staged_copy(self, at: int, gref: int, size: int) -> GrantCopy:
        """The copy of ``size`` bytes staged at ``at`` into the page of ``gref``: the
        frontend's pages and the staging places recur, so the same records (whose
        encoding the platform may keep) serve again."""
        made = self._made
        seg = made.get((at, gref, size))
        if seg is None:
            if len(made) >= _RX_MADE_KEPT:
                made.clear()
            assert self._stage is not None
            seg = made[at, gref, size] = GrantCopy(LocalPtr(self._stage.mem, at),
                                                   GrantPtr(self.domid, gref, 0), size)
        return seg

    def _claim(self, frame: NetFrame, chunks: list[tuple[int, int]], lengths: list[int],
               keys: list[int | None]) -> _RxCopy:
        """Take the posted pages ``frame`` needs (in ring order) and plan the copies of
        its ``chunks`` (of ``lengths``, into the pages of grants ``keys``), staged in own
        frames where there is staging: a whole page on the staging page its grant picks,
        so that its copy record serves again."""
        data = frame.data
        extras = self._extras(frame)
        reqs = [self.posted.popleft() for _ in range(len(chunks) + len(extras))]
        data_reqs = [reqs[0], *reqs[1 + len(extras):]]
        stage = self._stage
        at = stage.place(lengths, keys) if stage is not None else None
        if at is not None:  # staged: the copy carries no bytes (loopback)
            assert stage is not None
            mem, view = stage.mem, memoryview(data)
            segs = []
            for (off, n), o, (_id, gref) in zip(chunks, at, data_reqs, strict=True):
                mem[o:o + n] = view[off:off + n]
                segs.append(self._staged_copy(o, gref, n))
        else:
            segs = [GrantCopy(LocalPtr(data, off), GrantPtr(self.domid, gref, 0), n)
                    for (off, n), (_id, gref) in zip(chunks, data_reqs, strict=True)]
        return _RxCopy(frame, chunks, extras, data_reqs, segs)

    def _fill(self, group: list[_RxCopy | tuple[int, int, int]], segs: list[GrantCopy],
              out: bytearray) -> None:
        """Copy every frame of ``group`` into its pages with one call (``segs``, in
        order); add the responses to ``out``, in the order the pages were posted (a
        frame whose copy failed is answered ERROR); empties ``group`` and ``segs``."""
        if not group:
            return
        self.stats["copies"] += 1
        try:
            statuses = self.grants.copy(segs)
        except (PlatformError, LocalError) as exc:
            log.debug("grant copy of %d segments failed: %s", len(segs), exc)
            statuses = [-1] * len(segs)
        stats = self.stats
        k = 0
        pack = _RX_RSP.pack
        for c in group:
            if isinstance(c, _RxCopy):
                n = len(c.segs)
                out += b"".join(self._responses(c, any(statuses[k:k + n])))
                k += n
                continue
            rid, flags, size = c  # one slot
            if statuses[k]:
                stats["copy_errors"] += 1
                stats["dropped"] += 1
                out += pack(rid, 0, flags, NETIF_RSP_ERROR)
            else:
                stats["packets"] += 1
                stats["bytes"] += size
                out += pack(rid, 0, flags, size)
            k += 1
        group.clear()
        segs.clear()
        if self._stage is not None:
            self._stage.reset()

    def _responses(self, c: _RxCopy, failed: bool) -> list[bytes]:
        frame = c.frame
        if failed:
            self.stats["copy_errors"] += 1
            self.stats["dropped"] += 1
        else:
            self.stats["packets"] += 1
            self.stats["bytes"] += len(frame.data)
        flags0 = _rx_flags(frame)
        if c.extras:
            flags0 |= NETRXF_extra_info
        out: list[bytes] = []
        last = len(c.chunks) - 1
        for k, ((_off, n), (rid, _gref)) in enumerate(zip(c.chunks, c.data_reqs, strict=True)):
            flags = (flags0 if k == 0 else 0) | (NETRXF_more_data if k < last else 0)
            out.append(_RX_RSP.pack(rid, 0, flags, NETIF_RSP_ERROR if failed else n))
            if k == 0:
                out += c.extras
        return out

    # -- stall (scenario 7)
    def _arm(self) -> None:
        if self._timer is not None or self.closed:
            return
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.config.stall_timeout, self._check_stall)

    def _check_stall(self) -> None:
        self._timer = None
        if not self.backlog or self.closed:
            return
        idle = time.monotonic() - self._progress
        if idle < self.config.stall_timeout:
            self._arm()
            return
        self.stats["stalls"] += 1
        self.stats["dropped"] += len(self.backlog)
        log.info("dom%d rx: no progress for %.1f s: %d frames dropped, carrier off",
                 self.domid, idle, len(self.backlog))
        self.backlog.clear()
        self.backlog_bytes = 0
        self.carrier = False

    def close(self) -> None:
        """Stop delivering; drop the backlog."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        self.backlog.clear()
        self.backlog_bytes = 0
        stage, self._stage = self._stage, None
        if stage is not None:
            stage.close()


# --------------------------------------------------------------------------- control ring


class NetCtrl:
    """The control ring handler of a vif (io/netif.h ``xen_netif_ctrl``): the frontend
    chooses the Toeplitz hash (algorithm, hash types, key) and the mapping table from
    hash to queue that RX queue selection then uses (:meth:`select`).  Key and mapping
    come in pages the frontend granted, pulled with grant copies; every request is
    answered with its id and type and a status (``INVALID_PARAMETER`` for values out of
    range, ``BUFFER_OVERFLOW`` for a key longer than 40 bytes or a mapping beyond its
    page, ``NOT_SUPPORTED`` for the static grant mapping requests and unknown types)."""

    def __init__(self, platform: Platform, frontend_domid: int, queues: int) -> None:
        """Hash nothing until the frontend asks."""
        self.grants = platform.grants
        self.domid = frontend_domid
        self.queues = queues
        self.algorithm = XEN_NETIF_CTRL_HASH_ALGORITHM_NONE
        self.flags = 0
        self.key = bytes(MAX_HASH_KEY)
        self.mapping: list[int] = []
        self.stats = {"requests": 0, "refused": 0, "hashed": 0}

    def handle(self, batch: memoryview, count: int) -> list[bytes]:
        """Answer every request in order."""
        out = []
        for j in range(count):
            rid, typ, d0, d1, d2 = _CTRL_REQ.unpack_from(batch, j * _CTRL_SLOT)
            status, data = self._one(typ, d0, d1, d2)
            self.stats["requests"] += 1
            self.stats["refused"] += status != XEN_NETIF_CTRL_STATUS_SUCCESS
            out.append(_CTRL_RSP.pack(rid, typ, status, data))
        return out

    def _pull(self, gref: int, length: int) -> bytes | None:
        buf = bytearray(length)
        if not length:
            return b""
        try:
            ok = self.grants.copy([GrantCopy(GrantPtr(self.domid, gref, 0), LocalPtr(buf),
                                             length)]) == [0]
        except (PlatformError, LocalError):
            ok = False
        return bytes(buf) if ok else None

    def _one(self, typ: int, d0: int, d1: int, d2: int) -> tuple[int, int]:
        ok, bad = XEN_NETIF_CTRL_STATUS_SUCCESS, XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
        if typ == XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS:
            return ok, HASH_TYPES
        if typ == XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS:
            if d0 & ~HASH_TYPES or self.algorithm == XEN_NETIF_CTRL_HASH_ALGORITHM_NONE:
                return bad, 0
            self.flags = d0
            return ok, 0
        if typ == XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM:
            if d0 not in (XEN_NETIF_CTRL_HASH_ALGORITHM_NONE,
                          XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ):
                return bad, 0
            self.algorithm = d0
            if d0 == XEN_NETIF_CTRL_HASH_ALGORITHM_NONE:
                self.flags = 0
            return ok, 0
        if typ == XEN_NETIF_CTRL_TYPE_SET_HASH_KEY:
            if d1 > MAX_HASH_KEY:
                return XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW, 0
            key = self._pull(d0, d1)
            if key is None:
                return bad, 0
            self.key = key.ljust(MAX_HASH_KEY, b"\0")
            return ok, 0
        if typ == XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE:
            return ok, MAX_HASH_MAPPING
        if typ == XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE:
            if not 1 <= d0 <= MAX_HASH_MAPPING:
                return bad, 0
            self.mapping = [0] * d0
            return ok, 0
        if typ == XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING:
            off, n = d1, d2
            if n * 4 > XEN_PAGE_SIZE:
                return XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW, 0
            if off > len(self.mapping) or n > len(self.mapping) - off:
                return bad, 0
            raw = self._pull(d0, n * 4)
            if raw is None:
                return bad, 0
            entries = list(struct.unpack(f"<{n}I", raw))
            if any(e >= self.queues for e in entries):
                return bad, 0
            self.mapping[off:off + n] = entries
            return ok, 0
        return XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED, 0

    def select(self, data: bytes) -> tuple[int, int, int] | None:
        """(queue, hash type, hash) the configured hash gives a frame, or None (no hash
        configured or no enabled type applies)."""
        if self.algorithm != XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ or not self.flags:
            return None
        hin = toeplitz_input(data, self.flags)
        if hin is None:
            return None
        h = toeplitz(self.key, hin[1])
        self.stats["hashed"] += 1
        q = self.mapping[h % len(self.mapping)] if self.mapping else h % self.queues
        return q, hin[0], h

    def info(self) -> dict[str, Any]:
        """Algorithm, hash types, key, mapping and counters."""
        return {"algorithm": self.algorithm, "flags": self.flags, "key": self.key.hex(),
                "mapping": list(self.mapping), **self.stats}


# --------------------------------------------------------------------------- queues


@dataclass(frozen=True)
class QueueKeys:
    """Where one queue's rings are (as the frontend wrote them)."""

    tx_ref: int
    rx_ref: int
    tx_port: int
    rx_port: int | None  # None: one event channel for both rings


async def read_queue_keys(peer: PeerKeys, *, max_queues: int, split: bool
                          ) -> list[QueueKeys]:
    """Read the frontend's ring keys strictly (bounds first, §7.4); one entry per queue.
    Split event channels are read only if ``split`` was offered and are used when both
    ``event-channel-tx`` and ``-rx`` are there."""
    count = _keys.parse_num_queues(await peer.raw("multi-queue-num-queues"), max_queues)

    async def one(prefix: str) -> QueueKeys:
        tx = await peer.grant_ref(f"{prefix}tx-ring-ref")
        rx = await peer.grant_ref(f"{prefix}rx-ring-ref")
        if split and await peer.raw(f"{prefix}event-channel-tx") is not None:
            return QueueKeys(tx, rx, await peer.port(f"{prefix}event-channel-tx"),
                             await peer.port(f"{prefix}event-channel-rx"))
        return QueueKeys(tx, rx, await peer.port(f"{prefix}event-channel"), None)

    if count == 1:
        return [await one("")]
    return [await one(f"queue-{k}/") for k in range(count)]



class NetQueue:
    """One queue of a vif: TX and RX channels, handlers and services."""

    def __init__(self, platform: Platform, frontend_domid: int, keys: QueueKeys,
                 config: NetConfig, features: NetFeatures,
                 port: Callable[[NetFrame], object],
                 rate: tuple[int, int] | None = None,
                 mcast: MulticastFilter | None = None) -> None:
        """Map both rings and bind the port(s); nothing runs before :meth:`start`."""
        self.tx_channel = BackChannel.attach(platform, frontend_domid,
                                             RingPlacement((keys.tx_ref,), keys.tx_port),
                                             slot_size=_TX_SLOT)
        try:
            self.rx_channel = BackChannel.attach(
                platform, frontend_domid,
                RingPlacement((keys.rx_ref,), keys.rx_port if keys.rx_port is not None
                              else keys.tx_port),
                slot_size=_RX_SLOT,
                shared_port=None if keys.rx_port is not None else self.tx_channel.port)
        except BaseException:
            self.tx_channel.close()
            raise
        self.split = keys.rx_port is not None
        self.tx = NetTx(platform, frontend_domid, config, port, rate, mcast)
        self.rx = NetRx(platform, frontend_domid, config, features, mcast)
        self.tx_service = RingService(self.tx_channel, self.tx)
        self.rx_service = RingService(self.rx_channel, self.rx)
        self.rx.respond_slots = self.rx_service.respond_slots
        self.tx.respond = self.tx_service.respond
        self.tx.respond_slots = self.tx_service.respond_slots
        self._hub: PortDispatcher | None = None
        self._guard: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Serve both rings (in the running loop).  A ring the frontend breaks stops
        both (R4; with a shared port the other could not be woken any more)."""
        self.tx_service.start()
        self.rx_service.start()
        if not self.split:
            self._hub = share_port(self.tx_channel.res.events, self.tx_channel.port,
                                   [self.tx_service, self.rx_service])
        self._guard = asyncio.get_running_loop().create_task(self._stop_together())

    async def _stop_together(self) -> None:
        waits = [asyncio.ensure_future(s.wait_stopped())
                 for s in (self.tx_service, self.rx_service)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self.stop()

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        guard, self._guard = self._guard, None
        if guard is not None and guard is not asyncio.current_task():
            guard.cancel()
        self.rx.close()
        self.tx.close()
        self.tx_service.stop()
        self.rx_service.stop()
        if self._hub is not None:
            hub, self._hub = self._hub, None
            hub.detach(self.tx_channel.port)

    def close(self) -> None:
        """Stop, then release rings and ports (the RX ring first: it may share the
        TX ring's port)."""
        self.stop()
        self.rx_channel.close()
        self.tx_channel.close()

    def info(self) -> dict[str, Any]:
        """Counters of both rings."""
        return {"split": self.split, "tx": dict(self.tx.stats), "tx_held": self.tx.held,
                "rx": dict(self.rx.stats),
                "rx_posted": len(self.rx.posted), "rx_backlog": len(self.rx.backlog),
                "carrier": self.rx.carrier, "tx_ring": self.tx_service.info(),
                "rx_ring": self.rx_service.info()}


class NetVif:
    """The queues of one connected vif: frames to the guest are spread by flow (the
    frontend's Toeplitz hash and mapping when it set them on the control ring ``ctrl``,
    else :func:`~xenpv.protocols.ethernet.flow_hash`)."""

    def __init__(self, queues: list[NetQueue], ctrl: NetCtrl | None = None) -> None:
        """Serve ``queues`` (at least one)."""
        if not queues:
            raise LocalError("a vif needs at least one queue")
        self.queues = queues
        self.ctrl = ctrl

    def deliver(self, frame: NetFrame) -> None:
        """Send a frame to the guest on its flow's queue."""
        n = len(self.queues)
        sel = self.ctrl.select(frame.data) if self.ctrl is not None else None
        if sel is not None:
            self.queues[sel[0] if sel[0] < n else 0].rx.deliver(frame, (sel[1], sel[2]))
            return
        self.queues[frame_flow_hash(frame.data) % n if n > 1 else 0].rx.deliver(frame)

    def errors(self) -> list[PeerError]:
        """Peer errors that stopped a queue's service."""
        return [e for q in self.queues for e in (q.tx_service.error, q.rx_service.error)
                if e is not None]


# --------------------------------------------------------------------------- driver


class NetBackendDriver(BackendDriver):
    """Backend of one vif (``backend/vif/<fe>/<devid>``); see the module docstring.

    Frames from the guest go to ``port`` (a callable), or, if None, into the switch
    ``switch``; frames the port or switch sends back go to the guest.
    """

    def __init__(self, platform: Platform, client: XenbusClient, path: str, *,
                 config: NetConfig | None = None, switch: NetSwitch | None = None,
                 **kw: Any) -> None:
        """Serve ``path`` (see :class:`BackendDriver` for the timeouts)."""
        super().__init__(client, path, **kw)
        self.platform = platform
        self.config = config or NetConfig()
        self.switch = switch
        self.switch_port: SwitchPort | None = None
        self.vif: NetVif | None = None
        self.queues: list[NetQueue] = []
        self.rate: tuple[int, int] | None = None
        self.mcast: MulticastFilter | None = None
        self.ctrl: NetCtrl | None = None
        self.ctrl_channel: BackChannel | None = None
        self.ctrl_service: RingService | None = None
        self.features = NetFeatures()

    def _offer(self) -> dict[str, str | int]:
        c = self.config
        return {"feature-sg": int(c.sg), "feature-gso-tcpv4": int(c.gso_tcpv4),
                "feature-gso-tcpv6": int(c.gso_tcpv6),
                "feature-ipv6-csum-offload": int(c.ipv6_csum), "feature-rx-copy": 1,
                "feature-rx-flip": 0, "feature-split-event-channels": int(c.split_events),
                "multi-queue-max-queues": c.max_queues, "feature-ctrl-ring": int(c.ctrl_ring),
                "feature-multicast-control": int(c.multicast_control),
                "feature-dynamic-multicast-control": int(c.multicast_control)}

    async def publish_features(self) -> None:
        """Advertise what this backend offers (before InitWait)."""
        await self.write_keys(self._offer())

    async def connect(self, peer: PeerKeys) -> None:
        """Read the frontend's features and rings; map, bind, serve, join the switch."""
        if not await peer.feature("request-rx-copy"):
            raise _NetPeerError("request-rx-copy is required (this backend only copies)")
        if not await peer.feature("feature-rx-notify"):
            raise _NetPeerError("feature-rx-notify is required (this backend never polls)")
        self.features = NetFeatures(
            sg=await peer.feature("feature-sg"),
            gso_tcpv4=await peer.feature("feature-gso-tcpv4"),
            gso_tcpv6=await peer.feature("feature-gso-tcpv6"),
            csum=not await peer.feature("feature-no-csum-offload"),
            ipv6_csum=await peer.feature("feature-ipv6-csum-offload"))
        placements = await read_queue_keys(peer, max_queues=self.config.max_queues,
                                           split=self.config.split_events)
        name = self.path.rsplit("/", 2)
        if self.switch is not None:
            self.switch_port = self.switch.attach(f"vif{name[-2]}.{name[-1]}",
                                                  self._deliver)
        port: Callable[[NetFrame], object] = (
            self.switch_port.send if self.switch_port is not None else (lambda f: None))
        self.rate = await self._rate()
        self.mcast = MulticastFilter() if self.config.multicast_control else None
        if self.mcast is not None:
            self.mcast.enabled = await peer.feature("request-multicast-control")
            self.start_watcher(self._watch_mcast(peer, self.mcast))
        for pl in placements:
            self.queues.append(NetQueue(self.platform, self.peer_domid, pl, self.config,
                                        self.features, port, self.rate, self.mcast))
        if self.config.ctrl_ring and await peer.raw("ctrl-ring-ref") is not None:
            placement = RingPlacement((await peer.grant_ref("ctrl-ring-ref"),),
                                      await peer.port("event-channel-ctrl"))
            self.ctrl_channel = BackChannel.attach(self.platform, self.peer_domid, placement,
                                                   slot_size=_CTRL_SLOT)
            self.ctrl = NetCtrl(self.platform, self.peer_domid, len(self.queues))
            self.ctrl_service = RingService(self.ctrl_channel, self.ctrl)
            self.ctrl_service.start()
            self.watch_ring(self.ctrl_service)
        self.vif = NetVif(self.queues, self.ctrl)
        for q in self.queues:
            q.start()
            for s in (q.tx_service, q.rx_service):
                self.watch_ring(s)

    async def _watch_mcast(self, peer: PeerKeys, mcast: MulticastFilter) -> None:
        """``feature-dynamic-multicast-control``: follow the frontend's
        ``request-multicast-control`` while connected (a garbage value: unchanged)."""
        path = peer.key("request-multicast-control")
        with contextlib.suppress(Exception):
            async with self.client.watch(path, max_pending=4) as watch:
                async for _ in watch:
                    with contextlib.suppress(PeerError, TimeoutError):
                        mcast.enabled = await peer.feature("request-multicast-control")

    async def _rate(self) -> tuple[int, int] | None:
        """The own ``rate`` node (``BYTES,USECS``, written by the toolstack), per queue."""
        raw = await self._read(f"{self.path}/rate")
        if not raw:
            return None
        try:
            nbytes, usecs = (int(x) for x in raw.decode("ascii").split(","))
        except (ValueError, UnicodeDecodeError):
            log.warning("%s: ignoring rate %r (not BYTES,USECS)", self.path, raw)
            return None
        if nbytes <= 0 or not 0 < usecs <= 60_000_000:
            log.warning("%s: ignoring rate %r (out of range)", self.path, raw)
            return None
        return nbytes, usecs

    def _deliver(self, frame: NetFrame) -> None:
        if self.vif is not None:
            self.vif.deliver(frame)

    async def disconnect(self) -> None:
        """Leave the switch, stop the queues, release rings and ports."""
        self.stop_watchers()
        if self.switch_port is not None:
            self.switch_port.detach()
            self.switch_port = None
        self.vif = None
        queues, self.queues = self.queues, []
        for q in queues:
            q.close()
        if self.ctrl_service is not None:
            self.ctrl_service.stop()
            self.ctrl_service = None
        if self.ctrl_channel is not None:
            self.ctrl_channel.close()
            self.ctrl_channel = None
        self.ctrl = None

    def info(self) -> dict[str, Any]:
        """Negotiated features, queues and counters (for ``xenpv net info``)."""
        queues = self.queues
        return {
            "path": self.path,
            "state": self.state.name,
            "offered": self._offer(),
            "frontend_features": self.features.as_dict(),
            "queues": len(queues),
            "split_event_channels": bool(queues) and queues[0].split,
            "switch": self.switch.name if self.switch is not None else None,
            "rate": list(self.rate) if self.rate else None,
            "multicast_filter": None if self.mcast is None else {
                "enabled": self.mcast.enabled,
                "macs": sorted(":".join(f"{b:02x}" for b in m) for m in self.mcast.macs)},
            "port": self.switch_port.info() if self.switch_port is not None else None,
            "per_queue": [q.info() for q in queues],
            "ctrl": self.ctrl.info() if self.ctrl is not None else None,
        }


class NetBackend:
    """Serves every vif whose backend is this domain (a
    :class:`~xenpv.xenbus.watcher.BackendWatcher` of ``vif``), joining each to the switch
    its ``bridge`` node names (``default_switch`` if none)."""

    def __init__(self, platform: Platform, client: XenbusClient,
                 config: NetConfig | None = None, *, default_switch: str = "xenpv0",
                 **driver_kw: Any) -> None:
        """Prepare; :meth:`start` begins serving."""
        self.platform = platform
        self.client = client
        self.config = config or NetConfig()
        self.default_switch = default_switch
        self.driver_kw = driver_kw
        self.switches: dict[str, NetSwitch] = {}
        self.watcher: BackendWatcher | None = None

    def switch(self, name: str) -> NetSwitch:
        """The switch called ``name`` (made on first use)."""
        sw = self.switches.get(name)
        if sw is None:
            sw = self.switches[name] = NetSwitch(name)
        return sw

    async def start(self) -> None:
        """Watch the backend directory and serve what appears there."""
        backend = self

        class _Driver(NetBackendDriver):
            async def publish_features(self) -> None:
                raw = await self._read(f"{self.path}/bridge")
                name = raw.decode("ascii", "replace") if raw else backend.default_switch
                self.switch = backend.switch(name[:64] or backend.default_switch)
                await super().publish_features()

        def factory(client: XenbusClient, path: str) -> NetBackendDriver:
            return _Driver(self.platform, client, path, config=self.config, **self.driver_kw)

        self.watcher = BackendWatcher(self.client, self.platform.domid, "vif", factory)
        await self.watcher.start()

    @property
    def drivers(self) -> list[NetBackendDriver]:
        """The drivers serving now."""
        if self.watcher is None:
            return []
        return [d for d in self.watcher.devices.values() if isinstance(d, NetBackendDriver)]

    async def close(self) -> None:
        """Stop every driver (bounded, idempotent)."""
        if self.watcher is not None:
            await self.watcher.close()
            self.watcher = None

"""Network protocol (``xen/io/netif.h``): TX/RX/ctrl ring records, extra-info, packet rules.

Theory of operation
-------------------
Each queue has a TX ring (12-byte slots: frontend requests, 4-byte responses) and an RX
ring (8-byte slots).  A transmitted packet is a *chain* of TX slots: the first request
carries the total packet size and flags; if it has ``NETTXF_extra_info`` the next slot(s)
are 8-byte :class:`ExtraInfo` records (chained by ``XEN_NETIF_EXTRA_FLAG_MORE``) overlaying
the request slot; if it has ``NETTXF_more_data`` further requests follow, each with its own
fragment length.  :func:`parse_tx_packet` walks such a chain in a copied batch of slots and
checks it (hostile scenario 6): at most ``fatal_slots`` slots after the first or the peer is
treated as malicious (:class:`NetifFatalError`), more than ``max_slots`` data slots, a total
above 0xFFFF or of 0 bytes, fragments larger than the total, or a fragment crossing its page make the
packet droppable (0 bytes is allowed only for a dummy request carrying an MCAST_ADD/DEL
extra) (:class:`NetifPacketError`, answered with ``NETIF_RSP_ERROR`` for every
slot consumed).  Extra-info records are parsed per type (GSO, MCAST, HASH).

Everything is sans-IO and bounded by the number of slots handed in.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from xenpv.compiled import compiled_attr
from xenpv.errors import LocalError
from xenpv.protocols import ProtocolError
from xenpv.protocols.layout import (
    XEN_PAGE_SIZE,
    Buffer,
    Field,
    Layout,
    Record,
    RingLayout,
    c_struct,
    pad,
)

# io/netif.h: limits
XEN_NETIF_NR_SLOTS_MIN = 18
XEN_NETIF_MAX_TX_SIZE = 0xFFFF
#: Linux netback's default ``fatal_skb_slots``: more slots after the first = malicious.
FATAL_SKB_SLOTS_DEFAULT = 20

# io/netif.h: TX flags
_NETTXF_csum_blank = 0
NETTXF_csum_blank = 1 << _NETTXF_csum_blank
_NETTXF_data_validated = 1
NETTXF_data_validated = 1 << _NETTXF_data_validated
_NETTXF_more_data = 2
NETTXF_more_data = 1 << _NETTXF_more_data
_NETTXF_extra_info = 3
NETTXF_extra_info = 1 << _NETTXF_extra_info

# io/netif.h: RX flags (csum/validated swapped relative to TX)
_NETRXF_data_validated = 0
NETRXF_data_validated = 1 << _NETRXF_data_validated
_NETRXF_csum_blank = 1
NETRXF_csum_blank = 1 << _NETRXF_csum_blank
_NETRXF_more_data = 2
NETRXF_more_data = 1 << _NETRXF_more_data
_NETRXF_extra_info = 3
NETRXF_extra_info = 1 << _NETRXF_extra_info
_NETRXF_gso_prefix = 4
NETRXF_gso_prefix = 1 << _NETRXF_gso_prefix

# io/netif.h: response status
NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1

# io/netif.h: extra-info types and flags
XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5
_XEN_NETIF_EXTRA_FLAG_MORE = 0
XEN_NETIF_EXTRA_FLAG_MORE = 1 << _XEN_NETIF_EXTRA_FLAG_MORE

# io/netif.h: GSO types
XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

# io/netif.h: hash types (bit numbers, and masks) and algorithms
_XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 0
_XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1
_XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 2
_XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 3
XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV4
XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP
XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV6
XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP
XEN_NETIF_CTRL_HASH_ALGORITHM_NONE = 0
XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ = 1

# io/netif.h: control ring
XEN_NETIF_CTRL_TYPE_INVALID = 0
XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS = 1
XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS = 2
XEN_NETIF_CTRL_TYPE_SET_HASH_KEY = 3
XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE = 4
XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE = 5
XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING = 6
XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM = 7
XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE = 8
XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING = 9
XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING = 10
XEN_NETIF_CTRL_STATUS_SUCCESS = 0
XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED = 1
XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER = 2
XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW = 3
_XEN_NETIF_CTRLF_GREF_readonly = 0
XEN_NETIF_CTRLF_GREF_readonly = 1 << _XEN_NETIF_CTRLF_GREF_readonly

# Xenstore keys (§7.4)
KEY_TX_RING_REF = "tx-ring-ref"
KEY_RX_RING_REF = "rx-ring-ref"
KEY_CTRL_RING_REF = "ctrl-ring-ref"
KEY_EVENT_CHANNEL = "event-channel"
KEY_EVENT_CHANNEL_TX = "event-channel-tx"
KEY_EVENT_CHANNEL_RX = "event-channel-rx"
KEY_EVENT_CHANNEL_CTRL = "event-channel-ctrl"
KEY_REQUEST_RX_COPY = "request-rx-copy"
KEY_FEATURE_RX_NOTIFY = "feature-rx-notify"
KEY_FEATURE_RX_COPY = "feature-rx-copy"
KEY_FEATURE_RX_FLIP = "feature-rx-flip"
KEY_FEATURE_SG = "feature-sg"
KEY_FEATURE_GSO_TCPV4 = "feature-gso-tcpv4"
KEY_FEATURE_GSO_TCPV6 = "feature-gso-tcpv6"
KEY_FEATURE_IPV6_CSUM_OFFLOAD = "feature-ipv6-csum-offload"
KEY_FEATURE_NO_CSUM_OFFLOAD = "feature-no-csum-offload"
KEY_FEATURE_MULTICAST_CONTROL = "feature-multicast-control"
KEY_FEATURE_DYNAMIC_MULTICAST_CONTROL = "feature-dynamic-multicast-control"
KEY_REQUEST_MULTICAST_CONTROL = "request-multicast-control"
KEY_FEATURE_SPLIT_EVENT_CHANNELS = "feature-split-event-channels"
KEY_FEATURE_CTRL_RING = "feature-ctrl-ring"
KEY_MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
KEY_MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"
KEY_MAC = "mac"
KEY_MTU = "mtu"
KEY_CARRIER = "carrier"
KEY_HANDLE = "handle"

# -- layouts and records ---------------------------------------------------------------------

TX_REQUEST_LAYOUT = c_struct(
    "netif_tx_request",
    [Field("gref", "I"), Field("offset", "H"), Field("flags", "H"), Field("id", "H"), Field("size", "H")],
)
TX_RESPONSE_LAYOUT = c_struct("netif_tx_response", [Field("id", "H"), Field("status", "h")])
RX_REQUEST_LAYOUT = c_struct(
    "netif_rx_request",
    [Field("id", "H"), Field("pad", "H"), Field("gref", "I")],
)
RX_RESPONSE_LAYOUT = c_struct(
    "netif_rx_response",
    [Field("id", "H"), Field("offset", "H"), Field("flags", "H"), Field("status", "h")],
)
_EXTRA_HEAD = [Field("type", "B"), Field("flags", "B")]
EXTRA_LAYOUT = c_struct("netif_extra_info", [*_EXTRA_HEAD, Field("data", "s", 6, c="u")])
EXTRA_GSO_LAYOUT = c_struct(
    "netif_extra_info.gso",
    [
        *_EXTRA_HEAD,
        Field("size", "H", c="u.gso.size"),
        Field("gso_type", "B", c="u.gso.type"),
        pad(1),
        Field("features", "H", c="u.gso.features"),
    ],
)
EXTRA_MCAST_LAYOUT = c_struct(
    "netif_extra_info.mcast",
    [*_EXTRA_HEAD, Field("addr", "s", 6, c="u.mcast.addr")],
)
EXTRA_HASH_LAYOUT = c_struct(
    "netif_extra_info.hash",
    [
        *_EXTRA_HEAD,
        Field("hash_type", "B", c="u.hash.type"),
        Field("algorithm", "B", c="u.hash.algorithm"),
        Field("value", "I", c="u.hash.value"),
    ],
)
CTRL_REQUEST_LAYOUT = c_struct(
    "xen_netif_ctrl_request",
    [Field("id", "H"), Field("type", "H"), Field("data", "I", 3)],
)
CTRL_RESPONSE_LAYOUT = c_struct(
    "xen_netif_ctrl_response",
    [Field("id", "H"), Field("type", "H"), Field("status", "I"), Field("data", "I")],
)
GREF_LAYOUT = c_struct(
    "xen_netif_gref",
    [Field("ref", "I"), Field("flags", "H"), Field("status", "H")],
)

TX_RING = RingLayout("netif_tx", TX_REQUEST_LAYOUT.size, TX_RESPONSE_LAYOUT.size)
RX_RING = RingLayout("netif_rx", RX_REQUEST_LAYOUT.size, RX_RESPONSE_LAYOUT.size)
CTRL_RING = RingLayout("xen_netif_ctrl", CTRL_REQUEST_LAYOUT.size, CTRL_RESPONSE_LAYOUT.size)
#: Slots of each single-page ring (256, 256, 128).
NET_TX_RING_SIZE = TX_RING.nr_ents()
NET_RX_RING_SIZE = RX_RING.nr_ents()
NET_CTRL_RING_SIZE = CTRL_RING.nr_ents()

#: Batch views over ring slots (itemsize = slot size).
TX_REQUEST_DTYPE = TX_REQUEST_LAYOUT.dtype_for(TX_RING.slot_size)
TX_RESPONSE_DTYPE = TX_RESPONSE_LAYOUT.dtype_for(TX_RING.slot_size)
RX_REQUEST_DTYPE = RX_REQUEST_LAYOUT.dtype_for(RX_RING.slot_size)
RX_RESPONSE_DTYPE = RX_RESPONSE_LAYOUT.dtype_for(RX_RING.slot_size)
CTRL_REQUEST_DTYPE = CTRL_REQUEST_LAYOUT.dtype_for(CTRL_RING.slot_size)
CTRL_RESPONSE_DTYPE = CTRL_RESPONSE_LAYOUT.dtype_for(CTRL_RING.slot_size)


@dataclass(frozen=True)
class TxRequest(Record):
    """``struct netif_tx_request``."""

    LAYOUT: ClassVar[Layout] = TX_REQUEST_LAYOUT
    gref: int
    offset: int
    flags: int
    id: int
    size: int


@dataclass(frozen=True)
class TxResponse(Record):
    """``struct netif_tx_response`` (4 bytes in a 12-byte slot)."""

    LAYOUT: ClassVar[Layout] = TX_RESPONSE_LAYOUT
    id: int
    status: int


@dataclass(frozen=True)
class RxRequest(Record):
    """``struct netif_rx_request``: an empty page granted (writable) to the backend."""

    LAYOUT: ClassVar[Layout] = RX_REQUEST_LAYOUT
    id: int
    pad: int
    gref: int


@dataclass(frozen=True)
class RxResponse(Record):
    """``struct netif_rx_response``; ``status`` >= 0 is the byte count in this slot."""

    LAYOUT: ClassVar[Layout] = RX_RESPONSE_LAYOUT
    id: int
    offset: int
    flags: int
    status: int


@dataclass(frozen=True)
class ExtraInfo(Record):
    """``struct netif_extra_info`` of a type without a specific parser (raw 6-byte union)."""

    LAYOUT: ClassVar[Layout] = EXTRA_LAYOUT
    type: int
    flags: int
    data: bytes = bytes(6)


@dataclass(frozen=True)
class GsoExtra(Record):
    """``netif_extra_info`` of type ``XEN_NETIF_EXTRA_TYPE_GSO``."""

    LAYOUT: ClassVar[Layout] = EXTRA_GSO_LAYOUT
    type: int
    flags: int
    size: int
    gso_type: int
    features: int


@dataclass(frozen=True)
class McastExtra(Record):
    """``netif_extra_info`` of type ``XEN_NETIF_EXTRA_TYPE_MCAST_ADD`` / ``_DEL``."""

    LAYOUT: ClassVar[Layout] = EXTRA_MCAST_LAYOUT
    type: int
    flags: int
    addr: bytes


@dataclass(frozen=True)
class HashExtra(Record):
    """``netif_extra_info`` of type ``XEN_NETIF_EXTRA_TYPE_HASH`` (value little-endian)."""

    LAYOUT: ClassVar[Layout] = EXTRA_HASH_LAYOUT
    type: int
    flags: int
    hash_type: int
    algorithm: int
    value: int


AnyExtra = ExtraInfo | GsoExtra | McastExtra | HashExtra
_EXTRA_CLASSES: dict[int, type[GsoExtra] | type[McastExtra] | type[HashExtra]] = {
    XEN_NETIF_EXTRA_TYPE_GSO: GsoExtra,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD: McastExtra,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL: McastExtra,
    XEN_NETIF_EXTRA_TYPE_HASH: HashExtra,
}


def parse_extra(buf: Buffer, offset: int = 0) -> AnyExtra:
    """Copy an extra-info record out once and decode it by type (unknown types stay raw)."""
    raw = bytes(memoryview(buf).cast("B")[offset : offset + EXTRA_LAYOUT.size])
    if len(raw) != EXTRA_LAYOUT.size or offset < 0:
        raise LocalError(f"netif_extra_info: buffer too short at {offset}")
    cls = _EXTRA_CLASSES.get(raw[0])
    return cls.parse(raw) if cls is not None else ExtraInfo.parse(raw)


def validate_extra(extra: AnyExtra) -> None:
    """Type must be 1..4 (NONE and >= MAX are invalid); GSO type must be known."""
    if not XEN_NETIF_EXTRA_TYPE_NONE < extra.type < XEN_NETIF_EXTRA_TYPE_MAX:
        raise ProtocolError(f"netif extra-info type {extra.type} invalid")
    if extra.flags & ~XEN_NETIF_EXTRA_FLAG_MORE:
        raise ProtocolError(f"netif extra-info flags {extra.flags:#x} unknown")
    if isinstance(extra, GsoExtra):
        if extra.gso_type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
            raise ProtocolError(f"netif GSO type {extra.gso_type} unknown")
        if extra.size == 0:
            raise ProtocolError("netif GSO size 0")


@dataclass(frozen=True)
class CtrlRequest(Record):
    """``struct xen_netif_ctrl_request``."""

    LAYOUT: ClassVar[Layout] = CTRL_REQUEST_LAYOUT
    id: int
    type: int
    data: tuple[int, ...] = (0, 0, 0)


@dataclass(frozen=True)
class CtrlResponse(Record):
    """``struct xen_netif_ctrl_response``."""

    LAYOUT: ClassVar[Layout] = CTRL_RESPONSE_LAYOUT
    id: int
    type: int
    status: int
    data: int


@dataclass(frozen=True)
class Gref(Record):
    """``struct xen_netif_gref`` (entries of an ADD/DEL_GREF_MAPPING page)."""

    LAYOUT: ClassVar[Layout] = GREF_LAYOUT
    ref: int
    flags: int
    status: int


# -- slot checks and packet assembly ---------------------------------------------------------


class NetifPacketError(ProtocolError):
    """A TX packet must be dropped: answer its ``slots`` consumed slots with ``NETIF_RSP_ERROR``."""

    def __init__(self, message: str, slots: int, ids: tuple[int, ...]) -> None:
        super().__init__(message)
        self.slots = slots
        self.ids = ids


class NetifFatalError(ProtocolError):
    """The frontend is malicious (too many slots, fragment crossing its page): disable it."""


def check_slot(offset: int, length: int) -> None:
    """A fragment must stay inside its 4096-byte page: ``offset + length <= 4096``."""
    if offset + length > XEN_PAGE_SIZE:
        raise NetifFatalError(f"fragment offset {offset} + size {length} crosses the page")


def validate_rx_response(rsp: RxResponse) -> int:
    """Frontend check of an RX response; returns the byte count (0 for error statuses).

    A negative status is a legal per-packet error (dropped packet, not a protocol error);
    data running past the page is a structural violation (hostile scenario 15).
    """
    return check_rx_response(rsp.id, rsp.offset, rsp.status)


def check_rx_response(rid: int, offset: int, status: int) -> int:
    """:func:`validate_rx_response` on the fields of a response (the frontend's hot path
    unpacks them with :data:`RX_RESPONSE_STRUCT`, no record)."""
    if status < 0:
        if status not in (NETIF_RSP_ERROR, NETIF_RSP_DROPPED):
            raise ProtocolError(f"netif rx response {rid}: unknown status {status}")
        return 0
    if offset + status > XEN_PAGE_SIZE:
        raise ProtocolError(f"netif rx response {rid}: offset {offset} + {status} > page")
    return status


@dataclass(frozen=True)
class Fragment:
    """One piece of packet data: ``length`` bytes at ``offset`` of granted page ``gref``."""

    gref: int
    offset: int
    length: int


@dataclass(frozen=True)
class TxPacket:
    """A checked TX packet: its requests (data slots), extras, fragments and slot count."""

    requests: tuple[TxRequest, ...]
    extras: tuple[AnyExtra, ...]
    fragments: tuple[Fragment, ...]
    size: int
    slots: int

    @property
    def flags(self) -> int:
        """The first request's flags (checksum offload bits apply to the whole packet)."""
        return self.requests[0].flags


#: The records as plain structs for the drivers' hot paths (the same bytes as the
#: layouts above; padding to the slot size is the ring's).
_TX_REQ = struct.Struct("<IHHHH")
TX_RESPONSE_STRUCT = struct.Struct("<Hh")
RX_REQUEST_STRUCT = struct.Struct("<HxxI")
RX_RESPONSE_STRUCT = struct.Struct("<HHHh")
CTRL_REQUEST_STRUCT = struct.Struct("<HH3I")
CTRL_RESPONSE_STRUCT = struct.Struct("<HHII")


def pack_tx_request(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    """``TxRequest(...).pack()`` without the generic record machinery (the hot path)."""
    return _TX_REQ.pack(gref, offset, flags, rid, size)


def parse_tx_packet(
    slots: Buffer,
    count: int,
    *,
    max_slots: int = XEN_NETIF_NR_SLOTS_MIN,
    fatal_slots: int = FATAL_SKB_SLOTS_DEFAULT,
) -> TxPacket | None:
    """Assemble one TX packet from ``count`` consumed 12-byte slots (a private copy).

    Returns ``None`` if the chain continues past the ``count`` slots given (wait for more),
    else the packet.  Raises :class:`NetifFatalError` (disable the frontend) or
    :class:`NetifPacketError` (drop, answer each consumed slot with ``NETIF_RSP_ERROR``).
    Work is bounded by ``min(count, fatal_slots + 1 + extras)`` slots.
    """
    if count < 1:
        raise LocalError("parse_tx_packet needs at least one slot")
    step = TX_RING.slot_size
    first = TxRequest(*_TX_REQ.unpack_from(slots, 0))
    used = 1
    extras: list[AnyExtra] = []
    ids = [first.id]
    if first.flags & NETTXF_extra_info:
        more = True
        while more:
            if used >= count:
                return None
            if len(extras) >= XEN_NETIF_EXTRA_TYPE_MAX:
                raise NetifFatalError("too many chained extra-info slots")
            extra = parse_extra(slots, used * step)
            used += 1
            try:
                validate_extra(extra)
            except ProtocolError as e:
                raise NetifFatalError(str(e)) from None
            extras.append(extra)
            more = bool(extra.flags & XEN_NETIF_EXTRA_FLAG_MORE)
    reqs = [first]
    following = 0
    more_data = bool(first.flags & NETTXF_more_data)
    while more_data:
        if following >= fatal_slots:
            raise NetifFatalError(f"packet uses more than {fatal_slots} slots after the first")
        if used >= count:
            return None
        req = TxRequest(*_TX_REQ.unpack_from(slots, used * step))
        used += 1
        following += 1
        reqs.append(req)
        ids.append(req.id)
        more_data = bool(req.flags & NETTXF_more_data)
    slot_ids = tuple(ids)
    if following + 1 > max_slots:
        raise NetifPacketError(f"packet uses {following + 1} data slots (> {max_slots})", used, slot_ids)
    total = first.size
    rest = sum(r.size for r in reqs[1:])
    if rest > total:
        raise NetifPacketError(f"fragments ({rest}) exceed packet size {total}", used, slot_ids)
    if total > XEN_NETIF_MAX_TX_SIZE:
        raise NetifPacketError(f"packet size {total} > {XEN_NETIF_MAX_TX_SIZE}", used, slot_ids)
    mcast = any(e.type in (XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL)
                for e in extras)
    if total == 0 and not mcast:  # scenario 6: no zero-length packet (allocation);
        # a multicast filter request is a dummy request of 0 bytes with its extra
        raise NetifPacketError("packet of 0 bytes", used, slot_ids)
    frags = [Fragment(first.gref, first.offset, total - rest)]
    frags.extend(Fragment(r.gref, r.offset, r.size) for r in reqs[1:])
    for f in frags:
        check_slot(f.offset, f.length)
    return TxPacket(tuple(reqs), tuple(extras), tuple(frags), total, used)


# -- the backend's batch accept of plain TX chains ---------------------------------------------

#: A plain TX chain accepted in one pass: (flags of its first slot, packet size, slots used,
#: the id of each data slot, the (gref, offset, length) of each fragment, (GSO type, GSO
#: size) of its GSO record or (0, 0)).
PlainTx = tuple[int, int, int, tuple[int, ...], tuple[tuple[int, int, int], ...],
                tuple[int, int]]

#: The Ethernet header length (``xenpv.protocols.ethernet.ETH_HLEN``): a packet and its first
#: fragment must hold at least this.
_ETH_HLEN = 14
#: :func:`scan_tx`'s ``gso`` mask bits: the GSO types a backend offered.
SCAN_GSO_TCPV4, SCAN_GSO_TCPV6 = 1, 2


def plain_tx(pkt: TxPacket, *, sg: bool, gso: int = 0) -> PlainTx | None:
    """``pkt`` as a :data:`PlainTx` if it is plain (no extra-info but one GSO record of a
    type in ``gso`` (:data:`SCAN_GSO_TCPV4` | :data:`SCAN_GSO_TCPV6`), at least an
    Ethernet header in its first fragment, no empty fragment after it, one slot unless
    ``sg``), else None."""
    frags = pkt.fragments
    gso_type = gso_size = 0
    if pkt.extras:
        extra = pkt.extras[0]
        if len(pkt.extras) != 1 or not isinstance(extra, GsoExtra) or not (
                (extra.gso_type == XEN_NETIF_GSO_TYPE_TCPV4 and gso & SCAN_GSO_TCPV4) or
                (extra.gso_type == XEN_NETIF_GSO_TYPE_TCPV6 and gso & SCAN_GSO_TCPV6)):
            return None
        gso_type, gso_size = extra.gso_type, extra.size
    if pkt.size < _ETH_HLEN or frags[0].length < _ETH_HLEN \
            or any(f.length == 0 for f in frags[1:]) or (len(frags) > 1 and not sg):
        return None
    return (pkt.flags, pkt.size, pkt.slots, tuple(r.id for r in pkt.requests),
            tuple((f.gref, f.offset, f.length) for f in frags), (gso_type, gso_size))


def scan_tx_reference(batch: Buffer, count: int, *, max_slots: int = XEN_NETIF_NR_SLOTS_MIN,
                      fatal_slots: int = FATAL_SKB_SLOTS_DEFAULT, sg: bool = True,
                      gso: int = 0) -> list[PlainTx]:
    """The readable twin of the compiled :func:`scan_tx`: the plain chains (see
    :func:`plain_tx`) that :func:`parse_tx_packet` accepts at the start of ``count``
    slots of ``batch`` (already a private copy), in order, up to the first chain that is
    not plain or not complete; the caller validates that one in full (which answers it)."""
    out: list[PlainTx] = []
    view = memoryview(batch).cast("B")
    pos = 0
    while pos < count:
        try:
            pkt = parse_tx_packet(view[pos * TX_RING.slot_size:], count - pos,
                                  max_slots=max_slots, fatal_slots=fatal_slots)
        except ProtocolError:
            break
        plain = plain_tx(pkt, sg=sg, gso=gso) if pkt is not None else None
        if plain is None:
            break
        out.append(plain)
        pos += plain[2]
    return out


def _compiled_scan() -> Any:
    """The compiled scan, or None (not built, or ``XENPV_PURE_PYTHON=1``:
    :func:`xenpv.compiled.pure_python`)."""
    return compiled_attr("xenpv.protocols._netscan", "scan_tx")


_SCAN = _compiled_scan()


def scan_tx(batch: Buffer, count: int, *, max_slots: int = XEN_NETIF_NR_SLOTS_MIN,
            fatal_slots: int = FATAL_SKB_SLOTS_DEFAULT, sg: bool = True,
            gso: int = 0) -> list[PlainTx]:
    """:func:`scan_tx_reference`, compiled (``cython/netscan.pyx``: one pass over the
    slots, no per-field Python objects) where built."""
    if _SCAN is None:
        return scan_tx_reference(batch, count, max_slots=max_slots, fatal_slots=fatal_slots,
                                 sg=sg, gso=gso)
    result: list[PlainTx] = _SCAN(batch, count, max_slots, fatal_slots, sg, gso)
    return result


# -- the frontend's RX batch ------------------------------------------------------------------

#: Slots one received chain may use: the data slots a backend may fill plus extras.
MAX_RX_CHAIN = XEN_NETIF_NR_SLOTS_MIN + XEN_NETIF_EXTRA_TYPE_MAX
#: One frame of :func:`scan_rx`: its bytes (None: dropped, a slot had an error status or
#: no slot had data), its first data slot's flags, its GSO type and size ((0, 0): none)
#: and its hash value and type mask ((None, 0): none).
RxFrame = tuple[bytes | None, int, int, int, int | None, int]


def scan_rx_reference(batch: Buffer, count: int, posted: Sequence[int], mem: Buffer
                      ) -> tuple[list[RxFrame], int, str | None]:
    """The readable twin of the compiled :func:`scan_rx`: the frames of the complete
    chains at the start of ``count`` RX responses in ``batch`` (a private copy, 8 bytes
    each), where ``posted[k]`` is the id of the page posted at the ring slot of response
    ``k`` and page ``id`` is at ``id * 4096`` in ``mem``.

    Returns (frames, slots used, error).  A chain is data responses joined by
    ``NETRXF_more_data``, each followed by the extra-info slots its
    ``NETRXF_extra_info`` (then each record's MORE flag) announces; a data response must
    carry its page's id, a known status and stay inside its page; an extra-info record
    must be valid (:func:`validate_extra`); a chain may use :data:`MAX_RX_CHAIN` slots.
    The scan stops after the last complete chain (the slots after it begin a chain that
    continues in the next batch) or at a chain that breaks one of these rules (``error``
    says which; the frames before it stand).  A page id outside ``mem`` is the caller's
    mistake (ValueError)."""
    view = memoryview(batch).cast("B")
    pages = memoryview(mem).cast("B")
    if count < 0 or count * RX_RING.slot_size > len(view):
        raise ValueError("batch too short for the slots")
    frames: list[RxFrame] = []
    pos = 0
    while pos < count:  # one chain from pos
        k, slots = pos, 0
        pieces: list[bytes] = []
        failed, first, more, extra = False, -1, False, False
        gso: tuple[int, int] = (0, 0)
        rss: tuple[int | None, int] = (None, 0)
        while True:
            if k >= count:
                return frames, pos, None  # continued in the next batch
            if k >= len(posted):
                return frames, pos, "an RX response without a posted page"
            idx = posted[k]
            slots += 1
            if slots > MAX_RX_CHAIN:
                return frames, pos, f"an RX chain longer than {MAX_RX_CHAIN} slots"
            off = k * RX_RING.slot_size
            k += 1
            try:
                if extra:
                    record = parse_extra(view, off)
                    validate_extra(record)
                    if isinstance(record, GsoExtra):
                        gso = (record.gso_type, record.size)
                    elif isinstance(record, HashExtra) and record.hash_type < 4:
                        rss = (record.value, 1 << record.hash_type)
                    extra = bool(record.flags & XEN_NETIF_EXTRA_FLAG_MORE)
                else:
                    rid, offset, flags, status = RX_RESPONSE_STRUCT.unpack_from(view, off)
                    if rid != idx:
                        raise ProtocolError(f"RX response id {rid} in the slot of page {idx}")
                    n = check_rx_response(rid, offset, status)
                    if status < 0:
                        failed = True
                    else:
                        if idx < 0 or (idx + 1) * XEN_PAGE_SIZE > len(pages):
                            raise ValueError(f"page {idx} is outside the pages")
                        at = idx * XEN_PAGE_SIZE + offset
                        pieces.append(bytes(pages[at:at + n]))
                    if first < 0:
                        first = flags
                    more = bool(flags & NETRXF_more_data)
                    extra = bool(flags & NETRXF_extra_info)
            except ProtocolError as exc:
                return frames, pos, str(exc)
            if not more and not extra:
                break
        data = b"".join(pieces)
        frames.append((None if failed or not data else data, first, *gso, *rss))
        pos = k
    return frames, pos, None


def _compiled_scan_rx() -> Any:
    """The compiled RX scan, or None (not built, or ``XENPV_PURE_PYTHON=1``)."""
    return compiled_attr("xenpv.protocols._netrx", "scan_rx")


_SCAN_RX = _compiled_scan_rx()


def scan_rx(batch: Buffer, count: int, posted: Sequence[int], mem: Buffer
            ) -> tuple[list[RxFrame], int, str | None]:
    """:func:`scan_rx_reference`, compiled (``cython/netrx.pyx``: one pass over the
    responses, each frame's bytes gathered from its pages into one new object) where
    built."""
    if _SCAN_RX is None:
        return scan_rx_reference(batch, count, posted, mem)
    result: tuple[list[RxFrame], int, str | None] = _SCAN_RX(batch, count, posted, mem)
    return result

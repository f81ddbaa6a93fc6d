"""What each request/response ring protocol means to a fuzzer, built on ``xenpv.protocols``.

A :class:`RingSpec` bundles, for one ``DEFINE_RING_TYPES`` ring (blkif, netif tx/rx/ctrl,
usbif urb/conn), the slot geometry and the sans-IO steps both halves of a driver perform
on it:

* backend: :attr:`RingSpec.serve` turns a batch of request slots (private copies) into one
  response per slot; per-request errors become error responses, structural violations
  raise a :class:`~xenpv.errors.PeerError` (the frontend is then misbehaving);
* frontend: :attr:`RingSpec.build_request` makes a valid request with a given id,
  :attr:`RingSpec.check_response` validates a response against the outstanding request;
* both: :attr:`RingSpec.request_id` / :attr:`RingSpec.response_id` read the id field.

Only ``xenpv.protocols`` parsers and validators are used, so fuzzing a spec fuzzes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xenpv.errors import PeerError
from xenpv.fuzz.source import ByteSource
from xenpv.protocols import ProtocolError, blkif, netif, usbif

__all__ = ["RING_SPECS", "RingSpec", "ServeResult"]


@dataclass(frozen=True)
class ServeResult:
    """The answer to a batch: responses (one per answered slot) and slots left pending."""

    responses: list[bytes]
    pending: int = 0


@dataclass(frozen=True)
class RingSpec:
    """One ring protocol as seen by the fuzz victims and the hostile peers."""

    name: str
    description: str
    request_size: int
    response_size: int
    #: ``io/*.h`` id field width in bytes (u64 for blkif, u16 elsewhere).
    id_bytes: int
    #: Requests (private slot copies) -> responses; PeerError marks the frontend bad.
    serve: Callable[[list[bytes]], ServeResult]
    #: A valid request with id ``rid``; the source picks the other fields.
    build_request: Callable[[int, ByteSource], bytes]
    #: A valid-but-nasty request (edge values the backend must refuse politely).
    build_nasty: Callable[[int, ByteSource], bytes]
    #: Check a response (private copy) against the request it answers; PeerError if bad.
    check_response: Callable[[bytes, bytes], None]
    #: A response a benign backend sends to ``request`` (the hostile backend's base).
    build_response: Callable[[bytes, ByteSource], bytes]
    #: Most request slots one answer may leave pending (netif TX chains).
    max_pending: int = 0

    @property
    def slot_size(self) -> int:
        """io/ring.h: a slot is the union of the request and the response."""
        return max(self.request_size, self.response_size)

    def request_id(self, slot: bytes) -> int:
        """The id field of a request slot (offset 0 except blkif's u64 at 8)."""
        off = 8 if self.name == "blkif" else 0
        return int.from_bytes(slot[off : off + self.id_bytes], "little")

    def response_id(self, slot: bytes) -> int:
        """The id field of a response slot (always at offset 0)."""
        return int.from_bytes(slot[: self.id_bytes], "little")


def _pad(data: bytes, size: int) -> bytes:
    return data + bytes(size - len(data))


# -- blkif -----------------------------------------------------------------------------------

#: The disk the fuzz victims pretend to serve (sectors).
DISK_SECTORS = 1 << 16
_BLK = blkif.layouts()


def _blk_serve(slots: list[bytes]) -> ServeResult:
    out = []
    for slot in slots:
        req = blkif.parse_request(slot)
        try:
            blkif.validate_request(req, disk_sectors=DISK_SECTORS)
            status = blkif.BLKIF_RSP_OKAY
        except blkif.BlkifRequestError as e:
            status = e.status
        rsp = blkif.BlkifResponse(req.id, req.operation, status).pack()
        out.append(_pad(rsp, _BLK.ring.slot_size))
    return ServeResult(out)


def _blk_request(rid: int, src: ByteSource) -> bytes:
    nseg = 1 + src.below(blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST)
    segs = []
    for _ in range(nseg):
        first = src.below(8)
        segs.append(blkif.Segment(8 + src.below(64), first, first + src.below(8 - first)))
    op = src.choice((blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE))
    sector = src.below(DISK_SECTORS - 128)
    return blkif.BlkifRequest.rw(op, 0, rid, sector, tuple(segs)).pack()


def _blk_nasty(rid: int, src: ByteSource) -> bytes:
    kind = src.below(6)
    if kind == 0:  # nr_segments 0 or above 11 (scenario 4)
        nr = src.choice((0, 12, 255))
        return blkif.BlkifRequest(blkif.BLKIF_OP_READ, nr, 0, rid, 0, ()).pack()
    if kind == 1:  # first_sect > last_sect, last_sect > 7
        seg = src.choice((blkif.Segment(9, 5, 2), blkif.Segment(9, 0, 8), blkif.Segment(9, 255, 255)))
        return blkif.BlkifRequest.rw(blkif.BLKIF_OP_WRITE, 0, rid, 0, (seg,)).pack()
    if kind == 2:  # beyond the disk, or wrapping u64
        sector = src.choice((DISK_SECTORS, DISK_SECTORS - 1, (1 << 64) - 1))
        return blkif.BlkifRequest.rw(blkif.BLKIF_OP_READ, 0, rid, sector, (blkif.Segment(9, 0, 7),)).pack()
    if kind == 3:  # unknown operation
        return blkif.BlkifRequest(src.choice((4, 7, 200, 255)), 1, 0, rid, 0, (blkif.Segment(9, 0, 0),)).pack()
    if kind == 4:  # discard with a bad flag or nothing to discard
        return blkif.BlkifRequestDiscard(blkif.BLKIF_OP_DISCARD, src.choice((0, 2, 255)), 0, rid,
                                         src.u32(), src.choice((0, 1, 1 << 63))).pack()
    return blkif.BlkifRequestIndirect(blkif.BLKIF_OP_INDIRECT, src.choice((0, 1, 9)),
                                      src.choice((0, 1, 4096, 65535)), rid, 0, 0).pack()


def _blk_check(rsp: bytes, req: bytes) -> None:
    r = blkif.BlkifResponse.parse(rsp)
    blkif.validate_response(r, req[0])


def _blk_response(req: bytes, src: ByteSource) -> bytes:
    r = blkif.parse_request(req)
    return _pad(blkif.BlkifResponse(r.id, r.operation, blkif.BLKIF_RSP_OKAY).pack(), _BLK.ring.slot_size)


# -- netif -----------------------------------------------------------------------------------

_TX = netif.TX_RING.slot_size
_NET_STATUS = (netif.NETIF_RSP_DROPPED, netif.NETIF_RSP_ERROR, netif.NETIF_RSP_OKAY, netif.NETIF_RSP_NULL)


def _tx_answer(slots: list[bytes], status: int) -> list[bytes]:
    return [_pad(netif.TxResponse(netif.TxRequest.parse(s).id, status).pack(), _TX) for s in slots]


def _tx_serve(slots: list[bytes]) -> ServeResult:
    """netback's TX path: assemble packets over the slots; drop bad ones, error on fatal."""
    out: list[bytes] = []
    blob = memoryview(b"".join(slots))
    at = 0
    while at < len(slots):
        chunk = slots[at:]
        try:
            pkt = netif.parse_tx_packet(blob[at * _TX :], len(chunk))
        except netif.NetifPacketError as e:
            out += _tx_answer(chunk[: e.slots], netif.NETIF_RSP_ERROR)
            at += e.slots
            continue
        if pkt is None:  # the chain continues beyond what the frontend pushed so far
            return ServeResult(out, len(chunk))
        out += _tx_answer(chunk[: pkt.slots], netif.NETIF_RSP_OKAY)
        at += pkt.slots
    return ServeResult(out)


def _tx_request(rid: int, src: ByteSource) -> bytes:
    size = 14 + src.below(1500)
    return netif.TxRequest(8 + src.below(64), src.below(4096 - size), 0, rid, size).pack()


def _tx_nasty(rid: int, src: ByteSource) -> bytes:
    kind = src.below(4)
    if kind == 0:  # fragment running past its page (fatal, scenario 6)
        return netif.TxRequest(9, 4000, 0, rid, 200).pack()
    if kind == 1:  # more_data chain start (a long chain needs many of these)
        return netif.TxRequest(9, 0, netif.NETTXF_more_data, rid, src.u16()).pack()
    if kind == 2:  # zero-length packet
        return netif.TxRequest(9, 0, 0, rid, 0).pack()
    return netif.TxRequest(9, 0, netif.NETTXF_extra_info, rid, 64).pack()


def _tx_check(rsp: bytes, req: bytes) -> None:
    r = netif.TxResponse.parse(rsp)
    if r.status not in _NET_STATUS:
        raise ProtocolError(f"netif tx response {r.id}: unknown status {r.status}")


def _tx_response(req: bytes, src: ByteSource) -> bytes:
    return _tx_answer([req], netif.NETIF_RSP_OKAY)[0]


_RX = netif.RX_RING.slot_size


def _rx_serve(slots: list[bytes]) -> ServeResult:
    """The backend fills each posted RX buffer with a small packet."""
    out = []
    for s in slots:
        req = netif.RxRequest.parse(s)
        out.append(_pad(netif.RxResponse(req.id, 0, 0, 60).pack(), _RX))
    return ServeResult(out)


def _rx_request(rid: int, src: ByteSource) -> bytes:
    return netif.RxRequest(rid, 0, 8 + src.below(64)).pack()


def _rx_nasty(rid: int, src: ByteSource) -> bytes:
    return netif.RxRequest(rid, src.u16(), src.u32()).pack()


def _rx_check(rsp: bytes, req: bytes) -> None:
    netif.validate_rx_response(netif.RxResponse.parse(rsp))


def _rx_response(req: bytes, src: ByteSource) -> bytes:
    return _pad(netif.RxResponse(netif.RxRequest.parse(req).id, src.below(64), 0,
                                 src.below(2048)).pack(), _RX)


_CTRL = netif.CTRL_RING.slot_size
_CTRL_STATUS = (netif.XEN_NETIF_CTRL_STATUS_SUCCESS, netif.XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED,
                netif.XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER, netif.XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW)


def _ctrl_serve(slots: list[bytes]) -> ServeResult:
    out = []
    for s in slots:
        req = netif.CtrlRequest.parse(s)
        ok = req.type == netif.XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS
        status = netif.XEN_NETIF_CTRL_STATUS_SUCCESS if ok else netif.XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED
        out.append(_pad(netif.CtrlResponse(req.id, req.type, status, 0).pack(), _CTRL))
    return ServeResult(out)


def _ctrl_request(rid: int, src: ByteSource) -> bytes:
    return netif.CtrlRequest(rid, 1 + src.below(10), (0, 0, 0)).pack()


def _ctrl_nasty(rid: int, src: ByteSource) -> bytes:
    return netif.CtrlRequest(rid, src.u16(), (src.u32(), src.u32(), src.u32())).pack()


def _ctrl_check(rsp: bytes, req: bytes) -> None:
    r = netif.CtrlResponse.parse(rsp)
    if r.status not in _CTRL_STATUS:
        raise ProtocolError(f"netif ctrl response {r.id}: unknown status {r.status}")
    if r.type != netif.CtrlRequest.parse(req).type:
        raise ProtocolError(f"netif ctrl response {r.id}: type {r.type} is not the request's")


def _ctrl_response(req: bytes, src: ByteSource) -> bytes:
    r = netif.CtrlRequest.parse(req)
    return _pad(netif.CtrlResponse(r.id, r.type, 0, src.u32()).pack(), _CTRL)


# -- usbif -----------------------------------------------------------------------------------

_URB = usbif.URB_RING.slot_size


def _urb_serve(slots: list[bytes]) -> ServeResult:
    out = []
    for s in slots:
        req = usbif.UrbRequest.parse(s)
        try:
            usbif.validate_urb_request(req)
            status = usbif.USBIF_STATUS_OK
        except ProtocolError:
            status = usbif.USBIF_STATUS_INVAL
        out.append(_pad(usbif.UrbResponse(req.id, 0, status, 0, 0).pack(), _URB))
    return ServeResult(out)


def _urb_request(rid: int, src: ByteSource) -> bytes:
    pipe = usbif.Pipe(1 + src.below(usbif.USBIF_MAX_PORTNR), False, src.boolean(), src.below(128),
                      src.below(16), usbif.USBIF_PIPE_TYPE_BULK).encode()
    length = src.below(4096)
    seg = usbif.UsbSegment(8 + src.below(64), 0, length)
    return usbif.UrbRequest(rid, 1, pipe, 0, length, bytes(8), (seg,)).pack()


def _urb_nasty(rid: int, src: ByteSource) -> bytes:
    pipe = src.u32()
    segs = tuple(usbif.UsbSegment(src.u32(), src.u16(), src.u16()) for _ in range(src.below(17)))
    return usbif.UrbRequest(rid, src.u16(), pipe, src.u16(), src.u16(), src.take(8), segs).pack()


_USB_STATUS = (usbif.USBIF_STATUS_OK, usbif.USBIF_STATUS_NODEV, usbif.USBIF_STATUS_INVAL,
               usbif.USBIF_STATUS_STALL, usbif.USBIF_STATUS_IOERROR, usbif.USBIF_STATUS_BABBLE,
               usbif.USBIF_STATUS_SHUTDOWN)


def _urb_check(rsp: bytes, req: bytes) -> None:
    r = usbif.UrbResponse.parse(rsp)
    if r.status not in _USB_STATUS:
        raise ProtocolError(f"usbif urb response {r.id}: unknown status {r.status}")
    if not 0 <= r.actual_length <= usbif.UrbRequest.parse(req).buffer_length:
        raise ProtocolError(f"usbif urb response {r.id}: actual_length {r.actual_length} out of range")


def _urb_response(req: bytes, src: ByteSource) -> bytes:
    r = usbif.UrbRequest.parse(req)
    return _pad(usbif.UrbResponse(r.id, 0, 0, src.below(r.buffer_length + 1), 0).pack(), _URB)


_CONN = usbif.CONN_RING.slot_size


def _conn_serve(slots: list[bytes]) -> ServeResult:
    out = []
    for s in slots:
        req = usbif.ConnRequest.parse(s)
        out.append(_pad(usbif.ConnResponse(req.id, 1, usbif.USBIF_SPEED_HIGH).pack(), _CONN))
    return ServeResult(out)


def _conn_request(rid: int, src: ByteSource) -> bytes:
    return _pad(usbif.ConnRequest(rid).pack(), _CONN)


def _conn_check(rsp: bytes, req: bytes) -> None:
    usbif.validate_conn_response(usbif.ConnResponse.parse(rsp))


def _conn_response(req: bytes, src: ByteSource) -> bytes:
    rid = usbif.ConnRequest.parse(req).id
    return usbif.ConnResponse(rid, 1 + src.below(usbif.USBIF_MAX_PORTNR), src.below(4)).pack()


RING_SPECS: dict[str, RingSpec] = {
    s.name: s
    for s in (
        RingSpec("blkif", "block requests/responses (io/blkif.h, x86_64 ABI)",
                 _BLK.request.size, _BLK.response.size, 8, _blk_serve, _blk_request, _blk_nasty,
                 _blk_check, _blk_response),
        RingSpec("netif-tx", "network transmit ring (io/netif.h), packets over slot chains",
                 netif.TX_REQUEST_LAYOUT.size, netif.TX_RESPONSE_LAYOUT.size, 2, _tx_serve,
                 _tx_request, _tx_nasty, _tx_check, _tx_response,
                 max_pending=netif.FATAL_SKB_SLOTS_DEFAULT + netif.XEN_NETIF_EXTRA_TYPE_MAX + 1),
        RingSpec("netif-rx", "network receive ring (io/netif.h)",
                 netif.RX_REQUEST_LAYOUT.size, netif.RX_RESPONSE_LAYOUT.size, 2, _rx_serve,
                 _rx_request, _rx_nasty, _rx_check, _rx_response),
        RingSpec("netif-ctrl", "network control ring (io/netif.h)",
                 netif.CTRL_REQUEST_LAYOUT.size, netif.CTRL_RESPONSE_LAYOUT.size, 2, _ctrl_serve,
                 _ctrl_request, _ctrl_nasty, _ctrl_check, _ctrl_response),
        RingSpec("usbif-urb", "USB request ring (io/usbif.h)",
                 usbif.URB_REQUEST_LAYOUT.size, usbif.URB_RESPONSE_LAYOUT.size, 2, _urb_serve,
                 _urb_request, _urb_nasty, _urb_check, _urb_response),
        RingSpec("usbif-conn", "USB port-connection ring (io/usbif.h)",
                 usbif.CONN_REQUEST_LAYOUT.size, usbif.CONN_RESPONSE_LAYOUT.size, 2, _conn_serve,
                 _conn_request, _conn_request, _conn_check, _conn_response),
    )
}


def is_peer_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the only kind of error hostile input may produce."""
    return isinstance(exc, PeerError)

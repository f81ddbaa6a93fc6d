"""Acceptance oracles: what an input the validators ACCEPT must satisfy, stated from the spec.

Theory of operation
-------------------
The parse fuzz targets and the property tests used to check only that hostile input
raised a peer error and nothing else.  That cannot notice a validator that accepts too
much: one that stops after the first segment, compares with ``>`` instead of ``>=``, or
forgets the second coordinate passes every such test.  An *oracle* closes the gap: when
the code under test accepts an input, the oracle re-reads the **raw bytes** (or the raw
xenstore value) and checks the spec's invariants on them, and that the parsed result the
code returned says the same as the bytes.

The oracles are deliberately written apart from the validators: they decode the records
with :mod:`struct` at the offsets of xen-protocols.md (§6.1-6.2 blkif, §7.1-7.3 netif,
§9.2 kbdif, §10.1 vchan, §11 usbif, §4.9/§8.1 byte rings, §5.3 keys), with constants
written here, and they never call a function of :mod:`xenpv.protocols` or
:mod:`xenpv.xenbus.keys`.  Parsed results are only *read* (attributes compared with the
bytes).  A violation raises :class:`~xenpv.fuzz.hostile.InvariantViolation`, which the
fuzz engines record as a failure with a reproducer.

An oracle states what is *necessary* for acceptance, not everything a validator may
refuse in addition (a validator may be stricter; see docs/testing.md for each oracle).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from xenpv.fuzz.hostile import InvariantViolation

__all__ = [
    "blkif_indirect_segments",
    "blkif_request",
    "blkif_response",
    "byte_ring_free",
    "byte_ring_readable",
    "kbdif_event",
    "netif_extra",
    "netif_rx_response",
    "netif_tx_packet",
    "usbif_conn_response",
    "usbif_urb_request",
    "vchan_grants",
    "xenstore_ring_used",
    "xs_bool",
    "xs_canonical_uint",
    "xs_decimal",
    "xs_protocol",
    "xs_virtual_device",
]

PAGE = 4096
U32 = 1 << 32


def _fail(what: str, message: str) -> None:
    raise InvariantViolation(f"oracle {what}: accepted input breaks the spec: {message}")


def _u8(raw: bytes, off: int) -> int:
    return raw[off]


def _u16(raw: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", raw, off)[0])


def _i16(raw: bytes, off: int) -> int:
    return int(struct.unpack_from("<h", raw, off)[0])


def _u32(raw: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", raw, off)[0])


def _i32(raw: bytes, off: int) -> int:
    return int(struct.unpack_from("<i", raw, off)[0])


def _u64(raw: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", raw, off)[0])


def _same(what: str, field: str, parsed: Any, raw_value: Any) -> None:
    if parsed != raw_value:
        _fail(what, f"parsed {field} {parsed!r} but the bytes say {raw_value!r}")


# -- blkif (§6.1, §6.2) -------------------------------------------------------------------------

#: Offsets by ABI: id, sector_number, seg[] (read/write), nr_sectors (discard), indirect grefs.
_BLK_OFFSETS: dict[str, dict[str, int]] = {
    "x86_64-abi": {"id": 8, "sector": 16, "seg": 24, "nr_sectors": 24, "grefs": 28},
    "arm-abi": {"id": 8, "sector": 16, "seg": 24, "nr_sectors": 24, "grefs": 28},
    "x86_32-abi": {"id": 4, "sector": 12, "seg": 20, "nr_sectors": 20, "grefs": 24},
}
_BLK_DIRECT_MAX = 11
_BLK_SECTOR_MAX = 7  # first_sect/last_sect index 512-byte sectors of one 4 KiB page
_BLK_INDIRECT_PER_PAGE = 512
_BLK_INDIRECT_PAGES = 8


def _abi_name(abi: Any) -> str:
    return str(getattr(abi, "value", abi))


def _blk_segment(what: str, raw: bytes, off: int, k: int, parsed: Any | None) -> int:
    """Check segment ``k`` at ``raw[off:off+8]``; return its sector count."""
    gref, first, last = _u32(raw, off), _u8(raw, off + 4), _u8(raw, off + 5)
    if not first <= last <= _BLK_SECTOR_MAX:
        _fail(what, f"segment {k} sectors first={first} last={last} (need first <= last <= 7)")
    if parsed is not None:
        _same(what, f"seg[{k}]", (parsed.gref, parsed.first_sect, parsed.last_sect), (gref, first, last))
    return last - first + 1


def _inside_disk(what: str, sector: int, count: int, disk_sectors: int | None) -> None:
    if disk_sectors is not None and count > 0 and sector + count > disk_sectors:
        _fail(what, f"sectors {sector}+{count} run past the disk of {disk_sectors}")


def blkif_request(
    slot: bytes,
    abi: Any,
    req: Any,
    *,
    max_indirect_segments: int = 0,
    disk_sectors: int | None = None,
    supported_ops: frozenset[int] | None = None,
) -> None:
    """A blkif request slot the backend accepted (``req`` is what it parsed from ``slot``).

    Operation known (0-3, 5, 6) and supported; read/write carry 1..11 segments,
    barrier/flush 0..11, each of the first ``nr_segments`` segments ``first <= last <= 7``;
    discard: flag only SECURE, at least one sector; indirect: ``indirect_op`` read/write,
    1..min(advertised, 4096) segments, and indirect offered at all; the sector range
    inside the disk; the parsed id, sector and segments equal the bytes.
    """
    what = "blkif request"
    o = _BLK_OFFSETS[_abi_name(abi)]
    op, rid, sector = _u8(slot, 0), _u64(slot, o["id"]), _u64(slot, o["sector"])
    _same(what, "operation", req.operation, op)
    _same(what, "id", req.id, rid)
    _same(what, "sector_number", req.sector_number, sector)
    if supported_ops is not None and op not in supported_ops:
        _fail(what, f"operation {op} accepted although not supported")
    if op == 5:  # discard
        flag, nr = _u8(slot, 1), _u64(slot, o["nr_sectors"])
        if flag & ~1:
            _fail(what, f"discard flag {flag:#x} has unknown bits")
        if nr == 0:
            _fail(what, "discard of 0 sectors")
        _same(what, "nr_sectors", req.nr_sectors, nr)
        _inside_disk(what, sector, nr, disk_sectors)
    elif op == 6:  # indirect
        ind_op, nr = _u8(slot, 1), _u16(slot, 2)
        if max_indirect_segments <= 0:
            _fail(what, "indirect request accepted although indirect is not offered")
        if ind_op not in (0, 1):
            _fail(what, f"indirect_op {ind_op} is not read or write")
        limit = min(max_indirect_segments, _BLK_INDIRECT_PER_PAGE * _BLK_INDIRECT_PAGES)
        if not 1 <= nr <= limit:
            _fail(what, f"indirect nr_segments {nr} outside 1..{limit}")
        _same(what, "nr_segments", req.nr_segments, nr)
        grefs = struct.unpack_from("<8I", slot, o["grefs"])
        _same(what, "indirect_grefs", tuple(req.indirect_grefs), tuple(grefs))
    elif op in (0, 1, 2, 3):
        nr = _u8(slot, 1)
        low = 1 if op in (0, 1) else 0
        if not low <= nr <= _BLK_DIRECT_MAX:
            _fail(what, f"operation {op} with nr_segments {nr} outside {low}..{_BLK_DIRECT_MAX}")
        _same(what, "nr_segments", req.nr_segments, nr)
        segs = tuple(req.seg)
        _same(what, "segment count", len(segs), nr)
        total = sum(_blk_segment(what, slot, o["seg"] + 8 * k, k, segs[k]) for k in range(nr))
        _inside_disk(what, sector, total, disk_sectors)
    else:
        _fail(what, f"unknown operation {op} accepted")


def blkif_indirect_segments(
    pages: Sequence[bytes], nr_segments: int, segs: Sequence[Any], sector_number: int,
    disk_sectors: int | None,
) -> None:
    """Indirect segments the backend accepted: segment k is page k//512 at (k%512)*8."""
    what = "blkif indirect segments"
    _same(what, "segment count", len(segs), nr_segments)
    total = 0
    for k in range(nr_segments):
        page, slot = divmod(k, _BLK_INDIRECT_PER_PAGE)
        total += _blk_segment(what, pages[page], slot * 8, k, segs[k])
    _inside_disk(what, sector_number, total, disk_sectors)


def blkif_response(raw: bytes, expected_operation: int | None = None) -> None:
    """A blkif response the frontend accepted: status OKAY/ERROR/EOPNOTSUPP, operation echoed."""
    what = "blkif response"
    status = _i16(raw, 10)  # id u64 @0, operation u8 @8, status i16 @10 in every ABI
    if status not in (0, -1, -2):
        _fail(what, f"status {status} is not OKAY, ERROR or EOPNOTSUPP")
    if expected_operation is not None and _u8(raw, 8) != expected_operation:
        _fail(what, f"operation {_u8(raw, 8)} is not the request's {expected_operation}")


# -- netif (§7.1-7.3) ---------------------------------------------------------------------------

_TX_SLOT = 12
_NETTXF_MORE_DATA = 0x4
_NETTXF_EXTRA_INFO = 0x8
_EXTRA_MORE = 0x1
_NET_MAX_SIZE = 0xFFFF


def _extra_ok(what: str, raw: bytes, off: int) -> None:
    etype, flags = _u8(raw, off), _u8(raw, off + 1)
    if not 1 <= etype <= 4:
        _fail(what, f"extra-info type {etype} (valid: GSO 1, MCAST_ADD 2, MCAST_DEL 3, HASH 4)")
    if flags & ~_EXTRA_MORE:
        _fail(what, f"extra-info flags {flags:#x} have bits other than MORE")


def netif_extra(raw: bytes) -> None:
    """An extra-info record the backend accepted: type 1..4, flags only MORE."""
    _extra_ok("netif extra-info", raw, 0)


def netif_rx_response(raw: bytes, count: int) -> None:
    """An RX response the frontend accepted (``count`` = the byte count it took from it)."""
    what = "netif rx response"
    offset, status = _u16(raw, 2), _i16(raw, 6)
    if status < 0:
        if status not in (-1, -2):
            _fail(what, f"negative status {status} is neither ERROR nor DROPPED")
        _same(what, "byte count", count, 0)
        return
    if offset + status > PAGE:
        _fail(what, f"data {offset}+{status} runs past the page")
    _same(what, "byte count", count, status)


def netif_tx_packet(
    slots: bytes, count: int, packet: Any, *, max_slots: int, fatal_slots: int
) -> None:
    """A TX chain the backend accepted (``packet``: what it assembled, or None = incomplete).

    Walked again from the bytes: the first request, its extra-info chain, then the
    ``more_data`` chain.  A complete packet: every extra valid, at most ``max_slots``
    data slots and ``fatal_slots`` after the first, total size 1..0xFFFF (no zero-length
    packet, except the dummy request of a multicast filter change, which carries an
    MCAST_ADD/DEL extra), the other fragments within the total, every fragment inside its page, and
    the parsed fragments, size and slot count equal to the walk.  ``None`` must mean the
    chain really runs past the ``count`` slots, with what was seen still legal.
    """
    what = "netif tx packet"

    def req(i: int) -> tuple[int, int, int, int, int]:
        off = i * _TX_SLOT
        return (_u32(slots, off), _u16(slots, off + 4), _u16(slots, off + 6), _u16(slots, off + 8),
                _u16(slots, off + 10))

    used, complete = 1, True
    first = req(0)
    mcast = False
    if first[2] & _NETTXF_EXTRA_INFO:
        more = True
        while more and complete:
            if used >= count:
                complete = False
                break
            _extra_ok(what, slots, used * _TX_SLOT)
            mcast |= _u8(slots, used * _TX_SLOT) in (2, 3)  # MCAST_ADD, MCAST_DEL
            more = bool(_u8(slots, used * _TX_SLOT + 1) & _EXTRA_MORE)
            used += 1
    data = [first]
    flags = first[2]
    while complete and flags & _NETTXF_MORE_DATA:  # bounded by count
        if used >= count:
            complete = False
            break
        r = req(used)
        used += 1
        data.append(r)
        flags = r[2]
    following = len(data) - 1
    if following > fatal_slots:
        _fail(what, f"{following} slots after the first (> fatal_slots {fatal_slots})")
    if packet is None:
        if complete:
            _fail(what, f"the chain is complete in {used} of {count} slots, yet reported incomplete")
        return
    if not complete:
        _fail(what, f"the chain runs past the {count} slots given, yet a packet was assembled")
    if len(data) > max_slots:
        _fail(what, f"{len(data)} data slots (> max_slots {max_slots})")
    total = first[4]
    rest = sum(r[4] for r in data[1:])
    if not (0 if mcast else 1) <= total <= _NET_MAX_SIZE:
        _fail(what, f"packet size {total} outside 1..{_NET_MAX_SIZE}")
    if rest > total:
        _fail(what, f"fragments after the first ({rest}) exceed the packet size {total}")
    frags = [(first[0], first[1], total - rest)] + [(r[0], r[1], r[4]) for r in data[1:]]
    for k, (_gref, offset, length) in enumerate(frags):
        if offset + length > PAGE:
            _fail(what, f"fragment {k} at {offset}+{length} crosses its page")
    _same(what, "slots", packet.slots, used)
    _same(what, "size", packet.size, total)
    _same(what, "fragments", [(f.gref, f.offset, f.length) for f in packet.fragments], frags)


# -- kbdif (§9.2) ------------------------------------------------------------------------------


def kbdif_event(raw: bytes, *, width: int, height: int, num_contacts: int | None) -> None:
    """A 40-byte in-ring event the frontend accepted.

    Type MOTION 1, KEY 3, POS 4 or MTOUCH 5; KEY pressed 0/1; POS and multi-touch
    DOWN/MOTION coordinates inside 0..width x 0..height (both coordinates); multi-touch
    sub-type 0..5, contact id below ``num_contacts``, orientation -180..180.
    """
    what = "kbdif event"
    etype = _u8(raw, 0)

    def inside(x: int, y: int) -> None:
        if not (0 <= x <= width and 0 <= y <= height):
            _fail(what, f"position ({x}, {y}) outside the {width}x{height} screen")

    if etype == 1:
        return
    if etype == 3:
        if _u8(raw, 1) not in (0, 1):
            _fail(what, f"key pressed={_u8(raw, 1)}")
    elif etype == 4:
        inside(_i32(raw, 4), _i32(raw, 8))
    elif etype == 5:
        sub, contact = _u8(raw, 1), _u8(raw, 2)
        if sub > 5:
            _fail(what, f"multi-touch sub-type {sub}")
        if num_contacts is not None and contact >= num_contacts:
            _fail(what, f"contact id {contact} not below {num_contacts}")
        if sub in (0, 2):  # DOWN, MOTION
            inside(_i32(raw, 8), _i32(raw, 12))
        elif sub == 5 and not -180 <= _i16(raw, 8) <= 180:
            _fail(what, f"orientation {_i16(raw, 8)} outside -180..180")
    else:
        _fail(what, f"event type {etype}")


# -- usbif (§11) -------------------------------------------------------------------------------

_USB_MAX_SEGS = 16
_USB_MAX_PORT = 31


def _usb_port(what: str, port: int, num_ports: int) -> None:
    if not 1 <= port <= min(num_ports, _USB_MAX_PORT):
        _fail(what, f"port {port} outside 1..{min(num_ports, _USB_MAX_PORT)}")


def usbif_urb_request(raw: bytes, num_ports: int) -> None:
    """A urb the backend accepted: port in range; unless an unlink, at most 16 segments
    (buffer + isochronous frame descriptors), every one inside its page, the buffer
    segments holding no more than ``buffer_length``."""
    what = "usbif urb"
    pipe = _u32(raw, 4)
    _usb_port(what, pipe & 0x1F, num_ports)
    if pipe & 0x20:
        return
    nbuf, buffer_length = _u16(raw, 2), _u16(raw, 10)
    ndesc = _u16(raw, 18) if (pipe >> 30) & 3 == 0 else 0  # u.isoc.nr_frame_desc_segs
    if nbuf + ndesc > _USB_MAX_SEGS:
        _fail(what, f"{nbuf}+{ndesc} segments (> {_USB_MAX_SEGS})")
    held = 0
    for k in range(nbuf + ndesc):
        off = 20 + 8 * k
        offset, length = _u16(raw, off + 4), _u16(raw, off + 6)
        if offset + length > PAGE:
            _fail(what, f"segment {k} at {offset}+{length} crosses its page")
        if k < nbuf:
            held += length
    if held > buffer_length:
        _fail(what, f"buffer segments hold {held} > buffer_length {buffer_length}")


def usbif_conn_response(raw: bytes, num_ports: int) -> None:
    """A conn response the frontend accepted: port in range, speed NONE/LOW/FULL/HIGH."""
    what = "usbif conn response"
    _usb_port(what, _u8(raw, 2), num_ports)
    if _u8(raw, 3) > 3:
        _fail(what, f"speed {_u8(raw, 3)}")


# -- vchan (§10.1) -----------------------------------------------------------------------------


def vchan_grants(page: bytes, left: Sequence[int], right: Sequence[int]) -> None:
    """The grant lists a vchan client took from a control page it accepted.

    Orders 10..20, not both the same in-page order; 2^(order-12) pages per out-of-page
    ring (none in-page); the list (4 bytes per page from offset 24) ends inside the page
    and before any in-page ring (1024 for order 10, 2048 for 11); left's refs first.
    """
    what = "vchan control page"
    lo, ro = _u16(page, 16), _u16(page, 18)
    for name, order in (("left", lo), ("right", ro)):
        if not 10 <= order <= 20:
            _fail(what, f"{name} order {order} outside 10..20")
    if lo == ro and lo < 12:
        _fail(what, f"both rings in the same in-page slot (order {lo})")
    nl = 0 if lo < 12 else 1 << (lo - 12)
    nr = 0 if ro < 12 else 1 << (ro - 12)
    end = 24 + 4 * (nl + nr)
    limits = [PAGE] + [{10: 1024, 11: 2048}[o] for o in (lo, ro) if o < 12]
    if end > min(limits):
        _fail(what, f"grant list ends at {end}, beyond {min(limits)}")
    words = struct.unpack_from(f"<{nl + nr}I", page, 24)
    _same(what, "left grants", tuple(left), words[:nl])
    _same(what, "right grants", tuple(right), words[nl:])


# -- byte rings (§4.9, §8.1, §10.2) ------------------------------------------------------------


def _fill(prod: int, cons: int, size: int) -> int | None:
    """``prod - cons`` modulo 2^32, or None when it exceeds ``size`` (a corrupt pair)."""
    fill = (prod - cons) % U32
    return fill if fill <= size else None


def byte_ring_readable(prod: int, cons: int, size: int, readable: int) -> None:
    """Readable bytes a consumer computed from a peer's index pair: the fill
    (``prod - cons`` modulo 2^32), or 0 when the fill exceeds ``size`` (corrupt)."""
    fill = _fill(prod, cons, size)
    _same("byte ring", f"readable bytes (prod {prod} cons {cons} size {size})", readable,
          0 if fill is None else fill)


def byte_ring_free(prod: int, cons: int, size: int, free: int) -> None:
    """Free bytes a producer computed from an index pair: ``size`` minus the fill, or 0
    (full) when the fill exceeds ``size`` (corrupt)."""
    fill = _fill(prod, cons, size)
    _same("byte ring", f"free bytes (prod {prod} cons {cons} size {size})", free,
          0 if fill is None else size - fill)


def xenstore_ring_used(prod: int, cons: int, used: int) -> None:
    """A xenstore ring index pair accepted as sane: fill at most 1024 and reported exactly."""
    fill = (prod - cons) % U32
    if fill > 1024:
        _fail("xenstore ring", f"fill {fill} > 1024 accepted")
    _same("xenstore ring", "fill", used, fill)


# -- xenstore values (§5.3, §6.4, xenbus keys) --------------------------------------------------


def _digits(raw: bytes | str) -> bytes:
    return raw.encode("latin-1", "replace") if isinstance(raw, str) else bytes(raw)


def xs_decimal(raw: bytes | str, value: int, lo: int, hi: int, *, what: str = "xenstore number") -> None:
    """A decimal value accepted: only ASCII digits (no sign, space, prefix), 1..20 of them,
    worth ``value``, and ``lo <= value <= hi``."""
    text = _digits(raw)
    if not text or len(text) > 20 or any(not 0x30 <= c <= 0x39 for c in text):
        _fail(what, f"{text[:32]!r} is not plain decimal digits")
    _same(what, "value", value, int(text))
    if not lo <= value <= hi:
        _fail(what, f"{value} outside {lo}..{hi}")


def xs_canonical_uint(raw: bytes, value: int, lo: int, hi: int, *, what: str = "peer key") -> None:
    """A connect-time number accepted by a strict key parser: canonical decimal (digits
    only, no leading zero, at most 10 digits), worth ``value``, ``lo <= value <= hi``."""
    text = bytes(raw)
    xs_decimal(text, value, lo, hi, what=what)
    if len(text) > 10 or (len(text) > 1 and text[:1] == b"0"):
        _fail(what, f"{text!r} is not canonical (leading zero or more than 10 digits)")


def xs_bool(raw: bytes | None, value: bool, default: bool) -> None:
    """A ``feature-*``/``request-*`` flag accepted: exactly ``0`` or ``1``, or absent (default)."""
    want = default if raw is None else {b"0": False, b"1": True}.get(bytes(raw))
    if want is None:
        _fail("peer flag", f"{raw!r} accepted as {value}")
    _same("peer flag", "value", value, want)


def xs_protocol(raw: bytes | str | None, value: Any, default: Any) -> None:
    """A ``protocol`` accepted: one of the three ABI names (§6.2), or absent (the default)."""
    if raw is None:
        _same("protocol", "value", value, default)
        return
    text = _digits(raw)
    if text not in (b"x86_32-abi", b"x86_64-abi", b"arm-abi"):
        _fail("protocol", f"{text[:40]!r} accepted")
    _same("protocol", "value", _abi_name(value), text.decode())


def xs_virtual_device(raw: bytes | str, value: int) -> None:
    """A ``virtual-device`` number accepted: decimal below 2^29 whose encoding is one of
    xen-vbd-interface's: extended (bit 28), or major 202 (xvd), 8 (sd), 3/22 (hd, disk 0/1)."""
    xs_decimal(raw, value, 0, (1 << 29) - 1, what="virtual-device")
    if value & (1 << 28):
        return
    major = value >> 8
    if major not in (202, 8, 3, 22):
        _fail("virtual-device", f"{value}: major {major} is not xvd, sd or hd")
    if major in (3, 22) and (value >> 6) & 3 > 1:
        _fail("virtual-device", f"{value}: hd disk {(value >> 6) & 3} > 1")

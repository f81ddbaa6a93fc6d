"""Tests of the tests: every acceptance oracle fails on a deliberately broken validator.

Each case is a hostile input for one parse fuzz target and a *mutant*: the validator the
target calls, replaced by a copy with one typical slip (an off-by-one, a check of the
first element only, a forgotten coordinate, a missing lower bound).  The input is chosen
so that the real validator refuses it, the target passes, and the mutant accepts it; the
target must then fail with the oracle's InvariantViolation.  That proves each oracle is
wired into its target and notices what the old exception-type-only checks could not.
The mutants replace public validators by name, so the target is built after patching.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.seeds import Script
from xenpv.fuzz.targets import get_target
from xenpv.protocols import ProtocolError, blkif, kbdif, netif, usbif, vchan, xsring
from xenpv.xenbus import keys
from xenpv.xenbus.states import BadKeyError
from xenpv.xenstore import values

X86_64 = list(blkif.ABI).index(blkif.ABI.X86_64)


# -- inputs -------------------------------------------------------------------------------------


def _blk(slot: bytes, *, max_indirect: int = 0, disk: int = 1000, pages: bytes = b"") -> bytes:
    """parse:blkif input: ABI, slot, advertised indirect max, disk size, indirect pages."""
    slot = slot.ljust(blkif.layouts(blkif.ABI.X86_64).ring.slot_size, b"\0")
    return Script().b(X86_64).raw(slot).u32(max_indirect).u32(disk).raw(pages).done()


def _rw(*segs: tuple[int, int], sector: int = 0) -> bytes:
    seg = tuple(blkif.Segment(8 + k, f, last) for k, (f, last) in enumerate(segs))
    return blkif.BlkifRequest.rw(blkif.BLKIF_OP_READ, 0, 7, sector, seg).pack()


def _indirect(nr: int) -> bytes:
    return blkif.BlkifRequestIndirect(blkif.BLKIF_OP_INDIRECT, blkif.BLKIF_OP_READ, nr, 7, 0, 0).pack()


def _tx(*reqs: netif.TxRequest, max_slots: int = 18) -> bytes:
    """parse:netif input: slot count, the slots, max_slots (RX response and extra: zeros)."""
    body = b"".join(r.pack().ljust(netif.TX_RING.slot_size, b"\0") for r in reqs)
    return Script().b(len(reqs) - 1).raw(body).b(max_slots - 1).done()


def _netif_tail(rx: bytes = bytes(8), extra: bytes = bytes(8)) -> bytes:
    """parse:netif input with a valid one-slot packet, then the RX response and extra."""
    ok = netif.TxRequest(8, 0, 0, 1, 60).pack().ljust(netif.TX_RING.slot_size, b"\0")
    return Script().b(0).raw(ok).b(17).raw(rx).raw(extra).done()


def _kbd(event: Any, width: int = 800, height: int = 600, contacts: int = 4) -> bytes:
    return Script().raw(event.pack()).u16(width).u16(height).b(contacts).done()


def _urb(nbuf: int, length: int, segs: list[tuple[int, int]], *, ports: int = 8) -> bytes:
    pipe = usbif.Pipe(1, False, True, 2, 1, usbif.USBIF_PIPE_TYPE_BULK).encode()
    req = usbif.UrbRequest(1, nbuf, pipe, 0, length, bytes(8),
                           tuple(usbif.UsbSegment(8 + k, o, n) for k, (o, n) in enumerate(segs)))
    conn = usbif.ConnResponse(0, 1, usbif.USBIF_SPEED_HIGH).pack()
    return Script().raw(req.pack()).b(ports).raw(conn).done()


def _vchan_page(left: int, right: int) -> bytes:
    page = bytearray(4096)
    struct.pack_into("<HH", page, 16, left, right)
    n = vchan.nr_grants(left, right) if max(left, right) <= 21 else 0
    struct.pack_into(f"<{n}I", page, 24, *range(100, 100 + n))
    return bytes(page)


def _key(raw: bytes, which: int, *extra: int) -> bytes:
    """xenbus:keys input: one present value for key parser ``which``."""
    return Script().b(1, len(raw)).raw(raw).b(which, *extra).done()


def _xs_value(raw: bytes, which: int) -> bytes:
    """parse:xs-values input: one value for check ``which`` (grant, port, vdev, protocol)."""
    return Script().b(len(raw)).raw(raw).b(which).done()


def _indexes(prod: int, cons: int, order: int) -> bytes:
    return Script().raw(bytes(16)).u32(prod).u32(cons).b(order - vchan.VCHAN_MIN_ORDER).done()


# -- mutants -------------------------------------------------------------------------------------


def _segments_first_only(real: Callable[..., int]) -> Callable[..., int]:
    """validate_segments that checks only the first segment."""
    return lambda req, segs, disk: real(req, segs[:1], disk)


def _segment_last_off_by_one(seg: blkif.Segment) -> int:
    if seg.last_sect > blkif.SECTORS_PER_PAGE or seg.first_sect > seg.last_sect:  # should be >=
        raise ProtocolError("bad segment")
    return seg.nr_sectors


def _disk_off_by_one(real: Callable[..., None]) -> Callable[..., None]:
    return lambda req, **kw: real(req, **{**kw, "disk_sectors": kw.get("disk_sectors") and kw["disk_sectors"] + 1})


def _kbd_x_only(ev: Any, *, width: int = 800, height: int = 600, num_contacts: int | None = None) -> None:
    if isinstance(ev, kbdif.Position) and not 0 <= ev.abs_x <= width:
        raise ProtocolError("x outside the screen")  # the y check forgotten


def _kbd_contacts_off_by_one(real: Callable[..., None]) -> Callable[..., None]:
    return lambda ev, *, width, height, num_contacts: real(
        ev, width=width, height=height, num_contacts=None if num_contacts is None else num_contacts + 1)


def _urb_first_segment_only(req: usbif.UrbRequest, num_ports: int = 31) -> None:
    usbif.validate_port(req.pipe & usbif.USBIF_PIPE_PORT_MASK, num_ports)
    for s in req.seg[:1]:
        if s.offset + s.length > 4096:
            raise ProtocolError("segment crosses the page")


def _grants_without_equal_check(page: Any, left: int, right: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    for order in (left, right):
        if not 10 <= order <= 20:
            raise ProtocolError("order")
    nl, nr = vchan.pages_for_order(left), vchan.pages_for_order(right)
    refs = struct.unpack_from(f"<{nl + nr}I", page, 24)
    return tuple(refs[:nl]), tuple(refs[nl:])


def _grants_max_order_21(page: Any, left: int, right: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    for order in (left, right):
        if not 10 <= order <= 21:
            raise ProtocolError("order")
    nl, nr = vchan.pages_for_order(left), vchan.pages_for_order(right)
    refs = struct.unpack_from(f"<{nl + nr}I", page, 24)
    return tuple(refs[:nl]), tuple(refs[nl:])


def _lenient_uint(raw: bytes | None, key: str, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    """parse_uint that also takes leading zeros ("010")."""
    if raw is None or not raw.isdigit() or len(raw) > 10:
        raise BadKeyError(f"{key}: not a number")
    value = int(raw)
    if not lo <= value <= hi:
        raise BadKeyError(f"{key}: out of range")
    return value


def _port_off_by_one(raw: bytes | None, key: str = "event-channel") -> int:
    return keys.parse_uint(raw, key, 1, keys.EVTCHN_PORT_MAX + 1)


def _xs_number_no_minimum(real: Callable[..., int]) -> Callable[..., int]:
    """parse_xs_number that forgets the lower bound."""
    return lambda raw, key, *, lo=0, hi=0xFFFFFFFF, error=ProtocolError: real(
        raw, key, lo=0, hi=hi, error=error)


def _vdev_unchecked(value: str | bytes) -> int:
    text = value.decode() if isinstance(value, bytes) else value
    if not text.isdigit() or int(text) >= 1 << 29:
        raise ProtocolError("bad vdev")
    return int(text)  # the decode check forgotten


def _avail_insane_is_readable(prod: int, cons: int, size: int) -> int:
    return (prod - cons) & 0xFFFFFFFF  # a corrupt pair not reduced to 0


def _xs_ring_off_by_one(prod: int, cons: int) -> int:
    n = (prod - cons) & 0xFFFFFFFF
    if n > 1025:
        raise ProtocolError("corrupt")
    return n


def _rx_page_off_by_one(rsp: netif.RxResponse) -> int:
    if rsp.status < 0:
        return 0
    if rsp.offset + rsp.status > 4097:
        raise ProtocolError("past the page")
    return int(rsp.status)


def _check_slot_off_by_one(offset: int, length: int) -> None:
    if offset + length > 4097:
        raise netif.NetifFatalError("crosses the page")


@dataclass(frozen=True)
class Case:
    """One oracle, a mutant of the validator it guards and an input telling them apart."""

    name: str
    target: str
    data: bytes
    module: Any
    attr: str
    mutant: Callable[[Any], Any]  # built from the real validator


CASES = [
    Case("blkif-later-segment-not-checked", "parse:blkif", _blk(_rw((0, 7), (5, 2))),
         blkif, "validate_segments", _segments_first_only),
    Case("blkif-last-sect-8", "parse:blkif", _blk(_rw((0, 7), (0, 7), (0, 8))),
         blkif, "validate_segment", lambda real: _segment_last_off_by_one),
    Case("blkif-past-the-disk", "parse:blkif", _blk(_rw((0, 7), sector=993)),
         blkif, "validate_request", _disk_off_by_one),
    Case("blkif-indirect-later-segment", "parse:blkif",
         _blk(_indirect(3), max_indirect=8,
              pages=(blkif.pack_indirect_pages([blkif.Segment(8, 0, 7), blkif.Segment(9, 0, 7),
                                                blkif.Segment(10, 6, 5)])[0])),
         blkif, "validate_segments", _segments_first_only),
    Case("blkif-response-status", "parse:blkif",
         Script().b(X86_64).raw(_rw((0, 7))).u32(0).u32(1000)
         .raw(blkif.BlkifResponse(7, 0, 5).pack()).b(0).done(),
         blkif, "validate_response", lambda real: lambda rsp, op=None: None),
    Case("netif-later-fragment-crosses-page", "parse:netif",
         _tx(netif.TxRequest(8, 0, netif.NETTXF_more_data, 1, 200), netif.TxRequest(9, 4000, 0, 2, 97)),
         netif, "check_slot", lambda real: _check_slot_off_by_one),
    Case("netif-rx-past-page", "parse:netif",
         _netif_tail(rx=netif.RxResponse(1, 4000, 0, 97).pack()),
         netif, "validate_rx_response", lambda real: _rx_page_off_by_one),
    Case("netif-extra-type-5", "parse:netif",
         _netif_tail(extra=netif.ExtraInfo(5, 0).pack()),
         netif, "validate_extra", lambda real: lambda extra: None),
    Case("kbdif-y-outside-screen", "parse:kbdif", _kbd(kbdif.Position(kbdif.XENKBD_TYPE_POS, 10, 601)),
         kbdif, "validate_in_event", lambda real: _kbd_x_only),
    Case("kbdif-contact-id-off-by-one", "parse:kbdif",
         _kbd(kbdif.MTouchPos(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_DOWN, 4, 1, 1), contacts=4),
         kbdif, "validate_in_event", _kbd_contacts_off_by_one),
    Case("usbif-later-segment-crosses-page", "parse:usbif", _urb(2, 100, [(0, 10), (4090, 10)]),
         usbif, "validate_urb_request", lambda real: _urb_first_segment_only),
    Case("usbif-buffer-overrun", "parse:usbif", _urb(2, 15, [(0, 10), (0, 10)]),
         usbif, "validate_urb_request", lambda real: _urb_first_segment_only),
    Case("vchan-equal-in-page-orders", "parse:vchan", _vchan_page(11, 11),
         vchan, "parse_grants", lambda real: _grants_without_equal_check),
    Case("vchan-order-21", "parse:vchan", _vchan_page(12, 21),
         vchan, "parse_grants", lambda real: _grants_max_order_21),
    Case("keys-leading-zero", "xenbus:keys", _key(b"010", 1),
         keys, "parse_uint", lambda real: _lenient_uint),
    Case("keys-port-2-17", "xenbus:keys", _key(str(1 << 17).encode(), 1),
         keys, "parse_port", lambda real: _port_off_by_one),
    Case("keys-flag-yes", "xenbus:keys", _key(b"yes", 4),
         keys, "parse_bool", lambda real: lambda raw, key, default=False: raw is not None),
    Case("xs-port-0", "parse:xs-values", _xs_value(b"0", 1),
         values, "parse_xs_number", _xs_number_no_minimum),
    Case("xs-vdev-unknown-major", "parse:xs-values", _xs_value(b"4096", 2),
         blkif, "parse_virtual_device", lambda real: _vdev_unchecked),
    Case("vchan-avail-insane", "parse:byte-indexes", _indexes(3000, 0, 11),
         vchan, "ring_avail", lambda real: _avail_insane_is_readable),
    Case("xenstore-ring-1025", "parse:byte-indexes", _indexes(1025, 0, 10),
         xsring, "ring_used", lambda real: _xs_ring_off_by_one),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_real_validator_refuses_and_the_target_passes(case: Case) -> None:
    get_target(case.target)(case.data)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_oracle_catches_the_broken_validator(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(case.module, case.attr, case.mutant(getattr(case.module, case.attr)))
    fn = get_target(case.target)  # built after patching: some targets bind validators early
    with pytest.raises(InvariantViolation, match="oracle"):
        fn(case.data)


def test_every_parse_target_has_a_case() -> None:
    from xenpv.fuzz.targets import TARGETS

    guarded = {n for n in TARGETS if n.startswith("parse:")} | {"xenbus:keys"}
    assert guarded == {c.target for c in CASES}

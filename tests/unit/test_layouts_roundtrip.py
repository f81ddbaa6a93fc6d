"""Round trips of every protocol record: parse(pack(x)) == x, padding always packed as zero,
and the numpy dtype reading the same values as the struct."""

from __future__ import annotations

import inspect
import struct
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError
from xenpv.protocols import blkif, console, kbdif, netif, usbif, vchan, xsring
from xenpv.protocols.layout import Layout, Record

MODULES: list[ModuleType] = [blkif, console, kbdif, netif, usbif, vchan, xsring]
ABI_RECORDS = (blkif.BlkifRequest, blkif.BlkifRequestDiscard, blkif.BlkifRequestIndirect, blkif.BlkifResponse)


def _record_cases() -> list[tuple[type[Record], Any]]:
    cases: list[tuple[type[Record], Any]] = []
    for mod in MODULES:
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, Record) and cls.__module__ == mod.__name__ and hasattr(cls, "LAYOUT"):
                if cls in ABI_RECORDS:
                    cases.extend((cls, abi) for abi in blkif.ABI)
                else:
                    cases.append((cls, None))
    return cases


CASES = _record_cases()
EACH_RECORD = pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0].__name__}-{c[1].value if c[1] else 'native'}"
)


def _layout(cls: type[Record], abi: Any) -> Layout:
    return cls.layout(abi) if abi is not None else cls.LAYOUT  # type: ignore[attr-defined, no-any-return]


def _parse(cls: type[Record], abi: Any, data: bytes) -> Record:
    return cls.parse(data, 0, abi) if abi is not None else cls.parse(data)  # type: ignore[call-arg]


def _pack(rec: Record, abi: Any) -> bytes:
    return rec.pack(abi) if abi is not None else rec.pack()  # type: ignore[call-arg]


def expected_bytes(layout: Layout, rec: Record, data: bytes) -> bytes:
    """``data`` with padding zeroed, and nested-array entries the record does not keep zeroed."""
    out = bytearray(data)
    for off, n in layout.padding():
        out[off : off + n] = bytes(n)
    for f in layout.fields:
        if f.sub is not None:
            kept = len(getattr(rec, f.name))
            start = layout.offsets[f.name] + kept * f.sub.size
            end = layout.offsets[f.name] + f.size
            out[start:end] = bytes(end - start)
    return bytes(out)


def test_every_module_has_records() -> None:
    names = {cls.__name__ for cls, _ in CASES}
    assert len(CASES) >= 40
    assert {"BlkifRequest", "TxRequest", "Motion", "VchanInterface", "UrbRequest"} <= names


@EACH_RECORD
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_parse_pack_round_trip_zeroes_padding(case: tuple[type[Record], Any], data: st.DataObject) -> None:
    cls, abi = case
    layout = _layout(cls, abi)
    raw = data.draw(st.binary(min_size=layout.size, max_size=layout.size))
    rec = _parse(cls, abi, raw)
    packed = _pack(rec, abi)
    assert len(packed) == layout.size
    assert packed == expected_bytes(layout, rec, raw)
    for off, n in layout.padding():
        assert packed[off : off + n] == bytes(n)
    assert _parse(cls, abi, packed) == rec
    # pack_into writes the same bytes at an offset and nothing around them
    buf = bytearray(b"\xaa" * (layout.size + 16))
    if abi is not None:
        rec.pack_into(buf, 8, abi)  # type: ignore[call-arg]
    else:
        rec.pack_into(buf, 8)
    assert bytes(buf[8 : 8 + layout.size]) == packed
    assert buf[:8] == b"\xaa" * 8 and buf[8 + layout.size :] == b"\xaa" * 8


def _np_value(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        if v.dtype.names:
            return tuple(_np_value(x) for x in v)
        return tuple(int(x) for x in v)
    if isinstance(v, np.void):
        return tuple(_np_value(v[n]) for n in v.dtype.names or ())
    return int(v)


@EACH_RECORD
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_numpy_dtype_reads_what_struct_reads(case: tuple[type[Record], Any], data: st.DataObject) -> None:
    cls, abi = case
    layout = _layout(cls, abi)
    n = data.draw(st.integers(1, 3))
    raw = data.draw(st.binary(min_size=layout.size * n, max_size=layout.size * n))
    view = np.frombuffer(raw, dtype=layout.dtype)
    assert layout.dtype.itemsize == layout.size
    for k in range(n):
        values = layout.unpack_from(raw, k * layout.size)
        for name, value in zip(layout.names, values, strict=True):
            got = _np_value(view[k][name])
            want = tuple(value) if isinstance(value, bytes) else value
            assert got == want, (name, k)


def test_slot_dtypes_have_slot_itemsize() -> None:
    assert netif.TX_RESPONSE_DTYPE.itemsize == 12 == netif.TX_REQUEST_DTYPE.itemsize
    assert netif.RX_RESPONSE_DTYPE.itemsize == 8
    native = blkif.layouts()
    slot = native.ring.slot_size
    rsp = native.response_dtype
    assert (slot, rsp.itemsize, native.request_dtype.itemsize) == (112, 112, 112)
    assert blkif.layouts(blkif.ABI.X86_32).response_dtype.itemsize == 108
    assert usbif.URB_RESPONSE_DTYPE.itemsize == 148 and usbif.CONN_REQUEST_DTYPE.itemsize == 4
    assert netif.CTRL_RESPONSE_DTYPE.itemsize == 16
    # a batch of responses written slot by slot reads back through the slot dtype
    page = bytearray(slot * 4)
    for k in range(4):
        blkif.BlkifResponse(1000 + k, blkif.BLKIF_OP_WRITE, -k % 2 * -1).pack_into(page, k * slot)
    view = np.frombuffer(page, dtype=rsp)
    assert view["id"].tolist() == [1000, 1001, 1002, 1003]
    assert view["status"].tolist() == [0, -1, 0, -1]
    with pytest.raises(LocalError):
        native.request.dtype_for(100)


def test_blkif_request_dispatch_by_operation() -> None:
    seg = (blkif.Segment(8, 0, 7), blkif.Segment(9, 2, 5))
    rw = blkif.BlkifRequest.rw(blkif.BLKIF_OP_READ, 51712, 42, 2048, seg)
    disc = blkif.BlkifRequestDiscard(blkif.BLKIF_OP_DISCARD, blkif.BLKIF_DISCARD_SECURE, 51712, 43, 8, 16)
    ind = blkif.BlkifRequestIndirect(blkif.BLKIF_OP_INDIRECT, blkif.BLKIF_OP_WRITE, 600, 44, 0, 51712, (10, 11))
    for abi in blkif.ABI:
        slot = blkif.layouts(abi).ring.slot_size
        for req in (rw, disc, ind):
            buf = bytearray(slot)
            req.pack_into(buf, 0, abi)
            got = blkif.parse_request(buf, 0, abi)
            if isinstance(req, blkif.BlkifRequestIndirect):
                assert got == blkif.BlkifRequestIndirect(*[getattr(req, n) for n in req.LAYOUT.names[:-1]], (10, 11, 0, 0, 0, 0, 0, 0))
            else:
                assert got == req
    # x86_32 and x86_64 differ on the wire
    assert rw.pack(blkif.ABI.X86_32) != rw.pack(blkif.ABI.X86_64)[:108]
    assert rw.pack(blkif.ABI.ARM) == rw.pack(blkif.ABI.X86_64)


def test_blkif_request_keeps_only_named_segments() -> None:
    full = blkif.BlkifRequest.rw(blkif.BLKIF_OP_WRITE, 1, 2, 3, tuple(blkif.Segment(k, 0, 7) for k in range(11)))
    data = bytearray(full.pack())
    data[1] = 3  # nr_segments
    got = blkif.parse_request(data)
    assert isinstance(got, blkif.BlkifRequest)
    assert [s.gref for s in got.seg] == [0, 1, 2]
    data[1] = 200  # hostile count: parse keeps 11, validation refuses
    got = blkif.parse_request(data)
    assert isinstance(got, blkif.BlkifRequest) and len(got.seg) == 11


def test_indirect_pages_round_trip() -> None:
    segs = tuple(blkif.Segment(100 + k, k % 8, 7) for k in range(700))
    pages = blkif.pack_indirect_pages(segs)
    assert [len(p) for p in pages] == [4096, 4096]
    assert blkif.indirect_pages(700) == 2 and blkif.indirect_pages(512) == 1
    assert blkif.parse_indirect_segments(list(pages), 700) == segs
    assert pages[1][188 * 8 :] == bytes(4096 - 188 * 8)
    with pytest.raises(LocalError):
        blkif.parse_indirect_segments([pages[0]], 700)


def test_netif_extra_dispatch_and_kbd_event_dispatch() -> None:
    extras = [
        netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, netif.XEN_NETIF_EXTRA_FLAG_MORE, 1448, 1, 0),
        netif.McastExtra(netif.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, bytes.fromhex("01005e000001")),
        netif.HashExtra(netif.XEN_NETIF_EXTRA_TYPE_HASH, 0, 1, 1, 0xDEADBEEF),
        netif.ExtraInfo(9, 0, b"abcdef"),
    ]
    for e in extras:
        assert netif.parse_extra(e.pack() + bytes(4)) == e
    assert netif.HashExtra(4, 0, 1, 1, 0x01020304).pack()[4:] == bytes([4, 3, 2, 1])
    events = [
        kbdif.Motion(kbdif.XENKBD_TYPE_MOTION, -5, 7, -1),
        kbdif.Key(kbdif.XENKBD_TYPE_KEY, 1, 0x110),
        kbdif.Position(kbdif.XENKBD_TYPE_POS, 400, 300, 0),
        kbdif.MTouchPos(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_DOWN, 2, 10, 20),
        kbdif.MTouchShape(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_SHAPE, 2, 30, 15),
        kbdif.MTouchOrient(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_ORIENT, 2, -90),
        kbdif.MTouch(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_SYN, 0),
        kbdif.MTouch(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_UP, 2),
    ]
    page = bytearray(4096)
    for i, ev in enumerate(events):
        ev.pack_into(page, kbdif.in_slot_offset(i + 49))  # wraps past slot 50
    for i, ev in enumerate(events):
        assert kbdif.parse_in_event(page, kbdif.in_slot_offset(i + 49)) == ev
    assert kbdif.in_slot_offset(51) == kbdif.XENKBD_IN_RING_OFFS
    unknown = kbdif.parse_in_event(bytes([77]) + bytes(39))
    assert isinstance(unknown, kbdif.UnknownEvent) and unknown.type == 77


def test_pack_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(LocalError):
        netif.TxRequest(1 << 32, 0, 0, 0, 0).pack()
    with pytest.raises(LocalError):
        blkif.BlkifRequest(0, 12, 0, 0, 0, tuple(blkif.Segment(0, 0, 0) for _ in range(12))).pack()
    with pytest.raises(LocalError):
        netif.McastExtra(2, 0, bytes(7)).pack()
    with pytest.raises(LocalError):
        netif.TxRequest(0, 0, 0, 0, 0).pack_into(bytearray(11))
    with pytest.raises(LocalError):
        netif.TxRequest(0, 0, 0, 0, 0).pack_into(b"x" * 12)
    with pytest.raises(LocalError):
        netif.TxRequest.parse(bytes(11))
    with pytest.raises(LocalError):
        netif.TxRequest.parse(bytes(24), -12)


def test_page_snapshots() -> None:
    page = bytearray(4096)
    struct.pack_into("<4I", page, console.XENCONS_INDEXES_OFFSET, 1, 2, 3, 4)
    assert console.ConsoleIndexes.from_page(page) == console.ConsoleIndexes(1, 2, 3, 4)
    struct.pack_into("<7I", page, xsring.XS_REQ_CONS_OFFSET, 1, 2, 3, 4, 3, 0, 0)
    assert xsring.XsControl.from_page(page).server_features == 3
    assert xsring.INTERFACE_LAYOUT_UPSTREAM.size == 2080
    assert xsring.INTERFACE_LAYOUT_UPSTREAM.offsets["evtchn_port"] == xsring.XS_EVTCHN_PORT_OFFSET == 2076
    assert console.XENCONS_CONNECTION_OFFSET == 3088
    assert vchan.INTERFACE_LAYOUT.size == vchan.VCHAN_GRANTS_OFFSET

"""Byte rings in every layout xenpv meets: xenstore, console, vchan, kbdif (modulo).

Every test runs once per implementation (``rings`` fixture: cython and reference).
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest
from rings_conftest import MASK32, PAGE, pattern, rings_fixture  # noqa: F401

from xenpv.errors import LocalError, RingOverflowError

# xen-protocols.md §4.9, §8.1, §9.1, §10.1 (offsets in the shared page)
XS_REQ = {"data_offset": 0, "size": 1024, "cons_offset": 2048, "prod_offset": 2052}
XS_RSP = {"data_offset": 1024, "size": 1024, "cons_offset": 2056, "prod_offset": 2060}
CONS_IN = {"data_offset": 0, "size": 1024, "cons_offset": 3072, "prod_offset": 3076}
CONS_OUT = {"data_offset": 1024, "size": 2048, "cons_offset": 3080, "prod_offset": 3084}
KBD_IN = {"data_offset": 1024, "size": 51, "slot": 40, "cons_offset": 0, "prod_offset": 4}
KBD_OUT = {"data_offset": 3072, "size": 25, "slot": 40, "cons_offset": 8, "prod_offset": 12}
VCHAN_LEFT10 = {"data_offset": 1024, "size": 1024, "cons_offset": 0, "prod_offset": 4}
VCHAN_RIGHT11 = {"data_offset": 2048, "size": 2048, "cons_offset": 8, "prod_offset": 12}


def set_indexes(page: Any, layout: dict[str, int], prod: int, cons: int) -> None:
    struct.pack_into("<I", page, layout["prod_offset"], prod & MASK32)
    struct.pack_into("<I", page, layout["cons_offset"], cons & MASK32)


@pytest.mark.parametrize("layout", [XS_REQ, XS_RSP, CONS_IN, CONS_OUT, VCHAN_LEFT10,
                                    VCHAN_RIGHT11], ids=["xs-req", "xs-rsp", "cons-in",
                                                         "cons-out", "vchan-10", "vchan-11"])
def test_stream_round_trip_with_wrap_near_2_32(rings: SimpleNamespace,
                                               layout: dict[str, int]) -> None:
    """Write as much as fits, read what is there; data wraps at the end of the area and
    indexes wrap at 2^32."""
    page = bytearray(PAGE)
    size = layout["size"]
    start = MASK32 - size // 2
    set_indexes(page, layout, start, start)
    writer = rings.ByteRing(page, **layout)
    reader = rings.ByteRing(page, **layout)
    assert writer.free() == size and reader.available() == 0
    first = pattern(1, size + 100)
    assert writer.write(first) == size  # only what fits
    assert writer.free() == 0 and reader.available() == size
    assert reader.read(size // 4) == first[: size // 4]
    assert writer.write(first[size:]) == 100
    rest = bytearray(size)
    assert reader.read_into(rest) == size - size // 4 + 100
    assert bytes(rest[: size - size // 4 + 100]) == first[size // 4 : size + 100]
    assert reader.available() == 0
    assert reader.prod == reader.cons == (start + size + 100) & MASK32
    # the bytes really sit at idx & (size - 1) in the data area
    pos = (start + size) & (size - 1)
    off = layout["data_offset"]
    assert page[off + pos : off + pos + 1] == first[size : size + 1]


def test_xenstore_insane_indexes_break_the_connection(rings: SimpleNamespace) -> None:
    """§4.9: prod - cons > 1024 means a corrupt ring; the connection stays broken."""
    page = bytearray(PAGE)
    set_indexes(page, XS_REQ, 1025, 0)
    ring = rings.ByteRing(page, **XS_REQ)
    with pytest.raises(RingOverflowError):
        ring.read()
    assert ring.broken
    set_indexes(page, XS_REQ, 0, 0)
    with pytest.raises(RingOverflowError):
        ring.write(b"x")


@pytest.mark.parametrize("layout", [VCHAN_LEFT10, CONS_OUT])
def test_vchan_and_console_treat_insane_state_as_empty(rings: SimpleNamespace,
                                                       layout: dict[str, int]) -> None:
    """§8.1 / §10.2: the reader ignores it, the writer sees no space; it is counted."""
    page = bytearray(PAGE)
    set_indexes(page, layout, 5000, 10)
    ring = rings.ByteRing(page, on_insane="zero", **layout)
    assert ring.available() == 0 and ring.free() == 0
    assert ring.read() == b"" and ring.read_into(bytearray(10)) == 0
    assert ring.write(b"abc") == 0
    assert ring.insane_count == 5 and not ring.broken
    assert ring.prod == 5000 and ring.cons == 10  # nothing was touched
    set_indexes(page, layout, 12, 10)  # sane again: it works again
    assert ring.available() == 2


def test_kbd_ring_uses_modulo_51_across_the_2_32_wrap(rings: SimpleNamespace) -> None:
    """§9.1: slot = page + 1024 + (i % 51) * 40 with u32 i, as Linux and QEMU compute it.

    2^32 - 1 is a multiple of 51, so indexes 2^32 - 1 and 0 share slot 0: the peers'
    arithmetic is discontinuous there and xenpv keeps it (rather than disagree with them).
    """
    page = bytearray(PAGE)
    start = MASK32 - 2
    set_indexes(page, KBD_IN, start, start)
    writer = rings.ByteRing(page, **KBD_IN)
    events = [bytes([i + 1]) * 40 for i in range(5)]
    slots = [((start + j) & MASK32) % 51 for j in range(5)]
    assert slots == [49, 50, 0, 0, 1]
    for event, slot in zip(events, slots, strict=True):
        assert writer.write(event + b"partial") == 1  # whole events only
        assert page[1024 + slot * 40 : 1024 + slot * 40 + 40] == event
    reader = rings.ByteRing(page, **KBD_IN)
    assert reader.available() == 5
    assert reader.read(2) == events[0] + events[1]
    assert reader.read() == events[3] + events[3] + events[4]  # the shared slot 0


def test_kbd_ring_is_full_at_51_events(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    ring = rings.ByteRing(page, **KBD_IN)
    assert ring.write(pattern(2, 60 * 40)) == 51
    assert ring.free() == 0 and ring.write(bytes(40)) == 0
    out = rings.ByteRing(page, **KBD_OUT)
    assert out.write(pattern(3, 30 * 40)) == 25
    assert page[3072 + 25 * 40 :] == bytes(PAGE - 3072 - 25 * 40)  # nothing past 25 slots


@pytest.mark.parametrize("order", [10, 12, 16, 20])
def test_vchan_ring_at_an_offset_in_a_larger_buffer(rings: SimpleNamespace, order: int) -> None:
    """A 2^order ring anywhere in a buffer, indexes elsewhere; nothing outside is touched."""
    size = 1 << order
    buf = bytearray(b"\xee" * (size + 3 * PAGE))
    layout = {"data_offset": PAGE + 8, "size": size, "cons_offset": 16, "prod_offset": 20}
    set_indexes(buf, layout, 0xFFFFFF00, 0xFFFFFF00)
    before = bytes(buf)
    ring = rings.ByteRing(buf, **layout)
    data = pattern(order, size)
    assert ring.write(data[: size - 7]) == size - 7
    assert ring.read(100) == data[:100]
    assert ring.write(data) == 107
    assert ring.read() == data[100 : size - 7] + data[:107]
    assert buf[: 16] == before[: 16] and buf[24 : PAGE + 8] == before[24 : PAGE + 8]
    assert buf[PAGE + 8 + size :] == before[PAGE + 8 + size :]


def test_separate_data_buffer(rings: SimpleNamespace) -> None:
    """vchan orders >= 12: indexes in the control page, data in its own pages."""
    control = bytearray(PAGE)
    data = bytearray(4 * PAGE)
    ring = rings.ByteRing(control, data_buffer=data, data_offset=0, size=4 * PAGE,
                          cons_offset=8, prod_offset=12)
    assert ring.write(b"hello") == 5
    assert data[:5] == b"hello" and control[12:16] == b"\x05\x00\x00\x00"
    assert ring.read() == b"hello"
    assert control[8:12] == b"\x05\x00\x00\x00"


def test_bad_layouts_are_local_errors(rings: SimpleNamespace) -> None:
    page = bytearray(PAGE)
    bad: list[dict[str, Any]] = [
        {"data_offset": 3500, "size": 1024, "cons_offset": 0, "prod_offset": 4},
        {"data_offset": 0, "size": 1024, "cons_offset": 8, "prod_offset": 8},
        {"data_offset": 0, "size": 1024, "cons_offset": 1000, "prod_offset": 2048},
        {"data_offset": 0, "size": 1024, "cons_offset": 2050, "prod_offset": 2048},
        {"data_offset": 0, "size": 1024, "cons_offset": 4096, "prod_offset": 2048},
        {"data_offset": 0, "size": 0, "cons_offset": 2044, "prod_offset": 2048},
        {"data_offset": 0, "size": 10, "cons_offset": 2044, "prod_offset": 2048,
         "on_insane": "maybe"},
    ]
    for layout in bad:
        with pytest.raises(LocalError):
            rings.ByteRing(page, **layout)
    ring = rings.ByteRing(page, **XS_REQ)
    ring.release()
    with pytest.raises(LocalError):
        ring.write(b"x")

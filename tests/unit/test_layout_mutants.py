"""Layout machinery (xenpv.protocols.layout) at the edges, written against io/ring.h's
geometry and the byte rings' free-running indexes (xen-protocols.md §1) and against
struct's own encoding of small records made up here: ring sizes at each power of two,
slot offsets as indexes wrap, byte-ring fill at 0, size and size + 1, buffers one byte too
short, and every refusal naming what it refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from xenpv.errors import LocalError
from xenpv.protocols.layout import (
    SRING_HEADER_SIZE,
    Field,
    Layout,
    Record,
    RingLayout,
    byte_ring_avail,
    byte_ring_fill,
    byte_ring_space,
    c_struct,
    pad,
    ring_nr_ents,
)


def test_ring_geometry_rounds_down_to_a_power_of_two() -> None:
    """io/ring.h: (bytes - 64) // slot, rounded down to a power of two; none when not one
    slot fits; slot offsets wrap with the index; the slot is the larger record."""
    for k in range(0, 10):
        fit = SRING_HEADER_SIZE + (1 << k) * 16
        assert ring_nr_ents(fit, 16) == 1 << k
        assert ring_nr_ents(fit - 1, 16) == (1 << k) >> 1
        assert ring_nr_ents(fit + 16 * ((1 << k) - 1), 16) == 1 << k
    assert ring_nr_ents(SRING_HEADER_SIZE, 1) == 0 and ring_nr_ents(10, 4) == 0
    assert ring_nr_ents(4096, 4096) == 0
    for bad in (0, -1):
        with pytest.raises(LocalError, match=rf"^slot size must be positive, got {bad}$"):
            ring_nr_ents(4096, bad)
    ring = RingLayout("r", 100, 120)
    assert ring.slot_size == 120 and RingLayout("r", 120, 100).slot_size == 120
    assert (ring.nr_ents(), ring.nr_ents(2), ring.nr_ents(3)) == (32, 64, 64)
    assert [ring.slot_offset(i) for i in (0, 1, 31, 32, 33, 2**32 - 1)] == [
        64, 184, 64 + 31 * 120, 64, 184, 64 + 31 * 120]
    assert ring.slot_offset(33, 2) == 64 + 33 * 120 and ring.slot_offset(64, 2) == 64
    with pytest.raises(LocalError, match=r"^r: a ring needs at least one page, got 0$"):
        ring.nr_ents(0)


def test_byte_ring_indexes_at_empty_full_and_corrupt() -> None:
    """Free-running u32 indexes: the fill is prod - cons modulo 2^32; a ring of `size`
    holds 0..size bytes; more means corrupt indexes, read as nothing to read and no
    room."""
    assert byte_ring_fill(5, 5) == 0 and byte_ring_fill(3, 2**32 - 2) == 5
    assert byte_ring_fill(0, 1) == 2**32 - 1
    size = 1024
    for fill, avail, space in ((0, 0, 1024), (1, 1, 1023), (1023, 1023, 1),
                               (1024, 1024, 0), (1025, 0, 0), (2**32 - 1, 0, 0)):
        prod = (7 + fill) & 0xFFFFFFFF
        assert (byte_ring_avail(prod, 7, size), byte_ring_space(prod, 7, size)) == (avail, space)


class _Pair(Record):
    LAYOUT = Layout("pair", [Field("a", "H"), pad(2), Field("b", "i")])
    PAGE_OFFSET = 6

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Pair) and (self.a, self.b) == (other.a, other.b)

    __hash__ = None  # type: ignore[assignment]


def test_records_read_and_write_only_inside_the_buffer() -> None:
    """A record is read from exactly its bytes at the offset (the last fitting offset
    too), written only there, and every buffer one byte short, negative offset or
    read-only buffer is refused with the layout's name."""
    want = struct.pack("<H2xi", 0xBEEF, -5)
    rec = _Pair(0xBEEF, -5)
    assert rec.pack() == want and _Pair.parse(want) == rec
    page = bytearray(16)
    rec.pack_into(page, 8)  # the last offset that fits
    assert bytes(page) == bytes(8) + want
    assert _Pair.parse(page, 8) == rec
    rec.pack_into(page)
    assert bytes(page[:8]) == want
    page[:] = bytes(6) + want + bytes(2)
    assert _Pair.from_page(page) == rec  # at PAGE_OFFSET
    with pytest.raises(LocalError, match=r"^pair: cannot read 8 bytes at 9: "):
        _Pair.parse(page, 9)
    with pytest.raises(LocalError, match=r"^pair: negative offset -8$"):
        _Pair.parse(page, -8)
    for off in (9, -1, -8):
        with pytest.raises(LocalError, match=rf"^pair: buffer too short for 8 bytes at {off}$"):
            rec.pack_into(page, off)
    with pytest.raises(LocalError, match=r"^pair: cannot write to buffer: "):
        rec.pack_into(bytes(8))
    assert repr(_Pair.LAYOUT) == "Layout('pair', size=8)"


def test_declared_members_offsets_leaves_and_c_names() -> None:
    """Offsets, leaves (nested arrays expanded with their C designators), padding and
    sizes follow the field list; c_struct names the C type up to the first '.' or '['."""
    inner = Layout("in", [Field("g", "I"), Field("f", "b", c="u.f"), pad(3)])
    outer = c_struct("outer.v[x]", [Field("op", "B"), pad(1), Field("raw", "s", 2),
                                    Field("seg", "", 2, c="segs", sub=inner),
                                    Field("w", "q", 2)], kind="union")
    assert outer.c_type == "union outer" and c_struct("a[b].c", []).c_type == "struct a"
    assert outer.size == 1 + 1 + 2 + 16 + 16
    assert outer.offsets == {"op": 0, "raw": 2, "seg": 4, "w": 20}
    assert outer.names == ("op", "raw", "seg", "w")
    leaves = [(lf.name, lf.c_path, lf.offset, lf.size, lf.signed) for lf in outer.leaves()]
    assert leaves == [("op", "op", 0, 1, False), ("raw", "raw", 2, 2, False),
                      ("seg[0].g", "segs[0].g", 4, 4, False),
                      ("seg[0].f", "segs[0].u.f", 8, 1, True),
                      ("seg[1].g", "segs[1].g", 12, 4, False),
                      ("seg[1].f", "segs[1].u.f", 16, 1, True), ("w", "w", 20, 16, True)]
    assert outer.padding() == [(1, 1), (9, 3), (17, 3)]
    values = (7, b"hi", ((1, -2), (3, 4)), (-1, 2**62))
    raw = outer.pack(values)
    assert raw == struct.pack("<Bx2sIb3xIb3x2q", 7, b"hi", 1, -2, 3, 4, -1, 2**62)
    assert outer.unpack_from(raw) == values
    assert Layout("exact", [Field("a", "I")], pad_to=4).fields == (Field("a", "I"),)
    assert Layout("tail", [Field("a", "I")], pad_to=6).padding() == [(4, 2)]
    dt = outer.dtype_for(outer.size)
    assert dt.itemsize == outer.size and dt.fields["w"][1] == 20
    view = np.frombuffer(raw, dtype=dt)[0]
    assert (int(view["seg"][1]["g"]), int(view["seg"][0]["f"]), bytes(view["raw"])) == (3, -2, b"hi")
    assert c_struct("ev.key", [Field("a", "I")], pad_to=8).padding() == [(4, 4)]
    # entries not given are packed as zeros; nested entries may be parsed records
    assert outer.pack((7, b"hi", [(1, -2)], (-1,))) == raw[:9] + bytes(11) + raw[20:28] + bytes(8)
    pairs = Layout("pairs", [Field("p", "", 2, sub=_Pair.LAYOUT)])
    assert pairs.pack(([_Pair(1, -2)],)) == struct.pack("<H2xi8x", 1, -2)
    with pytest.raises(LocalError, match=rf"^outer\.v\[x\]: itemsize {outer.size - 1} < "):
        outer.dtype_for(outer.size - 1)

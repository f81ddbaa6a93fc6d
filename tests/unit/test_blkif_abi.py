"""blkif's record layouts, rebuilt at test time, against io/blkif.h's three ABIs written out.

``blkif.LAYOUTS`` is built when the module is imported.  These tests also call the
builders again, so that mutation testing - whose workers are forked from an interpreter
that imported xenpv before any mutant was active - runs them (and ``layout.py`` under
them) mutated.  Every record is checked against a table written from Xen's io/blkif.h
(x86_64 and ARM align u64 to 8, i386 to 4; rings have a 64-byte header and a power-of-two
number of slots), without layout.py: each member is packed with ``struct`` at the table's
offset, the record read back must give those values and pack to the same bytes, and the
numpy view over a ring slot must see them at the same places.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pytest

from xenpv.errors import LocalError
from xenpv.protocols import ProtocolError, blkif
from xenpv.protocols.blkif import ABI
from xenpv.protocols.layout import Layout

U8, U16, S16, U32, U64 = ("B", 1), ("H", 2), ("h", 2), ("I", 4), ("Q", 8)


def _members(abi: ABI) -> dict[str, tuple[int, dict[str, tuple[int, tuple[str, int], int]]]]:
    """record -> (sizeof, {member: (offset, (struct code, size), count)}) for ``abi``."""
    i386 = abi is ABI.X86_32
    idw = 4 if i386 else 8  # where the u64 id starts after operation + two head members
    seg = {}
    for k in range(11):  # struct blkif_request_segment seg[11], 8 bytes each
        base = idw + 16 + 8 * k
        seg[f"seg[{k}].gref"] = (base, U32, 1)
        seg[f"seg[{k}].first_sect"] = (base + 4, U8, 1)
        seg[f"seg[{k}].last_sect"] = (base + 5, U8, 1)
    head = {"operation": (0, U8, 1), "id": (idw, U64, 1), "sector_number": (idw + 8, U64, 1)}
    return {
        "request": (idw + 16 + 88, {**head, "nr_segments": (1, U8, 1), "handle": (2, U16, 1), **seg}),
        "discard": (idw + 24, {**head, "flag": (1, U8, 1), "handle": (2, U16, 1),
                               "nr_sectors": (idw + 16, U64, 1)}),
        # x86_64 ends in 4 bytes of implicit padding, i386 in an explicit u64 pad: 64 both
        "indirect": (64, {**head, "indirect_op": (1, U8, 1), "nr_segments": (2, U16, 1),
                          "handle": (idw + 16, U16, 1), "indirect_grefs": (idw + 20, U32, 8)}),
        "response": (12 if i386 else 16, {"id": (0, U64, 1), "operation": (8, U8, 1),
                                          "status": (10, S16, 1)}),
    }


C_TYPES = {"request": "struct blkif_request", "discard": "struct blkif_request_discard",
           "indirect": "struct blkif_request_indirect", "response": "struct blkif_response"}


def _value(name: str, k: int, code: str) -> int:
    """A distinct value for member ``name`` (element ``k``) that fills its type."""
    crc = zlib.crc32(f"{name}/{k}".encode())
    v = (crc << 32 | crc ^ 0x5A5A5A5A) | 0x81  # never 0, high bits of every width set
    bits = struct.calcsize(code) * 8
    v &= (1 << bits) - 1
    if code.islower() and v >= 1 << (bits - 1):
        v -= 1 << bits
    return v


def _check(layout: Layout, abi: ABI, record: str, slot: int) -> None:
    size, members = _members(abi)[record]
    assert layout.size == size, (abi, record)
    assert layout.c_type == C_TYPES[record]
    leaves = {leaf.name: (leaf.offset, leaf.size // leaf.count, leaf.signed, leaf.count)
              for leaf in layout.leaves()}
    assert leaves == {n: (o, t[1], t[0].islower(), c) for n, (o, t, c) in members.items()}
    assert all(leaf.c_path == leaf.name for leaf in layout.leaves())
    covered = {o + i for o, t, c in members.values() for i in range(t[1] * c)}
    pads = {o + i for o, n in layout.padding() for i in range(n)}
    assert pads == set(range(size)) - covered, (abi, record)
    # the bytes, member by member, with struct at the table's offsets
    raw = bytearray(size)
    expect: dict[str, Any] = {}
    for name, (off, (code, _width), count) in members.items():
        vals = [_value(name, k, code) for k in range(count)]
        struct.pack_into(f"<{count}{code}", raw, off, *vals)
        expect[name] = vals[0] if count == 1 else tuple(vals)
    parsed = layout.unpack_from(bytes(raw))
    flat = dict(zip(layout.names, parsed, strict=True))
    for name, value in expect.items():
        if name.startswith("seg["):
            k, _, member = name[4:].partition("].")
            sub = flat["seg"][int(k)]
            assert sub[["gref", "first_sect", "last_sect"].index(member)] == value, name
        else:
            assert flat[name] == value, name
    assert layout.pack(parsed) == bytes(raw)
    buf = bytearray(2 * size + 8)
    layout.pack_into(buf, size, parsed)
    assert buf[size : 2 * size] == raw and not any(buf[:size]) and not any(buf[2 * size :])
    # the numpy view over ring slots: same values at the same places, slot-sized items
    dtype = layout.dtype_for(slot)
    assert dtype.itemsize == slot and layout.dtype.itemsize == size
    ring = bytearray(2 * slot)
    ring[slot : slot + size] = raw
    view = np.frombuffer(bytes(ring), dtype=dtype)
    for name, value in expect.items():
        if name.startswith("seg["):
            k, _, member = name[4:].partition("].")
            got = view[1]["seg"][int(k)][member]
        else:
            got = view[1][name]
        assert (tuple(int(x) for x in got) if isinstance(value, tuple) else int(got)) == value, name


@pytest.mark.parametrize("abi", list(ABI))
def test_blkif_layouts_match_the_abi(abi: ABI) -> None:
    """Rebuilt now and as built at import, every record of every ABI is the table's; the
    ring slot is the larger of request and response, with 32 slots in one page (64 in
    two) after the 64-byte header."""
    for layouts in (blkif._layouts(abi), blkif.layouts(abi)):
        assert layouts.abi is abi and layouts.ring.name == f"blkif[{abi.value}]"
        slot = 108 if abi is ABI.X86_32 else 112
        assert layouts.ring.slot_size == slot
        assert (layouts.ring.nr_ents(1), layouts.ring.nr_ents(2)) == (32, 64)
        assert layouts.ring.slot_offset(5) == 64 + 5 * slot
        for record in ("request", "discard", "indirect", "response"):
            _check(getattr(layouts, record), abi, record, slot)
        assert layouts.request_dtype.itemsize == slot == layouts.response_dtype.itemsize
        assert layouts.request_dtype.fields["sector_number"][1] == (4 if abi is ABI.X86_32 else 8) + 8
        assert layouts.response_dtype.fields["status"][1] == 10
    # the builders one by one, as the table names them
    size = _members(abi)
    assert blkif._request_layout(abi).size == size["request"][0]
    assert blkif._discard_layout(abi).size == size["discard"][0]
    assert blkif._indirect_layout(abi).size == size["indirect"][0]
    assert blkif._response_layout(abi).size == size["response"][0]
    assert blkif.SEGMENT_LAYOUT.size == 8 and blkif.SEGMENT_LAYOUT.padding() == [(6, 2)]


def test_blkif_abi_names() -> None:
    """The protocol key's three values (io/protocols.h) and the native default."""
    assert [a.value for a in ABI] == ["x86_32-abi", "x86_64-abi", "arm-abi"]
    assert blkif.abi_from_protocol(None) is ABI.X86_64
    assert blkif.abi_from_protocol(b"x86_32-abi") is ABI.X86_32
    assert blkif.abi_from_protocol("arm-abi") is ABI.ARM


def test_requests_pack_parse_and_indirect_pages_at_the_abi_offsets() -> None:
    """A full read/write request packed at the table's offsets, parsed back at offset 0
    and in a later slot; 11 segments at most; indirect pages hold 512 segments of 8 bytes
    each, zero-filled (io/blkif.h)."""
    seg = tuple(blkif.Segment(100 + k, k % 8, 7) for k in range(11))
    req = blkif.BlkifRequest.rw(blkif.BLKIF_OP_WRITE, 3, 0xABCDEF, 99, seg)
    assert (req.nr_segments, req.seg) == (11, seg)
    raw = req.pack()
    assert struct.unpack_from("<BBHxxxxQQ", raw) == (1, 11, 3, 0xABCDEF, 99)
    assert struct.unpack_from("<IBB", raw, 24 + 8 * 10) == (110, 2, 7)
    buf = bytearray(2 * 112)
    req.pack_into(buf, 112)
    assert buf[112:] == raw and not any(buf[:112])
    assert blkif.BlkifRequest.parse(raw, 0) == req == blkif.BlkifRequest.parse(buf, 112)
    with pytest.raises(LocalError):
        blkif.BlkifRequest.rw(blkif.BLKIF_OP_READ, 0, 1, 0, (*seg, seg[0]))
    segs = [blkif.Segment(1000 + k, k % 8, 7) for k in range(513)]
    pages = blkif.pack_indirect_pages(segs)
    assert [len(p) for p in pages] == [4096, 4096]
    for k in (0, 1, 511, 512):
        page, slot = divmod(k, 512)
        assert struct.unpack_from("<IBBH", pages[page], slot * 8) == (1000 + k, k % 8, 7, 0)
    assert not any(pages[1][8:])


def test_refusals_carry_id_status_and_text() -> None:
    def rw(op: int, sector: int = 0) -> Any:
        return blkif.BlkifRequest.rw(op, 0, 77, sector, (blkif.Segment(8, 0, 7),))

    cases: list[tuple[Any, dict[str, Any], str, int]] = [
        (rw(blkif.BLKIF_OP_FLUSH_DISKCACHE),
         {"supported_ops": frozenset({blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE})},
         "operation 3 not supported", blkif.BLKIF_RSP_EOPNOTSUPP),
        (rw(4), {}, "unknown operation 4", blkif.BLKIF_RSP_EOPNOTSUPP),
        (blkif.BlkifRequestIndirect(operation=blkif.BLKIF_OP_INDIRECT, indirect_op=2,
                                    nr_segments=1, id=77, sector_number=0, handle=0),
         {"max_indirect_segments": 32}, "indirect_op 2 not read/write", blkif.BLKIF_RSP_ERROR),
        (rw(blkif.BLKIF_OP_READ, 10), {"disk_sectors": 16}, "sectors 10+8 beyond disk of 16",
         blkif.BLKIF_RSP_ERROR),
    ]
    for req, kw, text, status in cases:
        with pytest.raises(blkif.BlkifRequestError) as err:
            blkif.validate_request(req, **kw)
        assert (str(err.value), err.value.id, err.value.status) == (text, 77, status)
        assert err.value.operation == req.operation
    blkif.validate_request(rw(blkif.BLKIF_OP_READ, 8), disk_sectors=16)  # the last 8 sectors


def test_virtual_device_numbers_at_their_edges() -> None:
    top = (1 << 29) - 1  # extended encoding: disk (top >> 8) & 0xFFFFF, partition 255
    assert blkif.parse_virtual_device(str(top)) == top
    with pytest.raises(ProtocolError):
        blkif.parse_virtual_device(str(1 << 29))
    with pytest.raises(ProtocolError, match=r"^virtual-device 256: unknown major 1$"):
        blkif.vdev_decode(256)
    assert blkif.vdev_encode("xvdq255") == blkif.VDEV_EXTENDED | 16 << 8 | 255
    for name in ("xvdq256", "xvda256", "d0p256"):
        with pytest.raises(LocalError):
            blkif.vdev_encode(name)

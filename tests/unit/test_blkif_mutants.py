"""blkif at the edges mutation testing found unchecked, each against xen-protocols.md §6
(and Linux's vdev numbering), not against the code: flushes without data anywhere on the
disk, the ABI records packed and parsed at any offset, the request encoder's slow path,
4096 indirect segments, the batch accept's twin and its fallback, and vdev names and
numbers at both edges of every range."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from xenpv.errors import LocalError
from xenpv.protocols import ProtocolError, blkif
from xenpv.protocols.blkif import (
    ABI,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BlkifRequest,
    BlkifRequestError,
    Segment,
)

#: (sector_t)-1: where Linux's blkfront puts a flush that carries no data (the block
#: layer's flush request is initialised with that sector and blkfront copies it).
NO_SECTOR = 2**64 - 1


def test_flush_and_barrier_without_data_are_accepted_at_any_sector() -> None:
    """A FLUSH or BARRIER with no segments transfers nothing, so no sector range is checked
    (Linux blkback and QEMU's qdisk check the range only of requests that carry sectors):
    one at the disk's end, past it, or at (u64)-1 as Linux's blkfront sends it, is
    accepted. With a segment the range is checked as for a write: the last sector of the
    disk fits, one more does not."""
    for op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
        for sector in (0, 99, 100, 101, NO_SECTOR):
            blkif.validate_request(BlkifRequest(op, 0, 51712, 9, sector), disk_sectors=100)
        one = (Segment(8, 7, 7),)
        blkif.validate_request(BlkifRequest(op, 1, 51712, 9, 99, one), disk_sectors=100)
        for sector in (100, NO_SECTOR):
            with pytest.raises(BlkifRequestError) as err:
                blkif.validate_request(BlkifRequest(op, 1, 51712, 9, sector, one),
                                       disk_sectors=100)
            assert (err.value.id, err.value.operation) == (9, op)
    # reads and writes always carry at least one sector: the first past the end is refused
    with pytest.raises(BlkifRequestError, match=r"^sectors 100\+1 beyond disk of 100$"):
        blkif.validate_request(BlkifRequest.rw(BLKIF_OP_READ, 0, 1, 100, (Segment(8, 0, 0),)),
                               disk_sectors=100)


# -- the batch accept: its readable twin, and the dispatcher's fallback to it -------------


def _batch(reqs: list[BlkifRequest], abi: ABI = blkif.NATIVE_ABI) -> bytes:
    slot = blkif.LAYOUTS[abi].ring.slot_size
    return b"".join(r.pack(abi) + bytes(slot - r.layout(abi).size) for r in reqs)


def _rw(op: int, sector: int, segs: list[tuple[int, int]], rid: int) -> BlkifRequest:
    return BlkifRequest.rw(op, 51712, rid, sector, tuple(Segment(20 + k, a, b)
                                                        for k, (a, b) in enumerate(segs)))


#: A read of sectors 16..25 in two segments, a write of 8 sectors at sector 8 (4 KiB
#: aligned), a read of one page at sector 1 (aligned segments, misaligned start), a read
#: of the disk's last 4 sectors, one sector past the end, and a flush.
BATCH = [_rw(BLKIF_OP_READ, 16, [(0, 7), (2, 3)], 1), _rw(BLKIF_OP_WRITE, 8, [(0, 7)], 2),
         _rw(BLKIF_OP_READ, 1, [(0, 7)], 3), _rw(BLKIF_OP_READ, 60, [(4, 7)], 4),
         _rw(BLKIF_OP_READ, 61, [(4, 7)], 5), BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 0, 1, 6, 0)]
#: What the batch accept must give for BATCH on a 64-sector disk: (id, op, byte offset,
#: byte length, (gref, start, end) in the page), from xen-protocols §6.1's units.
ACCEPTED = [(1, BLKIF_OP_READ, 16 * 512, 10 * 512, ((20, 0, 4096), (21, 1024, 2048))),
            (2, BLKIF_OP_WRITE, 8 * 512, 4096, ((20, 0, 4096),)),
            (3, BLKIF_OP_READ, 512, 4096, ((20, 0, 4096),)),
            (4, BLKIF_OP_READ, 60 * 512, 2048, ((20, 2048, 4096),)), None, None]


def test_batch_accept_twin_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The readable twin (its defaults: writable disk, 512-byte sectors) and scan_rw without
    the compiled scan give the byte ranges the spec's units give; on a read-only disk the
    write is left to the full validation, with 4096-byte sectors every request whose
    start, length or segments are not whole 4 KiB (the read at sector 1, the 2 KiB read)."""
    for abi in ABI:
        raw = _batch(BATCH, abi)
        ro = [a if a is None or a[1] == BLKIF_OP_READ else None for a in ACCEPTED]
        big = [None, ACCEPTED[1], None, None, None, None]  # only the 4 KiB write is whole 4 KiB sectors
        assert blkif.scan_rw_reference(raw, 6, abi, 64) == ACCEPTED
        assert blkif.scan_rw_reference(raw, 6, abi, 64, readonly=True) == ro
        assert blkif.scan_rw_reference(raw, 6, abi, 64, sector_size=4096) == big
        for scan in (blkif._SCAN, None):  # compiled where built, then the fallback
            monkeypatch.setattr(blkif, "_SCAN", scan)
            assert blkif.scan_rw(raw, 6, abi, 64) == ACCEPTED
            assert blkif.scan_rw(raw, 5, abi, 64, readonly=True) == ro[:5]
            assert blkif.scan_rw(raw, 6, abi, 64, sector_size=4096) == big
            assert blkif.scan_rw(raw, 6, abi, 60) == [*ACCEPTED[:3], None, None, None]


def test_pure_python_switch_turns_the_batch_accept_to_its_twin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """XENPV_PURE_PYTHON=1 makes every module with a compiled twin use the twin
    (xenpv.compiled), the batch accept too; otherwise the built extension serves."""
    from xenpv.protocols import _blkscan  # built by setup.py: missing is a failure

    monkeypatch.setenv("XENPV_PURE_PYTHON", "1")
    assert blkif._compiled_scan() is None
    monkeypatch.setenv("XENPV_PURE_PYTHON", "0")
    assert blkif._compiled_scan() is _blkscan.scan_rw


# -- the ABI records: packed and parsed at xen-protocols §6.1's offsets, at any offset ------


def _gap(abi: ABI) -> str:
    return "" if abi is ABI.X86_32 else "4x"  # u64 id aligned to 8 except on i386


def test_discard_indirect_and_response_records_at_any_offset() -> None:
    """Each record of each ABI packs to the bytes struct gives at the spec's offsets (the
    native ABI by default), parses back from offset 0 by default and from any offset
    given, and packs into a buffer at offset 0 by default or where told."""
    for abi in ABI:
        i386 = abi is ABI.X86_32
        grefs = tuple(0x1000 + k for k in range(8))
        cases: list[tuple[object, bytes]] = [
            (blkif.BlkifRequestDiscard(5, 1, 0xBEEF, 2**64 - 2, 2**40 + 3, 2**33 + 5),
             struct.pack("<BBH" + _gap(abi) + "QQQ", 5, 1, 0xBEEF, 2**64 - 2, 2**40 + 3,
                         2**33 + 5)),
            (blkif.BlkifRequestIndirect(6, 1, 0x1FF, 77, 2**41 + 1, 0xCAFE, grefs),
             struct.pack("<BBH" + _gap(abi) + "QQH2x8I" + ("8x" if i386 else "4x"), 6, 1,
                         0x1FF, 77, 2**41 + 1, 0xCAFE, *grefs)),
            (blkif.BlkifResponse(2**63 + 9, 3, -2),
             struct.pack("<QBxh" + ("" if i386 else "4x"), 2**63 + 9, 3, -2)),
        ]
        for rec, want in cases:
            kind = type(rec)
            assert rec.pack(abi) == want, (abi, kind)  # type: ignore[attr-defined]
            if abi is blkif.NATIVE_ABI:
                assert rec.pack() == want  # type: ignore[attr-defined]
                assert kind.parse(want) == rec  # type: ignore[attr-defined]
            assert kind.parse(want, 0, abi) == rec  # type: ignore[attr-defined]
            assert kind.parse(b"\xa5" * 3 + want, 3, abi) == rec  # type: ignore[attr-defined]
            buf = bytearray(b"\xa5" * (len(want) + 5))
            rec.pack_into(buf, abi=abi)  # type: ignore[attr-defined]
            assert bytes(buf) == want + b"\xa5" * 5
            rec.pack_into(buf, 5, abi)  # type: ignore[attr-defined]
            assert bytes(buf) == want[:5] + want
        # parse_request picks the layout by the operation byte, from offset 0 by default
        for rec, want in cases[:2]:
            slot = want + bytes(blkif.LAYOUTS[abi].request.size - len(want))
            assert blkif.parse_request(slot, abi=abi) == rec
            assert blkif.parse_request(b"\0" + slot, 1, abi) == rec


def test_request_encoder_slow_path_gives_the_same_bytes_and_clear_errors() -> None:
    """Segments given as plain (gref, first, last) triples pack to the same bytes as
    Segment records (the generic encoder serves them); what cannot be encoded - a
    segment that is no triple, a field out of its C type's range - is a LocalError."""
    segs = (Segment(8, 0, 7), Segment(2**32 - 1, 3, 5))
    for abi in ABI:
        want = BlkifRequest(BLKIF_OP_WRITE, 2, 51712, 5, 2**40, segs).pack(abi)
        assert struct.unpack_from("<BBH" + _gap(abi) + "QQIBBxxIBBxx", want) == (
            1, 2, 51712, 5, 2**40, 8, 0, 7, 2**32 - 1, 3, 5)
        assert not any(want[(24 if abi is not ABI.X86_32 else 20) + 16:])
        triples: Any = tuple((s.gref, s.first_sect, s.last_sect) for s in segs)
        assert BlkifRequest(BLKIF_OP_WRITE, 2, 51712, 5, 2**40, triples).pack(abi) == want
        for bad in (BlkifRequest(BLKIF_OP_READ, 1, 51712, 5, 0, ("junk",)),  # type: ignore[arg-type]
                    BlkifRequest(BLKIF_OP_READ, 1, 51712, 5, 0, (Segment(2**32, 0, 7),)),
                    BlkifRequest(BLKIF_OP_READ, 1, 2**16, 5, 0, segs[:1]),
                    BlkifRequest(BLKIF_OP_READ, 12, 51712, 5, 0, segs * 6)):
            with pytest.raises(LocalError, match=r"^blkif_request"):
                bad.pack(abi)


# -- indirect pages: 8 pages of 512 segments at most (io/blkif.h) -------------------------


def test_indirect_pages_hold_4096_segments_at_most() -> None:
    """4096 segments fill the 8 indirect pages exactly, from records and from columns;
    4097 are refused, naming the limit and the count; too few pages to read nr_segments
    from is refused naming both."""
    segs = [Segment(k, k % 8, 7) for k in range(4096)]
    pages = blkif.pack_indirect_pages(segs)
    assert len(pages) == 8 and all(len(p) == 4096 for p in pages)
    assert struct.unpack_from("<IBBH", pages[7], 511 * 8) == (4095, 7, 7, 0)
    cols = blkif.pack_indirect_columns([s.gref for s in segs], 0, [7] * 4096)
    assert len(cols) == 8 and struct.unpack_from("<IBBH", cols[7], 511 * 8) == (4095, 0, 7, 0)
    assert blkif.parse_indirect_segments(pages, 4096) == tuple(segs)
    with pytest.raises(LocalError, match=r"^at most 4096 indirect segments, got 4097$"):
        blkif.pack_indirect_pages([*segs, segs[0]])
    with pytest.raises(LocalError, match=r"^at most 4096 indirect segments, got 4097$"):
        blkif.pack_indirect_columns([0] * 4097, 0, [7] * 4097)
    with pytest.raises(LocalError, match=r"^513 indirect segments need 2 pages, got 1$"):
        blkif.parse_indirect_segments(pages[:1], 513)


def test_segment_refusals_name_the_segment() -> None:
    """A bad segment's refusal names its sectors and grant, directly and in the request's
    error (which answers the request's id)."""
    text = r"^bad segment sectors first=5 last=4 \(gref 21\)$"
    with pytest.raises(ProtocolError, match=text):
        blkif.validate_segment(Segment(21, 5, 4))
    req = _rw(BLKIF_OP_READ, 0, [(0, 7), (5, 4)], 33)
    with pytest.raises(BlkifRequestError, match=text) as err:
        blkif.validate_request(req)
    assert (err.value.id, err.value.status) == (33, blkif.BLKIF_RSP_ERROR)


# -- virtual-device names and numbers (xen-protocols §6.4, Linux's sd/hd numbering) --------


def test_virtual_device_names_at_the_edges_of_each_kind() -> None:
    """sd: 16 disks of 15 partitions under major 8 (sdp15 the last); hd: 4 disks of 63
    partitions, a and b under major 3, c and d under 22; xvd beyond 15 disks or
    partitions in the extended form, up to partition 255. Every refusal names the name."""
    assert blkif.vdev_encode("sda15") == 8 << 8 | 15
    assert blkif.vdev_encode("sdp15") == 8 << 8 | 15 << 4 | 15
    assert blkif.vdev_decode(8 << 8 | 15 << 4 | 15) == "sdp15"
    assert blkif.vdev_encode("hdd63") == 22 << 8 | 1 << 6 | 63
    assert blkif.vdev_encode("xvdp16") == blkif.VDEV_EXTENDED | 15 << 8 | 16
    for name, why in [("sda16", "sd disk/partition > 15"), ("sdq", "sd disk/partition > 15"),
                      ("hda64", "hd disk > 3 or partition > 63"),
                      ("hde", "hd disk > 3 or partition > 63"),
                      ("xvda256", "disk or partition too large"),
                      ("xvdbxxxx1", "disk or partition too large")]:
        with pytest.raises(LocalError, match=rf"^'{name}': {why}$"):
            blkif.vdev_encode(name)
    with pytest.raises(LocalError, match=r"^not a virtual-device name: 'xvd'$"):
        blkif.vdev_encode("xvd")
    with pytest.raises(LocalError, match=r"^bad partition in 'sda01'$"):
        blkif.vdev_encode("sda01")


def test_virtual_device_numbers_outside_29_bits_are_refused() -> None:
    """Numbers are 29 bits (bit 28 the extended flag): negative ones and ones with a bit
    above 28 are refused even where the low bits would decode; an hd number with disk 2
    or 3 under its major is refused naming the number."""
    top = blkif.VDEV_EXTENDED | 5 << 8 | 1  # xvdf1 in the extended form
    assert blkif.vdev_decode(top) == "xvdf1"
    for number in (-1, -top, 1 << 29 | top, 1 << 30 | top):
        with pytest.raises(ProtocolError, match=rf"^virtual-device {number} out of range$"):
            blkif.vdev_decode(number)
    with pytest.raises(ProtocolError, match=r"^virtual-device 896: bad hd disk$"):
        blkif.vdev_decode(3 << 8 | 2 << 6)


def test_virtual_device_key_errors_name_the_key_and_errno() -> None:
    """The xenstore value is a decimal below 2^29: a larger one is ERANGE, text EINVAL,
    both naming the key; a number in range that decodes to nothing is refused too."""
    with pytest.raises(ProtocolError, match=r"^peer key 'virtual-device' = 536870912 ") as e:
        blkif.parse_virtual_device("536870912")
    assert e.value.errno == errno.ERANGE
    with pytest.raises(ProtocolError, match=r"^peer key 'virtual-device' is not a") as e:
        blkif.parse_virtual_device(b"xvda")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError, match=r"unknown major 7$"):
        blkif.parse_virtual_device(str(7 << 8))


# -- validate_request: every refusal with its text, id and status; every accepted edge ----


def test_every_refusal_and_every_accepted_edge() -> None:
    """Each rule of validate_request's list at both edges: what is accepted just inside,
    and what is refused just outside, answering the request's id and operation with
    EOPNOTSUPP (not offered, unknown, unsupported) or ERROR (malformed), with a text
    naming the value."""
    from xenpv.protocols.blkif import (
        BLKIF_OP_DISCARD,
        BLKIF_OP_INDIRECT,
        BLKIF_RSP_EOPNOTSUPP,
        BLKIF_RSP_ERROR,
        BlkifRequestDiscard,
        BlkifRequestIndirect,
    )

    def ind(nr: int, op: int = BLKIF_OP_WRITE) -> BlkifRequestIndirect:
        return BlkifRequestIndirect(BLKIF_OP_INDIRECT, op, nr, 41, 0, 1)

    seg = (Segment(8, 0, 7),)
    accepted: list[tuple[blkif.AnyRequest, dict[str, Any]]] = [
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 1, 1, 41, 99, 1), {"disk_sectors": 100}),
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 1, 41, 0, 100), {"disk_sectors": 100}),
        (ind(1, BLKIF_OP_READ), {"max_indirect_segments": 1}),
        (ind(4096), {"max_indirect_segments": 100000}),
        (ind(300), {"max_indirect_segments": 300}),
        (BlkifRequest(BLKIF_OP_WRITE_BARRIER, 0, 1, 41, 0), {}),
        (BlkifRequest(BLKIF_OP_WRITE, 11, 1, 41, 0, seg * 11), {"disk_sectors": 88}),
        (BlkifRequest(BLKIF_OP_READ, 1, 1, 41, 0, seg),
         {"supported_ops": frozenset({BLKIF_OP_READ})}),
    ]
    for req, kw in accepted:
        blkif.validate_request(req, **kw)
    refused: list[tuple[blkif.AnyRequest, dict[str, Any], str, int]] = [
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 1, 41, 0, 8),
         {"supported_ops": frozenset({BLKIF_OP_READ})}, "operation 5 not supported",
         BLKIF_RSP_EOPNOTSUPP),
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 3, 1, 41, 0, 8), {}, "discard flag 0x3 unknown",
         BLKIF_RSP_ERROR),
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 1, 1, 41, 0, 0), {}, "discard of 0 sectors",
         BLKIF_RSP_ERROR),
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 1, 41, 99, 2), {"disk_sectors": 100},
         "sectors 99+2 beyond disk of 100", BLKIF_RSP_ERROR),
        (ind(1), {}, "indirect requests not offered", BLKIF_RSP_EOPNOTSUPP),
        (ind(1, BLKIF_OP_FLUSH_DISKCACHE), {"max_indirect_segments": 8},
         "indirect_op 3 not read/write", BLKIF_RSP_ERROR),
        (ind(0), {"max_indirect_segments": 8}, "indirect nr_segments 0 not in 1..8",
         BLKIF_RSP_ERROR),
        (ind(301), {"max_indirect_segments": 300}, "indirect nr_segments 301 not in 1..300",
         BLKIF_RSP_ERROR),
        (ind(4097), {"max_indirect_segments": 100000},
         "indirect nr_segments 4097 not in 1..4096", BLKIF_RSP_ERROR),
        (BlkifRequest(7, 0, 1, 41, 0), {}, "unknown operation 7", BLKIF_RSP_EOPNOTSUPP),
        (BlkifRequest(BLKIF_OP_READ, 0, 1, 41, 0), {}, "nr_segments 0 not in 1..11",
         BLKIF_RSP_ERROR),
        (BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 12, 1, 41, 0, seg * 11), {},
         "nr_segments 12 not in 0..11", BLKIF_RSP_ERROR),
    ]
    for req, kw, text, status in refused:
        with pytest.raises(BlkifRequestError) as err:
            blkif.validate_request(req, **kw)
        assert (str(err.value), err.value.id, err.value.operation, err.value.status) == (
            text, 41, req.operation, status)
    assert BlkifRequestError("x", 3, 1).status == BLKIF_RSP_ERROR


def test_request_parse_refuses_what_lies_outside_the_buffer() -> None:
    """A request is read only from inside the buffer: a negative offset or one that
    leaves less than a request's bytes is a LocalError, never a read from the end."""
    for abi in ABI:
        req = BlkifRequest.rw(BLKIF_OP_READ, 0x1234, 2**40 + 2, 3, (Segment(8, 1, 7),))
        raw = req.pack(abi)
        assert BlkifRequest.parse(raw, 0, abi) == req
        assert BlkifRequest.parse(raw, 0, abi) == BlkifRequest.parse(b"\0" + raw, 1, abi)
        if abi is blkif.NATIVE_ABI:
            assert BlkifRequest.parse(raw) == BlkifRequest.parse(raw, 0, abi)  # offset 0
        size = len(raw)
        for buf, off in ((raw, -size), (raw, 1), (raw[:-1], 0), (b"\0" + raw, -size)):
            text = rf"^blkif_request\[{abi.value}\]: (negative offset|cannot read {size} bytes)"
            with pytest.raises(LocalError, match=text):
                BlkifRequest.parse(buf, off, abi)
            with pytest.raises(LocalError, match=rf"^blkif request: buffer too short at {off}$"):
                blkif.parse_request(buf, off, abi)

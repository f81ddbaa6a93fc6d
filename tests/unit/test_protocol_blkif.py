"""blkif validation, ABI selection and virtual-device names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError, PeerError
from xenpv.protocols import ProtocolError, blkif
from xenpv.protocols.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestError,
    BlkifRequestIndirect,
    BlkifResponse,
    Segment,
)


def rw(op: int, segs: list[tuple[int, int]], sector: int = 0, rid: int = 7) -> BlkifRequest:
    return BlkifRequest.rw(op, 51712, rid, sector, tuple(Segment(8 + k, a, b) for k, (a, b) in enumerate(segs)))


def test_valid_requests_pass() -> None:
    blkif.validate_request(rw(BLKIF_OP_READ, [(0, 7)] * 11), disk_sectors=88)
    blkif.validate_request(rw(BLKIF_OP_WRITE, [(3, 3)]))
    blkif.validate_request(BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 0, 51712, 1, 0))
    blkif.validate_request(BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 51712, 2, 100, 8), disk_sectors=108)
    ind = BlkifRequestIndirect(BLKIF_OP_INDIRECT, BLKIF_OP_READ, 256, 3, 0, 51712, (9,))
    blkif.validate_request(ind, max_indirect_segments=256)
    assert blkif.validate_segments(ind, (Segment(1, 0, 7), Segment(2, 0, 3)), 100) == 12


@pytest.mark.parametrize(
    ("req", "status"),
    [
        (rw(BLKIF_OP_READ, []), BLKIF_RSP_ERROR),  # nr_segments 0 for a read
        (BlkifRequest(BLKIF_OP_WRITE, 12, 1, 7, 0, ()), BLKIF_RSP_ERROR),  # > 11
        (BlkifRequest(BLKIF_OP_WRITE, 255, 1, 7, 0, ()), BLKIF_RSP_ERROR),
        (rw(BLKIF_OP_READ, [(4, 3)]), BLKIF_RSP_ERROR),  # first_sect > last_sect
        (rw(BLKIF_OP_READ, [(0, 8)]), BLKIF_RSP_ERROR),  # last_sect > 7
        (rw(BLKIF_OP_READ, [(0, 7)], sector=97), BLKIF_RSP_ERROR),  # beyond the 100-sector disk
        (BlkifRequest(99, 1, 1, 7, 0, (Segment(8, 0, 7),)), BLKIF_RSP_EOPNOTSUPP),  # unknown op
        (BlkifRequest(blkif.BLKIF_OP_RESERVED_1, 0, 1, 7, 0), BLKIF_RSP_EOPNOTSUPP),
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 2, 1, 7, 0, 8), BLKIF_RSP_ERROR),  # unknown flag
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 1, 7, 0, 0), BLKIF_RSP_ERROR),
        (BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 1, 7, 96, 8), BLKIF_RSP_ERROR),  # beyond disk
        (BlkifRequestIndirect(BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, 0, 7, 0, 1), BLKIF_RSP_ERROR),
        (BlkifRequestIndirect(BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, 257, 7, 0, 1), BLKIF_RSP_ERROR),
        (BlkifRequestIndirect(BLKIF_OP_INDIRECT, BLKIF_OP_DISCARD, 8, 7, 0, 1), BLKIF_RSP_ERROR),
    ],
)
def test_scenario_04_out_of_range_requests_answer_an_error(req: blkif.AnyRequest, status: int) -> None:
    with pytest.raises(BlkifRequestError) as exc:
        blkif.validate_request(req, max_indirect_segments=256, disk_sectors=100)
    assert isinstance(exc.value, PeerError)
    assert exc.value.id == 7 and exc.value.status == status and exc.value.operation == req.operation


def test_indirect_not_offered_and_unsupported_ops() -> None:
    ind = BlkifRequestIndirect(BLKIF_OP_INDIRECT, BLKIF_OP_READ, 8, 5, 0, 1)
    with pytest.raises(BlkifRequestError) as exc:
        blkif.validate_request(ind)
    assert exc.value.status == BLKIF_RSP_EOPNOTSUPP
    with pytest.raises(BlkifRequestError) as exc:
        blkif.validate_request(
            BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 0, 1, 5, 0),
            supported_ops=frozenset({BLKIF_OP_READ, BLKIF_OP_WRITE}),
        )
    assert exc.value.status == BLKIF_RSP_EOPNOTSUPP
    # the indirect limit is also capped by the protocol's 8 pages x 512
    big = BlkifRequestIndirect(BLKIF_OP_INDIRECT, BLKIF_OP_READ, 4097, 5, 0, 1)
    with pytest.raises(BlkifRequestError):
        blkif.validate_request(big, max_indirect_segments=100000)


@settings(max_examples=200, deadline=None)
@given(slot=st.binary(min_size=112, max_size=112), abi=st.sampled_from(list(blkif.ABI)))
def test_hostile_slot_bytes_only_ever_raise_peer_errors(slot: bytes, abi: blkif.ABI) -> None:
    req = blkif.parse_request(slot, 0, abi)
    try:
        blkif.validate_request(req, max_indirect_segments=256, disk_sectors=1 << 20)
    except PeerError:
        return
    # accepted requests really are in range
    if isinstance(req, BlkifRequest):
        assert 0 <= req.nr_segments <= 11 and all(s.first_sect <= s.last_sect <= 7 for s in req.seg)


def test_responses() -> None:
    blkif.validate_response(BlkifResponse(1, BLKIF_OP_READ, 0), BLKIF_OP_READ)
    blkif.validate_response(BlkifResponse(1, BLKIF_OP_READ, BLKIF_RSP_EOPNOTSUPP))
    with pytest.raises(ProtocolError, match=r"^blkif response 1: unknown status 5$"):
        blkif.validate_response(BlkifResponse(1, BLKIF_OP_READ, 5))  # scenario 11
    with pytest.raises(ProtocolError, match=r"^blkif response 1: operation 1 != request's 0$"):
        blkif.validate_response(BlkifResponse(1, BLKIF_OP_WRITE, 0), BLKIF_OP_READ)  # echo


def test_abi_from_protocol() -> None:
    assert blkif.abi_from_protocol("x86_32-abi") is blkif.ABI.X86_32
    assert blkif.abi_from_protocol(b"arm-abi") is blkif.ABI.ARM
    assert blkif.abi_from_protocol(None) is blkif.ABI.X86_64
    with pytest.raises(ProtocolError):  # scenario 18: unknown protocol
        blkif.abi_from_protocol("x86_16-abi")
    # non-ASCII bytes are an unknown protocol too (never a decoding error), and the
    # message shows the first 40 characters of the value
    with pytest.raises(ProtocolError) as info:
        blkif.abi_from_protocol(b"\xffarm-abi" + b"x" * 60)
    shown = ("\ufffdarm-abi" + "x" * 60)[:40]
    assert str(info.value) == f"unknown blkif protocol {shown!r}"


def test_ring_sizes() -> None:
    for abi in blkif.ABI:
        assert [blkif.RING_SIZE(p, abi) for p in (1, 2, 4, 8, 16)] == [32, 64, 128, 256, 512]
    assert blkif.RING_SIZE() == 32
    seg = blkif.Segment(8, 0, 7)
    assert blkif.BlkifRequest.rw(BLKIF_OP_READ, 0, 1, 0, (seg,) * 11).nr_segments == 11
    with pytest.raises(LocalError, match=r"^at most 11 segments, got 12$"):
        blkif.BlkifRequest.rw(BLKIF_OP_READ, 0, 1, 0, (seg,) * 12)
    lay = blkif.layouts().ring
    assert lay.slot_offset(37) == 624  # xen-protocols §1.2 worked example
    with pytest.raises(LocalError):
        lay.nr_ents(0)
    assert blkif.ring_ref_key(3) == "ring-ref3"


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("xvda", 51712),
        ("xvdb", 51728),
        ("xvda1", 51713),
        ("xvdp15", (202 << 8) | (15 << 4) | 15),
        ("xvdq", (1 << 28) | (16 << 8)),
        ("xvdaa", (1 << 28) | (26 << 8)),
        ("xvda16", (1 << 28) | 16),
        ("sda", 2048),
        ("sdb2", (8 << 8) | (1 << 4) | 2),
        ("hda", 768),
        ("hdb3", (3 << 8) | (1 << 6) | 3),
        ("hdc", 22 << 8),
        ("hdd63", (22 << 8) | (1 << 6) | 63),
    ],
)
def test_virtual_device_encoding(name: str, number: int) -> None:
    assert blkif.vdev_encode(name) == number
    assert blkif.vdev_decode(number) == name
    assert blkif.parse_virtual_device(str(number)) == number


def test_virtual_device_d_p_form_and_errors() -> None:
    assert blkif.vdev_encode("d0p1") == blkif.vdev_encode("xvda1")
    assert blkif.vdev_encode("d100") == (1 << 28) | (100 << 8)
    for bad in ("xvd", "vda", "sdq", "hde", "xvda01", "hda64"):
        with pytest.raises(LocalError):
            blkif.vdev_encode(bad)
    for bad in ("abc", "-1", "51712 ", "0x10", "99999999999999999999999", "", str(1 << 29), str(7 << 8)):
        with pytest.raises(ProtocolError):
            blkif.parse_virtual_device(bad)
    with pytest.raises(ProtocolError):
        blkif.vdev_decode((3 << 8) | (2 << 6))  # hd major 3 only has disks 0 and 1


@settings(max_examples=200, deadline=None)
@given(number=st.integers(0, (1 << 29) - 1))
def test_virtual_device_decode_is_total_and_consistent(number: int) -> None:
    try:
        name = blkif.vdev_decode(number)
    except ProtocolError:
        return
    again = blkif.vdev_encode(name)
    assert blkif.vdev_decode(again) == name


@settings(max_examples=300, deadline=None)
@given(slot=st.binary(min_size=112, max_size=112), op=st.sampled_from([0, 1, 3, 4, 200]),
       nr=st.integers(0, 255), abi=st.sampled_from(list(blkif.ABI)))
def test_request_fast_path_matches_the_generic_layout(slot: bytes, op: int, nr: int,
                                                      abi: blkif.ABI) -> None:
    """BlkifRequest's flat parse and pack give what the generic nested layout gives."""
    raw = bytes([op, nr]) + slot[2:blkif.layouts(abi).request.size]
    fast = blkif.BlkifRequest.parse(raw, 0, abi)
    generic = blkif.BlkifRequest.from_raw(blkif.BlkifRequest.layout(abi).unpack_from(raw, 0))
    assert fast == generic
    assert fast.pack(abi) == blkif.BlkifRequest.layout(abi).pack(generic.raw())
    with pytest.raises(LocalError):
        blkif.BlkifRequest.parse(raw[:-1], 0, abi)


# -- the backend's batch accept (compiled scan and its readable twin) -----------------------

_ALL_ABIS = list(blkif.ABI)


@st.composite
def _slots(draw: st.DrawFn) -> tuple[blkif.ABI, bytes, int]:
    """A batch of request slots: mostly well-formed reads and writes, with every field
    sometimes wrong (operation, segment count, sector bounds, segment sectors)."""
    abi = draw(st.sampled_from(_ALL_ABIS))
    count = draw(st.integers(1, 6))
    out = bytearray()
    for _ in range(count):
        op = draw(st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_READ,
                                   BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD,
                                   BLKIF_OP_INDIRECT, 9]))
        nsegs = draw(st.sampled_from([1, 1, 2, 11, 0, 12, 200]))
        segs = tuple(Segment(draw(st.integers(0, 2**32 - 1)), *sorted(
            (draw(st.integers(0, 9)), draw(st.integers(0, 9))),
            reverse=draw(st.integers(0, 9)) == 0)) for _ in range(min(nsegs, 11)))
        sector = draw(st.sampled_from([0, 8, 7, 100, 4088, 4095, 2**64 - 8]))
        req = BlkifRequest(op, nsegs, 51712, draw(st.integers(0, 2**64 - 1)), sector, segs)
        raw = req.layout(abi).pack(req.raw())
        out += raw + bytes(blkif.LAYOUTS[abi].ring.slot_size - len(raw))
    return abi, bytes(out), count


@settings(max_examples=200, deadline=None)
@given(_slots(), st.sampled_from([0, 8, 4096, 2**40]), st.booleans(),
       st.sampled_from([512, 1024, 4096]))
def test_compiled_batch_accept_matches_its_twin(batch: tuple[blkif.ABI, bytes, int],
                                                disk: int, readonly: bool,
                                                sector_size: int) -> None:
    """The compiled scan accepts exactly what the readable twin (built on
    validate_request) accepts, with the same fields; never anything it refuses."""
    from xenpv.protocols import _blkscan  # built by setup.py: missing is a failure

    abi, raw, count = batch
    slot = blkif.LAYOUTS[abi].ring.slot_size
    twin = blkif.scan_rw_reference(raw, count, abi, disk, readonly=readonly,
                                   sector_size=sector_size)
    compiled = _blkscan.scan_rw(raw, count, slot, 4 if abi is blkif.ABI.X86_32 else 8,
                                disk, readonly, sector_size)
    assert compiled == twin
    assert blkif.scan_rw(raw, count, abi, disk, readonly=readonly,
                         sector_size=sector_size) == twin


def test_batch_accept_takes_good_reads_and_writes_only() -> None:
    """One batch: a good read and write accepted with byte ranges; a write to a
    read-only disk, a range past the end, a bad segment, a flush and a misaligned
    request (4096-byte sectors) left to the full validation."""
    abi = blkif.NATIVE_ABI
    slot = blkif.LAYOUTS[abi].ring.slot_size

    def pack(req: BlkifRequest) -> bytes:
        raw = req.pack(abi)
        return raw + bytes(slot - len(raw))

    good_read = rw(BLKIF_OP_READ, [(0, 7), (2, 3)], sector=16, rid=1)
    good_write = rw(BLKIF_OP_WRITE, [(0, 7)], sector=8, rid=2)
    past_end = rw(BLKIF_OP_READ, [(0, 7)], sector=60, rid=3)
    bad_seg = rw(BLKIF_OP_READ, [(5, 4)], rid=4)
    flush = BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 0, 51712, 5, 0)
    raw = b"".join(pack(r) for r in (good_read, good_write, past_end, bad_seg, flush))
    got = blkif.scan_rw(raw, 5, abi, 64)
    assert got == [(1, BLKIF_OP_READ, 16 * 512, 10 * 512, ((8, 0, 4096), (9, 1024, 2048))),
                   (2, BLKIF_OP_WRITE, 8 * 512, 4096, ((8, 0, 4096),)), None, None, None]
    assert blkif.scan_rw(raw, 2, abi, 64, readonly=True)[1] is None
    assert blkif.scan_rw(raw, 2, abi, 64, sector_size=4096) == [None, got[1]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 7)), min_size=1,
                max_size=1100))
def test_indirect_pages_from_columns_match_the_segment_encoder(
        segs: list[tuple[int, int]]) -> None:
    """The frontend's column packer gives the same pages as packing Segment records."""
    grefs, lasts = [g for g, _ in segs], [last for _, last in segs]
    assert blkif.pack_indirect_columns(grefs, 0, lasts) == blkif.pack_indirect_pages(
        [Segment(g, 0, last) for g, last in segs])

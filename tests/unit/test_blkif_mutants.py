"""blkif at the edges mutation testing found unchecked, each against xen-protocols.md §6
(and Linux's vdev numbering), not against the code: flushes without data anywhere on the
disk, the ABI records packed and parsed at any offset, the request encoder's slow path,
4096 indirect segments, the batch accept's twin and its fallback, and vdev names and
numbers at both edges of every range."""

from __future__ import annotations

import pytest

from xenpv.protocols import blkif
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

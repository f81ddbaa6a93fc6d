"""blkif at the edges mutation testing found unchecked, each against xen-protocols.md §6
(and Linux's vdev numbering), not against the code: flushes without data anywhere on the
disk, the ABI records packed and parsed at any offset, the request encoder's slow path,
4096 indirect segments, the batch accept's twin and its fallback, and vdev names and
numbers at both edges of every range."""

from __future__ import annotations

import pytest

from xenpv.protocols import blkif
from xenpv.protocols.blkif import (
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
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

# The block backend's batch accept: one pass over a batch of copied blkif request slots.
#
# The readable twin is xenpv.protocols.blkif.scan_rw_reference (tests compare the two on
# arbitrary slots).  Only plain READ/WRITE requests that pass every check are accepted
# here; anything else (another operation, a bad field, a range beyond the disk, a write
# to a read-only disk, a misaligned request) is left to the full Python validation, which
# answers it.  So this can only make the common case cheaper, never accept more.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    OP_READ = 0
    OP_WRITE = 1
    MAX_SEGMENTS = 11
    SECTOR_SHIFT = 9


cdef inline uint64_t _u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)  # little-endian host (x86, arm64 little-endian)
    return v


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


def scan_rw(const uint8_t[::1] batch not None, Py_ssize_t count, Py_ssize_t slot,
            Py_ssize_t id_offset, uint64_t disk_sectors, bint readonly,
            uint32_t sector_size):
    """For each of ``count`` request slots of ``slot`` bytes in ``batch`` (a private
    copy): ``(id, operation, byte offset, byte length, ((gref, start, end), ...))`` for
    a READ/WRITE that passes every check (start and end are byte offsets in the granted
    page), else None.  ``id_offset``: 8 (x86_64 and arm ABIs) or 4 (x86_32)."""
    if count < 0 or slot < id_offset + 16 + 8 * MAX_SEGMENTS or count * slot > batch.shape[0]:
        raise ValueError("batch too short for the slots")
    cdef list out = [None] * count
    cdef Py_ssize_t j, k
    cdef const uint8_t *base
    cdef const uint8_t *seg
    cdef uint8_t op, nr, first, last
    cdef uint64_t sector, total
    cdef uint32_t mask = (sector_size >> SECTOR_SHIFT) - 1 if sector_size >= 512 else 0
    cdef bint ok
    for j in range(count):
        base = &batch[j * slot]
        op = base[0]
        nr = base[1]
        if op != OP_READ and op != OP_WRITE:
            continue
        if op == OP_WRITE and readonly:
            continue
        if nr < 1 or nr > MAX_SEGMENTS:
            continue
        sector = _u64(base + id_offset + 8)
        seg = base + id_offset + 16
        total = 0
        ok = True
        for k in range(nr):
            first = seg[8 * k + 4]
            last = seg[8 * k + 5]
            if last > 7 or first > last or (first & mask) or ((last - first + 1) & mask):
                ok = False
                break
            total += last - first + 1
        if not ok or sector >= disk_sectors or total > disk_sectors - sector:
            continue
        if (sector & mask) or (total & mask):
            continue
        segs = tuple([(_u32(seg + 8 * k), <uint32_t>seg[8 * k + 4] << SECTOR_SHIFT,
                       (<uint32_t>seg[8 * k + 5] + 1) << SECTOR_SHIFT) for k in range(nr)])
        out[j] = (_u64(base + id_offset), op, sector << SECTOR_SHIFT,
                  total << SECTOR_SHIFT, segs)
    return out

# The block frontend's request table, compiled: one queue's ring ids, its staged request
# slots and its in-flight one-page requests of batches, with no Python object per request.
#
# The readable twin is xenpv.frontends.blktable (same API, same results; tests run both on
# the same operations).  Only one-page READ/WRITE pieces on free persistent-pool pages are
# built here, and only answers that name a request of the table, echo its operation and
# carry a known status are finished here; everything else is left to the frontend's
# general path, which reports protocol violations.

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.stdint cimport int16_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cdef enum:
    OP_READ = 0
    OP_WRITE = 1
    PAGE_SIZE = 4096
    SECTOR_SHIFT = 9
    RSP_OKAY = 0
    RSP_ERROR = -1
    RSP_EOPNOTSUPP = -2
    # in-flight entry states
    FREE = 0
    BUSY = 1

SLOT_BITS = 16
cdef uint64_t _SLOT_MASK = (1 << 16) - 1
GENERATION_MASK = (1 << 48) - 1
cdef uint64_t _GEN_MASK = (<uint64_t>1 << 48) - 1


cdef inline uint64_t _u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)  # little-endian host (x86, arm64 little-endian)
    return v


cdef inline void _put64(uint8_t *p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)


cdef inline void _put32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


def split_pages(list items not None, bint write, Py_ssize_t sector_size, Py_ssize_t size):
    """The pieces of ``items`` when every one is a single piece the table builds, else
    None (see the twin)."""
    cdef list pieces = []
    cdef Py_ssize_t offset, n
    if sector_size <= 0:
        return None
    for item in items:
        if type(item) is not tuple or len(<tuple>item) != 2:
            return None
        o = (<tuple>item)[0]
        buf = (<tuple>item)[1]
        if type(o) is not int or not (type(buf) is bytearray or (write and type(buf) is bytes)):
            return None
        try:
            offset = o
        except OverflowError:
            return None
        n = len(buf)
        if n <= 0 or n > PAGE_SIZE or offset < 0 or offset % sector_size \
                or n % sector_size or offset & 511 or n & 511 or offset > size - n:
            return None
        pieces.append((offset, n, PyMemoryView_FromObject(buf), 0))
    return pieces


cdef class Batch:
    """The requests of one ``read_many``/``write_many`` call: one future for all of
    them, set (to None) when the last is answered; ``errors`` counts those answered with
    an error and ``status`` is the first such status."""

    cdef public object future
    cdef public Py_ssize_t remaining
    cdef public Py_ssize_t errors
    cdef public int status

    def __init__(self, future, Py_ssize_t remaining):
        """``remaining`` requests, answered through ``future``."""
        self.future = future
        self.remaining = remaining
        self.errors = 0
        self.status = RSP_OKAY

    cdef int _answered(self, int status) except -1:
        if status != RSP_OKAY:
            self.errors += 1
            if self.status == RSP_OKAY:
                self.status = status
        self.remaining -= 1
        if self.remaining <= 0 and not self.future.done():
            self.future.set_result(None)
        return 0

    def answered(self, int status):
        """One request of the batch is answered; the future is set after the last."""
        self._answered(status)


cdef class RequestTable:
    """One queue's ids, staged slots and in-flight one-page batch requests (see
    ``xenpv.frontends.blktable``)."""

    cdef readonly Py_ssize_t nr_ents
    cdef readonly Py_ssize_t slot_size
    cdef readonly list free_ids
    cdef readonly uint64_t generation
    cdef readonly bytearray out
    cdef readonly Py_ssize_t staged
    cdef Py_ssize_t id_offset
    cdef Py_ssize_t count
    cdef uint8_t *state
    cdef uint8_t *ops
    cdef uint64_t *rids
    cdef double *deadlines
    cdef Py_ssize_t *starts
    cdef Py_ssize_t *lens
    # a read's buffer and page stay exported while it is in flight (released on answer)
    cdef Py_buffer *outbufs
    cdef Py_buffer *pagebufs
    cdef list pages
    cdef list homes
    cdef list batches

    def __cinit__(self, Py_ssize_t nr_ents, Py_ssize_t slot_size, Py_ssize_t id_offset):
        if not 0 < nr_ents <= (1 << SLOT_BITS) or id_offset not in (4, 8) \
                or slot_size != id_offset + 16 + 8 * 11:
            raise ValueError(f"no blkif ring of {nr_ents} slots of {slot_size} bytes "
                             f"with the id at {id_offset}")
        self.state = <uint8_t *>PyMem_Calloc(nr_ents, sizeof(uint8_t))
        self.ops = <uint8_t *>PyMem_Calloc(nr_ents, sizeof(uint8_t))
        self.rids = <uint64_t *>PyMem_Calloc(nr_ents, sizeof(uint64_t))
        self.deadlines = <double *>PyMem_Calloc(nr_ents, sizeof(double))
        self.starts = <Py_ssize_t *>PyMem_Calloc(nr_ents, sizeof(Py_ssize_t))
        self.lens = <Py_ssize_t *>PyMem_Calloc(nr_ents, sizeof(Py_ssize_t))
        self.outbufs = <Py_buffer *>PyMem_Calloc(nr_ents, sizeof(Py_buffer))
        self.pagebufs = <Py_buffer *>PyMem_Calloc(nr_ents, sizeof(Py_buffer))
        if not (self.state and self.ops and self.rids and self.deadlines and self.starts
                and self.lens and self.outbufs and self.pagebufs):
            raise MemoryError()

    def __init__(self, Py_ssize_t nr_ents, Py_ssize_t slot_size, Py_ssize_t id_offset):
        """A ring of ``nr_ents`` slots of ``slot_size`` bytes, the request id at
        ``id_offset`` (4 for the x86_32 ABI, else 8)."""
        self.nr_ents = nr_ents
        self.slot_size = slot_size
        self.id_offset = id_offset
        self.free_ids = list(range(nr_ents - 1, -1, -1))
        self.generation = 0
        self.out = bytearray(nr_ents * slot_size)
        self.staged = 0
        self.count = 0
        self.pages = [None] * nr_ents
        self.homes = [None] * nr_ents
        self.batches = [None] * nr_ents

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.state != NULL and self.outbufs != NULL and self.pagebufs != NULL:
            for i in range(self.nr_ents):
                if self.state[i] == BUSY and self.ops[i] == OP_READ:
                    PyBuffer_Release(&self.outbufs[i])
                    PyBuffer_Release(&self.pagebufs[i])
        PyMem_Free(self.state)
        PyMem_Free(self.ops)
        PyMem_Free(self.rids)
        PyMem_Free(self.deadlines)
        PyMem_Free(self.starts)
        PyMem_Free(self.lens)
        PyMem_Free(self.outbufs)
        PyMem_Free(self.pagebufs)

    @property
    def inflight(self):
        """Requests of the table on the ring (answered ones are gone)."""
        return self.count

    cdef inline uint64_t _next_id(self, Py_ssize_t slot) noexcept:
        self.generation = (self.generation + 1) & _GEN_MASK
        return (self.generation << SLOT_BITS) | <uint64_t>slot

    def next_id(self, Py_ssize_t slot):
        """The id of the next request in ``slot`` (a new generation)."""
        return self._next_id(slot)

    cdef uint8_t *_stage_slot(self) except NULL:
        if self.staged >= self.nr_ents \
                or PyByteArray_GET_SIZE(self.out) < self.nr_ents * self.slot_size:
            raise ValueError("no room to stage the request")
        cdef uint8_t *s = <uint8_t *>PyByteArray_AS_STRING(self.out) \
            + self.staged * self.slot_size
        self.staged += 1
        return s

    def stage(self, const uint8_t[::1] data not None):
        """Stage one request built elsewhere (at most a slot; the rest is zeroed)."""
        cdef Py_ssize_t n = data.shape[0]
        if n > self.slot_size:
            raise ValueError("no room to stage the request")
        cdef uint8_t *s = self._stage_slot()
        memset(s, 0, self.slot_size)
        if n:
            memcpy(s, &data[0], n)

    def take_staged(self):
        """How many slots are staged in ``out``; the stage is empty afterwards."""
        k, self.staged = self.staged, 0
        return k

    def build(self, list pieces not None, Py_ssize_t k, bint write, list free not None,
              double deadline, Batch batch not None):
        """Build and stage ``pieces[k:]`` while each is at most a page and there are a
        free slot and a free page in ``free``; returns the index of the first piece not
        built (see the twin)."""
        cdef Py_ssize_t total = len(pieces), n, start, offset, slot
        cdef Py_buffer vb, pb
        cdef uint32_t ref
        cdef uint64_t rid
        cdef uint8_t *s
        cdef uint8_t op = OP_WRITE if write else OP_READ
        cdef Py_ssize_t io = self.id_offset
        cdef list free_ids = self.free_ids
        cdef tuple piece
        while k < total:
            piece = <tuple?>pieces[k]
            offset = piece[0]
            n = piece[1]
            start = piece[3]
            if n <= 0 or n > PAGE_SIZE or n & 511 or offset < 0 or offset & 511 \
                    or start < 0 or not free or not free_ids:
                break
            page = free[len(free) - 1]
            ref = page.refs[0]
            mem = page.mem
            try:
                PyObject_GetBuffer(piece[2], &vb, PyBUF_SIMPLE if write else PyBUF_WRITABLE)
            except BufferError:
                break
            if start + n > vb.len:
                PyBuffer_Release(&vb)
                break
            try:
                PyObject_GetBuffer(mem, &pb, PyBUF_WRITABLE)
            except BaseException:
                PyBuffer_Release(&vb)
                raise
            if pb.len < n:
                PyBuffer_Release(&pb)
                PyBuffer_Release(&vb)
                break
            try:
                s = self._stage_slot()
            except BaseException:
                PyBuffer_Release(&pb)
                PyBuffer_Release(&vb)
                raise
            free.pop()
            slot = free_ids.pop()
            rid = self._next_id(slot)
            if write:
                memcpy(pb.buf, <uint8_t *>vb.buf + start, n)
                PyBuffer_Release(&pb)
                PyBuffer_Release(&vb)
            else:  # both stay exported until the answer
                self.outbufs[slot] = vb
                self.pagebufs[slot] = pb
            self.state[slot] = BUSY
            self.ops[slot] = op
            self.rids[slot] = rid
            self.deadlines[slot] = deadline
            self.starts[slot] = start
            self.lens[slot] = n
            self.pages[slot] = page
            self.homes[slot] = free
            self.batches[slot] = batch
            self.count += 1
            memset(s, 0, self.slot_size)
            s[0] = op
            s[1] = 1  # nr_segments; handle 0
            _put64(s + io, rid)
            _put64(s + io + 8, <uint64_t>(offset >> SECTOR_SHIFT))
            _put32(s + io + 16, ref)  # first sector 0
            s[io + 16 + 5] = <uint8_t>((n >> SECTOR_SHIFT) - 1)
            k += 1
        return k

    cdef object _end(self, Py_ssize_t slot):
        """Take entry ``slot`` out of the table: buffers released, page back on its free
        list; returns its batch (the slot itself is the caller's)."""
        self.state[slot] = FREE
        self.count -= 1
        if self.ops[slot] == OP_READ:
            PyBuffer_Release(&self.outbufs[slot])
            PyBuffer_Release(&self.pagebufs[slot])
        page = self.pages[slot]
        self.pages[slot] = None
        (<list>self.homes[slot]).append(page)
        self.homes[slot] = None
        b = self.batches[slot]
        self.batches[slot] = None
        return b

    def finish(self, const uint8_t[::1] responses not None, Py_ssize_t count, Py_ssize_t j):
        """Consume responses ``j`` .. ``count - 1`` while each answers a request of the
        table, echoes its operation and has a known status; returns the index of the
        first response left to the caller (see the twin)."""
        cdef Py_ssize_t e = self.slot_size, slot
        cdef const uint8_t *p
        cdef uint64_t rid
        cdef int16_t status
        cdef uint8_t op
        cdef Batch b
        if count < 0 or j < 0 or count * e > responses.shape[0]:
            raise ValueError("responses too short for the slots")
        while j < count:
            p = &responses[j * e]
            rid = _u64(p)
            op = p[8]
            memcpy(&status, p + 10, 2)
            slot = <Py_ssize_t>(rid & _SLOT_MASK)
            if slot >= self.nr_ents or self.state[slot] != BUSY or self.rids[slot] != rid \
                    or self.ops[slot] != op \
                    or (status != RSP_OKAY and status != RSP_ERROR
                        and status != RSP_EOPNOTSUPP):
                return j
            self.free_ids.append(slot)
            if op == OP_READ and status == RSP_OKAY:
                memcpy(<uint8_t *>self.outbufs[slot].buf + self.starts[slot],
                       self.pagebufs[slot].buf, self.lens[slot])
            (<Batch>self._end(slot))._answered(status)
            j += 1
        return j

    def lookup(self, uint64_t rid):
        """The operation of the table's request ``rid`` on the ring, or -1 if none."""
        cdef Py_ssize_t slot = <Py_ssize_t>(rid & _SLOT_MASK)
        if slot < self.nr_ents and self.state[slot] == BUSY and self.rids[slot] == rid:
            return self.ops[slot]
        return -1

    def entries(self):
        """(id, deadline, batch) of every request of the table on the ring."""
        cdef Py_ssize_t i
        return [(self.rids[i], self.deadlines[i], self.batches[i])
                for i in range(self.nr_ents) if self.state[i] == BUSY]

    def fail_all(self):
        """End every request of the table unanswered (pages back, nothing copied; their
        slots stay taken) and drop the staged slots; returns their batches (once each,
        in the order first met)."""
        cdef Py_ssize_t i
        cdef list out = []
        cdef set seen = set()
        self.staged = 0
        for i in range(self.nr_ents):
            if self.state[i] != BUSY:
                continue
            b = self._end(i)
            if id(b) not in seen:
                seen.add(id(b))
                out.append(b)
        return out

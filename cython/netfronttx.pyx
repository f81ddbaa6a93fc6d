# The net frontend's TX table, compiled: one queue's free TX pages, its staged TX slots
# (built as whole slots for RingClient.submit_slots), a TAP frame read straight into
# the pages with readv, and the backend's TX answers checked in one call.
#
# The readable twin is xenpv.frontends.nettx (same API, same results; a Hypothesis test
# runs both on the same operations).

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING
from libc.errno cimport EAGAIN, errno
from libc.stdint cimport int16_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free as c_free, malloc
from libc.string cimport memcpy, memset
from posix.uio cimport iovec, readv

import os

cdef enum:
    PAGE = 4096
    SLOT_SIZE = 12
    HDR_SIZE = 10
    FRAME_MAX = 0xFFFF
    FRAME_PAGES = 16
    F_MORE = 4          # NETTXF_more_data
    F_EXTRA = 8         # NETTXF_extra_info
    RSP_OKAY = 0
    RSP_ERROR = -1
    RSP_DROPPED = -2
    RSP_NULL = 1

SLOT = SLOT_SIZE
VNET_HDR_SIZE = HDR_SIZE
MAX_FRAME = FRAME_MAX
MAX_FRAME_PAGES = FRAME_PAGES


cdef inline void _put_req(uint8_t *p, uint32_t gref, uint16_t flags, uint16_t rid,
                          uint16_t size) noexcept nogil:
    cdef uint16_t zero = 0
    memcpy(p, &gref, 4)
    memcpy(p + 4, &zero, 2)
    memcpy(p + 6, &flags, 2)
    memcpy(p + 8, &rid, 2)
    memcpy(p + 10, &size, 2)


cdef class TxTable:
    """One queue's TX pages and staged slots (see ``xenpv.frontends.nettx``)."""

    cdef readonly Py_ssize_t npages
    cdef readonly Py_ssize_t staged
    cdef readonly bytearray out
    cdef readonly bytearray hdr
    cdef readonly object mem
    cdef Py_buffer _view     # over mem, held only during a call (see _pages/_done)
    cdef uint8_t *base
    cdef uint32_t *refs
    cdef uint16_t *stack
    cdef Py_ssize_t nfree
    cdef uint8_t *state      # bit 1: in flight, bit 2: watched
    cdef Py_ssize_t max_slots

    def __cinit__(self, *args, **kwargs):
        self.refs = NULL
        self.stack = NULL
        self.state = NULL

    def __dealloc__(self):
        c_free(self.refs)
        c_free(self.stack)
        c_free(self.state)

    def __init__(self, mem, list refs not None, Py_ssize_t max_slots):
        """Pages ``mem`` (``len(refs)`` of them, writable), granted as ``refs``; room
        for ``max_slots`` staged slots (the ring's size)."""
        cdef Py_ssize_t n = len(refs), k
        if n < 1 or n > 0xFFFF or max_slots < 1:
            raise ValueError("a TX table needs its pages and room for a slot")
        PyObject_GetBuffer(mem, &self._view, PyBUF_WRITABLE)
        k = self._view.len
        PyBuffer_Release(&self._view)
        if k < n * PAGE:
            raise ValueError("a TX table needs its pages and room for a slot")
        self.mem = mem
        self.base = NULL
        self.npages = n
        self.refs = <uint32_t *>malloc(n * sizeof(uint32_t))
        self.stack = <uint16_t *>malloc(n * sizeof(uint16_t))
        self.state = <uint8_t *>malloc(n)
        if self.refs == NULL or self.stack == NULL or self.state == NULL:
            raise MemoryError()
        for k in range(n):
            self.refs[k] = <uint32_t>refs[k]
            self.stack[k] = <uint16_t>(n - 1 - k)
        memset(self.state, 0, n)
        self.nfree = n
        self.max_slots = max_slots
        self.out = bytearray(max_slots * SLOT_SIZE)
        self.hdr = bytearray(HDR_SIZE)
        self.staged = 0

    cdef int _pages(self) except -1:
        """Hold the pages' buffer for this call (not across calls: a buffer held by an
        object the collector cannot see through would let it free the memoryview)."""
        PyObject_GetBuffer(self.mem, &self._view, PyBUF_WRITABLE)
        self.base = <uint8_t *>self._view.buf
        return 0

    cdef void _done(self) noexcept:
        self.base = NULL
        PyBuffer_Release(&self._view)

    @property
    def free(self) -> list:
        """The free pages, bottom of the stack first."""
        return [self.stack[k] for k in range(self.nfree)]

    @property
    def out_ids(self) -> set:
        """The pages in flight."""
        return {k for k in range(self.npages) if self.state[k] & 1}

    cpdef Py_ssize_t free_pages(self):
        """Pages free now."""
        return self.nfree

    cpdef Py_ssize_t outstanding(self):
        """Pages in flight (sent, not answered)."""
        cdef Py_ssize_t k, n = 0
        for k in range(self.npages):
            n += self.state[k] & 1
        return n

    cpdef Py_ssize_t room(self):
        """Slots that can still be staged."""
        return self.max_slots - self.staged

    cpdef void pushed(self):
        """The staged slots went to the ring (or were dropped): stage anew."""
        self.staged = 0

    def take(self) -> int:
        """Take one free page (for a request built elsewhere); ValueError if none."""
        if self.nfree == 0:
            raise ValueError("no free TX page")
        self.nfree -= 1
        cdef uint16_t idx = self.stack[self.nfree]
        self.state[idx] |= 1
        return idx

    def watch(self, Py_ssize_t idx) -> None:
        """Hand ``idx``'s answer back from :meth:`reap` (it is awaited)."""
        if 0 <= idx < self.npages:
            self.state[idx] |= 2

    cdef Py_ssize_t _check(self, Py_ssize_t size, object gso) except -1:
        cdef Py_ssize_t pages
        if not 0 < size <= FRAME_MAX:
            raise ValueError(f"a TX frame of {size} bytes")
        if gso is not None and len(gso) > SLOT_SIZE:
            raise ValueError("an extra-info slot larger than a slot")
        pages = (size + PAGE - 1) // PAGE
        if pages > self.nfree:
            raise ValueError("no free TX pages for the frame")
        if pages + (gso is not None) > self.max_slots - self.staged:
            raise ValueError("no room for the frame's slots")
        return pages

    def fill(self, data, int flags, gso) -> int:
        """Copy the frame ``data`` into its pages and stage its slots; the slots staged.
        ValueError (nothing taken) without the pages or the room."""
        cdef Py_buffer view
        cdef Py_ssize_t size, pages, k, n
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            size = view.len
            pages = self._check(size, gso)
            self._pages()
            for k in range(pages):
                n = size - k * PAGE
                if n > PAGE:
                    n = PAGE
                memcpy(self.base + <Py_ssize_t>self.stack[self.nfree - 1 - k] * PAGE,
                       <const uint8_t *>view.buf + k * PAGE, n)
            self._done()
        finally:
            PyBuffer_Release(&view)
        return self.commit(size, flags, gso)

    def read_frame(self, int fd) -> int:
        """Read one TAP frame: header into ``hdr``, frame into the top free pages (taken
        by :meth:`commit` only); bytes read with the header, -1 if none is ready.
        ValueError without the pages of the largest frame free, OSError if it fails."""
        cdef iovec iov[FRAME_PAGES + 1]
        cdef Py_ssize_t k, got
        cdef int err
        if self.nfree < FRAME_PAGES:
            raise ValueError("a TAP read needs the pages of the largest frame free")
        self._pages()
        iov[0].iov_base = PyByteArray_AS_STRING(self.hdr)
        iov[0].iov_len = HDR_SIZE
        for k in range(FRAME_PAGES):
            iov[k + 1].iov_base = self.base + <Py_ssize_t>self.stack[self.nfree - 1 - k] * PAGE
            iov[k + 1].iov_len = PAGE
        iov[FRAME_PAGES].iov_len = FRAME_MAX - (FRAME_PAGES - 1) * PAGE
        got = readv(fd, iov, FRAME_PAGES + 1)
        err = errno
        self._done()
        if got < 0:
            if err == EAGAIN:
                return -1
            raise OSError(err, os.strerror(err))
        return got

    def head(self, Py_ssize_t size) -> memoryview:
        """The start of a frame of ``size`` bytes just read (its first page)."""
        if self.nfree == 0:
            raise ValueError("no frame read")
        cdef Py_ssize_t at = <Py_ssize_t>self.stack[self.nfree - 1] * PAGE
        return memoryview(self.mem).cast("B")[at:at + min(size, PAGE)]

    def frame(self, Py_ssize_t size) -> bytes:
        """A copy of the ``size`` bytes just read (for a frame sent another way)."""
        cdef Py_ssize_t pages = (size + PAGE - 1) // PAGE, k, n
        if not 0 < size <= FRAME_MAX or pages > self.nfree:
            raise ValueError(f"no frame of {size} bytes read")
        cdef bytes out = bytes(size)
        cdef uint8_t *dst = <uint8_t *>(<char *>out)
        self._pages()
        for k in range(pages):
            n = size - k * PAGE
            if n > PAGE:
                n = PAGE
            memcpy(dst + k * PAGE, self.base + <Py_ssize_t>self.stack[self.nfree - 1 - k] * PAGE, n)
        self._done()
        return out

    def commit(self, Py_ssize_t size, int flags, gso) -> int:
        """Take the pages holding a frame of ``size`` bytes (the top free ones) and stage
        its slots; the slots staged.  ValueError (nothing taken) without the pages or
        the room."""
        cdef Py_ssize_t pages = self._check(size, gso), k, glen
        cdef uint8_t *out = <uint8_t *>PyByteArray_AS_STRING(self.out) + self.staged * SLOT_SIZE
        cdef uint8_t *start = out
        cdef uint16_t idx, head
        cdef const uint8_t[:] g
        idx = self.stack[self.nfree - 1]
        head = <uint16_t>(flags | (F_EXTRA if gso is not None else 0) | (F_MORE if pages > 1 else 0))
        _put_req(out, self.refs[idx], head, idx, <uint16_t>size)
        out += SLOT_SIZE
        if gso is not None:
            g = gso
            glen = g.shape[0]
            memset(out, 0, SLOT_SIZE)
            if glen:
                memcpy(out, &g[0], glen)
            out += SLOT_SIZE
        self.state[idx] |= 1
        for k in range(1, pages):
            idx = self.stack[self.nfree - 1 - k]
            self.state[idx] |= 1
            if k == pages - 1:
                _put_req(out, self.refs[idx], 0, idx, <uint16_t>(size - k * PAGE))
            else:
                _put_req(out, self.refs[idx], F_MORE, idx, PAGE)
            out += SLOT_SIZE
        self.nfree -= pages
        k = (out - start) // SLOT_SIZE
        self.staged += k
        return k

    def reap(self, batch, Py_ssize_t count):
        """Check and apply ``count`` TX answers: (answers other than OKAY, the watched
        pages' ``(id, status)``, the violation that stopped it or None)."""
        cdef Py_buffer view
        cdef Py_ssize_t j, errors = 0
        cdef uint16_t rid
        cdef int16_t status
        cdef const uint8_t *p
        cdef list answered = []
        cdef object bad = None
        PyObject_GetBuffer(batch, &view, PyBUF_SIMPLE)
        try:
            if count * SLOT_SIZE > view.len:
                raise ValueError("fewer answers in the batch than counted")
            for j in range(count):
                p = <const uint8_t *>view.buf + j * SLOT_SIZE
                memcpy(&rid, p, 2)
                memcpy(&status, p + 2, 2)
                if status == RSP_NULL:
                    continue
                if status != RSP_OKAY and status != RSP_ERROR and status != RSP_DROPPED:
                    bad = f"unknown status {status}"
                    break
                if rid >= self.npages or not self.state[rid] & 1:
                    bad = f"response to id {rid}, which is not outstanding"
                    break
                self.stack[self.nfree] = rid
                self.nfree += 1
                if self.state[rid] & 2:
                    answered.append((rid, status))
                elif status != RSP_OKAY:
                    errors += 1
                self.state[rid] = 0
        finally:
            PyBuffer_Release(&view)
        return errors, answered, bad

# io_uring for the block backend: batched reads and writes straight into mapped grant pages.
#
# A thin Python face on cython/includes/xenpv_uring.h (raw system calls, no liburing):
# ``prep`` queues one read or write of a list of buffers (memoryviews of mapped grant
# pages) at a file offset, ``submit`` hands every queued request to the kernel in one
# io_uring_enter, ``reap`` returns the completions.  The buffers must stay mapped until
# their completion is reaped; the caller (xenpv.backends.blockio) owns that.

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int32_t, int64_t, uint64_t

import os

cdef extern from "xenpv_uring.h":
    enum: XU_IOV_POOL
    ctypedef struct xu_ring:
        int fd
        unsigned features
    int xu_setup(xu_ring *r, unsigned entries, unsigned cq_entries, unsigned extra_flags)
    void xu_close(xu_ring *r)
    unsigned xu_unsubmitted(const xu_ring *r)
    int xu_submit(xu_ring *r, unsigned wait_nr) nogil
    int xu_prep_rw(xu_ring *r, int write, int fd, void *const *bufs, const size_t *lens,
                   unsigned n, uint64_t offset, uint64_t user_data)
    unsigned xu_reap(xu_ring *r, uint64_t *user_data, int32_t *res, unsigned max)
    int xu_register_eventfd(xu_ring *r, int efd, int async_only)
    int xu_eventfd_enable(xu_ring *r, int on)

cdef enum:
    REAP_BATCH = 256

MAX_BUFFERS = XU_IOV_POOL


def _oserror(int neg_errno, str what):
    err = -neg_errno
    return OSError(err, f"{what}: {os.strerror(err)}")


cdef class Uring:
    """One io_uring instance: ``entries`` submission slots, ``cq_entries`` completion
    slots.  Raises :class:`OSError` if the kernel refuses (``ENOSYS``: no io_uring;
    ``EPERM``: forbidden by seccomp or ``kernel.io_uring_disabled``; ``ENOTSUP``: a kernel
    older than 5.6 lacking a needed feature)."""

    cdef xu_ring r
    cdef void *bufs[XU_IOV_POOL]
    cdef size_t lens[XU_IOV_POOL]
    cdef uint64_t ud[REAP_BATCH]
    cdef int32_t res[REAP_BATCH]
    cdef public unsigned pending

    def __cinit__(self, *args, **kwargs):
        self.r.fd = -1
        self.pending = 0

    def __init__(self, unsigned entries=256, unsigned cq_entries=1024):
        if self.r.fd >= 0:  # (__init__ called again: the old ring goes first)
            xu_close(&self.r)
            self.r.fd = -1
        # No IORING_SETUP_COOP_TASKRUN: with it, a completion that arrives while the loop
        # sleeps in epoll is only posted at the task's next system call, and the eventfd
        # the loop waits for never fires.
        cdef int rc = xu_setup(&self.r, entries, cq_entries, 0)
        if rc == -95:  # ENOTSUP
            raise OSError(95, "io_uring_setup: the kernel lacks a needed feature "
                              "(Linux 5.6 or later is needed)")
        if rc < 0:
            raise _oserror(rc, "io_uring_setup")
        self.pending = 0

    def __dealloc__(self):
        xu_close(&self.r)

    @property
    def fd(self):
        """The ring's file descriptor (-1 once closed)."""
        return self.r.fd

    @property
    def unsubmitted(self):
        """Requests prepared and not yet taken by the kernel."""
        return xu_unsubmitted(&self.r) if self.r.fd >= 0 else 0

    def register_eventfd(self, int efd, bint async_only=False):
        """Have the kernel signal ``efd`` on completions (with ``async_only``, only on
        those completed by the kernel's io worker threads)."""
        self._check()
        cdef int rc = xu_register_eventfd(&self.r, efd, async_only)
        if rc < 0:
            raise _oserror(rc, "io_uring_register(EVENTFD)")

    def eventfd_enable(self, bint on):
        """Resume (True) or stop (False) the eventfd signals; False if this kernel
        cannot stop them (before 5.8)."""
        self._check()
        return xu_eventfd_enable(&self.r, on) == 0

    cdef int _check(self) except -1:
        if self.r.fd < 0:
            raise ValueError("the io_uring is closed")
        return 0

    def prep(self, bint write, int fd, list views, unsigned long long offset,
             unsigned long long user_data):
        """Queue a read into (``write`` false) or a write from ``views`` at ``offset`` of
        ``fd``; False if no submission slot can be had now (nothing was queued)."""
        self._check()
        cdef Py_ssize_t n = len(views), i
        cdef Py_buffer view
        if n < 1 or n > XU_IOV_POOL:
            raise ValueError(f"{n} buffers (1..{XU_IOV_POOL} allowed)")
        cdef int flags = PyBUF_SIMPLE if write else PyBUF_WRITABLE
        for i in range(n):
            PyObject_GetBuffer(views[i], &view, flags)
            self.bufs[i] = view.buf
            self.lens[i] = <size_t>view.len
            PyBuffer_Release(&view)
        cdef int rc = xu_prep_rw(&self.r, write, fd, self.bufs, self.lens, <unsigned>n,
                                 offset, user_data)
        if rc == -16:  # EBUSY
            return False
        if rc < 0:
            raise _oserror(rc, "io_uring prep")
        self.pending += 1
        return True

    def submit(self, unsigned wait_nr=0):
        """Hand every queued request to the kernel (and wait for ``wait_nr``
        completions); how many it took.  EAGAIN/EBUSY/EINTR count as none taken."""
        self._check()
        cdef int rc
        with nogil:
            rc = xu_submit(&self.r, wait_nr)
        if rc < 0:
            if rc in (-11, -16, -4):  # EAGAIN, EBUSY (completion backlog), EINTR
                return 0
            raise _oserror(rc, "io_uring_enter")
        return rc

    def reap(self):
        """Every completion available now, as ``[(user_data, result), ...]`` (a negative
        result is ``-errno``)."""
        self._check()
        out = []
        cdef unsigned got, k
        while True:
            got = xu_reap(&self.r, self.ud, self.res, REAP_BATCH)
            for k in range(got):
                out.append((self.ud[k], self.res[k]))
            self.pending -= got
            if got < REAP_BATCH:
                return out

    def close(self):
        """Release the ring (idempotent).  In-flight requests must have completed."""
        xu_close(&self.r)


# -- the block backend's fast lane ------------------------------------------------------------
#
# The common request of a connected frontend with persistent grants -- a READ or WRITE that
# the compiled batch accept (xenpv.protocols.blkif.scan_rw) already took, every page of it
# kept mapped -- costs no Python object of its own here: ``start`` queues a batch of them
# on the ring (an entry of a fixed table each, its token the entry's index with LANE_BIT
# set) and ``reap`` answers every one that moved all its bytes by writing the response
# record straight into ``out`` (one whole ring slot each, ready for the ring's batch put).
# Anything else -- a page not kept, no submission slot, a short or failed transfer, a
# token not of the lane -- goes back to the caller, which serves it the ordinary way
# (xenpv.backends.block is the readable twin: the same requests without the lane).

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.stdint cimport int16_t, uint8_t
from libc.string cimport memcpy
from libc.string cimport memset

#: Set in the tokens of the lane's requests (the engine's own tokens stay below 2**48).
LANE_BIT = 1 << 63
cdef uint64_t C_LANE_BIT = (<uint64_t>1) << 63

cdef enum:
    LANE_MAX_SEGMENTS = 11


cdef class RwLane:
    """The fast lane of one queue (see above): ``entries`` requests in flight at most,
    responses of ``rsp_size`` bytes written into ``out`` with a stride of ``slot_size``."""

    cdef Uring ring
    cdef int fd
    cdef dict pages
    cdef Py_ssize_t rsp_size, slot_size, entries, nfree
    cdef uint64_t[::1] e_id
    cdef uint64_t[::1] e_seq
    cdef int64_t[::1] e_length
    cdef uint8_t[::1] e_op
    cdef int32_t[::1] free
    cdef list e_request
    cdef void *bufs[LANE_MAX_SEGMENTS]
    cdef size_t lens[LANE_MAX_SEGMENTS]
    cdef uint64_t ud[REAP_BATCH]
    cdef int32_t res[REAP_BATCH]
    cdef public bytearray out
    cdef public Py_ssize_t nout
    cdef public uint64_t seq
    cdef public uint64_t reads, writes, bytes_read, bytes_written, hits, completed

    def __init__(self, Uring ring not None, int fd, dict pages not None,
                 Py_ssize_t rsp_size, Py_ssize_t slot_size, Py_ssize_t entries=1024):
        if not 12 <= rsp_size <= slot_size or entries < 1:
            raise ValueError("bad lane geometry")
        import array
        self.ring = ring
        self.fd = fd
        self.pages = pages
        self.rsp_size = rsp_size
        self.slot_size = slot_size
        self.entries = entries
        self.e_id = array.array("Q", bytes(8 * entries))
        self.e_seq = array.array("Q", bytes(8 * entries))
        self.e_length = array.array("q", bytes(8 * entries))
        self.e_op = array.array("B", bytes(entries))
        self.free = array.array("i", range(entries - 1, -1, -1))
        self.nfree = entries
        self.e_request = [None] * entries
        self.out = bytearray(slot_size * entries)
        self.nout = 0
        self.seq = 0
        self.reads = self.writes = self.bytes_read = self.bytes_written = 0
        self.hits = self.completed = 0

    @property
    def inflight(self):
        """Requests of the lane started and not answered or handed back."""
        return self.entries - self.nfree

    def oldest(self):
        """The smallest sequence number in flight, or None."""
        cdef Py_ssize_t i
        cdef uint64_t low = 0
        cdef bint any = False
        for i in range(self.entries):
            if self.e_request[i] is not None and (not any or self.e_seq[i] < low):
                low = self.e_seq[i]
                any = True
        return low if any else None

    def start(self, list accepted not None):
        """Queue every accepted ``(id, op, offset, length, ((gref, start, end), ...))``
        whose pages are all kept; the others out, in order (nothing queued for them).
        Each queued one gets the next ``seq``."""
        self.ring._check()
        cdef list rest = []
        cdef Py_ssize_t k, n, idx
        cdef object req, segs, seg, m
        cdef PyObject *page
        cdef Py_buffer view
        cdef int flags, rc
        cdef bint ok
        cdef uint8_t op
        cdef long long start, end
        for req in accepted:
            segs = (<tuple>req)[4]
            n = len(<tuple>segs)
            op = <uint8_t>(<tuple>req)[1]
            if self.nfree == 0 or n < 1 or n > LANE_MAX_SEGMENTS:
                rest.append(req)
                continue
            flags = PyBUF_SIMPLE if op == 1 else PyBUF_WRITABLE
            ok = True
            for k in range(n):
                seg = (<tuple>segs)[k]
                page = PyDict_GetItem(self.pages, (<tuple>seg)[0])
                if page == NULL:
                    ok = False
                    break
                m = (<object>page).mem
                start = (<tuple>seg)[1]
                end = (<tuple>seg)[2]
                PyObject_GetBuffer(m, &view, flags)
                if start < 0 or end > view.len or start >= end:
                    PyBuffer_Release(&view)
                    ok = False
                    break
                self.bufs[k] = <char *>view.buf + start
                self.lens[k] = <size_t>(end - start)
                PyBuffer_Release(&view)
            if not ok:
                rest.append(req)
                continue
            idx = self.free[self.nfree - 1]
            rc = xu_prep_rw(&self.ring.r, op == 1, self.fd, self.bufs, self.lens,
                            <unsigned>n, <uint64_t>(<tuple>req)[2],
                            C_LANE_BIT | <uint64_t>idx)
            if rc < 0:
                rest.append(req)
                continue
            self.nfree -= 1
            self.ring.pending += 1
            self.seq += 1
            self.e_seq[idx] = self.seq
            self.e_id[idx] = (<tuple>req)[0]
            self.e_op[idx] = op
            self.e_length[idx] = (<tuple>req)[3]
            self.e_request[idx] = req
            self.hits += n
            if op == 1:
                self.writes += 1
                self.bytes_written += <uint64_t>self.e_length[idx]
            else:
                self.reads += 1
                self.bytes_read += <uint64_t>self.e_length[idx]
        return rest

    def take(self, unsigned long long token):
        """Hand back the lane's request of ``token`` (``reap`` gave it out): ``(the
        accepted tuple start got, its seq)``; its entry is free again."""
        cdef Py_ssize_t idx = <Py_ssize_t>(token & ~C_LANE_BIT)
        if not token & C_LANE_BIT or idx >= self.entries or self.e_request[idx] is None:
            raise KeyError(token)
        req = self.e_request[idx]
        self.e_request[idx] = None
        self.free[self.nfree] = <int32_t>idx
        self.nfree += 1
        return req, self.e_seq[idx]

    def reap(self):
        """Every completion available now: the lane's requests that moved all their bytes
        are answered OKAY into ``out`` (``nout`` slots written); the rest out as
        ``[(token, result), ...]`` (the lane's among them stay taken until :meth:`take`)."""
        self.ring._check()
        cdef list other = []
        cdef unsigned got, k
        cdef uint64_t token
        cdef Py_ssize_t idx
        cdef char *dst
        cdef uint64_t rid
        cdef int16_t status = 0
        while True:
            got = xu_reap(&self.ring.r, self.ud, self.res, REAP_BATCH)
            self.ring.pending -= got
            for k in range(got):
                token = self.ud[k]
                idx = <Py_ssize_t>(token & ~C_LANE_BIT)
                if (not token & C_LANE_BIT or idx >= self.entries
                        or self.e_request[idx] is None
                        or self.res[k] != self.e_length[idx]
                        or (self.nout + 1) * self.slot_size > len(self.out)):
                    other.append((token, self.res[k]))
                    continue
                dst = PyByteArray_AS_STRING(self.out) + self.nout * self.slot_size
                memset(dst, 0, self.slot_size)
                rid = self.e_id[idx]
                memcpy(dst, &rid, 8)
                dst[8] = <char>self.e_op[idx]
                memcpy(dst + 10, &status, 2)
                self.nout += 1
                self.completed += 1
                self.e_request[idx] = None
                self.free[self.nfree] = <int32_t>idx
                self.nfree += 1
            if got < REAP_BATCH:
                return other

    def counts(self):
        """``(reads, writes, bytes_read, bytes_written, hits, completed)`` since the last
        call (reset to zero)."""
        out = (self.reads, self.writes, self.bytes_read, self.bytes_written, self.hits,
               self.completed)
        self.reads = self.writes = self.bytes_read = self.bytes_written = 0
        self.hits = self.completed = 0
        return out

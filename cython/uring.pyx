# io_uring for the block backend: batched reads and writes straight into mapped grant pages.
#
# A thin Python face on cython/includes/xenpv_uring.h (raw system calls, no liburing):
# ``prep`` queues one read or write of a list of buffers (memoryviews of mapped grant
# pages) at a file offset, ``submit`` hands every queued request to the kernel in one
# io_uring_enter, ``reap`` returns the completions.  The buffers must stay mapped until
# their completion is reaped; the caller (xenpv.backends.blockio) owns that.

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int32_t, uint64_t

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

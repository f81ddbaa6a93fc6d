# Compiled shared request/response rings (Xen io/ring.h semantics).
#
# Theory of operation
# -------------------
# A ring is a 64-byte header (req_prod, req_event, rsp_prod, rsp_event, pvt, pad) followed by
# N slots of E bytes, N the largest power of two that fits (xen-protocols.md §1.1-1.2).  The
# frontend produces requests and consumes responses; the backend the reverse.  Both ends are
# the same machine seen from two sides, so _Ring implements one end generically:
#
#   _prod_pvt  entries this end produced, published or not   (front req_prod_pvt, back rsp_prod_pvt)
#   _cons      entries this end consumed                      (front rsp_cons,     back req_cons)
#   out_*      the shared producer index / event field of what this end produces
#   in_*       the shared producer index / event field of what this end consumes
#
# and FrontRing / BackRing add the names of io/ring.h and the two things that really differ:
# how much room there is to produce (_room) and how a peer's producer index is validated
# (_avail).  The peer's index is read once per call (a snapshot), so a peer that changes it
# while we work cannot make us loop or read twice.  Validation, in free-running u32:
#
#   back:  c <= req_prod - rsp_prod_pvt <= N   where c = req_cons - rsp_prod_pvt
#          (io/ring.h RING_REQUEST_PROD_OVERFLOW is the upper bound; the lower bound catches
#          a req_prod that moved backwards behind requests already consumed)
#   front: rsp_prod - rsp_cons <= req_prod_pvt - rsp_cons  (<= N)
#          (io/ring.h RING_RESPONSE_PROD_OVERFLOW, tightened to the requests outstanding)
#
# A violation raises RingOverflowError (a PeerError) and the ring marks itself broken: every
# later call raises the same error.  Slot addresses are always base + 64 + (idx & (N-1)) * E,
# so nothing outside [base, base + 64 + N*E) is ever touched, whatever the peer writes.
#
# Batches are copied with at most two runs (up to the end of the slot array, then from slot
# 0): each entry leaves shared memory exactly once (R1) and Python pays one call per batch.
# Notifications are never sent from here: pushes return ``notify: bool`` (sans-IO).

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memset

from heldbuf cimport drop_buffer, hold_buffer
from includes.barrier cimport (
    XENPV_DEBUG_ENABLED,
    xenpv_cpu_relax,
    xenpv_load_u32,
    xenpv_mb,
    xenpv_now_ns,
    xenpv_rmb,
    xenpv_store_u32,
    xenpv_wmb,
)
from includes.copy cimport xenpv_copy

from xenpv.errors import LocalError, RingOverflowError

# io/ring.h: struct __name##_sring field offsets.
cdef enum:
    OFF_REQ_PROD = 0
    OFF_REQ_EVENT = 4
    OFF_RSP_PROD = 8
    OFF_RSP_EVENT = 12
    OFF_PVT = 16
    HEADER_SIZE = 64

HEADER_BYTES = HEADER_SIZE

cdef object _numpy = None


cdef object _as_dtype_view(object data, object dtype):
    """Wrap a freshly copied bytearray as a numpy array of ``dtype`` (no further copy)."""
    global _numpy
    if _numpy is None:
        import numpy
        _numpy = numpy
    return _numpy.frombuffer(data, dtype=dtype)


cpdef unsigned int ring_size(Py_ssize_t nbytes, Py_ssize_t slot_size) except? 0:
    """Number of slots N of a ring of ``nbytes`` bytes with ``slot_size``-byte slots.

    io/ring.h __RING_SIZE: the largest power of two <= (nbytes - 64) // slot_size, or 0.
    """
    cdef Py_ssize_t k
    cdef unsigned int n = 1
    if slot_size <= 0:
        raise LocalError(f"slot size must be positive, not {slot_size}")
    if nbytes <= HEADER_SIZE:
        return 0
    k = (nbytes - HEADER_SIZE) // slot_size
    if k == 0:
        return 0
    if k > 0xFFFFFFFF:
        k = 0xFFFFFFFF
    while n <= <unsigned int>(k >> 1):
        n <<= 1
    return n


cdef class _Ring:
    """One end of a shared ring: the held memory, the geometry and the generic operations."""

    cdef Py_buffer *_view
    cdef uint8_t *base
    cdef uint8_t *slots
    cdef readonly Py_ssize_t slot_size
    cdef readonly unsigned int nr_ents
    cdef unsigned int mask
    cdef object _broken
    cdef uint32_t _prod_pvt
    cdef uint32_t _cons
    cdef Py_ssize_t out_prod, out_event, in_prod, in_event

    def __cinit__(self, *args, **kwargs):
        self._view = NULL
        self.base = NULL
        self._broken = None

    def __dealloc__(self):
        drop_buffer(&self._view)

    cdef int _attach(self, object buf, Py_ssize_t slot_size, uint32_t start) except -1:
        cdef unsigned int n
        self.release()  # __init__ called again: drop the old memory first
        self._view = hold_buffer(buf)
        try:
            n = ring_size(self._view.len, slot_size)
            if n == 0:
                raise LocalError(
                    f"a {self._view.len}-byte buffer holds no {slot_size}-byte slot after "
                    f"the {HEADER_SIZE}-byte header")
            if (<size_t>self._view.buf) & 3:
                raise LocalError("ring memory must be 4-byte aligned (shared indexes are u32)")
        except BaseException:
            self.release()
            raise
        self.base = <uint8_t *>self._view.buf
        self.slots = self.base + HEADER_SIZE
        self.slot_size = slot_size
        self.nr_ents = n
        self.mask = n - 1
        self._prod_pvt = start
        self._cons = start
        return 0

    def release(self) -> None:
        """Let go of the ring memory (an mmap can then be closed); later calls raise LocalError."""
        drop_buffer(&self._view)
        self.base = NULL

    @property
    def broken(self) -> bool:
        """True once the peer was caught violating the protocol (the ring is then dead)."""
        return self._broken is not None

    cdef inline int _usable(self) except -1:
        if self._broken is not None:
            raise RingOverflowError(self._broken)
        if self.base == NULL:
            raise LocalError("the ring memory was released")
        return 0

    cdef int _fail(self, str message) except -1:
        self._broken = message
        raise RingOverflowError(message)

    # -- the two things FrontRing and BackRing define -------------------------------------
    cdef uint32_t _avail(self) except? 0xFFFFFFFF:
        """Validated number of entries the peer published for us (one load of its index)."""
        raise NotImplementedError

    cdef uint32_t _room(self) noexcept:
        """Entries this end may produce now."""
        return 0

    # -- copying ---------------------------------------------------------------------------
    cdef inline void _copy_in(self, uint32_t idx, const uint8_t *src, uint32_t n) noexcept nogil:
        """Copy n entries from private memory into the slots of indexes idx .. idx+n-1."""
        cdef uint32_t first = idx & self.mask
        cdef uint32_t run = self.nr_ents - first
        cdef Py_ssize_t e = self.slot_size
        if run > n:
            run = n
        xenpv_copy(self.slots + first * e, src, run * e)
        if n > run:
            xenpv_copy(self.slots, src + run * e, (n - run) * e)

    cdef inline void _copy_out(self, uint32_t idx, uint8_t *dst, uint32_t n) noexcept nogil:
        """Copy n entries of indexes idx .. idx+n-1 out of the slots into private memory."""
        cdef uint32_t first = idx & self.mask
        cdef uint32_t run = self.nr_ents - first
        cdef Py_ssize_t e = self.slot_size
        if run > n:
            run = n
        xenpv_copy(dst, self.slots + first * e, run * e)
        if n > run:
            xenpv_copy(dst + run * e, self.slots, (n - run) * e)

    # -- producing -------------------------------------------------------------------------
    cdef Py_ssize_t _entries(self, Py_buffer *view, Py_ssize_t n) except -1:
        """How many entries a call on ``view`` asked for: all of it if n < 0; LocalError if
        the buffer holds fewer than ``n``."""
        cdef Py_ssize_t have = view.len // self.slot_size
        if n < 0:
            return have
        if n > have:
            raise LocalError(
                f"{n} entries asked for but the buffer holds {have} of {self.slot_size} bytes")
        return n

    cdef uint32_t _put(self, object src, Py_ssize_t n, bint strict) except? 0xFFFFFFFF:
        """Copy up to ``n`` entries (all of ``src`` if n < 0) into the slots; not pushed."""
        cdef Py_buffer view
        cdef uint32_t room
        self._usable()
        room = self._room()
        PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
        try:
            n = self._entries(&view, n)
            if n > room:
                if strict:
                    raise LocalError(f"{n} entries do not fit: room for {room}")
                n = room
            self._copy_in(self._prod_pvt, <const uint8_t *>view.buf, <uint32_t>n)
        finally:
            PyBuffer_Release(&view)
        self._prod_pvt += <uint32_t>n
        return <uint32_t>n

    cdef int _put_one(self, object data) except -1:
        """Queue one entry of at most slot_size bytes; the rest of the slot is zeroed."""
        cdef Py_buffer view
        cdef uint8_t *slot
        self._usable()
        if self._room() == 0:
            raise LocalError("no room for another entry")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len > self.slot_size:
                raise LocalError(
                    f"a {view.len}-byte entry does not fit a {self.slot_size}-byte slot")
            slot = self.slots + (self._prod_pvt & self.mask) * self.slot_size
            xenpv_copy(slot, view.buf, view.len)
            memset(slot + view.len, 0, self.slot_size - view.len)
        finally:
            PyBuffer_Release(&view)
        self._prod_pvt += 1
        return 0

    cdef int _push_plain(self) except -1:
        """io/ring.h RING_PUSH_*: publish what was queued."""
        self._usable()
        xenpv_wmb()  # the peer must see the slots before the index that covers them
        xenpv_store_u32(self.base + self.out_prod, self._prod_pvt)
        return 0

    cdef bint _push(self) except -1:
        """io/ring.h RING_PUSH_*_AND_CHECK_NOTIFY: publish, say if the peer asked to be told."""
        cdef uint32_t old, new = self._prod_pvt
        self._usable()
        old = xenpv_load_u32(self.base + self.out_prod)
        xenpv_wmb()  # the peer must see the slots before the index that covers them
        xenpv_store_u32(self.base + self.out_prod, new)
        xenpv_mb()   # the index store must be visible before we read the peer's event field
        # notify exactly when the peer's wake-up point lies in (old, new] (mod 2^32)
        return <uint32_t>(new - xenpv_load_u32(self.base + self.out_event)) < <uint32_t>(new - old)

    # -- consuming -------------------------------------------------------------------------
    cdef uint32_t _take_into(self, object dst, Py_ssize_t max_n,
                             uint32_t avail) except? 0xFFFFFFFF:
        """Copy up to min(max_n, avail, what fits dst) entries out; advance _cons."""
        cdef Py_buffer view
        cdef Py_ssize_t n
        PyObject_GetBuffer(dst, &view, PyBUF_WRITABLE)
        try:
            n = view.len // self.slot_size
            if 0 <= max_n < n:
                n = max_n
            if n > avail:
                n = avail
            self._copy_out(self._cons, <uint8_t *>view.buf, <uint32_t>n)
        finally:
            PyBuffer_Release(&view)
        self._cons += <uint32_t>n
        return <uint32_t>n

    cdef object _take(self, Py_ssize_t max_n, object dtype):
        """Copy up to ``max_n`` waiting entries out: bytes, or a numpy array of ``dtype``."""
        cdef uint32_t n = self._avail()
        cdef object out
        if 0 <= max_n < n:
            n = <uint32_t>max_n
        if dtype is None:
            out = PyBytes_FromStringAndSize(NULL, n * self.slot_size)
            self._copy_out(self._cons, <uint8_t *>PyBytes_AS_STRING(out), n)
        else:
            out = PyByteArray_FromStringAndSize(NULL, n * self.slot_size)
            self._copy_out(self._cons, <uint8_t *>PyByteArray_AS_STRING(out), n)
            out = _as_dtype_view(out, dtype)
        self._cons += n
        return out

    cdef int _rearm(self) except -1:
        """Ask for a notification on the very next entry (io/ring.h RING_FINAL_CHECK_*)."""
        xenpv_store_u32(self.base + self.in_event, self._cons + 1)
        xenpv_mb()  # the event store must be visible before re-reading the peer's index
        return 0

    cdef uint32_t _poll_into(self, object dst, Py_ssize_t max_n,
                             long long spin_ns) except? 0xFFFFFFFF:
        """Take waiting entries (spinning up to ``spin_ns`` for them); when there are none,
        re-arm the event field and take what arrived meanwhile (RING_FINAL_CHECK_*)."""
        cdef uint32_t n = self._take_into(dst, max_n, self._spin(spin_ns))
        if n == 0 and max_n != 0:
            self._rearm()
            n = self._take_into(dst, max_n, self._avail())
        return n

    cdef bint _final_check(self) except -1:
        if self._avail():
            return True
        self._rearm()
        return self._avail() != 0

    cdef uint32_t _spin(self, long long max_ns) except? 0xFFFFFFFF:
        """Busy-wait up to ``max_ns`` for the peer to publish entries; the validated count."""
        cdef uint32_t n = self._avail()
        cdef long long until
        if n or max_ns <= 0:
            return n
        cdef int turn
        until = xenpv_now_ns() + max_ns
        while True:
            # a cheap volatile load per turn, the clock every 16 turns; the full check only
            # once something changed
            for turn in range(16):
                if xenpv_load_u32(self.base + self.in_prod) != self._cons:
                    return self._avail()
                xenpv_cpu_relax()
            if xenpv_now_ns() >= until:
                return self._avail()

    def spin(self, long long max_ns) -> int:
        """Poll the peer's producer index for up to ``max_ns`` nanoseconds (a busy-wait, no
        sleeping, no re-arm) and return how many entries are waiting (0: time ran out).
        Drivers spin briefly after the last entry before they re-arm and sleep."""
        return self._spin(max_ns)

    cdef int _set_event(self, value) except -1:
        self._usable()
        xenpv_store_u32(self.base + self.in_event, <uint32_t>(value & 0xFFFFFFFF))
        xenpv_mb()
        return 0

    # -- diagnostics -----------------------------------------------------------------------
    def _header_index(self, Py_ssize_t offset) -> int:
        self._usable()
        return xenpv_load_u32(self.base + offset)

    @property
    def req_prod(self) -> int:
        """The shared ``req_prod`` (one load; diagnostics)."""
        return self._header_index(OFF_REQ_PROD)

    @property
    def req_event(self) -> int:
        """The shared ``req_event`` (one load; diagnostics)."""
        return self._header_index(OFF_REQ_EVENT)

    @property
    def rsp_prod(self) -> int:
        """The shared ``rsp_prod`` (one load; diagnostics)."""
        return self._header_index(OFF_RSP_PROD)

    @property
    def rsp_event(self) -> int:
        """The shared ``rsp_event`` (one load; diagnostics)."""
        return self._header_index(OFF_RSP_EVENT)


cdef class FrontRing(_Ring):
    """The frontend's view of a shared ring: produces requests, consumes responses.

    ``FrontRing(buf, slot_size, start=0, init=True)``: with ``init`` the shared header is
    initialised (io/ring.h SHARED_RING_INIT, with both producer indexes at ``start`` and both
    event fields at ``start + 1``); without it the ring is only attached (a frontend
    reconnecting to a page whose header is already set up, io/ring.h FRONT_RING_ATTACH).
    ``buf`` is any writable, 4-byte aligned buffer; it is held, never copied.
    """

    def __init__(self, buf, Py_ssize_t slot_size, start: int = 0, *, bint init=True):
        cdef uint32_t s = <uint32_t>(start & 0xFFFFFFFF)
        self.out_prod, self.out_event = OFF_REQ_PROD, OFF_REQ_EVENT
        self.in_prod, self.in_event = OFF_RSP_PROD, OFF_RSP_EVENT
        self._attach(buf, slot_size, s)
        if init:
            xenpv_store_u32(self.base + OFF_REQ_PROD, s)
            xenpv_store_u32(self.base + OFF_RSP_PROD, s)
            xenpv_store_u32(self.base + OFF_REQ_EVENT, s + 1)
            xenpv_store_u32(self.base + OFF_RSP_EVENT, s + 1)
            memset(self.base + OFF_PVT, 0, HEADER_SIZE - OFF_PVT)

    cdef uint32_t _room(self) noexcept:
        return self.nr_ents - (self._prod_pvt - self._cons)

    cdef uint32_t _avail(self) except? 0xFFFFFFFF:
        cdef uint32_t prod, n, outstanding
        self._usable()
        prod = xenpv_load_u32(self.base + OFF_RSP_PROD)
        n = prod - self._cons
        outstanding = self._prod_pvt - self._cons
        if XENPV_DEBUG_ENABLED and outstanding > self.nr_ents:
            raise AssertionError("xenpv internal: more requests outstanding than slots")
        # io/ring.h RING_RESPONSE_PROD_OVERFLOW, tightened to the requests outstanding.
        if n > outstanding:
            self._fail(
                f"backend rsp_prod {prod} claims {n} responses with rsp_cons {self._cons}, "
                f"{outstanding} requests outstanding, ring of {self.nr_ents}")
        xenpv_rmb()  # the index load comes before the slot loads it covers
        return n

    @property
    def req_prod_pvt(self) -> int:
        """Private index of the next request slot to fill."""
        return self._prod_pvt

    @property
    def rsp_cons(self) -> int:
        """Private index of the next response to consume."""
        return self._cons

    cpdef unsigned int free_requests(self) except? 0xFFFFFFFF:
        """io/ring.h RING_FREE_REQUESTS: slots the frontend may still fill."""
        self._usable()
        return self._room()

    def full(self) -> bool:
        """io/ring.h RING_FULL."""
        return self.free_requests() == 0

    def put_request(self, data) -> None:
        """Queue one request (``slot_size`` bytes or fewer; the rest of the slot is zeroed)."""
        self._put_one(data)

    cpdef unsigned int put_requests(self, src, Py_ssize_t n=-1) except? 0xFFFFFFFF:
        """Copy up to ``n`` requests (default: all of ``src``) into free slots; not pushed yet.

        ``src`` is any buffer of whole ``slot_size``-byte entries.  Returns how many fitted.
        """
        return self._put(src, n, False)

    cpdef void push_requests(self) except *:
        """io/ring.h RING_PUSH_REQUESTS: publish queued requests without the notify check."""
        self._push_plain()

    cpdef bint push_requests_and_check_notify(self) except -1:
        """io/ring.h RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish; True if the backend asked
        to be notified (the caller signals the event channel)."""
        return self._push()

    cpdef bint submit_requests(self, src, Py_ssize_t n=-1) except -1:
        """Queue ``n`` requests (default: all of ``src``) and push them in one call; returns
        ``notify``.  A LocalError if they do not all fit (see :meth:`free_requests`)."""
        self._put(src, n, True)
        return self._push()

    cpdef unsigned int unconsumed_responses(self) except? 0xFFFFFFFF:
        """io/ring.h RING_HAS_UNCONSUMED_RESPONSES, after the overflow check."""
        return self._avail()

    cpdef bint final_check_for_responses(self) except -1:
        """io/ring.h RING_FINAL_CHECK_FOR_RESPONSES: True if responses are waiting; otherwise
        re-arm ``rsp_event`` for the next response and check once more."""
        return self._final_check()

    def set_rsp_event(self, value: int) -> None:
        """Custom re-arm: ask to be notified when ``rsp_prod`` passes ``value``."""
        self._set_event(value)

    cpdef unsigned int take_responses_into(self, dst, Py_ssize_t max_n=-1,
                                        long long spin_ns=0) except? 0xFFFFFFFF:
        """Copy up to ``max_n`` waiting responses (as many as fit ``dst``) into ``dst``; with
        ``spin_ns``, busy-wait up to that long (see :meth:`spin`) when none are waiting."""
        return self._take_into(dst, max_n, self._spin(spin_ns))

    cpdef unsigned int poll_responses_into(self, dst, Py_ssize_t max_n=-1,
                                        long long spin_ns=0) except? 0xFFFFFFFF:
        """Take waiting responses into ``dst`` (with ``spin_ns``, busy-wait up to that long
        for them first); when there are none, re-arm ``rsp_event`` and take what arrived
        meanwhile.  0 means the ring is empty and armed: safe to sleep."""
        return self._poll_into(dst, max_n, spin_ns)

    def take_responses(self, Py_ssize_t max_n=-1, dtype=None):
        """Copy out up to ``max_n`` waiting responses: ``bytes`` of k * slot_size, or a numpy
        array of ``dtype`` (itemsize = slot_size) over a private copy."""
        return self._take(max_n, dtype)

    def take_response(self):
        """Copy out the next response (``bytes``), or None if there is none."""
        return self._take(1, None) or None

    def take_and_submit(self, dst, src, Py_ssize_t n=-1, Py_ssize_t max_n=-1,
                        long long spin_ns=0):
        """The frontend's turn in one call: take responses, then queue and push requests.

        1. Responses: up to ``max_n`` (as many as fit ``dst``) are copied into ``dst``.  When
           this call can queue nothing (``n`` is 0 or the ring is full) it waits for them as
           :meth:`poll_responses_into` does: spins up to ``spin_ns``, then re-arms
           ``rsp_event`` and looks once more (RING_FINAL_CHECK_FOR_RESPONSES).  Otherwise
           it takes only what is already there.
        2. Requests: up to ``n`` entries of ``src`` (default: all), as many as fit now
           (the responses just taken freed their slots), are queued and pushed with the
           notify check (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY).

        Returns ``(taken, queued, notify)``; the caller signals the event channel when
        ``notify``.  ``(0, 0, False)`` means nothing came, nothing could be sent and
        ``rsp_event`` is armed: safe to sleep (unless ``max_n`` is 0 or ``dst`` holds no
        whole entry: then nothing is taken and, with ``max_n`` 0, nothing re-armed, as in
        :meth:`poll_responses_into`).  ``src`` is checked before anything is
        taken (a LocalError if it holds fewer than ``n`` entries).  A ring driven by this
        call alone turns a batch of responses into the next batch of requests without
        returning to Python in between, as a frontend written in C does.
        """
        cdef Py_buffer view
        cdef uint32_t taken, room, queued = 0
        cdef bint notify = False
        self._usable()
        PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
        try:
            n = self._entries(&view, n)
            if n == 0 or self._room() == 0:
                taken = self._poll_into(dst, max_n, spin_ns)
            else:
                taken = self._take_into(dst, max_n, self._avail())
            room = self._room()
            queued = <uint32_t>n if n < room else room
            if queued:
                self._copy_in(self._prod_pvt, <const uint8_t *>view.buf, queued)
                self._prod_pvt += queued
                notify = self._push()
        finally:
            PyBuffer_Release(&view)
        return taken, queued, notify


cdef class BackRing(_Ring):
    """The backend's view of a shared ring: consumes requests, produces responses.

    ``BackRing(buf, slot_size, start=0)`` attaches to a ring the frontend initialised
    (io/ring.h BACK_RING_ATTACH); ``start`` is where both private indexes begin (0 on a
    fresh ring, the current index when re-attaching after a reconnect).
    """

    def __init__(self, buf, Py_ssize_t slot_size, start: int = 0):
        self.out_prod, self.out_event = OFF_RSP_PROD, OFF_RSP_EVENT
        self.in_prod, self.in_event = OFF_REQ_PROD, OFF_REQ_EVENT
        self._attach(buf, slot_size, <uint32_t>(start & 0xFFFFFFFF))

    cdef uint32_t _room(self) noexcept:
        return self._cons - self._prod_pvt

    cdef uint32_t _avail(self) except? 0xFFFFFFFF:
        cdef uint32_t prod, ahead, consumed
        self._usable()
        prod = xenpv_load_u32(self.base + OFF_REQ_PROD)
        ahead = prod - self._prod_pvt
        consumed = self._cons - self._prod_pvt
        # io/ring.h RING_REQUEST_PROD_OVERFLOW (upper bound), and prod may not fall behind
        # requests already consumed (lower bound).
        if ahead > self.nr_ents or ahead < consumed:
            self._fail(
                f"frontend req_prod {prod} is outside the ring: req_cons {self._cons}, "
                f"rsp_prod_pvt {self._prod_pvt}, ring of {self.nr_ents}")
        if XENPV_DEBUG_ENABLED and consumed > self.nr_ents:
            raise AssertionError("xenpv internal: more requests consumed than answered + N")
        xenpv_rmb()  # the index load comes before the slot loads it covers
        return ahead - consumed

    @property
    def req_cons(self) -> int:
        """Private index of the next request to consume."""
        return self._cons

    @property
    def rsp_prod_pvt(self) -> int:
        """Private index of the next response slot to fill."""
        return self._prod_pvt

    cpdef unsigned int unconsumed_requests(self) except? 0xFFFFFFFF:
        """io/ring.h RING_HAS_UNCONSUMED_REQUESTS, after the overflow check."""
        return self._avail()

    cpdef bint final_check_for_requests(self) except -1:
        """io/ring.h RING_FINAL_CHECK_FOR_REQUESTS: True if requests are waiting; otherwise
        re-arm ``req_event`` for the next request and check once more."""
        return self._final_check()

    def set_req_event(self, value: int) -> None:
        """Custom re-arm: ask to be notified when ``req_prod`` passes ``value``."""
        self._set_event(value)

    cpdef unsigned int take_requests_into(self, dst, Py_ssize_t max_n=-1,
                                        long long spin_ns=0) except? 0xFFFFFFFF:
        """Copy up to ``max_n`` waiting requests (as many as fit ``dst``) into ``dst``; with
        ``spin_ns``, busy-wait up to that long (see :meth:`spin`) when none are waiting."""
        return self._take_into(dst, max_n, self._spin(spin_ns))

    cpdef unsigned int poll_requests_into(self, dst, Py_ssize_t max_n=-1,
                                       long long spin_ns=0) except? 0xFFFFFFFF:
        """Take waiting requests into ``dst`` (with ``spin_ns``, busy-wait up to that long
        for them first); when there are none, re-arm ``req_event`` and take what arrived
        meanwhile.  0 means the ring is empty and armed: safe to sleep."""
        return self._poll_into(dst, max_n, spin_ns)

    def take_requests(self, Py_ssize_t max_n=-1, dtype=None):
        """Copy out up to ``max_n`` waiting requests: ``bytes`` of k * slot_size, or a numpy
        array of ``dtype`` (itemsize = slot_size) over a private copy."""
        return self._take(max_n, dtype)

    def take_request(self):
        """Copy out the next request (``bytes``), or None if there is none."""
        return self._take(1, None) or None

    cpdef unsigned int pending_responses(self) except? 0xFFFFFFFF:
        """Requests consumed but not answered yet (responses that may still be queued)."""
        self._usable()
        return self._room()

    def put_response(self, data) -> None:
        """Queue one response (``slot_size`` bytes or fewer; the rest of the slot is zeroed)."""
        self._put_one(data)

    cpdef unsigned int put_responses(self, src, Py_ssize_t n=-1) except? 0xFFFFFFFF:
        """Copy ``n`` responses (default: all of ``src``) into the slots of consumed requests;
        not pushed yet.  More responses than consumed requests is a LocalError."""
        return self._put(src, n, True)

    cpdef void push_responses(self) except *:
        """io/ring.h RING_PUSH_RESPONSES: publish queued responses without the notify check."""
        self._push_plain()

    cpdef bint push_responses_and_check_notify(self) except -1:
        """io/ring.h RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish; True if the frontend asked
        to be notified (the caller signals the event channel)."""
        return self._push()

    cpdef bint submit_responses(self, src, Py_ssize_t n=-1) except -1:
        """Queue ``n`` responses (default: all of ``src``) and push them in one call; returns
        ``notify``.  More responses than consumed requests is a LocalError."""
        self._put(src, n, True)
        return self._push()

    def take_and_respond(self, dst, responses, Py_ssize_t max_n=-1, long long spin_ns=0):
        """One call for backends whose answers are known before the requests are read (an
        echo, a null device, benchmarks): take up to ``max_n`` requests into ``dst`` (as
        :meth:`poll_requests_into`: spinning up to ``spin_ns`` for them, re-arming when
        empty), queue the first k entries of ``responses`` as their answers and push.
        Returns ``(k, notify)``; ``(0, False)`` means the ring is empty and armed.
        ``responses`` may be ``dst`` itself (echo)."""
        cdef uint32_t k = self._poll_into(dst, max_n, spin_ns)
        if k == 0:
            return 0, False
        self._put(responses, k, True)
        return k, self._push()

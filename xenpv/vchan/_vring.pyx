# Compiled twin of xenpv.vchan.ring.VchanRings: the vchan data path over mapped memory.
#
# Theory of operation
# -------------------
# Same behaviour, same API and same checks as the pure-Python reference in ring.py (read
# that file's docstring first): the index this side advances is private and only stored to
# the control page; the peer's index is loaded once per pass; an index pair more than the
# ring size apart, or our own index rewritten by the peer, is an insane state that reads as
# 0 bytes and locks the rings (scenario 26).  What differs is only the cost: one Python
# call per operation, index accesses as single volatile 32-bit loads/stores, real fences,
# lock-prefixed byte atomics for the notify bytes, and copies through xenpv_copy (glibc's
# memcpy at any relative alignment, see xenpv_copy.h), so a 64 KiB chunk costs about what
# the copy costs.  Nothing outside the two data areas and the 24-byte header is touched.
#
# write_some is the blocking API's write in one call: live check, poll for room, one copy
# from the caller's buffer (at an offset, so a write larger than the ring needs no slice),
# publish, and the peer signalled through on_kick when it asked, so the endpoint does no
# per-call work of its own; recv_into is the same for reads.
#
# wait_ready is the busy-wait of the blocking API kept in C: a tight loop of volatile loads
# and `pause` (no Python call per iteration) that leaves as soon as any watched word moves
# away from the "nothing to do" state; the checked data_ready/buffer_space then decide
# (so an insane index still ends up in `broken`, exactly as in ring.py).

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint32_t

from includes.barrier cimport (
    xenpv_atomic_fetch_and_clear8,
    xenpv_atomic_or8,
    xenpv_cpu_relax,
    xenpv_load_u32,
    xenpv_load_u8,
    xenpv_mb,
    xenpv_now_ns,
    xenpv_rmb,
    xenpv_store_u32,
    xenpv_wmb,
)
from includes.copy cimport xenpv_copy

from xenpv.errors import LocalError

# io/libxenvchan.h: vchan_interface offsets and notify bits
cdef enum:
    LEFT_CONS = 0
    LEFT_PROD = 4
    RIGHT_CONS = 8
    RIGHT_PROD = 12
    CLI_LIVE = 20
    SRV_LIVE = 21
    CLI_NOTIFY = 22
    SRV_NOTIFY = 23
    NOTIFY_WRITE = 1
    NOTIFY_READ = 2


cdef class VchanRings:
    """Shared-memory operations of one vchan endpoint (compiled; see ring.py)."""

    cdef Py_buffer _ctrl_view, _rd_view, _wr_view
    cdef int _views  # bit 0 ctrl, 1 rd, 2 wr held
    cdef uint8_t *ctrl
    cdef const uint8_t *rd
    cdef uint8_t *wr
    cdef readonly uint32_t rd_size, wr_size
    cdef readonly bint is_server
    cdef Py_ssize_t rd_cons_off, rd_prod_off, wr_cons_off, wr_prod_off
    cdef Py_ssize_t my_notify, peer_notify, my_live, peer_live_off
    cdef uint32_t _rd_cons, _wr_prod
    cdef public object broken
    cdef public bint kick
    cdef public object on_kick
    cdef public unsigned long long kicks
    cdef public unsigned long long insane_count

    def __cinit__(self, *args, **kwargs):
        self._views = 0
        self.ctrl = NULL
        self.broken = None

    def __init__(self, ctrl, rd_data, Py_ssize_t rd_size, wr_data, Py_ssize_t wr_size, *,
                 bint is_server):
        for size in (rd_size, wr_size):
            if size < 1024 or size > (1 << 20) or size & (size - 1):
                raise LocalError(f"bad vchan ring size {size}")
        PyObject_GetBuffer(ctrl, &self._ctrl_view, PyBUF_WRITABLE)
        self._views |= 1
        PyObject_GetBuffer(rd_data, &self._rd_view, PyBUF_SIMPLE)
        self._views |= 2
        PyObject_GetBuffer(wr_data, &self._wr_view, PyBUF_WRITABLE)
        self._views |= 4
        if (self._ctrl_view.len < 24 or self._rd_view.len < rd_size
                or self._wr_view.len < wr_size or (<size_t>self._ctrl_view.buf) & 3):
            self.release()
            raise LocalError("vchan views are too small or the control page is misaligned")
        self.ctrl = <uint8_t *>self._ctrl_view.buf
        self.rd = <const uint8_t *>self._rd_view.buf
        self.wr = <uint8_t *>self._wr_view.buf
        self.rd_size = <uint32_t>rd_size
        self.wr_size = <uint32_t>wr_size
        self.is_server = is_server
        if is_server:  # server reads left, writes right
            self.rd_cons_off, self.rd_prod_off = LEFT_CONS, LEFT_PROD
            self.wr_cons_off, self.wr_prod_off = RIGHT_CONS, RIGHT_PROD
            self.my_notify, self.peer_notify = SRV_NOTIFY, CLI_NOTIFY
            self.my_live, self.peer_live_off = SRV_LIVE, CLI_LIVE
        else:
            self.rd_cons_off, self.rd_prod_off = RIGHT_CONS, RIGHT_PROD
            self.wr_cons_off, self.wr_prod_off = LEFT_CONS, LEFT_PROD
            self.my_notify, self.peer_notify = CLI_NOTIFY, SRV_NOTIFY
            self.my_live, self.peer_live_off = CLI_LIVE, SRV_LIVE
        self._rd_cons = xenpv_load_u32(self.ctrl + self.rd_cons_off)
        self._wr_prod = xenpv_load_u32(self.ctrl + self.wr_prod_off)
        self.kick = False
        self.on_kick = None
        self.kicks = 0
        self.insane_count = 0

    def __dealloc__(self):
        self._drop()

    cdef void _drop(self):
        if self._views & 1:
            PyBuffer_Release(&self._ctrl_view)
        if self._views & 2:
            PyBuffer_Release(&self._rd_view)
        if self._views & 4:
            PyBuffer_Release(&self._wr_view)
        self._views = 0
        self.ctrl = NULL
        self.rd = NULL
        self.wr = NULL

    def release(self) -> None:
        """Drop every view of the shared memory; later calls see a broken, empty vchan."""
        self._drop()
        if self.broken is None:
            self.broken = "released"

    @property
    def released(self) -> bool:
        """True after :meth:`release`."""
        return self.ctrl == NULL

    cdef uint32_t _insane(self, str why) except? 0xFFFFFFFF:
        self.insane_count += 1
        if self.broken is None:
            self.broken = why
        return 0

    # -- live and notify bytes
    def peer_live(self) -> int:
        """The peer's live byte (0 once released)."""
        if self.ctrl == NULL:
            return 0
        return xenpv_load_u8(self.ctrl + self.peer_live_off)

    def set_live(self, unsigned int value) -> None:
        """Store our own live byte."""
        if self.ctrl != NULL:
            (<volatile uint8_t *>(self.ctrl + self.my_live))[0] = <uint8_t>value

    cpdef request_notify(self, unsigned int bit):
        """OR ``bit`` into the peer's check byte, then a full barrier."""
        if self.ctrl != NULL:
            xenpv_atomic_or8(self.ctrl + self.peer_notify, <uint8_t>bit)
            xenpv_mb()

    cdef inline int _send_notify(self, uint8_t bit) except -1:
        xenpv_mb()  # our index store is visible before we look at the request bit
        if xenpv_atomic_fetch_and_clear8(self.ctrl + self.my_notify, bit) & bit:
            self.kicks += 1
            if self.on_kick is None:
                self.kick = True
            else:
                self.on_kick()
        return 0

    # -- waiting
    cdef inline bint _moved(self, bint reading, bint writing) noexcept:
        # One pass of volatile loads: has anything left the "nothing to do" state?
        # Differences in our own index count as movement: the checked path reports them.
        cdef uint32_t prod, cons
        if xenpv_load_u8(self.ctrl + self.peer_live_off) == 0:
            return True
        if reading:
            prod = xenpv_load_u32(self.ctrl + self.rd_prod_off)
            cons = xenpv_load_u32(self.ctrl + self.rd_cons_off)
            if prod != self._rd_cons or cons != self._rd_cons:
                return True
        if writing:
            cons = xenpv_load_u32(self.ctrl + self.wr_cons_off)
            prod = xenpv_load_u32(self.ctrl + self.wr_prod_off)
            if prod != self._wr_prod or self._wr_prod - cons != self.wr_size:
                return True
        return False

    cdef bint _ready(self, bint reading, bint writing) except -1:
        if self.ctrl == NULL or self.broken is not None:
            return True
        if reading and self.data_ready():
            return True
        if writing and self.buffer_space():
            return True
        return self.broken is not None or xenpv_load_u8(self.ctrl + self.peer_live_off) == 0

    def wait_ready(self, bint reading, bint writing, long long spin_ns) -> bool:
        """Poll for up to ``spin_ns`` nanoseconds until data is readable (``reading``),
        room is writable (``writing``), the peer's live byte is 0, or the rings are broken
        (True); False if none of that happened in time.  Never sleeps, never notifies."""
        return self._wait(reading, writing, spin_ns)

    cdef bint _wait(self, bint reading, bint writing, long long spin_ns) except -1:
        cdef long long end
        cdef unsigned int spins = 0
        if self._ready(reading, writing):
            return True
        if spin_ns <= 0:
            return False
        end = xenpv_now_ns() + spin_ns
        while True:
            if self._moved(reading, writing):
                xenpv_rmb()  # the loads above come before those of the checked pass
                if self._ready(reading, writing):
                    return True
            xenpv_cpu_relax()
            spins += 1
            if (spins & 15) == 0 and xenpv_now_ns() >= end:
                return self._ready(reading, writing)

    # -- the ring we read
    cpdef unsigned int data_ready(self) except? 0xFFFFFFFF:
        """Bytes readable now (0 for an insane state, which locks the rings)."""
        cdef uint32_t prod, own, ready
        if self.ctrl == NULL or self.broken is not None:
            return 0
        prod = xenpv_load_u32(self.ctrl + self.rd_prod_off)
        own = xenpv_load_u32(self.ctrl + self.rd_cons_off)
        if own != self._rd_cons:
            return self._insane(f"peer rewrote our consumer index ({self._rd_cons} -> {own})")
        ready = prod - self._rd_cons
        if ready > self.rd_size:
            return self._insane(f"read ring prod {prod} cons {self._rd_cons} claims {ready} "
                                f"bytes in a ring of {self.rd_size}")
        return ready

    def recv_into(self, buf, Py_ssize_t want=-1, long long spin_ns=0) -> int:
        """Move up to ``want`` (default ``len(buf)``) available bytes into ``buf``; with
        nothing available, first poll for up to ``spin_ns`` nanoseconds (:meth:`wait_ready`)."""
        cdef Py_buffer view
        cdef uint32_t n, start, first, mask
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            if want < 0 or want > view.len:
                want = view.len
            n = self.data_ready()
            if n == 0 and want > 0 and spin_ns > 0 and self._wait(True, False, spin_ns):
                n = self.data_ready()
            if n > want:
                n = <uint32_t>want
            if n == 0:
                return 0
            mask = self.rd_size - 1
            start = self._rd_cons & mask
            first = self.rd_size - start
            if first > n:
                first = n
            xenpv_rmb()  # the prod load comes before the data loads it covers
            xenpv_copy(view.buf, self.rd + start, first)
            if n > first:
                xenpv_copy(<uint8_t *>view.buf + first, self.rd, n - first)
        finally:
            PyBuffer_Release(&view)
        self._consume(n)
        return n

    cdef int _consume(self, uint32_t n) except -1:
        self._rd_cons += n
        xenpv_mb()  # finish reading the data before the producer may overwrite it
        xenpv_store_u32(self.ctrl + self.rd_cons_off, self._rd_cons)
        return self._send_notify(NOTIFY_READ)

    def discard(self) -> int:
        """Consume and drop everything readable now; returns the bytes dropped."""
        cdef uint32_t n = self.data_ready()
        if n:
            self._consume(n)
        return n

    # -- the ring we write
    cpdef unsigned int buffer_space(self) except? 0xFFFFFFFF:
        """Bytes writable now (0 for an insane state, which locks the rings)."""
        cdef uint32_t cons, own, used
        if self.ctrl == NULL or self.broken is not None:
            return 0
        cons = xenpv_load_u32(self.ctrl + self.wr_cons_off)
        own = xenpv_load_u32(self.ctrl + self.wr_prod_off)
        if own != self._wr_prod:
            return self._insane(f"peer rewrote our producer index ({self._wr_prod} -> {own})")
        used = self._wr_prod - cons
        if used > self.wr_size:
            return self._insane(f"write ring prod {self._wr_prod} cons {cons} claims {used} "
                                f"bytes in a ring of {self.wr_size}")
        return self.wr_size - used

    def send(self, data, long long spin_ns=0) -> int:
        """Copy as much of ``data`` as fits into the ring we write and publish it; with no
        room, first poll for up to ``spin_ns`` nanoseconds (:meth:`wait_ready`)."""
        cdef Py_buffer view
        cdef uint32_t n
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            n = self._copy_in(<const uint8_t *>view.buf, view.len, spin_ns)
        finally:
            PyBuffer_Release(&view)
        if n:
            self._publish(n)
        return n

    def write_some(self, data, Py_ssize_t offset=0, long long spin_ns=0) -> int:
        """:meth:`send` of ``data`` from byte ``offset`` on, but only while the peer's live
        byte says connected (1): -1, with nothing written, when it does not or the rings are
        released or broken (the caller's slow path sorts that out).  No slice is made."""
        cdef Py_buffer view
        cdef uint32_t n
        if (self.ctrl == NULL or self.broken is not None
                or xenpv_load_u8(self.ctrl + self.peer_live_off) != 1):
            return -1
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if offset < 0 or offset > view.len:
                raise ValueError(f"offset {offset} outside a buffer of {view.len} bytes")
            n = self._copy_in(<const uint8_t *>view.buf + offset, view.len - offset, spin_ns)
        finally:
            PyBuffer_Release(&view)
        if n:
            self._publish(n)
        return n

    cdef uint32_t _copy_in(self, const uint8_t *src, Py_ssize_t length,
                           long long spin_ns) except? 0xFFFFFFFF:
        # Copy what fits of src into the ring at our private prod; publishing is separate.
        cdef uint32_t n, start, first
        n = self.buffer_space()
        if n == 0 and length > 0 and spin_ns > 0 and self._wait(False, True, spin_ns):
            n = self.buffer_space()
        if n > length:
            n = <uint32_t>length
        if n == 0:
            return 0
        start = self._wr_prod & (self.wr_size - 1)
        first = self.wr_size - start
        if first > n:
            first = n
        xenpv_mb()  # indexes read before we overwrite data the consumer released
        xenpv_copy(self.wr + start, src, first)
        if n > first:
            xenpv_copy(self.wr, src + first, n - first)
        return n

    cdef int _publish(self, uint32_t n) except -1:
        self._wr_prod += n
        xenpv_wmb()  # the consumer must see the data before the index that covers it
        xenpv_store_u32(self.ctrl + self.wr_prod_off, self._wr_prod)
        return self._send_notify(NOTIFY_WRITE)

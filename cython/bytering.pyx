# Compiled byte rings: one class for the xenstore, console, vchan and kbdif data rings.
#
# Theory of operation
# -------------------
# A byte ring is a data area of ``count`` units of ``slot`` bytes plus two free-running u32
# indexes (prod, cons) stored somewhere in the same buffer.  Unit ``i`` lives at
# ``data_offset + (i % count) * slot``.  The layouts differ only in those numbers:
#
#   xenstore (§4.9)  req: data 0, size 1024, cons 2048, prod 2052
#                    rsp: data 1024, size 1024, cons 2056, prod 2060
#   console  (§8.1)  in: data 0, size 1024, cons 3072, prod 3076
#                    out: data 1024, size 2048, cons 3080, prod 3084
#   vchan    (§10)   a power of two 2^10 .. 2^20 anywhere in a buffer; indexes in the control page
#   kbdif    (§9.1)  in: 51 units of 40 bytes at 1024, cons 0, prod 4 (index % 51, not a mask)
#
# Both indexes are read from shared memory once per call (a snapshot) and checked: when
# ``prod - cons`` (u32) exceeds ``count`` the peer is insane.  With ``on_insane="error"``
# (xenstore) that raises RingOverflowError and the ring stays broken; with ``"zero"`` (vchan,
# console) the call sees 0 units available / free and ``insane_count`` goes up so the caller
# can report it.  Copies are at most two memcpy calls (wrap at the end of the data area) for
# power-of-two counts; other counts (kbdif) go unit by unit with the u32 index taken modulo
# ``count``, exactly as the peers compute it.  Nothing outside the data area and the two
# index words is ever read or written.

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t

from heldbuf cimport drop_buffer, hold_buffer
from includes.barrier cimport xenpv_load_u32, xenpv_mb, xenpv_rmb, xenpv_store_u32, xenpv_wmb
from includes.copy cimport xenpv_copy

from xenpv.errors import LocalError, RingOverflowError




cdef class ByteRing:
    """One direction of a byte (or fixed-unit) ring laid out inside ``buf``.

    ``ByteRing(buf, *, data_offset, size, prod_offset, cons_offset, slot=1, on_insane="error",
    data_buffer=None)`` where ``size`` is the number of units (bytes when ``slot`` is 1) and
    the offsets are byte offsets into ``buf``; with ``data_buffer`` the data area is in that
    buffer instead (vchan rings of order >= 12 live in their own pages).  The producer calls
    :meth:`write`, the consumer :meth:`read` / :meth:`read_into`; neither signals anything
    (the caller notifies its peer).
    """

    cdef Py_buffer *_view
    cdef Py_buffer *_data_view
    cdef uint8_t *base
    cdef uint8_t *data
    cdef Py_ssize_t prod_off
    cdef Py_ssize_t cons_off
    cdef readonly uint32_t size
    cdef readonly Py_ssize_t slot
    cdef readonly str on_insane
    cdef readonly unsigned long long insane_count
    cdef bint _pow2
    cdef bint _zero
    cdef object _broken

    def __cinit__(self, *args, **kwargs):
        self._view = NULL
        self._data_view = NULL
        self.base = NULL
        self._broken = None

    def __init__(self, buf, *, Py_ssize_t data_offset, Py_ssize_t size, Py_ssize_t prod_offset,
                 Py_ssize_t cons_offset, Py_ssize_t slot=1, str on_insane="error",
                 data_buffer=None):
        cdef Py_buffer *dview
        if on_insane not in ("error", "zero"):
            raise LocalError(f"on_insane must be 'error' or 'zero', not {on_insane!r}")
        if size <= 0 or size > 0x80000000 or slot <= 0:
            raise LocalError(f"bad ring geometry: {size} units of {slot} bytes")
        self.release()  # __init__ called again: drop the old memory first
        self._view = hold_buffer(buf)
        if data_buffer is not None:
            self._data_view = hold_buffer(data_buffer)
        dview = self._data_view if self._data_view != NULL else self._view
        try:
            _check_geometry(self._view.len, <size_t>self._view.buf, dview.len, data_offset,
                            size, slot, prod_offset, cons_offset, self._data_view != NULL)
        except BaseException:
            self.release()
            raise
        self.base = <uint8_t *>self._view.buf
        self.data = <uint8_t *>dview.buf + data_offset
        self.prod_off = prod_offset
        self.cons_off = cons_offset
        self.size = <uint32_t>size
        self.slot = slot
        self.on_insane = on_insane
        self._zero = on_insane == "zero"
        self._pow2 = (size & (size - 1)) == 0
        self.insane_count = 0

    def __dealloc__(self):
        self.release()

    def release(self) -> None:
        """Let go of the ring memory; later calls raise LocalError."""
        drop_buffer(&self._view)
        drop_buffer(&self._data_view)
        self.base = NULL

    @property
    def broken(self) -> bool:
        """True once an insane index state was seen with ``on_insane="error"``."""
        return self._broken is not None

    @property
    def prod(self) -> int:
        """The shared producer index (one load)."""
        self._usable()
        return xenpv_load_u32(self.base + self.prod_off)

    @property
    def cons(self) -> int:
        """The shared consumer index (one load)."""
        self._usable()
        return xenpv_load_u32(self.base + self.cons_off)

    cdef inline int _usable(self) except -1:
        if self._broken is not None:
            raise RingOverflowError(self._broken)
        if self.base == NULL:
            raise LocalError("the ring memory was released")
        return 0

    cdef uint32_t _used(self, uint32_t prod, uint32_t cons) except? 0xFFFFFFFF:
        """Units between cons and prod, or the insane-state policy's answer."""
        cdef uint32_t used = prod - cons
        if used > self.size:
            if self._zero:
                self.insane_count += 1
                return 0xFFFFFFFE  # marker: insane, treat as neither readable nor writable
            self._broken = (f"ring indexes prod {prod} cons {cons} claim {used} units "
                            f"in a ring of {self.size}")
            raise RingOverflowError(self._broken)
        return used

    cpdef unsigned int available(self) except? 0xFFFFFFFF:
        """Units the consumer may read now (0 for an insane state under ``"zero"``)."""
        cdef uint32_t used
        self._usable()
        used = self._used(xenpv_load_u32(self.base + self.prod_off),
                          xenpv_load_u32(self.base + self.cons_off))
        return 0 if used == 0xFFFFFFFE else used

    cpdef unsigned int free(self) except? 0xFFFFFFFF:
        """Units the producer may write now (0 for an insane state under ``"zero"``)."""
        cdef uint32_t used
        self._usable()
        used = self._used(xenpv_load_u32(self.base + self.prod_off),
                          xenpv_load_u32(self.base + self.cons_off))
        return 0 if used == 0xFFFFFFFE else self.size - used

    cdef void _copy_in(self, uint32_t idx, const uint8_t *src, uint32_t n) noexcept nogil:
        cdef uint32_t first, run, j
        if self._pow2:
            first = idx & (self.size - 1)
            run = self.size - first
            if run > n:
                run = n
            xenpv_copy(self.data + first * self.slot, src, run * self.slot)
            if n > run:
                xenpv_copy(self.data, src + run * self.slot, (n - run) * self.slot)
        else:
            for j in range(n):
                xenpv_copy(self.data + (<uint32_t>(idx + j) % self.size) * self.slot,
                       src + j * self.slot, self.slot)

    cdef void _copy_out(self, uint32_t idx, uint8_t *dst, uint32_t n) noexcept nogil:
        cdef uint32_t first, run, j
        if self._pow2:
            first = idx & (self.size - 1)
            run = self.size - first
            if run > n:
                run = n
            xenpv_copy(dst, self.data + first * self.slot, run * self.slot)
            if n > run:
                xenpv_copy(dst + run * self.slot, self.data, (n - run) * self.slot)
        else:
            for j in range(n):
                xenpv_copy(dst + j * self.slot,
                       self.data + (<uint32_t>(idx + j) % self.size) * self.slot, self.slot)

    cpdef unsigned int write(self, data) except? 0xFFFFFFFF:
        """Copy as many whole units of ``data`` as fit, publish them; returns units written."""
        cdef Py_buffer view
        cdef uint32_t prod, cons, used, n
        cdef Py_ssize_t want
        self._usable()
        prod = xenpv_load_u32(self.base + self.prod_off)
        cons = xenpv_load_u32(self.base + self.cons_off)
        used = self._used(prod, cons)
        if used == 0xFFFFFFFE:
            return 0
        xenpv_mb()  # index loads before overwriting data the consumer has just released
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            want = view.len // self.slot
            n = self.size - used
            if want < n:
                n = <uint32_t>want
            self._copy_in(prod, <const uint8_t *>view.buf, n)
        finally:
            PyBuffer_Release(&view)
        xenpv_wmb()  # the consumer must see the data before the index that covers it
        xenpv_store_u32(self.base + self.prod_off, prod + n)
        return n

    cdef uint32_t _begin_read(self, uint32_t *cons) except? 0xFFFFFFFF:
        cdef uint32_t prod, used
        self._usable()
        prod = xenpv_load_u32(self.base + self.prod_off)
        cons[0] = xenpv_load_u32(self.base + self.cons_off)
        used = self._used(prod, cons[0])
        if used == 0xFFFFFFFE:
            return 0
        xenpv_rmb()  # the prod load comes before the data loads it covers
        return used

    cdef void _end_read(self, uint32_t cons, uint32_t n) noexcept nogil:
        xenpv_mb()  # finish reading the data before the producer may overwrite it
        xenpv_store_u32(self.base + self.cons_off, cons + n)

    cpdef unsigned int read_into(self, dst, Py_ssize_t max_n=-1) except? 0xFFFFFFFF:
        """Move up to ``max_n`` available units (as many as fit ``dst``) into ``dst``."""
        cdef Py_buffer view
        cdef uint32_t cons, n
        cdef Py_ssize_t room
        n = self._begin_read(&cons)
        PyObject_GetBuffer(dst, &view, PyBUF_WRITABLE)
        try:
            room = view.len // self.slot
            if 0 <= max_n < room:
                room = max_n
            if room < n:
                n = <uint32_t>room
            self._copy_out(cons, <uint8_t *>view.buf, n)
        finally:
            PyBuffer_Release(&view)
        if n:
            self._end_read(cons, n)
        return n

    def read(self, Py_ssize_t max_n=-1) -> bytes:
        """Move up to ``max_n`` available units out of the ring and return them as bytes."""
        cdef uint32_t cons, n
        n = self._begin_read(&cons)
        if 0 <= max_n < n:
            n = <uint32_t>max_n
        out = PyBytes_FromStringAndSize(NULL, n * self.slot)
        self._copy_out(cons, <uint8_t *>PyBytes_AS_STRING(out), n)
        if n:
            self._end_read(cons, n)
        return out


cdef int _check_geometry(Py_ssize_t buflen, size_t addr, Py_ssize_t datalen,
                         Py_ssize_t data_offset, Py_ssize_t size, Py_ssize_t slot,
                         Py_ssize_t prod_offset, Py_ssize_t cons_offset,
                         bint separate) except -1:
    if data_offset < 0 or data_offset + size * slot > datalen:
        raise LocalError(
            f"data area [{data_offset}, {data_offset + size * slot}) is outside the "
            f"{datalen}-byte buffer")
    for off in (prod_offset, cons_offset):
        if off < 0 or off + 4 > buflen:
            raise LocalError(f"index offset {off} is outside the {buflen}-byte buffer")
        if (addr + off) & 3:
            raise LocalError(f"index offset {off} is not 4-byte aligned")
        if not separate and off + 4 > data_offset and off < data_offset + size * slot:
            raise LocalError(f"index offset {off} overlaps the data area")
    if prod_offset == cons_offset:
        raise LocalError("prod and cons cannot share one word")
    return 0

# The loopback daemon's GNT_COPY (docs/loopback-protocol.md §4.7), compiled.
#
# The readable twin is PyCopyEngine in xenpv/platforms/loopback/gntcopy.py (the request
# parsed into GrantCopy records, run by core.CopyPlan); tests compare the two
# on arbitrary requests, hostile ones included.  This one parses the request in place, keeps
# what the hypervisor answered for each named page until a grant table changes, and copies
# with memmove:
#
# * the length checks come first and allocate nothing (hostile-inputs R5, R11): the local
#   source bytes must be in the request, the local destination bytes fit one reply;
# * the table rules are not repeated here: a grant side's page is asked of
#   Hypervisor.grant_page, an own side's pages of Hypervisor._share_window (for a window
#   widened to whole pages: the same answer), and the pages granted are kept (at most
#   MAX_KEPT per cache; refusals are asked again each time) while Hypervisor.grant_gen
#   stays (every change of what a copy may name bumps it);
# * only the arithmetic is: a segment of more than a page is bad_copy_arg, a grant window
#   must end in its page (bad_copy_arg), both flags of a side is general_error, an own
#   window's page index and offset; then the statuses, in segment order, are those of
#   CopyPlan, and the copies are its runs (segments contiguous on both sides in the same
#   memory are merged and copied as one memmove, in order), so even overlapping
#   segments leave the same bytes.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memmove

from heldbuf cimport drop_buffer, hold_buffer
from includes.wire cimport le_u16, le_u32

import errno

from xenpv.errors import PlatformError
from xenpv.platforms.base import GntSt

cdef enum:
    PAGE_SIZE = 4096
    HEAD = 8           # count, pad
    SEG = 24           # COPY_SEG: <IHHIHHHHI
    REPLY_HEAD = 16    # REPLY: op, seq, status, len
    MAX_MESSAGE = 131072
    SRC_GREF = 1
    DST_GREF = 2
    SRC_OWN = 0x100
    DST_OWN = 0x200
    # pages kept per cache (refusals never are: see CopyEngine): beyond it a cache starts
    # again, so nothing a peer sends grows it without bound (hostile-inputs R11)
    MAX_KEPT = 4096

cdef int BAD_COPY_ARG = GntSt.bad_copy_arg
cdef int GENERAL_ERROR = GntSt.general_error


cdef class _Window:
    """A buffer held open over (part of) a segment's memory: the pages an answer named."""

    cdef Py_buffer *buf   # held outside the object (heldbuf.pxd says why)
    cdef object base      # the segment: runs merge within one base only
    cdef char *ptr        # the first byte the answer named

    def __dealloc__(self):
        drop_buffer(&self.buf)


cdef _Window _window(object seg, object view, Py_ssize_t start):
    """Hold ``view[start:]`` writable (a slice: the segment's own view can still be
    released; its mmap then stays until this is dropped)."""
    cdef _Window w = _Window.__new__(_Window)
    w.buf = hold_buffer(view[start:])
    w.base = seg
    w.ptr = <char *>w.buf.buf
    return w


ctypedef struct _Run:
    char *dst
    char *src
    Py_ssize_t n
    void *dbase
    void *sbase


cdef class CopyEngine:
    """GNT_COPY for one daemon connection (one hypervisor handle): :meth:`run` takes a
    request payload and returns the reply payload."""

    cdef object hv
    cdef object handle
    cdef object share_ptr
    cdef dict grants      # (domid, ref, dest) -> _Window of the page
    cdef dict owns        # (handle id, first page, last page) -> _Window of those pages
    cdef object gen
    cdef Py_ssize_t _inpage  # where in its window the last side asked for starts

    def __init__(self, hv, handle, share_ptr):
        """``share_ptr`` is core.SharePtr (passed in: no import cycle)."""
        self.hv = hv
        self.handle = handle
        self.share_ptr = share_ptr
        self.grants = {}
        self.owns = {}
        self.gen = None

    @property
    def kept(self):
        """How many answers are kept (pages held)."""
        return len(self.grants) + len(self.owns)

    def release(self):
        """Drop every buffer held (the engine fills its caches again if run again)."""
        self.grants.clear()
        self.owns.clear()
        self.gen = None

    cdef object _grant(self, uint16_t domid, uint32_t ref, bint dest):
        key = (domid, ref, dest)
        found = self.grants.get(key)
        if found is None:
            answer = self.hv.grant_page(self.handle, domid, ref, dest)
            if isinstance(answer, int):  # refusals are not kept: a peer cannot grow this
                return int(answer)
            seg, start = answer
            found = _window(seg, seg.view, start)
            if len(self.grants) >= MAX_KEPT:
                self.grants.clear()
            self.grants[key] = found
        return found

    cdef object _own(self, uint32_t hid, Py_ssize_t off, Py_ssize_t length):
        cdef Py_ssize_t k, last
        if off < 0 or length == 0:  # refused or empty: asked as it is, not kept
            answer = self.hv._share_window(self.handle, self.share_ptr(hid, off), length)
            if isinstance(answer, int):
                return int(answer)
            seg, view, start = answer
            return _window(seg, view, start)
        k = off // PAGE_SIZE
        last = (off + length - 1) // PAGE_SIZE
        key = (hid, k, last)
        found = self.owns.get(key)
        if found is None:
            answer = self.hv._share_window(self.handle, self.share_ptr(hid, k * PAGE_SIZE),
                                           (last - k + 1) * PAGE_SIZE)
            if isinstance(answer, int):
                return int(answer)
            seg, view, start = answer
            found = _window(seg, view, start)
            if len(self.owns) >= MAX_KEPT:
                self.owns.clear()
            self.owns[key] = found
        return found

    def run(self, payload):
        """The reply payload to the GNT_COPY request ``payload`` (count, pad, then one
        int32 GNTST status per segment, then the local destination bytes); raises
        :class:`~xenpv.errors.PlatformError` as the daemon's Python path does."""
        cdef const uint8_t[::1] pv = payload
        cdef Py_ssize_t n = pv.shape[0]
        cdef Py_ssize_t count, base, i, src_total = 0, dst_total = 0, head
        cdef Py_ssize_t src_cursor = 0, out_len = 0, inpage, nruns = 0
        cdef const uint8_t *p
        cdef const uint8_t *s
        cdef uint16_t flags, length
        cdef int status
        cdef char *sptr
        cdef char *dptr
        cdef void *sbase
        cdef void *dbase
        cdef _Run *runs
        cdef _Run *last
        cdef _Window w
        cdef bytearray reply
        cdef uint8_t[::1] rv
        cdef char *reply_data
        if n < HEAD:
            raise PlatformError("request payload has the wrong size", errno.EINVAL)
        p = &pv[0]
        count = le_u32(p)
        base = HEAD + count * SEG
        if n < base:
            raise PlatformError("short grant-copy request", errno.EINVAL)
        for i in range(count):
            s = p + HEAD + i * SEG
            flags = le_u16(s + 18)
            if not flags & (SRC_GREF | SRC_OWN):
                src_total += le_u16(s + 16)
            if not flags & (DST_GREF | DST_OWN):
                dst_total += le_u16(s + 16)
        if src_total > n - base:
            raise PlatformError("grant copy: not enough source data", errno.EINVAL)
        head = HEAD + 4 * count
        if REPLY_HEAD + head + dst_total > MAX_MESSAGE:
            raise PlatformError("grant copy: the destination data exceeds a reply",
                                errno.E2BIG)
        if self.handle.closed:
            raise PlatformError("handle is closed", errno.EBADF)
        gen = self.hv.grant_gen
        if gen != self.gen:
            self.grants.clear()
            self.owns.clear()
            self.gen = gen
        reply = bytearray(head + dst_total)
        rv = reply
        reply_data = <char *>&rv[0] + head
        keep = []  # windows of this request that are not kept in a cache
        runs = <_Run *>malloc((count if count else 1) * sizeof(_Run))
        if runs == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                s = p + HEAD + i * SEG
                length = le_u16(s + 16)
                flags = le_u16(s + 18)
                # the local sides' places follow each other, whatever the statuses
                sptr = dptr = NULL
                sbase = dbase = NULL
                if not flags & (SRC_GREF | SRC_OWN):
                    sptr = <char *>p + base + src_cursor
                    sbase = <void *>payload
                    src_cursor += length
                if not flags & (DST_GREF | DST_OWN):
                    dptr = reply_data + out_len
                    dbase = <void *>reply
                    out_len += length
                status = 0
                if length > PAGE_SIZE:  # grant_table.c: at most one page
                    status = BAD_COPY_ARG
                if status == 0 and sptr == NULL:
                    found = self._side(s, length, False, keep)
                    if isinstance(found, int):
                        status = found
                    else:
                        w = <_Window>found
                        sptr = w.ptr + self._inpage
                        sbase = <void *>w.base
                if status == 0 and dptr == NULL:
                    found = self._side(s, length, True, keep)
                    if isinstance(found, int):
                        status = found
                    else:
                        w = <_Window>found
                        dptr = w.ptr + self._inpage
                        dbase = <void *>w.base
                (<int32_t *>(<char *>&rv[0] + HEAD))[i] = status
                if status:
                    continue
                last = &runs[nruns - 1] if nruns else NULL
                if (last != NULL and last.dbase == dbase and last.sbase == sbase
                        and last.dst + last.n == dptr and last.src + last.n == sptr):
                    last.n += length
                else:
                    runs[nruns].dst = dptr
                    runs[nruns].src = sptr
                    runs[nruns].n = length
                    runs[nruns].dbase = dbase
                    runs[nruns].sbase = sbase
                    nruns += 1
            for i in range(nruns):
                memmove(runs[i].dst, runs[i].src, runs[i].n)
        finally:
            free(runs)
        (<uint32_t *>&rv[0])[0] = <uint32_t>count
        (<uint32_t *>&rv[0])[1] = 0
        del keep
        return reply

    cdef object _side(self, const uint8_t *s, uint16_t length, bint dest, list keep):
        """The window of one named side (its first byte at ``w.ptr + self._inpage``), or
        the GNTST code refusing it."""
        cdef uint32_t ref = le_u32(s + (8 if dest else 0))
        cdef uint16_t domid = le_u16(s + (12 if dest else 4))
        cdef uint16_t off = le_u16(s + (14 if dest else 6))
        cdef uint16_t flags = le_u16(s + 18)
        cdef uint16_t gref = DST_GREF if dest else SRC_GREF
        cdef uint16_t own = DST_OWN if dest else SRC_OWN
        cdef Py_ssize_t at
        self._inpage = 0
        if flags & gref and flags & own:
            return GENERAL_ERROR
        if flags & gref:
            if off + length > PAGE_SIZE:
                return BAD_COPY_ARG
            found = self._grant(domid, ref, dest)
            self._inpage = off
            return found
        at = -1 if off >= PAGE_SIZE else <Py_ssize_t>domid * PAGE_SIZE + off
        if at < 0 or length == 0:
            found = self._own(ref, at, length)
            if not isinstance(found, int):
                keep.append(found)
            return found
        found = self._own(ref, at, length)
        self._inpage = at % PAGE_SIZE
        return found


# --------------------------------------------------------------------------- client side

cdef enum:
    PIECE = 12         # base.COPY_PIECE: <IHHI (ref, offset, length, place)


def encode_pieces(const uint8_t[::1] pieces not None, Py_ssize_t count, uint32_t domid,
                  uint32_t handle, Py_ssize_t base, Py_ssize_t size, bint per_page):
    """The GNT_COPY request (head and segments) copying ``count`` COPY_PIECE records of
    ``pieces`` from grants of ``domid`` into the client's own share ``handle``, whose
    destination buffer starts ``base`` bytes into the share and holds ``size`` bytes; None
    where a piece cannot be named so (it crosses a page of a share of one page per frame,
    or its page index does not fit).  A piece crossing its grant's page or running past
    the buffer raises ValueError.  Readable twin: ``gntcopy.encode_pieces_reference``."""
    if count < 0 or count * PIECE > pieces.shape[0] or base < 0 or size < 0:
        raise ValueError("bad piece count or destination")
    if HEAD + count * SEG > MAX_MESSAGE:
        raise ValueError("too many pieces for one request")
    cdef bytearray out = bytearray(HEAD + count * SEG)
    cdef uint8_t *o = out
    cdef const uint8_t *p
    cdef uint32_t ref, place, at
    cdef uint16_t offset, length
    cdef uint16_t flags = SRC_GREF | DST_OWN
    cdef uint16_t dom16 = <uint16_t>domid
    cdef uint16_t page16, off16
    cdef uint32_t count32 = <uint32_t>count, zero32 = 0
    cdef Py_ssize_t i
    memmove(o, &count32, 4)
    memmove(o + 4, &zero32, 4)
    for i in range(count):
        p = &pieces[i * PIECE]
        ref = le_u32(p)
        offset = le_u16(p + 4)
        length = le_u16(p + 6)
        place = le_u32(p + 8)
        if <Py_ssize_t>offset + length > PAGE_SIZE or <Py_ssize_t>place + length > size:
            raise ValueError("a copy piece out of bounds")
        at = <uint32_t>(base + place)
        if per_page and length and at // PAGE_SIZE != (at + length - 1) // PAGE_SIZE:
            return None
        if at // PAGE_SIZE > 0xFFFF:
            return None
        page16 = <uint16_t>(at // PAGE_SIZE)
        off16 = <uint16_t>(at % PAGE_SIZE)
        o = <uint8_t *>out + HEAD + i * SEG
        memmove(o, &ref, 4)
        memmove(o + 4, &dom16, 2)
        memmove(o + 6, &offset, 2)
        memmove(o + 8, &handle, 4)
        memmove(o + 12, &page16, 2)
        memmove(o + 14, &off16, 2)
        memmove(o + 16, &length, 2)
        memmove(o + 18, &flags, 2)
        memmove(o + 20, &zero32, 4)
    return bytes(out)

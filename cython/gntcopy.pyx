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
#   widened to whole pages: the same answer), and the pages granted are kept in a C table
#   (at most MAX_KEPT; refusals are asked again each time) while Hypervisor.grant_gen
#   stays (every change of what a copy may name bumps it): a segment whose pages are kept
#   touches no Python object;
# * only the arithmetic is: a segment of more than a page is bad_copy_arg, a grant window
#   must end in its page (bad_copy_arg), both flags of a side is general_error, an own
#   window's page index and offset; then the statuses, in segment order, are those of
#   CopyPlan, and the copies are its runs (segments contiguous on both sides in the same
#   memory are merged and copied as one memmove, in order), so even overlapping
#   segments leave the same bytes (runs apart from each other's memory, nearly all, are
#   copied by xenpv_copy: see _copy).
#
# CopyEngine.answer also frames the daemon's hot request: a whole GNT_COPY request message
# in, the whole reply message out, so the daemon's Python path does not see it.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.exc cimport PyErr_SetFromErrno
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memmove, memset

from heldbuf cimport drop_buffer, hold_buffer
from includes.copy cimport xenpv_copy
from includes.wire cimport le_u16, le_u32

import errno

from xenpv.errors import PlatformError
from xenpv.platforms.base import GntSt
from xenpv.platforms.loopback.proto import ProtocolViolation


cdef extern from "<sys/socket.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        unsigned msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_LEN(size_t n)
    int SOL_SOCKET, SCM_RIGHTS, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC, MSG_CTRUNC
    int MSG_CMSG_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<errno.h>":
    int c_errno "errno"
    int EAGAIN, EWOULDBLOCK, EINTR

cdef enum:
    CONTROL_WORDS = 256  # 2 KiB of control space: more than CMSG_SPACE(253 * 4), the
                         # kernel's SCM_MAX_FD descriptors (proto.CMSG_SPACE)

cdef enum:
    PAGE_SIZE = 4096
    HEAD = 8           # count, pad
    SEG = 24           # COPY_SEG: <IHHIHHHHI
    REQUEST_HEAD = 12  # REQUEST: op, seq, len
    REPLY_HEAD = 16    # REPLY: op, seq, status, len
    MAX_MESSAGE = 131072
    OP_GNT_COPY = 7
    SRC_GREF = 1
    DST_GREF = 2
    SRC_OWN = 0x100
    DST_OWN = 0x200
    # pages kept (refusals never are: see CopyEngine): beyond it the cache starts again,
    # so nothing a peer sends grows it without bound (hostile-inputs R11)
    MAX_KEPT = 8192
    FIRST_SLOTS = 16   # the table's first size (slots; doubled when it would be half full)

cdef int BAD_COPY_ARG = GntSt.bad_copy_arg
cdef int GENERAL_ERROR = GntSt.general_error
# a kept page's key: a grant's (domid, dest, ref), or OWN_KEY with an own window's
# (handle id, first page, whether it runs on into the next page)
cdef uint64_t OWN_KEY = (<uint64_t>1) << 63


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


ctypedef struct _Slot:
    uint64_t key
    uint32_t epoch     # the slot is in use while this is the engine's epoch
    char *ptr          # the window's first byte
    void *base         # its segment (runs merge within one base only)


cdef inline void _copy(char *dst, const char *src, Py_ssize_t n) noexcept:
    """memmove, but memory apart (nearly always: grant pages and the caller's own) goes
    through xenpv_copy: glibc's memmove copies a page with ``rep movsb``, up to several
    times slower when the two sides are misaligned to each other (xenpv_copy.h)."""
    if <size_t>dst + <size_t>n <= <size_t>src or <size_t>src + <size_t>n <= <size_t>dst:
        xenpv_copy(dst, src, n)
    else:
        memmove(dst, src, n)


cdef inline uint64_t _grant_key(uint16_t domid, uint32_t ref, bint dest) noexcept:
    return (<uint64_t>domid << 33) | (<uint64_t>dest << 32) | ref


cdef inline uint64_t _own_key(uint32_t hid, Py_ssize_t off, Py_ssize_t length) noexcept:
    # length is at most a page and off's page offset under a page: the window ends in
    # page k or k + 1 (k fits 16 bits: the wire's page index)
    cdef Py_ssize_t k = off // PAGE_SIZE
    cdef Py_ssize_t last = (off + length - 1) // PAGE_SIZE
    return OWN_KEY | (<uint64_t>hid << 17) | (<uint64_t>k << 1) | <uint64_t>(last - k)


cdef class CopyEngine:
    """GNT_COPY for one daemon connection (one hypervisor handle): :meth:`run` takes a
    request payload and returns the reply payload, :meth:`answer` does the same for a
    whole request message.

    The pages the hypervisor gave are kept in an open-addressing table of C slots (key,
    pointer, segment) whose windows ``_held`` owns: a segment served from it touches no
    Python object.  The table is dropped at once (a new epoch) when a grant table
    changed, at MAX_KEPT pages, and on :meth:`release`."""

    cdef object hv
    cdef object handle
    cdef object share_ptr
    cdef list _held       # the _Window of every slot of this epoch
    cdef list _keep       # windows the request being run still points into
    cdef _Slot *_table
    cdef Py_ssize_t _size  # slots (a power of two)
    cdef int _shift        # 64 - log2(_size)
    cdef Py_ssize_t _kept
    cdef Py_ssize_t _max_kept
    cdef uint32_t _epoch
    cdef object gen

    def __cinit__(self):
        self._table = <_Slot *>calloc(FIRST_SLOTS, sizeof(_Slot))
        if self._table == NULL:
            raise MemoryError()
        self._size = FIRST_SLOTS
        self._shift = 64 - 4
        self._epoch = 1

    def __dealloc__(self):
        free(self._table)

    def __init__(self, hv, handle, share_ptr, Py_ssize_t max_kept=MAX_KEPT):
        """``share_ptr`` is core.SharePtr (passed in: no import cycle); ``max_kept``
        bounds the pages kept (tests make it small)."""
        if not 0 < max_kept <= MAX_KEPT:
            raise ValueError(f"max_kept must be in 1..{MAX_KEPT}")
        self._max_kept = max_kept
        self.hv = hv
        self.handle = handle
        self.share_ptr = share_ptr
        self._held = []
        self._keep = []
        self.gen = None

    @property
    def kept(self):
        """How many answers are kept (pages held)."""
        return self._kept

    def release(self):
        """Drop every buffer held (the engine fills its cache again if run again)."""
        self._forget()
        self._held.clear()
        self.gen = None

    cdef void _forget(self) noexcept:
        """A new epoch: every slot is free (the windows are the caller's to drop)."""
        self._kept = 0
        self._epoch += 1
        if self._epoch == 0:  # wrapped: slots of an old epoch 0 would look in use
            memset(self._table, 0, self._size * sizeof(_Slot))
            self._epoch = 1

    cdef inline Py_ssize_t _home(self, uint64_t key) noexcept:
        return <Py_ssize_t>((key * <uint64_t>0x9E3779B97F4A7C15) >> self._shift)

    cdef inline _Slot *_find(self, uint64_t key) noexcept:
        """The slot of ``key``, or the free slot where it goes (less than half full:
        there is always one)."""
        cdef Py_ssize_t i = self._home(key)
        cdef _Slot *slot
        while True:
            slot = &self._table[i]
            if slot.epoch != self._epoch or slot.key == key:
                return slot
            i = (i + 1) & (self._size - 1)

    cdef int _grow(self) except -1:
        cdef _Slot *old = self._table
        cdef Py_ssize_t i, n = self._size
        cdef _Slot *slot
        cdef _Slot *table = <_Slot *>calloc(2 * n, sizeof(_Slot))
        if table == NULL:
            raise MemoryError()
        self._table = table
        self._size = 2 * n
        self._shift -= 1
        for i in range(n):
            if old[i].epoch == self._epoch:
                slot = self._find(old[i].key)
                slot[0] = old[i]
        free(old)
        return 0

    cdef int _keep_window(self, uint64_t key, _Window w) except -1:
        """Keep the page ``w`` answered for ``key``."""
        cdef _Slot *slot
        if self._kept >= self._max_kept:
            # the request being run may still point into these: they go with it
            self._keep.extend(self._held)
            self._held.clear()
            self._forget()
        if 2 * (self._kept + 1) > self._size:
            self._grow()
        slot = self._find(key)
        slot.key = key
        slot.epoch = self._epoch
        slot.ptr = w.ptr
        slot.base = <void *>w.base
        self._held.append(w)
        self._kept += 1
        return 0

    cdef int _grant(self, uint16_t domid, uint32_t ref, bint dest, char **ptr,
                    void **base) except 1:
        """The page of grant ``ref`` of ``domid`` (0, its first byte in ``ptr``), or the
        GNTST code refusing it."""
        cdef uint64_t key = _grant_key(domid, ref, dest)
        cdef _Slot *slot = self._find(key)
        cdef _Window w
        if slot.epoch == self._epoch:
            ptr[0] = slot.ptr
            base[0] = slot.base
            return 0
        answer = self.hv.grant_page(self.handle, domid, ref, dest)
        if isinstance(answer, int):  # refusals are not kept: a peer cannot grow this
            return answer
        seg, start = answer
        w = _window(seg, seg.view, start)
        self._keep_window(key, w)
        ptr[0] = w.ptr
        base[0] = <void *>w.base
        return 0

    cdef int _own(self, uint32_t hid, Py_ssize_t off, Py_ssize_t length, char **ptr,
                  void **base) except 1:
        """The window of ``length`` bytes at ``off`` in the caller's own share ``hid``
        (0, its first byte in ``ptr``), or the GNTST code refusing it."""
        cdef Py_ssize_t k
        cdef uint64_t key
        cdef _Slot *slot
        cdef _Window w
        if off < 0 or length == 0:  # refused or empty: asked as it is, not kept
            answer = self.hv._share_window(self.handle, self.share_ptr(hid, off), length)
            if isinstance(answer, int):
                return answer
            seg, view, start = answer
            w = _window(seg, view, start)
            self._keep.append(w)
            ptr[0] = w.ptr
            base[0] = <void *>w.base
            return 0
        key = _own_key(hid, off, length)
        slot = self._find(key)
        if slot.epoch == self._epoch:
            ptr[0] = slot.ptr + off % PAGE_SIZE
            base[0] = slot.base
            return 0
        k = off // PAGE_SIZE
        answer = self.hv._share_window(self.handle, self.share_ptr(hid, k * PAGE_SIZE),
                                       ((off + length - 1) // PAGE_SIZE - k + 1) * PAGE_SIZE)
        if isinstance(answer, int):
            return answer
        seg, view, start = answer
        w = _window(seg, view, start)
        self._keep_window(key, w)
        ptr[0] = w.ptr + off % PAGE_SIZE
        base[0] = <void *>w.base
        return 0

    cdef int _side(self, const uint8_t *s, uint16_t length, bint dest, char **ptr,
                   void **base) except 1:
        """Where one named side starts (0, in ``ptr``; its memory's base in ``base``), or
        the GNTST code refusing it."""
        cdef uint32_t ref = le_u32(s + (8 if dest else 0))
        cdef uint16_t domid = le_u16(s + (12 if dest else 4))
        cdef uint16_t off = le_u16(s + (14 if dest else 6))
        cdef uint16_t flags = le_u16(s + 18)
        cdef uint16_t gref = DST_GREF if dest else SRC_GREF
        cdef uint16_t own = DST_OWN if dest else SRC_OWN
        cdef int status
        if flags & gref and flags & own:
            return GENERAL_ERROR
        if flags & gref:
            if off + length > PAGE_SIZE:
                return BAD_COPY_ARG
            status = self._grant(domid, ref, dest, ptr, base)
            if status == 0:
                ptr[0] += off
            return status
        return self._own(ref, -1 if off >= PAGE_SIZE else <Py_ssize_t>domid * PAGE_SIZE + off,
                         length, ptr, base)

    def run(self, payload):
        """The reply payload to the GNT_COPY request ``payload`` (count, pad, then one
        int32 GNTST status per segment, then the local destination bytes); raises
        :class:`~xenpv.errors.PlatformError` as the daemon's Python path does."""
        cdef Py_buffer pb
        PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
        try:
            return self._reply(<const uint8_t *>pb.buf, pb.len, payload, 0)
        finally:
            PyBuffer_Release(&pb)

    def serve(self, sock, rbuf):
        """Receive one request message from ``sock`` (non-blocking) into ``rbuf`` and,
        when it is a GNT_COPY framed right, send its reply (:meth:`answer`): -1 then,
        and when nothing waits; 0 at the end of the stream (or an empty message); else
        the length of the message left in ``rbuf`` for the daemon's general path.
        Descriptors sent along are closed; a truncated message raises
        ProtocolViolation, a failed receive or send OSError.  Readable twin:
        ``PyCopyEngine.serve``."""
        cdef int fd = sock.fileno()
        cdef Py_buffer pb
        cdef msghdr msg
        cdef iovec iov
        cdef uint64_t control[CONTROL_WORDS]
        cdef cmsghdr *c
        cdef Py_ssize_t got, i, nfds
        cdef int *fds
        cdef object out
        PyObject_GetBuffer(rbuf, &pb, PyBUF_SIMPLE)
        try:
            iov.iov_base = pb.buf
            iov.iov_len = pb.len
            memset(&msg, 0, sizeof(msg))
            msg.msg_iov = &iov
            msg.msg_iovlen = 1
            msg.msg_control = control
            msg.msg_controllen = sizeof(control)
            got = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
            if got < 0:
                if c_errno == EAGAIN or c_errno == EWOULDBLOCK or c_errno == EINTR:
                    return -1
                PyErr_SetFromErrno(OSError)
            if msg.msg_controllen:
                c = CMSG_FIRSTHDR(&msg)
                while c != NULL:  # clients never send descriptors
                    if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_RIGHTS:
                        fds = <int *>CMSG_DATA(c)
                        nfds = (c.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                        for i in range(nfds):
                            close(fds[i])
                    c = CMSG_NXTHDR(&msg, c)
            if msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC):
                raise ProtocolViolation("oversized request")
            if got == 0:
                return 0
        finally:
            PyBuffer_Release(&pb)
        out = self.answer(rbuf, got)
        if out is None:
            return got
        if send(fd, PyByteArray_AS_STRING(out), len(out), MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
            PyErr_SetFromErrno(OSError)
        return -1

    def answer(self, msg, Py_ssize_t n):
        """The whole reply message (header and payload) to the request message
        ``msg[:n]`` when it is a GNT_COPY request framed right (its length field says
        the rest of the message), with a failure's ``-errno`` as its status and no
        payload; None for any other message (the daemon's general path frames it)."""
        cdef Py_buffer pb
        cdef const uint8_t *p
        cdef uint32_t seq, length
        cdef int32_t status = 0
        cdef bytearray reply
        cdef uint32_t *h
        PyObject_GetBuffer(msg, &pb, PyBUF_SIMPLE)
        try:
            if n < REQUEST_HEAD or n > pb.len:
                return None
            p = <const uint8_t *>pb.buf
            seq = le_u32(p + 4)
            length = le_u32(p + 8)
            if le_u32(p) != OP_GNT_COPY or length != n - REQUEST_HEAD:
                return None
            try:
                reply = self._reply(p + REQUEST_HEAD, length, msg, REPLY_HEAD)
            except PlatformError as exc:
                reply = bytearray(REPLY_HEAD)
                status = -(exc.errno or errno.EINVAL)
        finally:
            PyBuffer_Release(&pb)
        h = <uint32_t *>PyByteArray_AS_STRING(reply)
        h[0] = OP_GNT_COPY
        h[1] = seq
        (<int32_t *>h)[2] = status
        h[3] = <uint32_t>(len(reply) - REPLY_HEAD)
        return reply

    cdef bytearray _reply(self, const uint8_t *p, Py_ssize_t n, object source,
                          Py_ssize_t lead):
        """The reply payload to the request payload ``p[:n]`` (held by ``source``),
        ``lead`` bytes into a new bytearray."""
        cdef Py_ssize_t count, base, i, src_total = 0, dst_total = 0, head
        cdef Py_ssize_t src_cursor = 0, out_len = 0, nruns = 0
        cdef const uint8_t *s
        cdef uint16_t flags, length
        cdef int status
        cdef char *sptr
        cdef char *dptr
        cdef void *sbase
        cdef void *dbase
        cdef _Run *runs
        cdef _Run *last
        cdef bytearray reply
        cdef char *out
        if n < HEAD:
            raise PlatformError("request payload has the wrong size", errno.EINVAL)
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
            self._forget()
            self._held.clear()
            self.gen = gen
        reply = bytearray(lead + head + dst_total)
        out = PyByteArray_AS_STRING(reply) + lead
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
                    sbase = <void *>source
                    src_cursor += length
                if not flags & (DST_GREF | DST_OWN):
                    dptr = out + head + out_len
                    dbase = <void *>reply
                    out_len += length
                status = 0
                if length > PAGE_SIZE:  # grant_table.c: at most one page
                    status = BAD_COPY_ARG
                if status == 0 and sptr == NULL:
                    status = self._side(s, length, False, &sptr, &sbase)
                if status == 0 and dptr == NULL:
                    status = self._side(s, length, True, &dptr, &dbase)
                (<int32_t *>(out + HEAD))[i] = status
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
                _copy(runs[i].dst, runs[i].src, runs[i].n)
        finally:
            free(runs)
            self._keep.clear()
        (<uint32_t *>out)[0] = <uint32_t>count
        (<uint32_t *>out)[1] = 0
        return reply


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

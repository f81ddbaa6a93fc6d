# The net backend's TX copy group, compiled (see xenpv/backends/nettx.py).
#
# The readable twin is xenpv.backends.nettx.TxGroupReference (tests compare the two on
# arbitrary chains, layouts and statuses, hostile ones included).  The same layout rule,
# the same COPY_PIECE records, the same bytes and answers; no Python object per piece:
# a chain's bytes are one allocation and one memcpy per piece, its answers whole slots.
#
# Bounds: every piece is at most a page (ValueError otherwise) and placed inside the
# staging area of ``pages`` pages; finish checks each place against the memory it is
# given and the pieces' sum against the chain's size before copying anything out.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset

cdef enum:
    PAGE = 4096
    PIECE = 12          # base.COPY_PIECE: <IHHI
    SLOT = 12           # a TX ring slot
    RSP_OKAY = 0
    RSP_ERROR = -1
    RSP_NULL = 1


cdef class TxGroup:
    """See xenpv.backends.nettx: the staging layout of one queue and the chains of one
    copy batch."""

    cdef readonly int pages
    cdef int _page, _fill, _next
    cdef bytearray _used
    cdef bytearray _pieces
    cdef Py_ssize_t _count
    cdef list _chains

    def __init__(self, int pages):
        if pages < 1:
            raise ValueError("a staging area has at least one page")
        self.pages = pages
        self.reset()

    def reset(self):
        """Forget the chains and the layout: place from the start again."""
        self._page = -1
        self._fill = PAGE
        self._next = 0
        self._used = bytearray(self.pages)
        self._pieces = bytearray()
        self._count = 0
        self._chains = []

    @property
    def chains(self):
        """Chains in the group."""
        return len(self._chains)

    @property
    def count(self):
        """Pieces in the group."""
        return self._count

    @property
    def pieces(self):
        """The group's pieces, COPY_PIECE records."""
        return memoryview(self._pieces)

    def state(self):
        """The layout's state (for tests)."""
        return self._page, self._fill, self._next, bytes(self._used)

    cdef int _lay(self, Py_ssize_t n, const long *lengths, const long long *keys,
                  bint commit, uint32_t *places) except -1:
        """Lay out ``n`` pieces (``keys[i]``: the key of a whole page already modulo the
        pages, or -1); 1 if they all fit (places written), committed only with
        ``commit``; 0 if not."""
        cdef int pages = self.pages
        cdef bytearray used = bytearray(self._used)
        cdef uint8_t *u = used
        cdef int page = self._page, fill = self._fill, nxt = self._next, at, tries
        cdef Py_ssize_t i
        cdef long length
        for i in range(n):
            length = lengths[i]
            if length < 0 or length > PAGE:
                raise ValueError("a piece longer than a page")
            if keys[i] >= 0 and length == PAGE:
                at = <int>keys[i]
                tries = 0
                while tries < pages and u[at]:
                    at = at + 1 if at + 1 < pages else 0
                    tries += 1
                if tries >= pages:
                    return 0
                u[at] = 1
                places[i] = <uint32_t>at * PAGE
                continue
            if length and fill + length > PAGE:
                while nxt < pages and u[nxt]:
                    nxt += 1
                if nxt >= pages:
                    return 0
                page = nxt
                fill = 0
                u[nxt] = 1
            places[i] = <uint32_t>((page if page > 0 else 0) * PAGE + (fill if fill < PAGE else PAGE))
            fill += length
        if commit:
            self._page = page
            self._fill = fill
            self._next = nxt
            self._used = used
        return 1

    def layout(self, lengths, keys, bint commit):
        """Where pieces of ``lengths`` go after what is placed, or None (see the twin)."""
        cdef Py_ssize_t n = len(lengths), i
        if keys is not None and len(keys) < n:
            raise ValueError("fewer keys than lengths")
        cdef bytearray work = bytearray(20 * n + 8)
        cdef long *lens = <long *><uint8_t *>work
        cdef long long *ks = <long long *>(<uint8_t *>work + 8 * n)
        cdef uint32_t *places = <uint32_t *>(<uint8_t *>work + 16 * n)
        for i in range(n):
            length = lengths[i]
            lens[i] = length if 0 <= length <= PAGE else -1  # refused where it is reached
            key = keys[i] if keys is not None else None
            ks[i] = -1 if key is None else key % self.pages
        if not self._lay(n, lens, ks, commit, places):
            return None
        return [places[i] for i in range(n)]

    def add(self, chain):
        """Lay out and keep a chain of the TX scan; False (nothing taken) if it does not
        fit (see the twin)."""
        flags, size, used, ids, frags, gso = chain
        cdef Py_ssize_t n = len(frags), i, first = self._count
        cdef bytearray work = bytearray(20 * n + 8)
        cdef long *lens = <long *><uint8_t *>work
        cdef long long *ks = <long long *>(<uint8_t *>work + 8 * n)
        cdef uint32_t *places = <uint32_t *>(<uint8_t *>work + 16 * n)
        cdef uint32_t ref
        cdef uint16_t offset, length
        for i in range(n):
            f = frags[i]
            ref = f[0]
            offset = f[1]
            length = f[2] if 0 <= f[2] <= PAGE else 0xFFFF  # refused where it is reached
            lens[i] = length if length <= PAGE else -1
            ks[i] = -1 if offset else <long long>(ref % <uint32_t>self.pages)
        if not self._lay(n, lens, ks, True, places):
            return False
        self._pieces.extend(bytes(PIECE * n))
        cdef uint8_t *p = <uint8_t *>self._pieces + first * PIECE
        for i in range(n):
            f = frags[i]
            ref = f[0]
            offset = f[1]
            length = <uint16_t>lens[i]
            memcpy(p, &ref, 4)
            memcpy(p + 4, &offset, 2)
            memcpy(p + 6, &length, 2)
            memcpy(p + 8, &places[i], 4)
            p += PIECE
        self._count = first + n
        self._chains.append((flags, size, ids, used - len(ids), first, n, gso[0], gso[1]))
        return True

    def finish(self, mem, const int[::1] statuses not None):
        """Per chain (bytes or None, flags, GSO type, GSO size) and the answers as whole
        TX slots, after the copy (see the twin); the group is empty afterwards."""
        if statuses.shape[0] < self._count:
            raise ValueError("fewer statuses than pieces")
        cdef const uint8_t[::1] view = memoryview(mem).cast("B")
        cdef Py_ssize_t memlen = view.shape[0]
        cdef const uint8_t *base = &view[0] if memlen else NULL
        cdef const uint8_t *p = <const uint8_t *>(<bytearray>self._pieces) if self._count else NULL
        cdef list frames = []
        cdef Py_ssize_t nslots = 0, k, first, n, size, pos, extras
        cdef uint32_t place
        cdef uint16_t length
        for c in self._chains:
            ids = c[2]
            nslots += len(ids) + <Py_ssize_t>c[3]
        cdef object answers = PyBytes_FromStringAndSize(NULL, nslots * SLOT)
        cdef uint8_t *a = <uint8_t *>PyBytes_AS_STRING(answers)
        memset(a, 0, nslots * SLOT)
        cdef uint8_t *d
        cdef bint ok
        cdef int16_t status
        cdef uint16_t ident
        for c in self._chains:
            flags, size, ids, extras, first, n, gso_type, gso_size = c
            ok = True
            for k in range(first, first + n):
                if statuses[k] != 0:
                    ok = False
                    break
            data = None
            if ok:
                total = 0
                for k in range(first, first + n):
                    memcpy(&place, p + k * PIECE + 8, 4)
                    memcpy(&length, p + k * PIECE + 6, 2)
                    if <Py_ssize_t>place + length > memlen:
                        raise ValueError("a piece past the staging memory")
                    total += length
                if total != size:
                    raise ValueError("the pieces do not make the chain's size")
                data = PyBytes_FromStringAndSize(NULL, size)
                d = <uint8_t *>PyBytes_AS_STRING(data)
                pos = 0
                for k in range(first, first + n):
                    memcpy(&place, p + k * PIECE + 8, 4)
                    memcpy(&length, p + k * PIECE + 6, 2)
                    memcpy(d + pos, base + place, length)
                    pos += length
            status = RSP_OKAY if ok else RSP_ERROR
            ident = ids[0]
            memcpy(a, &ident, 2)
            memcpy(a + 2, &status, 2)
            a += SLOT
            for k in range(extras):  # id 0, NETIF_RSP_NULL
                a[2] = RSP_NULL
                a += SLOT
            for i in ids[1:]:
                ident = i
                memcpy(a, &ident, 2)
                memcpy(a + 2, &status, 2)
                a += SLOT
            frames.append((data, flags, gso_type, gso_size))
        self.reset()
        return frames, answers

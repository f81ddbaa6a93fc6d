# The embedded xenstored's ring service pass, compiled.
#
# Theory of operation
# -------------------
# ``RingPass(mem)`` holds the xenstore page of one ring connection
# (``xenpv.xenstore.ringserver.RingConnection``) and ``serve(rc)`` runs one service pass of
# that connection in its common case, the compiled form of ``RingConnection._service``
# (its pure-Python twin, which the ring tests run as well): the page's ``connection`` is
# ``XS_CONNECTED``, nothing older waits (no buffered input, no held request, no unsent
# output or queued events, not paused or throttled, not closing or ignored), and the
# ``req`` ring holds only whole requests — at most a batch, none of a rate-limited type
# while the connection is limited, no length over 4096.  Then it takes them (``req``
# cons moves past them, a signal if the guest may wait), answers each READ outside a
# transaction of a path the connection already validated, naming a node it may read,
# itself (``Store.handle``'s fast path, compiled: ``_read``), hands every other request to
# ``Store.handle``, puts the replies into ``rsp`` (a signal if any went in; what does not
# fit goes to the connection's output, as the Python path keeps it), lets the server
# deliver the watch events the batch caused, and looks at ``req`` once more: more bytes
# schedule another pass on the loop's next turn, exactly as the Python path does.
#
# Calling the object is the port's event callback: one pass, then — with the server's
# ``spin`` set (``spin_us``, as for its sockets) — up to ``rounds - 1`` more, each after
# polling ``req`` (and ``connection``) for up to ``spin`` seconds, yielding the CPU
# between looks: a sequential guest's next request is then taken without an event
# delivery and without this process sleeping and being woken.  The guest's signal for
# it stays queued and later costs one look at an empty ring.
#
# Anything else returns False before a byte is consumed, and the caller runs the Python
# pass, which owns every such case: a reconnection, a corrupt index pair (it sets
# ``error`` and ignores the ring), a partial or oversized message, a full batch.  Index
# loads, barriers and copies follow ``cython/bytering.pyx``.  The page's layout (its
# ring size and offsets, ``XS_CONNECTED``) is ``xenpv.xenstore.page``'s and the message
# limits and types are ``xenpv.xenstore.wire``'s: taken from there into C globals when
# this module is imported, so the compiled and the Python pass read one definition.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

from heldbuf cimport drop_buffer, hold_buffer
from includes.barrier cimport xenpv_load_u32, xenpv_mb, xenpv_rmb, xenpv_store_u32, xenpv_wmb
from includes.barrier cimport xenpv_now_ns

from xenpv.errors import LocalError, PlatformError
from xenpv.xenstore import page as _page
from xenpv.xenstore import wire as _wire
from xenpv.xenstore.page import ERROR_RINGIDX
from xenpv.xenstore.store import READ as _PERM_READ


# The layout and the wire's limits, from their Python definitions (module comment).
cdef uint32_t RING = _page.RING_SIZE
cdef Py_ssize_t REQ = _page.REQ_OFFSET
cdef Py_ssize_t RSP = _page.RSP_OFFSET
cdef Py_ssize_t REQ_CONS = _page.REQ_CONS_OFFSET
cdef Py_ssize_t REQ_PROD = _page.REQ_PROD_OFFSET
cdef Py_ssize_t RSP_CONS = _page.RSP_CONS_OFFSET
cdef Py_ssize_t RSP_PROD = _page.RSP_PROD_OFFSET
cdef Py_ssize_t CONNECTION = _page.CONNECTION_OFFSET
cdef Py_ssize_t INTERFACE = _page.INTERFACE_SIZE
cdef uint32_t XS_CONNECTED = _page.XS_CONNECTED
cdef uint32_t PAYLOAD_MAX = _wire.PAYLOAD_MAX
cdef uint32_t XS_READ = _wire.XsType.READ


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef struct xsd_sockmsg:  # io/xs_wire.h; xenpv.xenstore.wire.HEADER
    uint32_t type
    uint32_t req_id
    uint32_t tx_id
    uint32_t len


cdef Py_ssize_t HEADER_SIZE = _wire.HEADER_SIZE
if sizeof(xsd_sockmsg) != HEADER_SIZE:
    raise ImportError("xsring: the message header differs from xenpv.xenstore.wire's")


cdef inline void _copy_out(const uint8_t *ring, uint32_t idx, uint8_t *dst,
                           uint32_t n) noexcept nogil:
    cdef uint32_t first = idx & (RING - 1)
    cdef uint32_t run = RING - first
    if run > n:
        run = n
    memcpy(dst, ring + first, run)
    if n > run:
        memcpy(dst + run, ring, n - run)


cdef inline void _copy_in(uint8_t *ring, uint32_t idx, const uint8_t *src,
                          uint32_t n) noexcept nogil:
    cdef uint32_t first = idx & (RING - 1)
    cdef uint32_t run = RING - first
    if run > n:
        run = n
    memcpy(ring + first, src, run)
    if n > run:
        memcpy(ring, src + run, n - run)


cdef class RingPass:
    """The compiled service pass of ring connection ``rc`` over its xenstore page ``mem``
    (module comment).  Calling it is the port's event callback."""

    cdef Py_buffer *_view
    cdef uint8_t *base
    cdef uint8_t *scratch  # RING bytes: the requests a pass takes
    cdef object rc
    cdef int rounds
    cdef object notify  # the events handle's notify (bound once)
    cdef long perm_read

    def __cinit__(self, *args, **kwargs):
        self._view = NULL
        self.base = NULL
        self.scratch = <uint8_t *>PyMem_Malloc(RING)
        if self.scratch == NULL:
            raise MemoryError()

    def __init__(self, rc, mem, int rounds=16):
        self.release()
        self.rounds = rounds
        self._view = hold_buffer(mem)
        if self._view.len < INTERFACE or (<size_t>self._view.buf) & 3:
            drop_buffer(&self._view)
            raise LocalError(f"a xenstore page needs {INTERFACE} aligned bytes")
        self.base = <uint8_t *>self._view.buf
        self.rc = rc
        self.notify = rc.service.events.notify
        self.perm_read = _PERM_READ

    def __dealloc__(self):
        drop_buffer(&self._view)
        PyMem_Free(self.scratch)

    def release(self) -> None:
        """Let go of the page and the connection (idempotent); passes then decline."""
        drop_buffer(&self._view)
        self.base = NULL
        self.rc = None
        self.notify = None

    def __call__(self) -> None:
        """An event on the port: ``RingConnection._on_event``'s compiled form, then (with
        the server's ``spin`` set) up to ``rounds - 1`` more passes, each after polling
        ``req`` that long for the guest's next request (yielding the CPU between looks)."""
        cdef object rc = self.rc
        cdef int r
        cdef double spin
        if rc is None:
            return
        stats = rc.stats
        stats["events"] += 1
        if not self.serve(rc):
            rc._service_general()
            return
        spin = rc.server.spin
        if spin <= 0:
            return
        for r in range(1, self.rounds):
            if not self._spin_wait(spin) or self.rc is None:
                return
            if not self.serve(rc):
                rc._service_general()
                return

    cdef bint _spin_wait(self, double spin) noexcept:
        """Poll ``req`` (and ``connection``) for up to ``spin`` seconds, yielding the CPU
        between looks; True when the guest published something."""
        cdef long long end = xenpv_now_ns() + <long long>(spin * 1e9)
        cdef uint8_t *base
        while True:
            with nogil:
                sched_yield()
            base = self.base
            if base == NULL:
                return False
            if (xenpv_load_u32(base + REQ_PROD) != xenpv_load_u32(base + REQ_CONS)
                    or xenpv_load_u32(base + CONNECTION) != XS_CONNECTED):
                return True
            if xenpv_now_ns() > end:
                return False

    cdef int _notify(self, object rc) except -1:
        """``RingConnection._notify``: signal the guest (a failure is not ours to report)."""
        cdef object port = rc.port
        if port < 0:
            return 0
        stats = rc.stats
        stats["notifies"] += 1
        try:
            self.notify(port)
        except PlatformError:
            pass
        return 0

    cdef object _read(self, object conn, object store, uint32_t req_id,
                      const uint8_t *payload, uint32_t n):
        """The reply to a READ outside a transaction, or None when ``Store.handle`` must
        answer it: ``Store.handle``'s fast path (the same lookups, in the same order),
        compiled.  Only a path already in the connection's cache, naming a node the
        connection may read, is answered here; anything else (an error to report, a path
        to validate first) goes to the store."""
        cdef object key, value
        cdef PyObject *path
        cdef PyObject *node
        cdef Py_ssize_t size
        cdef bytes reply
        cdef xsd_sockmsg h
        if conn.closed:
            return None
        key = PyBytes_FromStringAndSize(<const char *>payload, n)
        path = PyDict_GetItem(conn.path_cache, key)
        if path == NULL:
            return None
        node = PyDict_GetItem(store.nodes, <object>path)
        if node == NULL:
            return None
        if not conn.privileged and not (store.perm_for(conn, <object>node) & self.perm_read):
            return None
        value = (<object>node).value
        size = PyBytes_GET_SIZE(value)
        reply = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + size)
        h.type = XS_READ
        h.req_id = req_id
        h.tx_id = 0
        h.len = <uint32_t>size
        memcpy(PyBytes_AS_STRING(reply), &h, sizeof(h))
        memcpy(PyBytes_AS_STRING(reply) + HEADER_SIZE, PyBytes_AS_STRING(value), size)
        return reply

    cpdef bint serve(self, object rc) except -1:
        """One service pass of ring connection ``rc`` in the common case; False (nothing
        consumed) when the Python pass must run instead."""
        cdef uint8_t *base = self.base
        cdef uint8_t *buf = self.scratch
        cdef uint32_t prod, cons, used, rprod, rcons, rused, room, n
        cdef Py_ssize_t pos, end, count, batch, total
        cdef xsd_sockmsg h
        cdef object limited_types, handle, conn, server, store, reply
        cdef list out
        cdef bytes data
        if base == NULL:
            return False
        if (rc.closed or rc.ignored or not rc.reading or rc.closing or rc.out or rc.queue
                or rc.held is not None or rc.write_paused or rc.throttled
                or rc.decoder.buffered):
            return False
        if xenpv_load_u32(base + CONNECTION) != XS_CONNECTED:
            return False
        prod = xenpv_load_u32(base + REQ_PROD)
        cons = xenpv_load_u32(base + REQ_CONS)
        used = prod - cons
        if used > RING:
            return False  # corrupt: the Python pass reports it
        if used == 0:
            # A spurious event (the request was taken by an earlier pass): the Python
            # pass would find nothing to read, nothing to send and nothing to resume.
            store = rc.server.store
            if store.dirty or store.released:
                rc.server._after_batch()
            return True
        xenpv_rmb()  # the prod load comes before the data loads it covers
        _copy_out(base + REQ, cons, buf, used)
        # Only whole requests, within a batch and the rate limit, take this path.
        batch = rc.batch
        limited_types = rc.limited_types
        pos = 0
        count = 0
        while pos < used:
            if used - pos < HEADER_SIZE or count >= batch:
                return False
            memcpy(&h, buf + pos, sizeof(h))
            end = pos + HEADER_SIZE + <Py_ssize_t>h.len
            if h.len > PAYLOAD_MAX or end > used:
                return False
            if h.type in limited_types and rc.limited:
                return False
            pos = end
            count += 1
        xenpv_mb()  # finish reading the data before the guest may overwrite it
        xenpv_store_u32(base + REQ_CONS, prod)
        # The guest may have found the ring full (also after ``prod`` was sampled) and be
        # waiting for room: judged, as XsRingPage.read_wake does, from its index read
        # after ours was published.
        xenpv_mb()
        if <uint32_t>(xenpv_load_u32(base + REQ_PROD) - cons) >= RING:
            self._notify(rc)
        conn = rc.conn
        server = rc.server
        store = server.store
        handle = store.handle
        out = []
        pos = 0
        while pos < used:
            memcpy(&h, buf + pos, sizeof(h))
            reply = None
            if h.type == XS_READ and h.tx_id == 0:
                reply = self._read(conn, store, h.req_id, buf + pos + HEADER_SIZE, h.len)
            if reply is None:
                reply = handle(conn, h.type, h.req_id, h.tx_id,
                               PyBytes_FromStringAndSize(<char *>buf + pos + HEADER_SIZE,
                                                         h.len))
            out.append(reply)
            pos += HEADER_SIZE + <Py_ssize_t>h.len
        data = out[0] if len(out) == 1 else b"".join(out)
        if rc.closing or rc.closed or rc.out or self.base == NULL:
            rc.write(data)  # the batch changed the connection's state: the general rule
        else:
            total = PyBytes_GET_SIZE(data)
            rprod = xenpv_load_u32(base + RSP_PROD)
            rcons = xenpv_load_u32(base + RSP_CONS)
            rused = rprod - rcons
            if rused > RING:
                rc.write(data)  # corrupt: the Python write ignores the ring (RINGIDX)
            else:
                xenpv_mb()  # index loads before overwriting data the guest has released
                room = RING - rused
                n = room if total > room else <uint32_t>total
                _copy_in(base + RSP, rprod, <const uint8_t *>PyBytes_AS_STRING(data), n)
                xenpv_wmb()  # the guest must see the data before the index covering it
                xenpv_store_u32(base + RSP_PROD, rprod + n)
                if n:
                    self._notify(rc)
                if n < total:
                    rc._keep(data[n:])
        if store.dirty or store.released:
            server._after_batch()
        # As the Python pass: a guest that signals only when we had caught up may have
        # published more meanwhile; look again on the loop's next pass.
        if self.base != NULL and rc.reading and not (rc.closing or rc.closed):
            prod = xenpv_load_u32(base + REQ_PROD)
            cons = xenpv_load_u32(base + REQ_CONS)
            if prod - cons > RING:
                rc._ignore(ERROR_RINGIDX)
            elif prod != cons and not rc.scheduled:
                rc.loop.call_soon(rc._service)
        return True

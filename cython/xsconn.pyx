# The embedded xenstored's per-connection hot path, compiled.
#
# Theory of operation
# -------------------
# ``serve(xc, rounds)`` is the compiled form of the "direct" path of
# ``xenpv.xenstore.server._XsConnection`` (its pure-Python twin is
# ``_XsConnection._serve_direct``; both must behave the same, and the server tests run on
# both).  One *round* is: ``recv`` into the connection's reused buffer; walk the complete
# requests in it (the 16-byte header is the native-endian ``struct xsd_sockmsg`` of
# io/xs_wire.h), handing each to ``Store.handle``; ``send`` all the replies at once; let the
# server deliver the watch events the round caused.  Rounds repeat while every byte
# received was a whole request and every reply was taken by the socket, up to ``rounds``
# times, so a client that waits for each reply is served without going back to the event
# loop.  Anything else — a partial or oversized message, a rate-limited write, a full
# batch, a socket that did not take everything, end of file, an error — stops the walk and
# is returned to the Python code, which owns every such case:
#
#   (AGAIN,)                     nothing (more) to read
#   (DONE,)                      rounds used up, or the connection's state changed
#   (GENERAL, n, pos, replies)   bytes ``[pos:n]`` of the buffer need the general path;
#                                ``replies`` answer the bytes before ``pos`` (not sent)
#   (UNSENT, data)               the socket took only part of a round's replies
#   (EOF,)                       the client closed its side
#   (ERROR, errno)               recv or send failed

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint32_t
from libc.string cimport memcpy

from xenpv.xenstore import wire as _wire


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef Py_ssize_t _spin_recv(int fd, char *buf, size_t size, double spin) noexcept nogil:
    """Poll ``fd`` for up to ``spin`` seconds, yielding the CPU between tries; the
    receive's result (-1 with errno EAGAIN when nothing came)."""
    cdef double end = _now() + spin
    cdef Py_ssize_t n
    while True:
        sched_yield()
        n = recv(fd, buf, size, MSG_DONTWAIT)
        if n >= 0 or (errno != EAGAIN and errno != EINTR) or _now() > end:
            return n


cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL


cdef struct xsd_sockmsg:  # io/xs_wire.h; xenpv.xenstore.wire.HEADER
    uint32_t type
    uint32_t req_id
    uint32_t tx_id
    uint32_t len


cdef Py_ssize_t HEADER_SIZE = _wire.HEADER_SIZE
cdef uint32_t PAYLOAD_MAX = _wire.PAYLOAD_MAX

AGAIN = 0
DONE = 1
GENERAL = 2
UNSENT = 3
EOF = 4
ERROR = 5


def serve(object xc, int rounds):
    """Serve up to ``rounds`` receives of connection ``xc`` (see the module comment)."""
    cdef int fd = xc.fd
    cdef bytearray rbuf = xc.rbuf  # fixed size for the connection's life
    cdef char *buf = PyByteArray_AS_STRING(rbuf)
    cdef size_t size = PyByteArray_GET_SIZE(rbuf)
    cdef Py_ssize_t n, m, pos, end, count, sent, total
    cdef Py_ssize_t batch = xc.batch
    cdef xsd_sockmsg h
    cdef bint limited = xc.limited
    cdef object limited_types = xc.limited_types
    cdef object server = xc.server
    cdef object store = server.store
    cdef object handle = store.handle
    cdef object conn = xc.conn
    cdef list out
    cdef bytes data
    cdef const char *reply
    cdef int r
    cdef double spin = server.spin
    cdef bint served = False
    for r in range(rounds):
        with nogil:
            n = recv(fd, buf, size, MSG_DONTWAIT)
            if n < 0 and served and spin > 0 and (errno == EAGAIN or errno == EINTR):
                n = _spin_recv(fd, buf, size, spin)
        served = True
        if n < 0:
            if errno == EAGAIN or errno == EINTR:  # (EWOULDBLOCK is EAGAIN on Linux)
                return (AGAIN,)
            return (ERROR, errno)
        if n == 0:
            return (EOF,)
        if n >= HEADER_SIZE:
            memcpy(&h, buf, HEADER_SIZE)
        if n < HEADER_SIZE or (h.len <= PAYLOAD_MAX and n < HEADER_SIZE + <Py_ssize_t>h.len):
            # Only part of one request came.  libxenstore writes a request's header and
            # payload with two writes: let the writer finish (on a shared CPU it waits for
            # us) and read once more before going back to the loop.  (End of file here is
            # seen by the next read.)
            with nogil:
                sched_yield()
                m = recv(fd, buf + n, size - n, MSG_DONTWAIT)
            if m > 0:
                n += m
            elif m < 0 and errno != EAGAIN and errno != EINTR:
                return (ERROR, errno)
        out = []
        pos = 0
        count = 0
        while count < batch and n - pos >= HEADER_SIZE:
            memcpy(&h, buf + pos, HEADER_SIZE)
            end = pos + HEADER_SIZE + <Py_ssize_t>h.len
            if h.len > PAYLOAD_MAX or end > n or (limited and h.type in limited_types):
                break
            out.append(
                handle(
                    conn,
                    h.type,
                    h.req_id,
                    h.tx_id,
                    PyBytes_FromStringAndSize(buf + pos + HEADER_SIZE, h.len),
                )
            )
            pos = end
            count += 1
        if pos != n or count >= batch:
            return (GENERAL, n, pos, out)
        if count == 1:
            data = out[0]
        else:
            data = b"".join(out)
        total = PyBytes_GET_SIZE(data)
        reply = PyBytes_AS_STRING(data)
        with nogil:
            sent = send(fd, reply, total, MSG_DONTWAIT | MSG_NOSIGNAL)
        if sent < 0:
            if errno == EAGAIN or errno == EINTR:  # (EWOULDBLOCK is EAGAIN on Linux)
                sent = 0
            else:
                return (ERROR, errno)
        if sent < total:
            return (UNSENT, data[sent:])
        if store.dirty or store.released:
            server._after_batch()
        if xc.closing or not xc.reading or xc.out:
            return (DONE,)
    return (DONE,)

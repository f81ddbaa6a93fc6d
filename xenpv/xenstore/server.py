"""The embedded xenstored: an asyncio Unix-socket server around :class:`~.store.Store`.

Theory of operation
-------------------
Each listening socket belongs to one domain: every connection accepted on it acts as
that domain (dom0's socket is privileged).  Connections bypass asyncio's transports: each
is a non-blocking socket registered with ``loop.add_reader``.  One reader callback is the
whole hot path.  When nothing older waits, it takes the *direct path* (compiled in
``cython/xsconn.pyx``, with the pure-Python twin :meth:`_XsConnection._serve_direct`):
``recv`` into a reused buffer, hand every whole request in it to the store (a *batch*),
send the batch's replies in one ``send``, deliver the watch events it caused (one ``send``
per connection), and read again — at most ``_READ_AGAIN`` rounds per callback — because
a client that waits for each reply has usually sent the next request by then.  With
``spin_us`` set (``xenpv xenstored --spin-us``, default 50), a connection just answered is
polled that long, yielding the CPU between tries, before the callback returns: a
sequential client on another CPU then gets its next request taken without waking this
CPU from idle, the cost that dominates a cross-CPU round trip.  A receive
holding only part of one request yields the CPU once and reads again (libxenstore writes
header and payload separately).  Anything else goes through the general path: the
sans-IO :class:`~xenpv.xenstore.wire.Decoder` and :meth:`_XsConnection._process`.  Only
when a socket does not take everything is the rest kept and written by a writer callback
(``loop.add_writer``).

Bounds (hostile-inputs R11, scenarios 21-25):

* A payload over 4096 bytes (or any framing error) kills the connection at once.
* Connections: an unprivileged domain may hold ``connections`` open connections (64 by
  default); one more is accepted and closed at once.  Whatever the quotas, a guest's
  connection is also refused when the descriptor it got lies in the top
  ``_FD_RESERVE`` (64, or a quarter of the limit if that is less) of the process's
  descriptor limit: descriptors are handed out lowest first, so guests never hold the
  last ones and dom0 can always connect (issue 14, scenario 21).
* Outstanding replies: the unsent output of a domain connection may reach
  ``outstanding * (16 + 4096)`` bytes (1 MiB for dom0).  When the client stops reading
  and the backlog passes that mark, the connection stops reading and stops processing
  requests (backpressure) until the backlog drains to a quarter of it.
* Watch events for a connection whose buffer is full wait in a bounded queue: identical
  pending events are merged, the queue holds at most ``watch_events`` entries (newer
  ones are dropped beyond that) and entries older than ``watch_event_timeout`` expire.
* The undecoded input held per connection is bounded: reading pauses while more than
  64 KiB wait to be processed.
* A batch is at most ``outstanding`` requests for a domain (512 for dom0), and one
  reader callback serves at most ``_READ_AGAIN`` (16) receives, each one batch at most
  and each followed by at most one poll of ``spin_us``; then the loop runs the others,
  so one connection never starves them.
* WRITE-type requests of unprivileged domains pass a token bucket (``write_rate`` per
  second, ``write_burst`` deep; XSA-206), falling back on a reserve shared by all domains
  (``write_global_burst`` deep, refilled at the same rate); a domain with neither credit
  is paused, not refused.

State: with ``state_file`` the whole tree is loaded at start and saved atomically
(temporary file, fsync, rename, directory fsync) by :meth:`XenstoredServer.close`, and
every ``save_interval`` seconds while it changes.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import socket
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from xenpv.compiled import pure_python
from xenpv.errors import LocalError
from xenpv.pidlock import PidLock
from xenpv.xenstore.store import Connection, Quotas, Store
from xenpv.xenstore.wire import HEADER, HEADER_SIZE, PAYLOAD_MAX, Decoder, WireError, XsType

__all__ = ["XenstoredServer"]

log = logging.getLogger(__name__)

_DOM0_BATCH = 512
_MAX_BUFFERED_INPUT = 65536
_DOM0_HIGH_WATER = 1 << 20
_RECV_SIZE = 65536
#: Receive rounds one reader callback may take while every round is fully answered.
_READ_AGAIN = 16
_MAX_MESSAGE = HEADER_SIZE + PAYLOAD_MAX
# Results of one direct serve (xenpv.xenstore._xsconn and _XsConnection._serve_direct).
_AGAIN, _DONE, _GENERAL, _UNSENT, _EOF, _ERROR = range(6)
_BACKLOG = 128
_ACCEPT_BATCH = 32
_ACCEPT_PAUSE = 1.0
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Descriptors at the top of the process's limit that guests' connections never take.
_FD_RESERVE = 64
_WRITE_TYPES = frozenset({XsType.WRITE, XsType.MKDIR, XsType.RM, XsType.SET_PERMS})
_LIMITED_TYPES = _WRITE_TYPES | {XsType.TRANSACTION_END}


class _Bucket:
    """Token bucket of one domain's WRITE-type requests."""

    __slots__ = ("credit", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.credit = burst
        self.stamp = now

    def take(self, rate: float, burst: float, now: float) -> float:
        """Spend one token; return 0.0 if granted, else seconds until one is available."""
        self.credit = min(burst, self.credit + (now - self.stamp) * rate)
        self.stamp = now
        if self.credit >= 1.0:
            self.credit -= 1.0
            return 0.0
        return (1.0 - self.credit) / rate


class _XsConnection:
    """One client connection: a non-blocking socket driven by the loop's fd callbacks.

    The hot path is one reader callback: ``recv_into`` a reused buffer, decode and handle
    every complete request (up to a batch), and one ``send`` of all the replies.  Output
    the socket does not take at once is kept in :attr:`out` and written by a writer
    callback; past :attr:`high_water` bytes the connection stops reading and processing
    (backpressure) until the backlog drains to :attr:`low_water`.
    """

    #: Whether the connection counts against the ``connections`` quota (sockets do; a
    #: domain's one ring connection does not).
    counted = True

    def __init__(
        self,
        server: XenstoredServer,
        domid: int,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._init_state(server, domid, loop)

    def _init_state(
        self, server: XenstoredServer, domid: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Everything but the socket (a ring connection has none: see ``ringserver``)."""
        self.server = server
        self.domid = domid
        self.loop = loop
        self.decoder = Decoder(PAYLOAD_MAX)
        self.rbuf = bytearray(_RECV_SIZE)
        self.rview = memoryview(self.rbuf)
        #: Replies and events the socket has not taken yet.
        self.out = bytearray()
        self.conn: Connection | None = None
        self.reading = False
        self.writing = False
        self.closing = False  # close once ``out`` is flushed; no more processing
        self.closed = False
        self.write_paused = False
        self.throttled = False
        self.scheduled = False
        self.held: Any = None
        self.eof = False
        self.queue: OrderedDict[bytes, float] = OrderedDict()
        self.dropped_events = 0
        quotas = server.store.quotas
        privileged = domid == 0
        self.batch = _DOM0_BATCH if privileged or not quotas.outstanding else quotas.outstanding
        self.high_water = (
            _DOM0_HIGH_WATER
            if privileged or not quotas.outstanding
            else quotas.outstanding * (HEADER_SIZE + PAYLOAD_MAX)
        )
        self.low_water = self.high_water // 4
        self.limited_types = _LIMITED_TYPES

    @property
    def limited(self) -> bool:
        """Whether WRITE-type requests pass the rate limit (unprivileged, limit set now)."""
        return self.domid != 0 and self.server.store.quotas.write_rate > 0

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        """Attach to the store and start reading (drops the connection of a gone domain)."""
        store = self.server.store
        rec = store.domains.get(self.domid)
        if self.domid != 0 and (rec is None or not rec.introduced):
            self.abort()  # the domain does not exist (any more)
            return
        self.conn = store.connect(self.domid)
        self.server._register(self)
        self._resume_reading()

    def is_closing(self) -> bool:
        """True once the connection is closing or closed."""
        return self.closing or self.closed

    def close(self) -> None:
        """Stop processing; close the socket once the pending output is written."""
        if self.closed:
            return
        self.closing = True
        self._pause_reading()
        if not self.out:
            self.abort()

    def abort(self) -> None:
        """Close the socket at once, dropping pending output."""
        if self.closed:
            return
        self.closed = self.closing = True
        self.out.clear()
        self._pause_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        self.sock.close()
        # Like a transport's connection_lost: detach from the store on a later loop pass,
        # never in the middle of a batch or of an event delivery.
        self.loop.call_soon(self._lost)

    def _lost(self) -> None:
        if self.conn is not None:
            self.server._unregister(self)
            self.server.store.disconnect(self.conn)
        self.queue.clear()

    # -- socket I/O --------------------------------------------------------------------
    def _failed(self, exc: OSError) -> None:
        log.info("xenstore connection of domain %d failed: %s", self.domid, exc)
        self.abort()

    def _on_readable(self) -> None:
        if (
            self.decoder.buffered
            or self.held is not None
            or self.conn is None
            or self.write_paused
            or self.throttled
            or self.scheduled
            or self.out
        ):
            self._read_general()
            return
        # Nothing older is waiting: serve whole requests straight from the receive
        # buffer, and after answering everything received read again before returning
        # to the loop (at most _READ_AGAIN times): a client that waits for each reply
        # has usually sent its next request by the time the reply's send returns.
        result = _serve(self, _READ_AGAIN)
        status = result[0]
        if status <= _DONE:
            return
        if status == _GENERAL:
            _, n, pos, out = result
            if pos < n:
                self.decoder.feed(self.rview[pos:n])
            self._process(out)
        elif status == _UNSENT:
            self._keep(result[1])
            store = self.server.store
            if store.dirty or store.released:
                self.server._after_batch()
        elif status == _EOF:
            self._at_eof()
        else:
            self._failed(OSError(result[1], os.strerror(result[1])))

    def _read_general(self) -> None:
        """One receive for the general path (the decoder and :meth:`_process`)."""
        try:
            n = self.sock.recv_into(self.rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._failed(exc)
            return
        if not n:
            self._at_eof()
            return
        decoder = self.decoder
        decoder.feed(self.rview[:n])
        if decoder.buffered > _MAX_BUFFERED_INPUT:
            self._pause_reading()
        self._process()

    def _at_eof(self) -> None:
        # The client will send nothing more: answer what it sent, then close.
        self.eof = True
        self._pause_reading()
        self._process()

    def _serve_direct(self, rounds: int) -> tuple[Any, ...]:
        """Serve up to ``rounds`` receives straight from the receive buffer.

        The pure-Python twin of the compiled ``xenpv.xenstore._xsconn.serve`` (its
        module comment lists the results): complete requests are parsed in place and
        answered in one send per receive; the first one that needs the general path (a
        partial message, a bad length, a rate-limited write, a full batch) stops it.
        """
        sock, rbuf, rview = self.sock, self.rbuf, self.rview
        conn = self.conn
        assert conn is not None
        server = self.server
        store = server.store
        handle = store.handle
        unpack = HEADER.unpack_from
        limited = self.limited
        batch = self.batch
        spin = server.spin
        for r in range(rounds):
            try:
                n = sock.recv_into(rbuf)
            except (BlockingIOError, InterruptedError):
                n = -1
            except OSError as exc:
                return (_ERROR, exc.errno)
            if n < 0:
                if not (r and spin):
                    return (_AGAIN,)
                try:
                    n = _spin_recv(sock, rbuf, spin)
                except OSError as exc:
                    return (_ERROR, exc.errno)
                if n < 0:
                    return (_AGAIN,)
            if not n:
                return (_EOF,)
            if n < HEADER_SIZE or n < HEADER_SIZE + unpack(rbuf)[3] <= _MAX_MESSAGE:
                # Only part of one request came.  libxenstore writes a request's header
                # and payload with two writes: let the writer finish (on a shared CPU it
                # waits for us) and read once more before going back to the loop.
                os.sched_yield()
                try:
                    n += sock.recv_into(rview[n:])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    return (_ERROR, exc.errno)
            out: list[bytes] = []
            pos = 0
            while len(out) < batch and n - pos >= HEADER_SIZE:
                type_, req_id, tx_id, length = unpack(rbuf, pos)
                start = pos + HEADER_SIZE
                end = start + length
                if length > PAYLOAD_MAX or end > n or (limited and type_ in _LIMITED_TYPES):
                    break
                out.append(handle(conn, type_, req_id, tx_id, bytes(rview[start:end])))
                pos = end
            if pos != n or len(out) >= batch:
                return (_GENERAL, n, pos, out)
            data = out[0] if len(out) == 1 else b"".join(out)
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                return (_ERROR, exc.errno)
            if sent < len(data):
                return (_UNSENT, data[sent:])
            if store.dirty or store.released:
                server._after_batch()
            if self.closing or not self.reading or self.out:
                return (_DONE,)
        return (_DONE,)

    def write(self, data: bytes) -> None:
        """Send ``data`` now if the socket takes it, else keep it for the writer callback."""
        if self.is_closing():
            return
        out = self.out
        if not out:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._failed(exc)
                return
            if n == len(data):
                return
            self._keep(memoryview(data)[n:])
            return
        out += data
        if not self.write_paused and len(out) > self.high_water:
            self.write_paused = True
            self._pause_reading()

    def _keep(self, rest: bytes | memoryview) -> None:
        """Keep what the socket did not take (the output was empty) for the writer callback."""
        self.out += rest
        self.writing = True
        self.loop.add_writer(self.fd, self._on_writable)
        if not self.write_paused and len(self.out) > self.high_water:
            self.write_paused = True
            self._pause_reading()

    def _on_writable(self) -> None:
        out = self.out
        try:
            n = self.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._failed(exc)
            return
        del out[:n]
        if not out:
            self.writing = False
            self.loop.remove_writer(self.fd)
            if self.closing:
                self.abort()
                return
        if self.write_paused and len(out) <= self.low_water:
            self.write_paused = False
            self._flush_queue()
            self._schedule()

    def buffered_output(self) -> int:
        """Bytes written by the server that the client has not taken yet."""
        return len(self.out)

    # -- request processing ------------------------------------------------------------
    def _pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def _resume_reading(self) -> None:
        if not self.reading and not self.eof and not self.is_closing():
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._continue)

    def _continue(self) -> None:
        self.scheduled = False
        self._process()

    def _unthrottle(self) -> None:
        self.throttled = False
        self._process()

    def _process(self, out: list[bytes] | None = None) -> None:
        """Handle a batch of decoded requests (after ``out``, replies already made)."""
        conn = self.conn
        if out is None:
            out = []
            if conn is None or self.is_closing() or self.write_paused or self.throttled:
                return
        assert conn is not None
        server = self.server
        store = server.store
        handle = store.handle
        next_message = self.decoder.next_message
        limited = self.limited
        more = False
        try:
            for _ in range(self.batch - len(out)):
                msg = self.held
                if msg is None:
                    msg = next_message()
                    if msg is None:
                        break
                else:
                    self.held = None
                type_ = msg.type
                if limited and (
                    (type_ in _WRITE_TYPES and not msg.tx_id)
                    or (type_ == XsType.TRANSACTION_END and msg.payload[:1] == b"T")
                ):
                    wait = server._debit(self.domid)
                    if wait:
                        self.held = msg
                        self.throttled = True
                        server.throttles[self.domid] = server.throttles.get(self.domid, 0) + 1
                        self.loop.call_later(wait, self._unthrottle)
                        break
                out.append(handle(conn, type_, msg.req_id, msg.tx_id, msg.payload))
            else:
                more = True
        except WireError as exc:
            log.info("xenstore connection of domain %d dropped: %s", self.domid, exc)
            if out:
                self.write(b"".join(out))
            self.abort()
            server._after_batch()
            return
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))
        if store.dirty or store.released:
            server._after_batch()
        if self.is_closing():
            return
        if more and not self.write_paused:
            self._schedule()
        elif self.eof and not more and self.held is None and not self.throttled:
            if not self.write_paused:
                self._flush_queue()
            self.close()  # flushes what is buffered first
        elif (
            not self.write_paused
            and not self.throttled
            and self.decoder.buffered <= _MAX_BUFFERED_INPUT
        ):
            self._resume_reading()

    # -- watch events ------------------------------------------------------------------
    def send_events(self, events: list[bytes]) -> None:
        """Deliver encoded watch events, queueing (bounded) while the client lags."""
        if self.is_closing():
            return
        if not self.write_paused and not self.queue:
            self.write(b"".join(events))
            return
        quotas = self.server.store.quotas
        now = time.monotonic()
        queue = self.queue
        self._expire(now)
        for event in events:
            if event in queue:
                continue  # identical pending event: merged
            if quotas.watch_events and len(queue) >= quotas.watch_events:
                self.dropped_events += 1
                continue
            queue[event] = now

    def _expire(self, now: float) -> None:
        timeout = self.server.store.quotas.watch_event_timeout
        queue = self.queue
        if not timeout:
            return
        while queue:
            event, stamp = next(iter(queue.items()))
            if now - stamp <= timeout:
                break
            del queue[event]
            self.dropped_events += 1

    def _flush_queue(self) -> None:
        if not self.queue or self.is_closing():
            return
        self._expire(time.monotonic())
        data = b"".join(self.queue)
        self.queue.clear()
        if data:
            self.write(data)


class XenstoredServer:
    """An embedded xenstored serving one or more Unix sockets (see the module docstring)."""

    def __init__(
        self,
        *,
        quotas: Quotas | None = None,
        state_file: str | os.PathLike[str] | None = None,
        always_eagain: bool = False,
        save_interval: float = 0.0,
        spin_us: float = 0.0,
        platform: Any = None,
    ) -> None:
        """Create the server; with ``state_file`` an existing saved tree is loaded.

        The tree is saved at :meth:`close`, and also every ``save_interval`` seconds
        (when positive) if it changed since the last save, so a daemon that is killed
        loses at most that much.  Raises :class:`~xenpv.errors.LocalError` if the state
        file cannot be used.

        ``spin_us``: after answering a connection, poll it this many microseconds
        (yielding the CPU between tries) before going back to the event loop, so a
        client's next request is taken without a wake-up (see the module docstring).

        ``platform``: dom0's platform; with it, ``INTRODUCE`` maps the domain's xenstore
        page and binds its port, and the domain is served over its ring too
        (:mod:`xenpv.xenstore.ringserver`).  The server uses it from its event loop and
        does not close it.
        """
        self.quotas = quotas if quotas is not None else Quotas()
        self.state_file = os.fspath(state_file) if state_file is not None else None
        self.store = self._load()
        self.store.always_eagain = always_eagain
        self._listeners: list[tuple[socket.socket, str]] = []
        #: The lock file of each socket served (``<socket>.lock``, see :meth:`listen`).
        self._locks: dict[str, PidLock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._protocols: dict[Connection, _XsConnection] = {}
        #: Open connections per domid (what the ``connections`` quota counts).
        self._open: dict[int, int] = {}
        #: Connections refused per domid (connection quota or descriptor reserve).
        self.refused: dict[int, int] = {}
        self._buckets: dict[int, _Bucket] = {}
        self._reserve: _Bucket | None = None
        #: How often each domain was paused by the write rate limit.
        self.throttles: dict[int, int] = {}
        self._closed = False
        self.save_interval = save_interval
        #: Seconds a connection is polled after answering it (0: not at all).
        self.spin = max(0.0, spin_us) / 1e6
        self._saved: object = self._fingerprint()
        self._save_timer: asyncio.TimerHandle | None = None
        #: Dom0's end of the guests' rings (None: sockets only).
        self.rings: Any = None
        if platform is not None:
            from xenpv.xenstore.ringserver import RingService

            self.rings = RingService(self, platform)
            self.store.on_introduce = self.rings.introduce

    def _load(self) -> Store:
        path = self.state_file
        if path is None or not os.path.exists(path):
            return Store(self.quotas)
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            return Store.from_state(state, self.quotas)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise LocalError(f"xenstore state file {path} is unusable: {exc!r}") from None

    # -- sockets -----------------------------------------------------------------------
    async def listen(self, path: str, domid: int = 0) -> None:
        """Serve ``path``; every connection on it acts as ``domid`` (introduced if needed).

        The socket is owned through the lock file ``<path>.lock`` (see
        :mod:`xenpv.pidlock`): if a live process serves ``path`` this raises
        :class:`~xenpv.pidlock.InUseError` naming it and touches nothing; a socket left by
        a process that is gone is replaced.
        """
        lock = PidLock(f"{path}.lock", f"xenstore socket {path}")
        lock.acquire()
        try:
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # stale socket of an earlier run
            except FileNotFoundError:
                pass
            loop = self._loop = asyncio.get_running_loop()
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                lsock.setblocking(False)
                lsock.bind(path)
                lsock.listen(_BACKLOG)
            except BaseException:
                lsock.close()
                raise
        except BaseException:
            lock.release()
            raise
        self._locks[path] = lock
        if domid != 0:
            self.introduce_domain(domid)
        loop.add_reader(lsock.fileno(), self._accept, lsock, domid)
        self._listeners.append((lsock, path))
        if self.state_file and self.save_interval > 0 and self._save_timer is None:
            self._save_timer = loop.call_later(self.save_interval, self._periodic_save)

    def _accept(self, lsock: socket.socket, domid: int) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    # Out of descriptors or memory: stop accepting for a while instead of
                    # spinning on a listening socket that stays readable.
                    log.warning("xenstored cannot accept connections: %s", exc)
                    loop.remove_reader(lsock.fileno())
                    loop.call_later(_ACCEPT_PAUSE, self._resume_accept, lsock, domid)
                    return
                log.info("xenstored accept failed: %s", exc)
                return
            if domid != 0 and not self._admit(domid, sock):
                continue
            sock.setblocking(False)
            _XsConnection(self, domid, sock, loop).start()

    def _admit(self, domid: int, sock: socket.socket) -> bool:
        """Whether a new connection of unprivileged ``domid`` may be served (see the
        module docstring); a refused one is closed at once."""
        why = ""
        limit = self.quotas.connections
        if limit and self._open.get(domid, 0) >= limit:
            why = f"it has {limit} connections (quota)"
        else:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft != resource.RLIM_INFINITY and sock.fileno() >= soft - min(
                _FD_RESERVE, soft // 4
            ):
                why = "descriptors are running out (kept for dom0)"
        if not why:
            return True
        sock.close()
        count = self.refused[domid] = self.refused.get(domid, 0) + 1
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th … refusal: bounded logging
            log.warning(
                "xenstored refused a connection of domain %d: %s (%d refused)", domid, why, count
            )
        return False

    def _resume_accept(self, lsock: socket.socket, domid: int) -> None:
        if self._loop is not None and lsock.fileno() >= 0:
            self._loop.add_reader(lsock.fileno(), self._accept, lsock, domid)

    def _close_listener(self, lsock: socket.socket, path: str) -> None:
        if lsock.fileno() >= 0 and self._loop is not None:
            self._loop.remove_reader(lsock.fileno())
        lsock.close()
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        lock = self._locks.pop(path, None)
        if lock is not None:
            lock.release()

    async def unlisten(self, path: str) -> None:
        """Stop serving ``path`` and remove it (its open connections stay; no-op if unknown)."""
        keep = []
        for lsock, spath in self._listeners:
            if spath != path:
                keep.append((lsock, spath))
                continue
            self._close_listener(lsock, spath)
        self._listeners = keep

    async def close(self, *, save: bool = True) -> None:
        """Stop listening, drop every connection, remove the sockets and save the state
        (unless ``save`` is false)."""
        if self._closed:
            return
        self._closed = True
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
        for lsock, path in self._listeners:
            self._close_listener(lsock, path)
        self._listeners.clear()
        for proto in list(self._protocols.values()):
            proto.abort()
        if self.rings is not None:
            self.rings.close()
        await asyncio.sleep(0)
        if save:
            self.save_state()

    def _fingerprint(self) -> object:
        """What a save records, in brief: the generation counter (bumped by every node
        and permission change) and the domain records."""
        store = self.store
        domains = tuple((r.domid, r.gen, r.introduced, r.target) for r in store.domains.values())
        return (store.generation, domains)

    def _periodic_save(self) -> None:
        self._save_timer = None
        if self._closed or self._loop is None:
            return
        if self._fingerprint() != self._saved:
            try:
                self.save_state()
            except OSError as exc:  # keep serving; the next interval tries again
                log.error("xenstored could not save its state to %s: %s", self.state_file, exc)
        self._save_timer = self._loop.call_later(self.save_interval, self._periodic_save)

    def save_state(self) -> None:
        """Write the tree to ``state_file`` atomically (no-op without a state file)."""
        path = self.state_file
        if path is None:
            return
        self._saved = self._fingerprint()
        tmp = f"{path}.tmp"
        data = json.dumps(self.store.to_state(), separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- domains -----------------------------------------------------------------------
    def introduce_domain(self, domid: int) -> None:
        """Introduce ``domid`` (fires ``@introduceDomain`` the first time)."""
        self.store.introduce_domain(domid)
        self._after_batch()

    def release_domain(self, domid: int) -> None:
        """Release ``domid``: its nodes go, its connections close, ``@releaseDomain`` fires."""
        self.store.release_domain(domid)
        self._after_batch()

    # -- accounting queries ------------------------------------------------------------
    def connection_count(self, domid: int | None = None) -> int:
        """Number of open connections (of ``domid`` if given)."""
        return sum(1 for c in self._protocols if domid is None or c.domid == domid)

    def node_count(self, domid: int) -> int:
        """Nodes owned by ``domid``."""
        return self.store.node_count(domid)

    def watch_count(self, domid: int) -> int:
        """Watches registered by ``domid``."""
        return self.store.watch_count(domid)

    def transaction_count(self, domid: int) -> int:
        """Open transactions of ``domid``."""
        return self.store.transaction_count(domid)

    def queued_events(self, domid: int) -> int:
        """Watch events waiting for ``domid``'s clients to read."""
        return sum(len(p.queue) for c, p in self._protocols.items() if c.domid == domid)

    def dropped_events(self, domid: int | None = None) -> int:
        """Watch events dropped or expired for open connections (of ``domid`` if given)."""
        return sum(
            p.dropped_events
            for c, p in self._protocols.items()
            if domid is None or c.domid == domid
        )

    def buffered_bytes(self, domid: int) -> int:
        """Bytes held for ``domid``'s connections: unsent output, queued events, unparsed input."""
        total = 0
        for conn, proto in self._protocols.items():
            if conn.domid == domid:
                total += proto.buffered_output() + proto.decoder.buffered
                total += sum(len(event) for event in proto.queue)
        return total

    # -- internals ---------------------------------------------------------------------
    def _register(self, proto: _XsConnection) -> None:
        assert proto.conn is not None
        self._protocols[proto.conn] = proto
        if proto.counted:
            self._open[proto.domid] = self._open.get(proto.domid, 0) + 1

    def _unregister(self, proto: _XsConnection) -> None:
        assert proto.conn is not None
        if self._protocols.pop(proto.conn, None) is not None and proto.counted:
            left = self._open[proto.domid] - 1
            if left:
                self._open[proto.domid] = left
            else:
                del self._open[proto.domid]

    def _debit(self, domid: int) -> float:
        """Charge one write to ``domid``: 0.0 if allowed now, else seconds to wait."""
        q = self.quotas
        now = time.monotonic()
        bucket = self._buckets.get(domid)
        if bucket is None:
            bucket = self._buckets[domid] = _Bucket(q.write_burst, now)
        wait = bucket.take(q.write_rate, q.write_burst, now)
        if wait and q.write_global_burst:
            if self._reserve is None:
                self._reserve = _Bucket(q.write_global_burst, now)
            wait = min(wait, self._reserve.take(q.write_rate, q.write_global_burst, now))
        return wait

    def _after_batch(self) -> None:
        store = self.store
        if store.dirty:
            dirty = store.dirty
            store.dirty = set()
            for conn in dirty:
                events = conn.events
                if not events:
                    continue
                conn.events = []
                proto = self._protocols.get(conn)
                if proto is not None:
                    proto.send_events(events)
        if store.released:
            released = set(store.released)
            store.released.clear()
            for domid in released:
                self._buckets.pop(domid, None)
            for conn, proto in list(self._protocols.items()):
                if conn.domid in released:
                    proto.abort()


def _spin_recv(sock: socket.socket, rbuf: bytearray, spin: float) -> int:
    """Poll ``sock`` for up to ``spin`` seconds, yielding the CPU between tries; the
    number of bytes received, or -1 when nothing came."""
    end = time.monotonic() + spin
    while True:
        os.sched_yield()
        try:
            return sock.recv_into(rbuf)
        except (BlockingIOError, InterruptedError):
            if time.monotonic() > end:
                return -1


def _compiled_serve() -> Callable[[_XsConnection, int], tuple[Any, ...]] | None:
    """The compiled direct path, unless it is missing or ``XENPV_PURE_PYTHON=1``."""
    if pure_python():
        return None
    try:
        from xenpv.xenstore import _xsconn
    except ImportError:
        return None
    codes = (
        _xsconn.AGAIN,
        _xsconn.DONE,
        _xsconn.GENERAL,
        _xsconn.UNSENT,
        _xsconn.EOF,
        _xsconn.ERROR,
    )
    if codes != (_AGAIN, _DONE, _GENERAL, _UNSENT, _EOF, _ERROR):
        raise ImportError("xenpv.xenstore._xsconn does not match this server")
    serve: Callable[[_XsConnection, int], tuple[Any, ...]] = _xsconn.serve
    return serve


_serve = _compiled_serve() or _XsConnection._serve_direct
#: Which direct path serves connections: ``"cython"`` or ``"python"``.
SERVE_IMPL = "python" if _serve is _XsConnection._serve_direct else "cython"

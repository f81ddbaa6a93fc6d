"""Asyncio xenstore client.

Theory of operation
-------------------
One :class:`XenstoreClient` owns one connection to a xenstore server: a Unix stream socket
(dom0's ``xenstored`` socket, or an emulated domain's own endpoint, whose connections act
as that domain) or the ``/dev/xen/xenbus`` device, which carries the same framing.  The
connection is an :class:`asyncio.BufferedProtocol` on a minimal fd transport (the loop's
reader callback reads into one reused buffer; writes go straight to the fd): bytes
received go into the sans-IO :class:`~xenpv.xenstore.wire.Decoder`, and every complete
message is dispatched at once, so there is exactly one reader and no extra task per
request.  Request timeouts share one timer (a deadline heap), not one timer each.

Requests are pipelined.  Each gets a fresh ``req_id`` and a future in ``_pending``;
the reply (same type, or ``ERROR``) with that ``req_id`` resolves the future
(io/xs_wire.h: "the reply has the same req_id and tx_id").  Watch events
(``WATCH_EVENT``, req_id 0) are routed by token to the :class:`Watch` objects registered
under that token; each watch keeps a bounded, de-duplicated set of pending events.

Failure rules:

* an ``ERROR`` reply raises :class:`~xenpv.xenstore.wire.XenstoreError` in the caller only;
* a malformed message (bad framing, unknown ``req_id``, wrong reply type or tx_id,
  unparsable payload) is a :class:`~xenpv.xenstore.wire.WireError` (a PeerError): the
  connection is closed and every pending request and watch fails with it;
* connection loss fails every pending request and watch with
  :class:`XenstoreConnectionError`; nothing waits forever;
* every request accepts ``timeout`` (seconds); a timed-out request raises
  :class:`TimeoutError` and its late reply, if any, is discarded.

Relative paths are passed through unchanged: the server resolves them against the
connection's domain (xen-protocols.md §4.1).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TypeVar

from xenpv.errors import LocalError
from xenpv.xenstore import ops, wire
from xenpv.xenstore import paths as _paths
from xenpv.xenstore.blocking import BlockingClient, BlockingTransaction
from xenpv.xenstore.ops import (
    DEFAULT_RUNDIR,
    XENBUS_DEVICES,
    InvalidPermError,
    Perm,
    WatchEvent,
    XenstoreConnectionError,
    daemon_socket_path,
    encode_path,
)
from xenpv.xenstore.wire import WireError, XenstoreError, XsType

__all__ = [
    "DEFAULT_RUNDIR",
    "XENBUS_DEVICES",
    "BlockingClient",
    "BlockingTransaction",
    "InvalidPermError",
    "Perm",
    "Transaction",
    "Watch",
    "WatchEvent",
    "XenstoreClient",
    "XenstoreConnectionError",
    "connect",
    "daemon_socket_path",
]

T = TypeVar("T")

#: Timed-out request ids remembered so that their late replies are ignored.
_EXPIRED_MEMORY = 4096
#: Answered requests the deadline heap may hold beyond twice the pending ones.
_DEADLINE_SLACK = 64
#: Pending requests below which cancelled ones are not swept out.
_SWEEP_MIN = 256


class _Connection(asyncio.BufferedProtocol):
    """The protocol object: request table, decoder and watch routing of one connection.

    A buffered protocol: the transport reads into one reused buffer, which spares the
    allocation of a fresh bytes object per read.
    """

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self._write: Callable[[bytes], object] | None = None
        self._decoder = wire.Decoder()
        self._rbuf = bytearray(65536)
        self._rview = memoryview(self._rbuf)
        self._pending: dict[int, tuple[asyncio.Future[bytes], int, int]] = {}
        self._expired: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self.watches: dict[str, list[Watch]] = {}
        self.error: BaseException | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._deadlines: list[tuple[float, int, asyncio.Future[bytes]]] = []
        self._queued: list[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sweep_at = _SWEEP_MIN

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._write = transport.write  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rview[:nbytes])

    def data_received(self, data: bytes | bytearray | memoryview) -> None:
        decoder = self._decoder
        decoder.feed(data)
        try:
            while True:
                msg = decoder.next_message()
                if msg is None:
                    return
                self._dispatch(msg)
        except WireError as exc:
            self.fail(exc)

    def eof_received(self) -> bool | None:
        self.fail(XenstoreConnectionError("xenstore server closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.fail(XenstoreConnectionError("xenstore connection closed"))
        else:
            err = XenstoreConnectionError(f"xenstore connection lost: {exc}", _errno_of(exc))
            err.__cause__ = exc
            self.fail(err)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- dispatch -----------------------------------------------------------------------

    def _dispatch(self, msg: wire.Message) -> None:
        if msg.type == XsType.WATCH_EVENT:
            self._watch_event(msg.payload)
            return
        entry = self._pending.pop(msg.req_id, None)
        if entry is None:
            if msg.req_id in self._expired:
                del self._expired[msg.req_id]
                return
            raise WireError(f"xenstore reply to unknown req_id {msg.req_id} (type {msg.type})")
        fut, req_type, tx_id = entry
        if msg.type == req_type and msg.tx_id == tx_id:
            if not fut.done():
                fut.set_result(msg.payload)
            return
        exc = ops.reply_error(req_type, tx_id, msg)
        if exc is not None and not fut.done():
            fut.set_exception(exc)
        if isinstance(exc, WireError):
            raise exc

    def _watch_event(self, payload: bytes) -> None:
        event = ops.parse_watch_event(payload)
        for w in self.watches.get(event.token, ()):
            if ops.watch_fires(w.path, event.path):  # one token may watch several paths
                w._deliver(event)

    # -- requests -----------------------------------------------------------------------

    def submit(self, type_: int, payload: bytes, tx_id: int = 0) -> asyncio.Future[bytes]:
        """Send one request; return the future of its reply payload."""
        return self._submit(type_, payload, tx_id)[1]

    def _submit(self, type_: int, payload: bytes, tx_id: int) -> tuple[int, asyncio.Future[bytes]]:
        if self.error is not None:
            raise self.error
        req_id = next(self._ids) & 0xFFFFFFFF
        while req_id == 0 or req_id in self._pending:  # wrapped around: skip ids in use
            req_id = next(self._ids) & 0xFFFFFFFF
        data = wire.encode(type_, req_id, tx_id, payload)
        fut: asyncio.Future[bytes] = self._loop.create_future()
        pending = self._pending
        if len(pending) >= self._sweep_at:
            self._sweep()
        # A lone request leaves at once.  Requests made while others are in flight are
        # gathered until the loop's next pass and leave in one write (in order): a
        # window of pipelined requests costs the server one wake-up, not one each.
        queued = self._queued
        if queued is not None:
            queued.append(data)
        elif pending:
            self._queued = [data]
            self._loop.call_soon(self._flush)
        else:
            assert self._write is not None
            self._write(data)
        pending[req_id] = (fut, type_, tx_id)
        return req_id, fut

    def _sweep(self) -> None:
        """Forget requests whose callers gave up (cancelled futures): their late replies
        are discarded like a timed-out request's.  Runs when the table has doubled since
        the last sweep, so it costs O(1) per request and the table stays bounded by twice
        the requests really outstanding."""
        pending = self._pending
        for req_id in [r for r, entry in pending.items() if entry[0].cancelled()]:
            del pending[req_id]
            self._remember_expired(req_id)
        self._sweep_at = max(_SWEEP_MIN, 2 * len(pending))

    def _remember_expired(self, req_id: int) -> None:
        self._expired[req_id] = None
        while len(self._expired) > _EXPIRED_MEMORY:
            self._expired.popitem(last=False)

    def _flush(self) -> None:
        queued, self._queued = self._queued, None
        if queued and self.error is None and self._write is not None:
            self._write(b"".join(queued))

    def call(
        self, type_: int, payload: bytes, tx_id: int = 0, timeout: float | None = None
    ) -> asyncio.Future[bytes]:
        """Send one request; return the future of its reply, failing after ``timeout`` s.

        Deadlines share one timer: each request pushes ``(deadline, req_id, future)`` on a
        heap and the timer is armed for the earliest one, so a request costs no timer
        handle of its own.  Answered requests leave the heap lazily (when their deadline
        comes, or when the heap is compacted because it outgrew the pending table).
        """
        req_id, fut = self._submit(type_, payload, tx_id)
        if timeout is not None:
            deadline = self._loop.time() + timeout
            heap = self._deadlines
            heapq.heappush(heap, (deadline, req_id, fut))
            if len(heap) > 2 * len(self._pending) + _DEADLINE_SLACK:
                self._deadlines = heap = [e for e in heap if not e[2].done()]
                heapq.heapify(heap)
            timer = self._timer
            if timer is None or deadline < timer.when():
                if timer is not None:
                    timer.cancel()
                self._timer = self._loop.call_at(deadline, self._on_deadline)
        return fut

    def _on_deadline(self) -> None:
        self._timer = None
        heap = self._deadlines
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            _, req_id, fut = heapq.heappop(heap)
            if not fut.done():
                self._expire(req_id, fut)
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        if heap:
            self._timer = self._loop.call_at(heap[0][0], self._on_deadline)

    def _expire(self, req_id: int, fut: asyncio.Future[bytes]) -> None:
        if self._pending.pop(req_id, None) is not None:
            self._remember_expired(req_id)
        if not fut.done():
            fut.set_exception(TimeoutError(f"xenstore request {req_id} timed out"))

    def fail(self, exc: BaseException) -> None:
        """Close the connection and fail everything pending with ``exc`` (first one wins)."""
        if self.error is None:
            self.error = exc
        pending, self._pending = self._pending, {}
        for fut, _, _ in pending.values():
            if not fut.done():
                fut.set_exception(self.error)
        for watches in list(self.watches.values()):
            for w in watches:
                w._fail(self.error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines = []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _errno_of(exc: BaseException) -> int | None:
    return exc.errno if isinstance(exc, OSError) else None


class _Transport(asyncio.Transport):
    """What the client's transports (over a descriptor here, over a xenstore ring in
    :mod:`xenpv.xenstore.ring`) share: the protocol, the bytes written and not yet taken
    by the other side (``_out``), and closing once — let go of what the transport holds
    (:meth:`_let_go`), then tell the protocol on the loop's next turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 protocol: asyncio.BufferedProtocol) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._out = bytearray()
        self._closing = False

    def get_write_buffer_size(self) -> int:
        """Bytes written that the other side has not taken yet."""
        return len(self._out)

    def is_closing(self) -> bool:
        """True once closed."""
        return self._closing

    def close(self) -> None:
        """Let go of the connection and tell the protocol."""
        self._close(None)

    def _close(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._let_go()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def _let_go(self) -> None:
        """Release what the transport holds (once, as it closes)."""
        raise NotImplementedError


class _FdTransport(_Transport):
    """Minimal transport over a file descriptor: a connected Unix socket or a character
    device (``/dev/xen/xenbus``, a pty …).

    It is the client's hot path, so it skips asyncio's stream transports: the loop's
    reader callback reads straight into the protocol's reused buffer (``readv``) and
    a write goes to the fd at once, buffered (``add_writer``) only when the fd is full.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: _Connection) -> None:
        super().__init__(loop, protocol)
        self._fd = fd
        self._rbufs = [protocol.get_buffer(-1)]
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)
        protocol.connection_made(self)

    def _on_readable(self) -> None:
        try:
            n = os.readv(self._fd, self._rbufs)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(exc)
            return
        if not n:
            self._protocol.eof_received()
            self._close(None)
            return
        self._protocol.buffer_updated(n)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; written at once when the device accepts it."""
        if self._closing:
            return
        if not self._out:
            try:
                n = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._close(exc)
                return
            if n == len(data):
                return
            data = data[n:]
            self._loop.add_writer(self._fd, self._on_writable)
        self._out += data

    def _on_writable(self) -> None:
        try:
            n = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(exc)
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._fd)

    def _let_go(self) -> None:
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        os.close(self._fd)


#: Seconds a connect keeps retrying while the server's listen backlog is full.
CONNECT_BACKLOG_WAIT = 30.0


async def _connect_unix(loop: asyncio.AbstractEventLoop, path: str) -> int:
    """Connect a non-blocking Unix stream socket to ``path``; return its fd.

    A Unix socket never connects in the background: ``EAGAIN`` means the server's listen
    backlog is full (C xenstored listens with a backlog of 1), and the socket stays
    unconnected, so waiting for it to become writable (``loop.sock_connect``) would take
    it for connected.  The connect is tried again instead, with a growing pause, for at
    most :data:`CONNECT_BACKLOG_WAIT` seconds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        deadline = loop.time() + CONNECT_BACKLOG_WAIT
        pause = 0.001
        while True:
            try:
                sock.connect(path)
                break
            except (BlockingIOError, InterruptedError):
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


class _Ops:
    """Node operations shared by the client (tx_id 0) and transactions.

    Each runs one sans-IO operation of :mod:`xenpv.xenstore.ops` on the connection
    (:meth:`_run`); READ, the hot one, skips the generator.
    """

    _conn: _Connection
    _tx_id: int = 0
    default_timeout: float | None = None

    def _check_open(self) -> None:
        """Hook for transactions to refuse use after their end."""

    async def _run(self, op: ops.Op[T], timeout: float | None, tx_id: int | None = None) -> T:
        """Drive ``op`` to its result: each request it yields goes out in this
        transaction (or ``tx_id``); replies go back in, ERROR replies are thrown in.  A
        reply the operation finds malformed closes the connection."""
        self._check_open()
        conn = self._conn
        tx = self._tx_id if tx_id is None else tx_id
        if timeout is None:
            timeout = self.default_timeout
        try:
            type_, payload = next(op)
            while True:
                try:
                    reply = await conn.call(type_, payload, tx, timeout)
                except XenstoreError as exc:
                    type_, payload = op.throw(exc)
                else:
                    type_, payload = op.send(reply)
        except StopIteration as stop:
            return stop.value
        except WireError as exc:
            conn.fail(exc)
            raise

    async def read(self, path: str, *, timeout: float | None = None) -> bytes:
        """Return the value of ``path`` (raw bytes)."""
        self._check_open()
        return await self._conn.call(
            XsType.READ,
            encode_path(path),
            self._tx_id,
            self.default_timeout if timeout is None else timeout,
        )

    async def write(self, path: str, value: bytes | str, *, timeout: float | None = None) -> None:
        """Set ``path`` to ``value`` (creating missing parents)."""
        await self._run(ops.write(path, value), timeout)

    async def mkdir(self, path: str, *, timeout: float | None = None) -> None:
        """Create ``path`` (and parents) if missing; existing values are untouched."""
        await self._run(ops.mkdir(path), timeout)

    async def rm(self, path: str, *, timeout: float | None = None) -> None:
        """Remove ``path`` and its subtree (no error if it is absent but its parent exists)."""
        await self._run(ops.rm(path), timeout)

    async def exists(self, path: str, *, timeout: float | None = None) -> bool:
        """Return whether ``path`` exists (ENOENT → False; other errors raise)."""
        return await self._run(ops.exists(path), timeout)

    async def directory(self, path: str, *, timeout: float | None = None) -> list[str]:
        """Return the names of the children of ``path``.

        Falls back to ``DIRECTORY_PART`` when the full list does not fit in one reply
        (the server answers ``E2BIG``).
        """
        return await self._run(ops.directory(path), timeout)

    async def get_perms(self, path: str, *, timeout: float | None = None) -> list[Perm]:
        """Return the permission list of ``path`` (entry 0 is the owner)."""
        return await self._run(ops.get_perms(path), timeout)

    async def set_perms(
        self, path: str, perms: Iterable[Perm | str], *, timeout: float | None = None
    ) -> None:
        """Replace the permission list of ``path`` (first entry names the owner)."""
        await self._run(ops.set_perms(path, perms), timeout)


class Transaction(ops.TransactionLife, _Ops):
    """An open xenstore transaction; node operations run inside it.

    Use ``async with client.transaction() as t:`` — commit on normal exit (raising
    :class:`XenstoreError` ``EAGAIN`` on conflict), abort when the block raises.
    """

    def __init__(self, client: XenstoreClient, timeout: float | None = None) -> None:
        """Bind to ``client``; the transaction starts in ``__aenter__``/:meth:`start`."""
        self._client = client
        self._conn = client._conn
        self.default_timeout = client.default_timeout if timeout is None else timeout

    async def start(self) -> Transaction:
        """Send TRANSACTION_START (header tx_id 0, payload ``\\0``)."""
        self._check_new()
        self._opened(await self._client._run(ops.transaction_start(), self.default_timeout))
        return self

    async def end(self, commit: bool = True, *, timeout: float | None = None) -> None:
        """Commit (``T``) or abort (``F``); the transaction is over either way."""
        with self._ending(commit):
            await self._run(ops.transaction_end(commit), timeout)

    async def commit(self, *, timeout: float | None = None) -> None:
        """Commit; raises :class:`XenstoreError` ``EAGAIN`` if another writer interfered."""
        await self.end(True, timeout=timeout)

    async def abort(self, *, timeout: float | None = None) -> None:
        """Abort (discard every change)."""
        await self.end(False, timeout=timeout)

    async def __aenter__(self) -> Transaction:
        """Start the transaction."""
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit on success, abort (best effort) on an exception."""
        if self._state != "open":
            return
        with self._exit_end(exc_type):
            await self.end(exc_type is None)


class Watch:
    """A registered xenstore watch, consumed as an async iterator of :class:`WatchEvent`.

    Use ``async with client.watch(path) as w: async for path, token in w: …``.  The server
    fires once right after registration, so the first event is the watch path itself.
    Pending events are de-duplicated; if more than ``max_pending`` distinct events pile up,
    they collapse into one event for the watch path (events are hints: always re-read).
    """

    def __init__(
        self,
        client: XenstoreClient,
        path: str,
        token: str,
        depth: int | None = None,
        max_pending: int = 256,
        timeout: float | None = None,
    ) -> None:
        """Prepare a watch; it is registered by ``__aenter__``/:meth:`register`."""
        if max_pending < 1:
            raise LocalError("max_pending must be at least 1")
        self.client = client
        self.path = path
        self.token = token
        self.depth = depth
        self.max_pending = max_pending
        self.timeout = timeout
        self.overflows = 0
        self._pending: dict[WatchEvent, None] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._registered = False

    def _deliver(self, event: WatchEvent) -> None:
        pending = self._pending
        if event not in pending:
            if len(pending) >= self.max_pending:
                pending.clear()
                self.overflows += 1
                event = WatchEvent(self.path, self.token)
            pending[event] = None
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def pending(self) -> int:
        """Number of events queued and not yet consumed."""
        return len(self._pending)

    async def register(self) -> Watch:
        """Send WATCH; events start arriving (first the initial one)."""
        _paths.validate_path(self.path, allow_special=True)
        self.client._conn.watches.setdefault(self.token, []).append(self)
        self._registered = True
        try:
            await self.client._run(ops.watch(self.path, self.token, self.depth), self._timeout())
        except BaseException:
            self._unroute()
            raise
        return self

    def _timeout(self) -> float | None:
        return self.client.default_timeout if self.timeout is None else self.timeout

    def _unroute(self) -> None:
        if not self._registered:
            return
        self._registered = False
        routes = self.client._conn.watches.get(self.token)
        if routes is not None and self in routes:
            routes.remove(self)
            if not routes:
                del self.client._conn.watches[self.token]

    async def unregister(self, *, timeout: float | None = None) -> None:
        """Send UNWATCH and stop routing events here (no error if the connection is gone).

        ``timeout`` defaults to the watch's own (see :meth:`XenstoreClient.watch`)."""
        if not self._registered:
            return
        self._unroute()
        conn = self.client._conn
        if conn.error is None:
            with contextlib.suppress(XenstoreError, XenstoreConnectionError):
                await self.client._run(
                    ops.unwatch(self.path, self.token),
                    self._timeout() if timeout is None else timeout,
                )
        self._pending.clear()
        self._fail(LocalError("watch unregistered"))

    async def get(self, timeout: float | None = None) -> WatchEvent:
        """Return the next event, waiting at most ``timeout`` seconds (TimeoutError)."""
        if timeout is None:
            return await self.__anext__()
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    def __aiter__(self) -> Watch:
        """Iterate over events."""
        return self

    async def __anext__(self) -> WatchEvent:
        """Wait for and return the next event; raise the connection's error once it fails."""
        while not self._pending:
            if self._error is not None:
                if isinstance(self._error, LocalError):
                    raise StopAsyncIteration
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = next(iter(self._pending))
        del self._pending[event]
        return event

    async def __aenter__(self) -> Watch:
        """Register the watch."""
        return await self.register()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Unregister the watch."""
        await self.unregister()


_token_counter = itertools.count(1)


class XenstoreClient(_Ops):
    """An asyncio xenstore client over one connection.

    Create with :func:`connect` (or :meth:`XenstoreClient.connect`); close with
    :meth:`close` or ``async with``.  Node operations (:meth:`read`, :meth:`write`, …)
    are inherited from the shared operation set; transactions, watches and the
    domain-management requests are here.
    """

    def __init__(self, conn: _Connection, default_timeout: float | None = None) -> None:
        """Wrap an established connection (use :func:`connect`)."""
        self._conn = conn
        self._tx_id = 0
        self.default_timeout = default_timeout

    @classmethod
    async def connect(
        cls, path: str | None = None, *, timeout: float | None = None
    ) -> XenstoreClient:
        """Connect like libxenstore does, or to ``path`` (socket or device). See :func:`connect`."""
        loop = asyncio.get_running_loop()
        candidates = ops.connect_candidates(path)
        last: BaseException | None = None
        for candidate in candidates:
            try:
                st = os.stat(candidate)
            except OSError as exc:
                last = exc
                continue
            conn = _Connection()
            try:
                if stat.S_ISSOCK(st.st_mode):
                    fd = await _connect_unix(loop, candidate)
                else:
                    fd = os.open(candidate, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
                _FdTransport(loop, fd, conn)
            except OSError as exc:
                last = exc
                continue
            return cls(conn, timeout)
        raise ops.connect_error(candidates, last)

    @property
    def connected(self) -> bool:
        """False once the connection failed or was closed."""
        return self._conn.error is None

    async def close(self) -> None:
        """Close the connection; pending requests fail with XenstoreConnectionError."""
        self._conn.fail(XenstoreConnectionError("xenstore client closed"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._conn.closed), 5)

    async def __aenter__(self) -> XenstoreClient:
        """Return self."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection."""
        await self.close()

    # -- raw access ---------------------------------------------------------------------

    def submit(self, type_: int, payload: bytes, tx_id: int = 0) -> asyncio.Future[bytes]:
        """Send a raw request now and return the future of its reply payload.

        Many submits before awaiting pipeline the requests.  An ``ERROR`` reply sets
        :class:`XenstoreError` on the future.
        """
        return self._conn.submit(type_, payload, tx_id)

    async def request(
        self, type_: int, payload: bytes, *, tx_id: int = 0, timeout: float | None = None
    ) -> bytes:
        """Send a raw request and return its reply payload."""
        return await self._conn.call(
            type_, payload, tx_id, self.default_timeout if timeout is None else timeout
        )

    # -- transactions -------------------------------------------------------------------

    def transaction(self, *, timeout: float | None = None) -> Transaction:
        """Return a transaction, to be used as ``async with client.transaction() as t``."""
        return Transaction(self, timeout)

    async def transact(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        retries: int = 16,
        timeout: float | None = None,
    ) -> T:
        """Run ``await fn(t)`` in a transaction, re-running all of it on ``EAGAIN``.

        Gives up (re-raising ``EAGAIN``) after ``retries`` retries.
        """
        attempt = 0
        while True:
            try:
                async with self.transaction(timeout=timeout) as t:
                    result = await fn(t)
                return result
            except XenstoreError as exc:
                if exc.errno_name != "EAGAIN" or attempt >= retries:
                    raise
                attempt += 1

    # -- watches ------------------------------------------------------------------------

    def watch(
        self,
        path: str,
        token: str | None = None,
        *,
        depth: int | None = None,
        max_pending: int = 256,
        timeout: float | None = None,
    ) -> Watch:
        """Return a watch on ``path`` (``async with client.watch(p) as w``).

        ``token`` defaults to a unique one.  ``depth`` is sent only if given (needs the
        server's WATCH-depth feature).
        """
        if token is None:
            token = f"xenpv-{os.getpid()}-{next(_token_counter)}"
        return Watch(self, path, token, depth, max_pending, timeout)

    async def reset_watches(self, *, timeout: float | None = None) -> None:
        """Drop every watch and transaction of this connection (RESET_WATCHES)."""
        await self._run(ops.reset_watches(), timeout)
        for watches in list(self._conn.watches.values()):
            for w in list(watches):
                w._unroute()
                w._fail(LocalError("watches reset"))

    # -- domains ------------------------------------------------------------------------

    async def get_domain_path(self, domid: int, *, timeout: float | None = None) -> str:
        """Return the home path of ``domid`` (``/local/domain/<domid>``)."""
        return await self._run(ops.get_domain_path(domid), timeout)

    async def introduce(
        self, domid: int, gfn: int, evtchn: int, *, timeout: float | None = None
    ) -> None:
        """Introduce a domain to xenstored (dom0 only)."""
        await self._run(ops.introduce(domid, gfn, evtchn), timeout)

    async def release(self, domid: int, *, timeout: float | None = None) -> None:
        """Release a domain (dom0 only); fires ``@releaseDomain``."""
        await self._run(ops.release(domid), timeout)

    async def resume(self, domid: int, *, timeout: float | None = None) -> None:
        """Re-enable ``@releaseDomain`` reporting for ``domid``."""
        await self._run(ops.resume(domid), timeout)

    async def set_target(self, domid: int, target: int, *, timeout: float | None = None) -> None:
        """Give ``domid`` owner-like rights over ``target``'s nodes."""
        await self._run(ops.set_target(domid, target), timeout)

    async def is_domain_introduced(self, domid: int, *, timeout: float | None = None) -> bool:
        """Return whether ``domid`` is known to xenstored."""
        return await self._run(ops.is_domain_introduced(domid), timeout)

    async def control(self, *args: str | bytes | int, timeout: float | None = None) -> bytes:
        """Send a CONTROL request (implementation-defined); return the raw reply."""
        return await self._run(ops.control(*args), timeout)


async def connect(path: str | None = None, *, timeout: float | None = None) -> XenstoreClient:
    """Open a xenstore client connection.

    Without ``path``: ``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket`` (default
    ``/var/run/xenstored/socket``), else ``/dev/xen/xenbus`` (then ``/proc/xen/xenbus``).
    A path that is a socket is connected; anything else is opened as a device carrying
    the same framing.  ``timeout`` becomes the default per-request timeout.
    """
    return await XenstoreClient.connect(path, timeout=timeout)

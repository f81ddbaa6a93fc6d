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
import errno as _errno
import heapq
import itertools
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, TypeVar

from xenpv.errors import LocalError, PlatformError
from xenpv.xenstore import paths as _paths
from xenpv.xenstore import wire
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

#: Build-time default of ``XENSTORED_RUNDIR`` in libxenstore.
DEFAULT_RUNDIR = "/var/run/xenstored"
#: Kernel devices carrying the xenstore protocol, in the order libxenstore tries them.
XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")
#: Retries of a DIRECTORY_PART walk whose generation keeps changing.
_DIRECTORY_PART_RESTARTS = 16
#: Timed-out request ids remembered so that their late replies are ignored.
_EXPIRED_MEMORY = 4096
#: Valid ordinary paths already encoded for the wire (validation is per request otherwise).
_PATH_CACHE: dict[str, bytes] = {}
_PATH_CACHE_SIZE = 1024
#: Answered requests the deadline heap may hold beyond twice the pending ones.
_DEADLINE_SLACK = 64


class XenstoreConnectionError(PlatformError):
    """The connection to the xenstore server is closed, lost or could not be opened."""


class InvalidPermError(LocalError, ValueError):
    """A permission entry is not a letter ``n r w b`` followed by a decimal domid."""


_PERM_LETTERS = "nrwb"


@dataclass(frozen=True, slots=True)
class Perm:
    """One xenstore permission entry (xen-protocols.md §4.6), e.g. ``b0`` or ``r5``.

    ``access`` is one of ``n`` (none), ``r`` (read), ``w`` (write), ``b`` (both).
    In a node's list, entry 0 names the owner and gives the access of unlisted domains.
    """

    access: str
    domid: int

    def __post_init__(self) -> None:
        """Check the letter and the domid range."""
        if self.access not in _PERM_LETTERS or len(self.access) != 1:
            raise InvalidPermError(f"invalid permission letter {self.access!r}")
        if not 0 <= self.domid <= 0xFFFF:
            raise InvalidPermError(f"domid {self.domid} out of range")

    @classmethod
    def parse(cls, text: str | bytes) -> Perm:
        """Parse ``"b0"`` / ``b"r5"``; raises :class:`InvalidPermError`."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if len(text) < 2 or not text[1:].isdigit() or not text[1:].isascii():
            raise InvalidPermError(f"invalid permission entry {text!r}")
        return cls(text[0], int(text[1:]))

    def __str__(self) -> str:
        """Return the wire form, e.g. ``b0``."""
        return f"{self.access}{self.domid}"

    @property
    def can_read(self) -> bool:
        """True for ``r`` and ``b``."""
        return self.access in "rb"

    @property
    def can_write(self) -> bool:
        """True for ``w`` and ``b``."""
        return self.access in "wb"


class WatchEvent(NamedTuple):
    """One watch firing: the changed path (relative if the watch was) and the token."""

    path: str
    token: str


def daemon_socket_path() -> str:
    """Return the socket path libxenstore would use: ``$XENSTORED_PATH`` or rundir/socket."""
    path = os.environ.get("XENSTORED_PATH")
    if path:
        return path
    rundir = os.environ.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR
    return os.path.join(rundir, "socket")


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"non-ASCII {what} from xenstore: {raw[:64]!r}") from None


def _arg(value: str | bytes | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


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
        if msg.tx_id != tx_id:
            self._reject(fut, f"xenstore reply tx_id {msg.tx_id} != request tx_id {tx_id}")
        if msg.type == XsType.ERROR:
            if not fut.done():
                fut.set_exception(XenstoreError(wire.parse_error(msg.payload)))
        elif msg.type != req_type:
            self._reject(fut, f"xenstore reply of type {msg.type} to a request of type {req_type}")
        elif not fut.done():
            fut.set_result(msg.payload)

    @staticmethod
    def _reject(fut: asyncio.Future[bytes], text: str) -> None:
        exc = WireError(text)
        if not fut.done():
            fut.set_exception(exc)
        raise exc

    def _watch_event(self, payload: bytes) -> None:
        parts = payload.split(b"\0")
        # WATCH_EVENT payload: <path>\0<token>\0
        if len(parts) != 3 or parts[2] != b"" or not parts[0]:
            raise WireError(f"malformed xenstore watch event {payload[:80]!r}")
        token = _ascii(parts[1], "watch token")
        targets = self.watches.get(token)
        if targets:
            event = WatchEvent(_ascii(parts[0], "watch path"), token)
            for w in targets:
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
            self._expired[req_id] = None
            while len(self._expired) > _EXPIRED_MEMORY:
                self._expired.popitem(last=False)
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


class _FdTransport(asyncio.Transport):
    """Minimal transport over a file descriptor: a connected Unix socket or a character
    device (``/dev/xen/xenbus``, a pty …).

    It is the client's hot path, so it skips asyncio's stream transports: the loop's
    reader callback reads straight into the protocol's reused buffer (``readv``) and
    a write goes to the fd at once, buffered (``add_writer``) only when the fd is full.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: _Connection) -> None:
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._out = bytearray()
        self._closing = False
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

    def is_closing(self) -> bool:
        """True once closed."""
        return self._closing

    def close(self) -> None:
        """Close the device fd and tell the protocol."""
        self._close(None)

    def _close(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        os.close(self._fd)
        self._loop.call_soon(self._protocol.connection_lost, exc)


async def _connect_unix(loop: asyncio.AbstractEventLoop, path: str) -> int:
    """Connect a non-blocking Unix stream socket to ``path``; return its fd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


class _Ops:
    """Node operations shared by the client (tx_id 0) and transactions."""

    _conn: _Connection
    _tx_id: int = 0
    default_timeout: float | None = None

    def _check_open(self) -> None:
        """Hook for transactions to refuse use after their end."""

    def _call(self, type_: int, payload: bytes, timeout: float | None) -> asyncio.Future[bytes]:
        self._check_open()
        return self._conn.call(
            type_, payload, self._tx_id, self.default_timeout if timeout is None else timeout
        )

    async def _call_ok(self, type_: int, payload: bytes, timeout: float | None) -> None:
        reply = await self._call(type_, payload, timeout)
        if reply != wire.OK:
            self._protocol_error(f"expected OK, got {reply[:64]!r}")

    def _protocol_error(self, text: str) -> None:
        exc = WireError(f"malformed xenstore reply: {text}")
        self._conn.fail(exc)
        raise exc

    @staticmethod
    def _path(path: str, *, special: bool = False) -> bytes:
        if not special:
            cached = _PATH_CACHE.get(path)
            if cached is not None:
                return cached
        _paths.validate_path(path, allow_special=special)
        wire_path = path.encode("ascii") + b"\0"
        if not special:
            if len(_PATH_CACHE) >= _PATH_CACHE_SIZE:
                _PATH_CACHE.clear()
            _PATH_CACHE[path] = wire_path
        return wire_path

    async def read(self, path: str, *, timeout: float | None = None) -> bytes:
        """Return the value of ``path`` (raw bytes)."""
        return await self._call(XsType.READ, self._path(path), timeout)

    async def write(self, path: str, value: bytes | str, *, timeout: float | None = None) -> None:
        """Set ``path`` to ``value`` (creating missing parents)."""
        data = value.encode() if isinstance(value, str) else value
        # io/xs_wire.h: XS_WRITE payload is <path>\0<value>, the value not NUL-terminated
        await self._call_ok(XsType.WRITE, self._path(path) + data, timeout)

    async def mkdir(self, path: str, *, timeout: float | None = None) -> None:
        """Create ``path`` (and parents) if missing; existing values are untouched."""
        await self._call_ok(XsType.MKDIR, self._path(path), timeout)

    async def rm(self, path: str, *, timeout: float | None = None) -> None:
        """Remove ``path`` and its subtree (no error if it is absent but its parent exists)."""
        await self._call_ok(XsType.RM, self._path(path), timeout)

    async def exists(self, path: str, *, timeout: float | None = None) -> bool:
        """Return whether ``path`` exists (ENOENT → False; other errors raise)."""
        try:
            await self._call(XsType.READ, self._path(path), timeout)
        except XenstoreError as exc:
            if exc.errno_name == "ENOENT":
                return False
            raise
        return True

    async def directory(self, path: str, *, timeout: float | None = None) -> list[str]:
        """Return the names of the children of ``path``.

        Falls back to ``DIRECTORY_PART`` when the full list does not fit in one reply
        (the server answers ``E2BIG``).
        """
        payload = self._path(path)
        try:
            reply = await self._call(XsType.DIRECTORY, payload, timeout)
        except XenstoreError as exc:
            if exc.errno_name != "E2BIG":
                raise
            return await self._directory_part(payload, timeout)
        return self._names(wire.fields(reply))

    def _names(self, raw: Iterable[bytes]) -> list[str]:
        out = []
        for name in raw:
            if not name:
                self._protocol_error("empty child name")
            out.append(_ascii(name, "child name"))
        return out

    async def _directory_part(self, path_arg: bytes, timeout: float | None) -> list[str]:
        # xen-protocols.md §4.2: DIRECTORY_PART <path>\0<offset>\0 -> <gen>\0<child>\0...,
        # the last chunk ends in an extra \0; a generation change means restart at 0.
        for _ in range(_DIRECTORY_PART_RESTARTS):
            names: list[bytes] = []
            offset = 0
            generation: bytes | None = None
            while True:
                reply = await self._call(
                    XsType.DIRECTORY_PART, path_arg + b"%d\0" % offset, timeout
                )
                gen, sep, rest = reply.partition(b"\0")
                if not sep or not gen.isdigit():
                    self._protocol_error(f"DIRECTORY_PART reply {reply[:64]!r}")
                if generation is None:
                    generation = gen
                elif gen != generation:
                    break
                final = rest == b"\0" or rest.endswith(b"\0\0") or rest == b""
                chunk = rest[:-1] if final and rest else rest
                if chunk and not chunk.endswith(b"\0"):
                    self._protocol_error("DIRECTORY_PART chunk not NUL-terminated")
                new = chunk.split(b"\0")[:-1] if chunk else []
                if not final and not new:
                    self._protocol_error("DIRECTORY_PART made no progress")
                names.extend(new)
                offset += len(chunk)
                if final:
                    return self._names(names)
        raise XenstoreError("EAGAIN", "directory kept changing during DIRECTORY_PART")

    async def get_perms(self, path: str, *, timeout: float | None = None) -> list[Perm]:
        """Return the permission list of ``path`` (entry 0 is the owner)."""
        reply = await self._call(XsType.GET_PERMS, self._path(path, special=True), timeout)
        items = wire.fields(reply)
        if not items:
            self._protocol_error("empty permission list")
        try:
            return [Perm.parse(item) for item in items]
        except InvalidPermError as exc:
            self._protocol_error(str(exc))
            raise  # unreachable; keeps type checkers informed

    async def set_perms(
        self, path: str, perms: Iterable[Perm | str], *, timeout: float | None = None
    ) -> None:
        """Replace the permission list of ``path`` (first entry names the owner)."""
        entries = [p if isinstance(p, Perm) else Perm.parse(p) for p in perms]
        if not entries:
            raise LocalError("a permission list needs at least the owner entry")
        payload = self._path(path, special=True) + wire.join(*(str(p) for p in entries))
        await self._call_ok(XsType.SET_PERMS, payload, timeout)


class Transaction(_Ops):
    """An open xenstore transaction; node operations run inside it.

    Use ``async with client.transaction() as t:`` — commit on normal exit (raising
    :class:`XenstoreError` ``EAGAIN`` on conflict), abort when the block raises.
    """

    def __init__(self, client: XenstoreClient, timeout: float | None = None) -> None:
        """Bind to ``client``; the transaction starts in ``__aenter__``/:meth:`start`."""
        self._client = client
        self._conn = client._conn
        self.default_timeout = client.default_timeout if timeout is None else timeout
        self._tx_id = 0
        self._state = "new"

    @property
    def tx_id(self) -> int:
        """The server's transaction id (0 before start)."""
        return self._tx_id

    def _check_open(self) -> None:
        if self._state != "open":
            raise LocalError(f"transaction is {self._state}, not open")

    async def start(self) -> Transaction:
        """Send TRANSACTION_START (header tx_id 0, payload ``\\0``)."""
        if self._state != "new":
            raise LocalError("transaction already started")
        reply = await self._conn.call(XsType.TRANSACTION_START, b"\0", 0, self.default_timeout)
        text = reply[:-1] if reply.endswith(b"\0") else reply
        if not text.isdigit() or int(text) == 0 or int(text) > 0xFFFFFFFF:
            self._protocol_error(f"transaction id {reply[:32]!r}")
        self._tx_id = int(text)
        self._state = "open"
        return self

    async def end(self, commit: bool = True, *, timeout: float | None = None) -> None:
        """Commit (``T``) or abort (``F``); the transaction is over either way."""
        try:
            await self._call_ok(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", timeout)
        finally:
            self._state = "failed" if self._state == "open" else self._state
        self._state = "committed" if commit else "aborted"

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
        if exc_type is None:
            await self.commit()
            return
        with contextlib.suppress(XenstoreError, XenstoreConnectionError, WireError, TimeoutError):
            await self.abort()


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
        conn = self.client._conn
        _paths.validate_path(self.path, allow_special=True)
        args: list[str | bytes] = [self.path, self.token]
        if self.depth is not None:
            args.append(str(self.depth))
        conn.watches.setdefault(self.token, []).append(self)
        self._registered = True
        try:
            reply = await conn.call(XsType.WATCH, wire.join(*args), 0, self._timeout())
            if reply != wire.OK:
                self.client._protocol_error(f"WATCH reply {reply[:64]!r}")
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

    async def unregister(self) -> None:
        """Send UNWATCH and stop routing events here (no error if the connection is gone)."""
        if not self._registered:
            return
        self._unroute()
        conn = self.client._conn
        if conn.error is None:
            with contextlib.suppress(XenstoreError, XenstoreConnectionError):
                await conn.call(
                    XsType.UNWATCH, wire.join(self.path, self.token), 0, self._timeout()
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
        candidates = [path] if path is not None else [daemon_socket_path(), *XENBUS_DEVICES]
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
        raise XenstoreConnectionError(
            f"cannot connect to xenstore ({', '.join(candidates)}): {last}",
            _errno_of(last) if last is not None else _errno.ENOENT,
        )

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
        await self._call_ok(XsType.RESET_WATCHES, b"\0", timeout)
        for watches in list(self._conn.watches.values()):
            for w in list(watches):
                w._unroute()
                w._fail(LocalError("watches reset"))

    # -- domains ------------------------------------------------------------------------

    async def get_domain_path(self, domid: int, *, timeout: float | None = None) -> str:
        """Return the home path of ``domid`` (``/local/domain/<domid>``)."""
        reply = await self._call(XsType.GET_DOMAIN_PATH, wire.join(str(domid)), timeout)
        return _ascii(reply.rstrip(b"\0"), "domain path")

    async def introduce(
        self, domid: int, gfn: int, evtchn: int, *, timeout: float | None = None
    ) -> None:
        """Introduce a domain to xenstored (dom0 only)."""
        await self._call_ok(XsType.INTRODUCE, wire.join(str(domid), str(gfn), str(evtchn)), timeout)

    async def release(self, domid: int, *, timeout: float | None = None) -> None:
        """Release a domain (dom0 only); fires ``@releaseDomain``."""
        await self._call_ok(XsType.RELEASE, wire.join(str(domid)), timeout)

    async def resume(self, domid: int, *, timeout: float | None = None) -> None:
        """Re-enable ``@releaseDomain`` reporting for ``domid``."""
        await self._call_ok(XsType.RESUME, wire.join(str(domid)), timeout)

    async def set_target(self, domid: int, target: int, *, timeout: float | None = None) -> None:
        """Give ``domid`` owner-like rights over ``target``'s nodes."""
        await self._call_ok(XsType.SET_TARGET, wire.join(str(domid), str(target)), timeout)

    async def is_domain_introduced(self, domid: int, *, timeout: float | None = None) -> bool:
        """Return whether ``domid`` is known to xenstored."""
        reply = await self._call(XsType.IS_DOMAIN_INTRODUCED, wire.join(str(domid)), timeout)
        if reply not in (b"T\0", b"F\0"):
            self._protocol_error(f"IS_DOMAIN_INTRODUCED reply {reply[:32]!r}")
        return reply == b"T\0"

    async def control(self, *args: str | bytes | int, timeout: float | None = None) -> bytes:
        """Send a CONTROL request (implementation-defined); return the raw reply."""
        if not args:
            raise LocalError("control needs a command")
        return await self._call(XsType.CONTROL, wire.join(*(_arg(a) for a in args)), timeout)


async def connect(path: str | None = None, *, timeout: float | None = None) -> XenstoreClient:
    """Open a xenstore client connection.

    Without ``path``: ``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket`` (default
    ``/var/run/xenstored/socket``), else ``/dev/xen/xenbus`` (then ``/proc/xen/xenbus``).
    A path that is a socket is connected; anything else is opened as a device carrying
    the same framing.  ``timeout`` becomes the default per-request timeout.
    """
    return await XenstoreClient.connect(path, timeout=timeout)


class _BlockingNodeOps:
    """The node operations shared by :class:`BlockingClient` and
    :class:`BlockingTransaction`: each runs the same call of ``_target`` (the async
    client or transaction) to completion on the owner's private loop."""

    _target: XenstoreClient | Transaction

    def _run(self, aw: Awaitable[T]) -> T:
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        """Return the value of ``path``."""
        return self._run(self._target.read(path))

    def write(self, path: str, value: bytes | str) -> None:
        """Write ``value`` to ``path``."""
        self._run(self._target.write(path, value))

    def mkdir(self, path: str) -> None:
        """Create ``path``."""
        self._run(self._target.mkdir(path))

    def rm(self, path: str) -> None:
        """Remove ``path`` and its subtree."""
        self._run(self._target.rm(path))

    def directory(self, path: str) -> list[str]:
        """List the children of ``path``."""
        return self._run(self._target.directory(path))

    def exists(self, path: str) -> bool:
        """Return whether ``path`` exists."""
        return self._run(self._target.exists(path))


class BlockingTransaction(_BlockingNodeOps):
    """Blocking view of a :class:`Transaction` (see :class:`BlockingClient`); its node
    operations act inside the transaction."""

    def __init__(self, owner: BlockingClient, tx: Transaction) -> None:
        """Wrap ``tx``; its requests run on ``owner``'s private loop."""
        self._owner = owner
        self.tx = self._target = tx

    def _run(self, aw: Awaitable[T]) -> T:
        return self._owner._run(aw)


class BlockingClient(_BlockingNodeOps):
    """A small blocking wrapper for scripts: each call runs the async client to completion.

    It owns a private event loop, so it must not be used from inside a running loop.
    Watches are not offered here; use :class:`XenstoreClient` for them.
    """

    def __init__(self, path: str | None = None, *, timeout: float | None = None) -> None:
        """Connect like :func:`connect`."""
        self._loop = asyncio.new_event_loop()
        try:
            self.client = self._target = self._run(XenstoreClient.connect(path, timeout=timeout))
        except BaseException:
            self._loop.close()
            raise

    def _run(self, aw: Awaitable[T]) -> T:
        async def wrapper() -> T:
            return await aw

        return self._loop.run_until_complete(wrapper())

    def get_perms(self, path: str) -> list[Perm]:
        """Return the permissions of ``path``."""
        return self._run(self.client.get_perms(path))

    def set_perms(self, path: str, perms: Iterable[Perm | str]) -> None:
        """Set the permissions of ``path``."""
        self._run(self.client.set_perms(path, perms))

    def get_domain_path(self, domid: int) -> str:
        """Return ``/local/domain/<domid>``."""
        return self._run(self.client.get_domain_path(domid))

    def transact(self, fn: Callable[[BlockingTransaction], T], *, retries: int = 16) -> T:
        """Run ``fn(t)`` in a transaction; commit; re-run all of it on ``EAGAIN``.

        If ``fn`` raises, the transaction is aborted and the exception propagates.
        """
        attempt = 0
        while True:
            tx = self._run(self.client.transaction().start())
            try:
                result = fn(BlockingTransaction(self, tx))
            except BaseException:
                with contextlib.suppress(XenstoreError, XenstoreConnectionError, WireError):
                    self._run(tx.abort())
                raise
            try:
                self._run(tx.commit())
            except XenstoreError as exc:
                if exc.errno_name != "EAGAIN" or attempt >= retries:
                    raise
                attempt += 1
                continue
            return result

    def close(self) -> None:
        """Close the connection and the private loop."""
        if not self._loop.is_closed():
            self._run(self.client.close())
            self._loop.close()

    def __enter__(self) -> BlockingClient:
        """Return self."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close."""
        self.close()

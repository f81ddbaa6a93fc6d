"""Blocking xenstore client, for scripts, threads and sequential callers.

Theory of operation
-------------------
:class:`BlockingClient` is the synchronous twin of the asyncio
:class:`~xenpv.xenstore.client.XenstoreClient`: the same operations (written once, sans-IO,
in :mod:`xenpv.xenstore.ops`), the same connection rules (``$XENSTORED_PATH``,
``$XENSTORED_RUNDIR/socket``, ``/dev/xen/xenbus``), the same errors; only the I/O differs.
It owns one blocking file descriptor and no event loop and no thread: a request is one
``write`` of header and payload, then ``readv`` into one reused buffer until the reply
with the request's ``req_id`` is complete.  That is the whole per-request cost, which
is why sequential callers should prefer it (an event loop pays a wake-up and a task
switch per reply).

Requests are serialised by a lock, so threads may share a client (one request on the
wire at a time, as with libxenstore's request mutex).  Watch events that arrive while
a reply is awaited are queued (de-duplicated, at most ``max_pending``; beyond that the
queue collapses into one event per watch path, as events are hints) and handed out by
:meth:`BlockingClient.read_watch`, which waits for the next one while holding the
connection: a thread that blocks in it holds up other threads' requests, so
multi-threaded programs give their watch reader its own client.

Failure rules match the asyncio client: an ``ERROR`` reply raises
:class:`~xenpv.xenstore.wire.XenstoreError` in the caller; anything malformed (bad
framing, an unknown ``req_id``, a reply of the wrong type or transaction) is a
:class:`~xenpv.xenstore.wire.WireError` that closes the connection; a closed or lost
connection raises :class:`~xenpv.xenstore.ops.XenstoreConnectionError` from then on; a
request that outlives ``timeout`` raises :class:`TimeoutError` and its late reply is
discarded when it comes.  The same holds for a call interrupted by an exception from a
signal handler once its request is on the wire.  The timeout bounds the write too (a
socket is written with ``MSG_DONTWAIT``, a device is made non-blocking for the write); a
request left half-written fails the connection, since the stream could no longer be
framed.

The descriptor is closed only by the thread holding the lock (or by :meth:`close` when no
one holds it): ``close`` from another thread shuts the socket down, which wakes the
holder, and the holder closes the descriptor on its way out, so no thread ever reads or
writes a descriptor number that was closed (and perhaps reused) under it.  A client that
is dropped without ``close`` releases its descriptor when it is collected.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TypeVar

from xenpv.errors import LocalError
from xenpv.xenstore import ops, wire
from xenpv.xenstore.ops import Perm, WatchEvent, XenstoreConnectionError, encode_path
from xenpv.xenstore.wire import HEADER, HEADER_SIZE, PAYLOAD_MAX, WireError, XenstoreError, XsType

__all__ = ["BlockingClient", "BlockingTransaction"]

T = TypeVar("T")

_RECV_SIZE = 65536
#: Timed-out request ids remembered so that their late replies are ignored.
_EXPIRED_MEMORY = 4096
_token_counter = itertools.count(1)


def _open(path: str | None) -> tuple[int, socket.socket | None]:
    """Open a blocking connection the way libxenstore does (see :func:`ops.connect_candidates`);
    return the descriptor and, for a socket, its socket object."""
    candidates = ops.connect_candidates(path)
    last: BaseException | None = None
    for candidate in candidates:
        try:
            if stat.S_ISSOCK(os.stat(candidate).st_mode):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(candidate)
                except BaseException:
                    sock.close()
                    raise
                return sock.fileno(), sock
            return os.open(candidate, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY), None
        except OSError as exc:
            last = exc
    raise ops.connect_error(candidates, last)


class _NodeOps:
    """The node operations of a client (tx_id 0) and of a transaction: each drives one
    operation of :mod:`xenpv.xenstore.ops` through the owning client."""

    _client: BlockingClient
    _tx_id: int = 0

    def _run(self, op: ops.Op[T]) -> T:
        return self._client._drive(op, self._tx_id)

    def read(self, path: str) -> bytes:
        """Return the value of ``path`` (raw bytes)."""
        return self._client._call(XsType.READ, encode_path(path), self._tx_id)

    def write(self, path: str, value: bytes | str) -> None:
        """Set ``path`` to ``value`` (creating missing parents)."""
        self._run(ops.write(path, value))

    def mkdir(self, path: str) -> None:
        """Create ``path`` (and parents) if missing; existing values are untouched."""
        self._run(ops.mkdir(path))

    def rm(self, path: str) -> None:
        """Remove ``path`` and its subtree."""
        self._run(ops.rm(path))

    def directory(self, path: str) -> list[str]:
        """Return the names of the children of ``path`` (DIRECTORY_PART when large)."""
        return self._run(ops.directory(path))

    def exists(self, path: str) -> bool:
        """Return whether ``path`` exists (ENOENT → False; other errors raise)."""
        return self._run(ops.exists(path))

    def get_perms(self, path: str) -> list[Perm]:
        """Return the permission list of ``path`` (entry 0 is the owner)."""
        return self._run(ops.get_perms(path))

    def set_perms(self, path: str, perms: Iterable[Perm | str]) -> None:
        """Replace the permission list of ``path`` (first entry names the owner)."""
        self._run(ops.set_perms(path, perms))


class BlockingTransaction(ops.TransactionLife, _NodeOps):
    """An open transaction of a :class:`BlockingClient`; node operations act inside it.

    ``with client.transaction() as t:`` commits on normal exit (raising
    :class:`XenstoreError` ``EAGAIN`` on conflict) and aborts when the block raises.
    """

    def __init__(self, client: BlockingClient) -> None:
        """Bind to ``client``; the transaction starts in ``__enter__``/:meth:`start`."""
        self._client = client

    def _run(self, op: ops.Op[T]) -> T:
        self._check_open()
        return self._client._drive(op, self._tx_id)

    def read(self, path: str) -> bytes:
        """Return the value of ``path`` as the transaction sees it."""
        return self._run(ops.read(path))

    def start(self) -> BlockingTransaction:
        """Send TRANSACTION_START."""
        self._check_new()
        self._opened(self._client._drive(ops.transaction_start(), 0))
        return self

    def end(self, commit: bool = True) -> None:
        """Commit (``T``) or abort (``F``); the transaction is over either way."""
        with self._ending(commit):
            self._run(ops.transaction_end(commit))

    def commit(self) -> None:
        """Commit; raises :class:`XenstoreError` ``EAGAIN`` if another writer interfered."""
        self.end(True)

    def abort(self) -> None:
        """Abort (discard every change)."""
        self.end(False)

    def __enter__(self) -> BlockingTransaction:
        """Start the transaction."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit on success, abort (best effort) on an exception."""
        if self._state != "open":
            return
        with self._exit_end(exc_type):
            self.end(exc_type is None)


class BlockingClient(_NodeOps):
    """A blocking xenstore client over one connection (see the module docstring).

    ``timeout`` (seconds) bounds every request and :meth:`read_watch` unless given
    otherwise; ``None`` waits as long as the server takes, like libxenstore.
    """

    def __init__(
        self, path: str | None = None, *, timeout: float | None = None, max_pending: int = 1024
    ) -> None:
        """Connect like :func:`xenpv.xenstore.client.connect`."""
        self._fd = -1  # (so that __del__ of a client that failed here has nothing to do)
        self._sock: socket.socket | None = None
        if max_pending < 1:
            raise LocalError("max_pending must be at least 1")
        self._fd, self._sock = self._connect(path)
        self._client = self
        self.default_timeout = timeout
        self.max_pending = max_pending
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._start = 0  # unparsed bytes are _rbuf[_start:_end]
        self._end = 0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._expired: collections.OrderedDict[int, None] = collections.OrderedDict()
        #: registered watches: token → its paths (the server keys watches by path and
        #: token; events of other tokens are dropped)
        self._watches: dict[str, list[str]] = {}
        self._events: dict[WatchEvent, None] = {}
        self.overflows = 0
        self.error: BaseException | None = None

    def _connect(self, path: str | None) -> tuple[int, socket.socket | None]:
        """Open the connection: its descriptor and socket (None for a device)."""
        return _open(path)

    # -- life cycle ---------------------------------------------------------------------

    def fileno(self) -> int:
        """The connection's file descriptor (readable when a message is waiting)."""
        return self._fd

    @property
    def connected(self) -> bool:
        """False once the connection failed or was closed."""
        return self.error is None

    def close(self) -> None:
        """Close the connection; later calls raise XenstoreConnectionError."""
        self._fail(XenstoreConnectionError("xenstore client closed"))

    def __enter__(self) -> BlockingClient:
        """Return self."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close."""
        self.close()

    def __del__(self) -> None:
        """Release the descriptor of a client that was never closed."""
        self._close_fd()

    def _fail(self, exc: BaseException) -> None:
        """Mark the connection failed with ``exc`` and release the descriptor.

        The descriptor is closed only by whoever holds the lock (or can take it now): a
        thread blocked on it is woken by ``shutdown`` and closes it on its way out, so no
        thread ever uses a descriptor number that was closed (and maybe reused) under it.
        """
        if self.error is None:
            self.error = exc
            if self._sock is not None:
                with contextlib.suppress(OSError):  # wakes a thread blocked on the socket
                    self._sock.shutdown(socket.SHUT_RDWR)
        if self._lock.acquire(blocking=False):
            try:
                self._close_fd()
            finally:
                self._lock.release()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        sock = self._sock
        if sock is not None:
            sock.close()
        else:
            os.close(fd)

    # -- the wire -----------------------------------------------------------------------

    def _drive(self, op: ops.Op[T], tx_id: int, timeout: float | None = None) -> T:
        """Run ``op`` to its result (see :mod:`xenpv.xenstore.ops`)."""
        try:
            type_, payload = next(op)
            while True:
                try:
                    reply = self._call(type_, payload, tx_id, timeout)
                except XenstoreError as exc:
                    type_, payload = op.throw(exc)
                else:
                    type_, payload = op.send(reply)
        except StopIteration as stop:
            return stop.value
        except WireError as exc:
            self._fail(exc)
            raise

    def _call(self, type_: int, payload: bytes, tx_id: int, timeout: float | None = None) -> bytes:
        """Send one request and return its reply payload (ERROR → XenstoreError)."""
        if timeout is None:
            timeout = self.default_timeout
        with self._lock:
            try:
                return self._call_locked(type_, payload, tx_id, timeout)
            finally:
                if self.error is not None:
                    self._close_fd()

    def _call_locked(self, type_: int, payload: bytes, tx_id: int, timeout: float | None) -> bytes:
        if self.error is not None:
            raise self.error
        req_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = False
        try:
            self._send(wire.encode(type_, req_id, tx_id, payload), deadline)
            sent = True
            while True:
                r_type, r_id, r_tx, r_payload = self._receive(deadline)
                if r_id == req_id:
                    break
                self._unsolicited(r_type, r_id, r_payload)
        except TimeoutError:
            if sent:
                self._expire(req_id)
            raise TimeoutError(f"xenstore request {req_id} timed out") from None
        except WireError as exc:
            self._fail(exc)
            raise
        except BaseException:
            # Interrupted (a signal handler raised, a connection error): a reply that
            # comes later is discarded like the late reply of a timed-out request.
            if sent:
                self._expire(req_id)
            raise
        if r_type == type_ and r_tx == tx_id:
            return r_payload
        error = ops.reply_error(type_, tx_id, wire.Message(r_type, r_id, r_tx, r_payload))
        if isinstance(error, WireError):
            self._fail(error)
        assert error is not None
        raise error

    def _expire(self, req_id: int) -> None:
        """Remember ``req_id`` so that its late reply is discarded (bounded memory)."""
        self._expired[req_id] = None
        while len(self._expired) > _EXPIRED_MEMORY:
            self._expired.popitem(last=False)

    def _unsolicited(self, type_: int, req_id: int, payload: bytes) -> None:
        """A message that is not the awaited reply: a watch event or a late reply."""
        if type_ == XsType.WATCH_EVENT:
            self._queue_event(ops.parse_watch_event(payload))
        elif req_id in self._expired:
            del self._expired[req_id]
        else:
            raise WireError(f"xenstore reply to unknown req_id {req_id} (type {type_})")

    def _queue_event(self, event: WatchEvent) -> None:
        paths = self._watches.get(event.token)
        if not paths or not any(ops.watch_fires(p, event.path) for p in paths):
            return  # not (or no longer) ours: e.g. a late event of an UNWATCH
        events = self._events
        if event not in events:
            if len(events) >= self.max_pending:
                # events are hints: collapse into one event per watch (at most one per
                # registered path and token)
                watched = {self._collapsed(e) for e in events}
                events.clear()
                events.update(dict.fromkeys(watched))
                self.overflows += 1
                event = self._collapsed(event)
            events[event] = None

    def _collapsed(self, event: WatchEvent) -> WatchEvent:
        """The event of the watch path ``event`` belongs to (any path of its token)."""
        paths = self._watches.get(event.token) or [event.path]
        path = next((p for p in paths if ops.watch_fires(p, event.path)), paths[0])
        return WatchEvent(path, event.token)

    def _wait(self, fd: int, what: int, deadline: float | None) -> None:
        """Wait until ``fd`` is ready for ``what`` (POLLIN/POLLOUT); TimeoutError at the
        deadline.  Without a deadline the blocking call itself waits."""
        if deadline is None:
            return
        poller = select.poll()
        poller.register(fd, what)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if poller.poll(left * 1000):
                return

    def _send(self, data: bytes, deadline: float | None) -> None:
        """Write one whole request.  With a deadline a socket is written without blocking
        (a blocking write waits for room for everything, past any deadline); a request
        left half-written fails the connection, as the stream can no longer be framed."""
        fd = self._fd
        view = memoryview(data)
        if deadline is None:
            try:  # the common case: one blocking write takes the whole request
                n = os.write(fd, data)
            except (InterruptedError, BlockingIOError):
                n = 0
            except OSError as exc:
                raise self._lost(exc) from exc
            if n == len(data):
                return
            view = view[n:]
        sock = self._sock if deadline is not None else None
        device = deadline is not None and sock is None
        try:
            if device:  # (a device has no per-call MSG_DONTWAIT)
                os.set_blocking(fd, False)
            while view:
                # write first, wait only for want of room: a deadline that passed
                # before anything was written (a preempted caller) must not consume a
                # request id without its request
                try:
                    if sock is not None:
                        n = sock.send(view, socket.MSG_DONTWAIT)
                    else:
                        n = os.write(fd, view)
                except InterruptedError:
                    continue
                except BlockingIOError:
                    self._wait(fd, select.POLLOUT, deadline)
                    continue
                except OSError as exc:
                    raise self._lost(exc) from exc
                view = view[n:]
        except BaseException:
            if 0 < len(view) < len(data):
                self._fail(XenstoreConnectionError("xenstore request left half-written"))
            raise
        finally:
            if device and self._fd == fd:
                os.set_blocking(fd, True)

    def _receive(self, deadline: float | None) -> tuple[int, int, int, bytes]:
        """Return the next complete message (type, req_id, tx_id, payload)."""
        buf = self._rbuf
        while True:
            start, end = self._start, self._end
            if end - start >= HEADER_SIZE:
                type_, req_id, tx_id, length = HEADER.unpack_from(buf, start)
                if length > PAYLOAD_MAX:
                    raise WireError(
                        f"xenstore message announces {length} payload bytes (limit {PAYLOAD_MAX})"
                    )
                stop = start + HEADER_SIZE + length
                if stop <= end:
                    payload = bytes(self._rview[start + HEADER_SIZE : stop])
                    if stop == end:
                        self._start = self._end = 0
                    else:
                        self._start = stop
                    return type_, req_id, tx_id, payload
            if start and len(buf) - end < HEADER_SIZE + PAYLOAD_MAX:
                buf[: end - start] = buf[start:end]  # make room for a whole message
                self._start, self._end = 0, end - start
            self._end += self._read_some(deadline)

    def _read_some(self, deadline: float | None) -> int:
        """Read what has come (at least one byte) into the buffer after ``_end``."""
        while True:
            if deadline is not None:
                self._wait(self._fd, select.POLLIN, deadline)
            try:
                n = os.readv(self._fd, [self._rview[self._end :]])
            except InterruptedError:
                continue
            except OSError as exc:
                raise self._lost(exc) from exc
            if not n:
                raise self._lost(None)
            return n

    def _lost(self, exc: OSError | None) -> XenstoreConnectionError:
        if exc is None:
            err = XenstoreConnectionError("xenstore server closed the connection")
        else:
            err = XenstoreConnectionError(f"xenstore connection lost: {exc}", exc.errno)
        self._fail(err)
        return err

    # -- requests -----------------------------------------------------------------------

    def request(self, type_: int, payload: bytes, *, tx_id: int = 0) -> bytes:
        """Send a raw request and return its reply payload."""
        return self._call(type_, payload, tx_id)

    def transaction(self) -> BlockingTransaction:
        """Return a transaction, to be used as ``with client.transaction() as t``."""
        return BlockingTransaction(self)

    def transact(self, fn: Callable[[BlockingTransaction], T], *, retries: int = 16) -> T:
        """Run ``fn(t)`` in a transaction; commit; re-run all of it on ``EAGAIN``.

        If ``fn`` raises, the transaction is aborted and the exception propagates; after
        ``retries`` retries ``EAGAIN`` is raised.
        """
        attempt = 0
        while True:
            try:
                with self.transaction() as t:
                    result = fn(t)
                return result
            except XenstoreError as exc:
                if exc.errno_name != "EAGAIN" or attempt >= retries:
                    raise
                attempt += 1

    # -- watches ------------------------------------------------------------------------

    def watch(self, path: str, token: str | None = None, *, depth: int | None = None) -> str:
        """Register a watch on ``path``; return its token (unique by default).

        The server fires once at once (the watch path itself); read events with
        :meth:`read_watch`.
        """
        if token is None:
            token = f"xenpv-{os.getpid()}-{next(_token_counter)}"
        # Registered before the request, so that the initial event is kept; a refused
        # WATCH (EEXIST for a duplicate) takes back only this registration.
        with self._lock:
            self._watches.setdefault(token, []).append(path)
        try:
            self._drive(ops.watch(path, token, depth), 0)
        except BaseException:
            with self._lock:
                self._forget(path, token)
            raise
        return token

    def unwatch(self, path: str, token: str) -> None:
        """Unregister a watch and drop its queued events (those another watch of the same
        token covers stay)."""
        with self._lock:  # the queue belongs to the thread holding the connection
            self._forget(path, token)
            paths = self._watches.get(token, [])
            for event in [e for e in self._events if e.token == token]:
                if not any(ops.watch_fires(p, event.path) for p in paths):
                    del self._events[event]
        self._drive(ops.unwatch(path, token), 0)

    def _forget(self, path: str, token: str) -> None:
        paths = self._watches.get(token)
        if paths is not None and path in paths:
            paths.remove(path)
            if not paths:
                del self._watches[token]

    @property
    def pending_watch_events(self) -> int:
        """Watch events queued and not yet read."""
        return len(self._events)

    def read_watch(self, timeout: float | None = None) -> WatchEvent:
        """Return the next watch event, waiting at most ``timeout`` seconds (default: the
        client's timeout; TimeoutError when it passes)."""
        if timeout is None:
            timeout = self.default_timeout
        with self._lock:
            try:
                if self.error is not None and not self._events:
                    raise self.error
                deadline = None if timeout is None else time.monotonic() + timeout
                try:
                    while not self._events:
                        self._unsolicited(*_drop_tx(self._receive(deadline)))
                except WireError as exc:
                    self._fail(exc)
                    raise
                event = next(iter(self._events))
                del self._events[event]
                return event
            finally:
                if self.error is not None:
                    self._close_fd()

    # -- domains ------------------------------------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        """Return the home path of ``domid`` (``/local/domain/<domid>``)."""
        return self._drive(ops.get_domain_path(domid), 0)

    def introduce(self, domid: int, gfn: int, evtchn: int) -> None:
        """Introduce a domain to xenstored (dom0 only)."""
        self._drive(ops.introduce(domid, gfn, evtchn), 0)

    def release(self, domid: int) -> None:
        """Release a domain (dom0 only); fires ``@releaseDomain``."""
        self._drive(ops.release(domid), 0)

    def is_domain_introduced(self, domid: int) -> bool:
        """Return whether ``domid`` is known to xenstored."""
        return self._drive(ops.is_domain_introduced(domid), 0)

    def control(self, *args: str | bytes | int) -> bytes:
        """Send a CONTROL request (implementation-defined); return the raw reply."""
        return self._drive(ops.control(*args), 0)


def _drop_tx(msg: tuple[int, int, int, bytes]) -> tuple[int, int, bytes]:
    return msg[0], msg[1], msg[3]

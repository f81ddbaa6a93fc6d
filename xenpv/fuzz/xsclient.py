"""Fuzz targets ``xenstore:blocking-client`` and ``xenstore:async-client``: a hostile
xenstore server against the blocking client (:class:`~xenpv.xenstore.blocking.BlockingClient`)
and against the asyncio client (:class:`~xenpv.xenstore.client.XenstoreClient`).

Theory of operation
-------------------
The target owns a listening Unix socket in a private directory (for the whole campaign).
Per input, a fresh client connects and the target accepts its connection: the target *is*
the server, and it runs in the fuzzing thread, so everything is deterministic.  Each step
of the input first writes a *plan* into the server end — any mix of a correct reply to the
request the client is about to make, ``ERROR`` replies (known, unknown, garbage names),
watch events (valid, for tokens the client registered or not, malformed, floods of
hundreds), replies with a wrong ``req_id`` / type / ``tx_id``, late replies to requests
that timed out, lengths over 4096, a partial message, random bytes — and may hang up; then
the client makes one call (a node operation, a watch or unwatch, a transaction, a
``read_watch``).  Because the plan is in the socket before the request leaves, the call
finds everything it will ever get already there: a call whose plan holds no answer simply
times out (after a few milliseconds), and one whose plan is a correct answer gets it at
once.  The request ids the client will use are learnt by reading its requests back after
each call (they are sequential).

Invariant, for every call: it returns, or raises ``XenstoreError``, ``TimeoutError``,
``XenstoreConnectionError`` or a ``PeerError`` (``WireError``) — nothing else; it never
takes much longer than its timeout; when the plan was an honest answer (optionally after
valid watch events and late replies to expired requests) on a healthy connection, the
result is the right one; the queued watch events stay within ``max_pending`` (plus one
per registered watch, the collapsed form), the memory of expired request ids within its
bound, the receive buffer at its size; every request the client wrote is well framed; and
after the input the client's descriptor is closed (the process holds no more descriptors
than before).  The asyncio client is driven the same way, one call at a time on a private
event loop (a ``_Driver`` per client kind makes the calls and checks its own bounds: each
watch's pending events, no request left pending between calls).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xenpv.errors import PeerError
from xenpv.fuzz.hostile import InvariantViolation, violation
from xenpv.fuzz.source import ByteSource
from xenpv.xenstore import blocking, wire
from xenpv.xenstore import client as aclient
from xenpv.xenstore.blocking import BlockingClient
from xenpv.xenstore.ops import Perm, WatchEvent, XenstoreConnectionError
from xenpv.xenstore.wire import HEADER, PAYLOAD_MAX, XenstoreError, XsType

__all__ = ["ClientTarget", "async_client", "blocking_client"]

#: Timeout of a call whose plan holds no answer (it will time out).
SHORT = 0.004
#: Timeout of a call whose answer is already in the socket (never reached in practice).
LONG = 5.0
#: Slack over its timeout a call may take before it counts as a hang.
SLACK = 2.0
STEPS = 16
WATCH_PATHS = ("/w", "/w/x", "@releaseDomain", "rel")
TOKENS = ("t1", "t2")
ERRNO_NAMES = (b"ENOENT\0", b"EAGAIN\0", b"EACCES\0", b"E2BIG\0", b"EEXIST\0", b"EWHAT\0",
               b"\xff\0", b"ENOENT", b"")
_ALLOWED = (XenstoreError, TimeoutError, XenstoreConnectionError, PeerError)


@dataclass
class _Call:
    """One client call: its name and arguments, its request type and an honest answer."""

    name: str
    args: tuple[Any, ...]
    type_: int
    reply: bytes
    expected: Any


def _choose_call(src: ByteSource) -> _Call:
    """Choose the next call and an honest answer for it."""
    kind = src.below(12)
    value = src.take(src.below(40))
    path = src.choice(("/a", "/a/b", "rel/x", "/w/x"))
    if kind == 0:
        return _Call("read", (path,), XsType.READ, value, value)
    if kind == 1:
        return _Call("write", (path, value), XsType.WRITE, wire.OK, None)
    if kind == 2:
        names = [f"c{i}" for i in range(src.below(6))]
        reply = b"".join(n.encode() + b"\0" for n in names)
        return _Call("directory", (path,), XsType.DIRECTORY, reply, names)
    if kind == 3:
        return _Call("exists", (path,), XsType.READ, value, True)
    if kind == 4:
        return _Call("get_perms", (path,), XsType.GET_PERMS, b"b0\0r5\0",
                     [Perm("b", 0), Perm("r", 5)])
    if kind == 5:
        return _Call("rm", (path,), XsType.RM, wire.OK, None)
    if kind in (6, 7):
        wpath, token = src.choice(WATCH_PATHS), src.choice(TOKENS)
        if kind == 6:
            return _Call("watch", (wpath, token), XsType.WATCH, wire.OK, token)
        return _Call("unwatch", (wpath, token), XsType.UNWATCH, wire.OK, None)
    if kind == 8:
        return _Call("transaction_start", (), XsType.TRANSACTION_START, b"42\0", 42)
    if kind == 9:
        return _Call("get_domain_path", (5,), XsType.GET_DOMAIN_PATH, b"/local/domain/5\0",
                     "/local/domain/5")
    if kind == 10:
        return _Call("is_domain_introduced", (5,), XsType.IS_DOMAIN_INTRODUCED, b"T\0", True)
    return _Call("read_watch", (src.choice(WATCH_PATHS), src.choice(TOKENS)), -1, b"", None)


class _Driver:
    """How one kind of client makes the calls, and its bounds."""

    def connected(self) -> bool:
        """Whether the client still considers its connection usable."""
        raise NotImplementedError

    def run(self, call: _Call, timeout: float) -> Any:
        """Make ``call`` (bounded by ``timeout``); return its result."""
        raise NotImplementedError

    def check_bounds(self) -> None:
        """Raise :class:`InvariantViolation` if a queue or memory outgrew its bound."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the client."""
        raise NotImplementedError


class _BlockingDriver(_Driver):
    def __init__(self, path: str, max_pending: int) -> None:
        self.client = BlockingClient(path, timeout=SHORT, max_pending=max_pending)

    def connected(self) -> bool:
        return self.client.connected

    def run(self, call: _Call, timeout: float) -> Any:
        client = self.client
        if call.name == "read_watch":
            return client.read_watch(timeout=timeout)
        saved = client.default_timeout
        client.default_timeout = timeout
        try:
            if call.name == "transaction_start":
                return client.transaction().start().tx_id
            result = getattr(client, call.name)(*call.args)
            return call.args[1] if call.name == "watch" else result
        finally:
            client.default_timeout = saved

    def check_bounds(self) -> None:
        client = self.client
        registered = sum(len(p) for p in client._watches.values())
        if client.pending_watch_events > client.max_pending + registered + 1:
            raise InvariantViolation(
                f"{client.pending_watch_events} watch events queued "
                f"(max_pending {client.max_pending}, {registered} watches)")
        if len(client._expired) > blocking._EXPIRED_MEMORY:
            raise InvariantViolation("expired request ids beyond their bound")
        if len(client._rbuf) != blocking._RECV_SIZE:
            raise InvariantViolation("the receive buffer grew")

    def close(self) -> None:
        self.client.close()


class _AsyncDriver(_Driver):
    """The asyncio client on a private event loop, one call at a time."""

    def __init__(self, path: str, max_pending: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.max_pending = max_pending
        self.watches: dict[tuple[str, str], aclient.Watch] = {}
        try:
            self.client = self.loop.run_until_complete(aclient.connect(path, timeout=SHORT))
        except BaseException:
            self.loop.close()
            raise

    def connected(self) -> bool:
        return self.client.connected

    def run(self, call: _Call, timeout: float) -> Any:
        return self.loop.run_until_complete(self._run(call, timeout))

    async def _run(self, call: _Call, timeout: float) -> Any:
        client = self.client
        if call.name == "read_watch":
            w = self.watches.get(call.args)
            return None if w is None else await w.get(timeout)
        if call.name == "watch":
            w = client.watch(*call.args, max_pending=self.max_pending, timeout=timeout)
            await w.register()
            old = self.watches.get(call.args)
            self.watches[call.args] = w
            if old is not None:  # (the server refused a duplicate: nothing is sent)
                old._unroute()
            return w.token
        if call.name == "unwatch":
            old = self.watches.pop(call.args, None)
            if old is not None:
                old.timeout = timeout  # (the watch keeps the timeout it was made with)
                await old.unregister()
            return None
        if call.name == "transaction_start":
            return (await client.transaction(timeout=timeout).start()).tx_id
        return await getattr(client, call.name)(*call.args, timeout=timeout)

    def check_bounds(self) -> None:
        conn = self.client._conn
        for w in self.watches.values():
            if w.pending > w.max_pending:
                raise InvariantViolation(f"{w.pending} events queued on one watch")
        if len(conn._expired) > aclient._EXPIRED_MEMORY:
            raise InvariantViolation("expired request ids beyond their bound")
        if conn._pending:
            raise InvariantViolation(f"{len(conn._pending)} requests still pending between calls")

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.client.close())
        finally:
            self.loop.close()


def _event(path: str, token: str) -> bytes:
    return wire.encode(XsType.WATCH_EVENT, 0, 0, path.encode() + b"\0" + token.encode() + b"\0")


class ClientTarget:
    """The ``xenstore:blocking-client`` and ``xenstore:async-client`` targets (see the
    module docstring); call it with one input, ``close()`` it at the end of the campaign."""

    def __init__(self, driver: Callable[[str, int], _Driver]) -> None:
        self._driver = driver
        self._dir = tempfile.mkdtemp(prefix="xenpv-fuzz-xsclient-")
        self.path = os.path.join(self._dir, "xs.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(4)
        self._listener.settimeout(5.0)

    def close(self) -> None:
        """Remove the listening socket and its directory."""
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __call__(self, data: bytes) -> None:
        """Play one input (raises :class:`InvariantViolation` when the client broke it)."""
        before = _open_fds()
        src = ByteSource(data)
        driver = self._driver(self.path, src.choice((1, 4, 32, 1024)))
        try:
            server, _ = self._listener.accept()
        except BaseException:
            driver.close()
            raise
        try:
            server.setblocking(False)
            _Session(driver, server, src).play()
        finally:
            driver.close()
            server.close()
        del driver
        after = _open_fds()
        if after > before:
            raise InvariantViolation(f"descriptors leaked: {before} before, {after} after")


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return 0


class _Session:
    """One input's conversation between the hostile server end and the client."""

    def __init__(self, driver: _Driver, server: socket.socket, src: ByteSource) -> None:
        self.driver = driver
        self.server = server
        self.src = src
        self.next_id = 1
        self.expired: list[int] = []
        self.requests = wire.Decoder()
        self.hung_up = False
        #: bytes that may leave the stream unframed were sent: results are not checked
        self.tainted = False

    def play(self) -> None:
        src = self.src
        for _ in range(STEPS):
            if src.remaining <= 0:
                break
            call = _choose_call(src)
            plan, honest, answered = self.plan(call)
            if not self.deliver(plan):
                honest = answered = False
            if not self.hung_up and src.below(16) == 0:
                self.server.shutdown(socket.SHUT_WR)  # hang up (after the plan)
                self.hung_up = True
            if self.hung_up or self.tainted:
                honest = False
            sent = self.next_id
            # (after unframed bytes an answer may never be seen: no long wait for it)
            timed_out = self.call(call, honest, answered and not (self.hung_up or self.tainted))
            self.read_requests()
            if timed_out and self.next_id > sent:
                self.expired.append(self.next_id - 1)  # its late reply must be discarded
            self.driver.check_bounds()

    # -- the server's side -------------------------------------------------------------
    def plan(self, call: _Call) -> tuple[bytes, bool, bool]:
        """The bytes written before ``call``; whether they are an honest answer (the
        result can be checked) and whether they answer the call at all."""
        src = self.src
        rid = self.next_id
        out = bytearray()
        honest = self.driver.connected() and not self.hung_up
        answered = False
        for _ in range(1 + src.below(4)):
            kind = src.below(16)
            if kind <= 3 and call.type_ >= 0:  # the honest answer
                out += wire.encode(call.type_, rid, 0, call.reply)
                answered = True
                break
            if kind == 4:  # a valid watch event (of a registered watch or not)
                out += _event(src.choice(("/w", "/w/x/y", "/a", "/", "rel/z", "@releaseDomain")),
                              src.choice(TOKENS))
            elif kind == 5:  # a flood of distinct events
                count = 1 + src.below(400)
                token = src.choice(TOKENS)
                out += b"".join(_event(f"/w/f{i}", token) for i in range(count))
            elif kind == 6 and self.expired:  # a late reply to a request that timed out
                late = self.expired.pop(src.below(len(self.expired)))  # (discarded once)
                out += wire.encode(XsType.READ, late, 0, b"late")
            elif kind == 7:  # an ERROR reply
                out += wire.encode(XsType.ERROR, rid, 0, src.choice(ERRNO_NAMES))
                honest = False
                break
            else:
                honest = False
                self.tainted = True
                out += self.garbage(call, rid)
                if src.boolean():
                    break
        return bytes(out), honest and answered, answered

    def garbage(self, call: _Call, rid: int) -> bytes:
        src = self.src
        kind = src.below(9)
        type_ = call.type_ if call.type_ >= 0 else XsType.READ
        if kind == 0:  # unknown or future req_id
            return wire.encode(type_, src.choice((rid + 1, rid + 7, 0, 0xFFFFFFFF)), 0, call.reply)
        if kind == 1:  # wrong type
            return wire.encode(src.choice((XsType.DIRECTORY, XsType.WATCH, 99, XsType.READ)),
                               rid, 0, call.reply)
        if kind == 2:  # wrong transaction
            return wire.encode(type_, rid, 1 + src.below(5), call.reply)
        if kind == 3:  # a length over the limit
            return HEADER.pack(type_, rid, 0, PAYLOAD_MAX + 1 + src.below(1 << 16)) + src.take(32)
        if kind == 4:  # a partial message
            whole = wire.encode(type_, rid, 0, call.reply + b"x" * src.below(64))
            return whole[: src.below(len(whole))]
        if kind == 5:  # a malformed watch event
            return wire.encode(XsType.WATCH_EVENT, 0, 0, src.take(src.below(24)))
        if kind == 6:  # a malformed payload for the right header
            return wire.encode(type_, rid, 0, src.take(src.below(48)))
        if kind == 7:  # event with non-ASCII parts
            return wire.encode(XsType.WATCH_EVENT, 0, 0, b"/w/\xff\0t1\0")
        return src.take(src.below(64))

    def deliver(self, plan: bytes) -> bool:
        """Write the plan; False if not all of it went (what does not fit is dropped)."""
        if self.hung_up or not plan:
            return not plan
        try:
            sent = self.server.send(plan)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            sent = 0
        if sent < len(plan):
            self.tainted = True
            return False
        return True

    def read_requests(self) -> None:
        """Read back what the client wrote: it must be well framed; learn the next req_id."""
        while True:
            try:
                data = self.server.recv(65536)
            except (BlockingIOError, ConnectionResetError):
                break
            if not data:
                break
            try:
                self.requests.feed(data)
                for msg in self.requests:
                    if msg.req_id != self.next_id:
                        raise InvariantViolation(
                            f"client request id {msg.req_id}, expected {self.next_id}")
                    self.next_id = msg.req_id + 1
            except wire.WireError as exc:
                raise violation("the client wrote a malformed request", exc) from None

    # -- the client's side -------------------------------------------------------------
    def call(self, call: _Call, honest: bool, answered: bool) -> bool:
        """Make the call and check its outcome; return whether it timed out."""
        timeout = LONG if answered else SHORT
        started = time.monotonic()
        timed_out = False
        try:
            result = self.driver.run(call, timeout)
        except TimeoutError:
            result = None
            honest_ok = False
            timed_out = True
        except _ALLOWED:
            result = None
            honest_ok = False
        except BaseException as exc:
            raise violation(f"{call.name} raised outside the contract", exc) from None
        else:
            honest_ok = True
        elapsed = time.monotonic() - started
        if elapsed > timeout + SLACK:
            raise InvariantViolation(f"{call.name} took {elapsed:.1f} s (timeout {timeout} s)")
        if honest and call.type_ >= 0:
            if not honest_ok:
                raise InvariantViolation(f"{call.name} failed on an honest answer")
            if result != call.expected:
                raise InvariantViolation(f"{call.name} returned {result!r}, not {call.expected!r}")
        if call.name == "read_watch" and result is not None and not isinstance(result, WatchEvent):
            raise InvariantViolation(f"read_watch returned {result!r}")
        return timed_out


def blocking_client() -> ClientTarget:
    """The ``xenstore:blocking-client`` target."""
    return ClientTarget(_BlockingDriver)


def async_client() -> ClientTarget:
    """The ``xenstore:async-client`` target: the same plans against the asyncio client."""
    return ClientTarget(_AsyncDriver)

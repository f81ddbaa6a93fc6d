"""Differential test of the embedded xenstored's two direct paths.

Theory of operation
-------------------
``_XsConnection._on_readable`` serves a connection either through the compiled direct path
(``xenpv.xenstore._xsconn.serve``) or through its pure-Python twin
(``_XsConnection._serve_direct``); both hand every case they do not own to the general
path.  Hypothesis generates, for a dom0 connection and an unprivileged guest connection
(write rate limit small enough to throttle), byte streams of valid and invalid requests
(every message type, unknown types, bad paths, unknown transaction ids, payloads over
4096, truncated headers) and a schedule saying how the streams are cut into ``send``
calls, when a client stops and resumes reading, when it shuts its side (EOF, possibly
after half a header) or goes away with replies unread, and when time passes.  The same schedule is played against a fresh
server on each path, and the reply byte streams (watch events included), the connection
fates, the store state and the server's counters must be identical — to each other and to
a third run in which every receive goes to the general path (the server without a direct
path, the reference).

Delivery is made deterministic by replacing the event loop: each connection is a real
``socketpair``, but the loop the connection registers with is :class:`SteppedLoop`, which
calls the reader and writer callbacks itself (when ``select`` says the socket is ready) and
runs timers on a virtual clock that also replaces ``time.monotonic`` inside the server
(rate limits and watch-event ages).  After every ``send`` the loop is stepped until the
server has consumed everything, so the server sees exactly the chunk boundaries of the
schedule.
"""

from __future__ import annotations

import heapq
import itertools
import select
import socket
import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpv.xenstore import server as xs_server
from xenpv.xenstore.store import Quotas
from xenpv.xenstore.wire import HEADER, XsType

GUEST = 5
QUOTAS = dict(write_rate=2.0, write_burst=2.0, write_global_burst=1.0, outstanding=4,
              watch_events=8, nodes=30)


def _compiled_serve() -> Callable[..., tuple[Any, ...]]:
    # The compiled path must exist: a missing build is a failure, not a skip.
    from xenpv.xenstore import _xsconn  # type: ignore[attr-defined]

    serve: Callable[..., tuple[Any, ...]] = _xsconn.serve
    return serve


def _general_only(xc: xs_server._XsConnection, rounds: int) -> tuple[Any, ...]:
    """A "direct path" that hands every receive to the general path (the server as it was
    before the direct path existed): the reference both direct paths must match."""
    try:
        n = xc.sock.recv_into(xc.rbuf)
    except (BlockingIOError, InterruptedError):
        return (xs_server._AGAIN,)
    except OSError as exc:
        return (xs_server._ERROR, exc.errno)
    if not n:
        return (xs_server._EOF,)
    return (xs_server._GENERAL, n, 0, [])


class SteppedLoop:
    """The part of an asyncio loop ``_XsConnection`` uses, stepped by the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.ready: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.timers: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def add_reader(self, fd: int, cb: Callable[[], None]) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def add_writer(self, fd: int, cb: Callable[[], None]) -> None:
        self.writers[fd] = cb

    def remove_writer(self, fd: int) -> bool:
        return self.writers.pop(fd, None) is not None

    def call_soon(self, cb: Callable[..., None], *args: Any) -> None:
        self.ready.append((cb, args))

    def call_later(self, delay: float, cb: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.timers, (self.now + delay, next(self._seq), cb, args))

    def step(self) -> bool:
        """Run one pass (ready callbacks, ready fds); False when nothing could run."""
        ran = False
        ready, self.ready = self.ready, []
        for cb, args in ready:
            cb(*args)
            ran = True
        fds = sorted(set(self.readers) | set(self.writers))
        if fds:
            r, w, _ = select.select(list(self.readers), list(self.writers), [], 0)
            for fd in sorted(r):
                on_read = self.readers.get(fd)
                if on_read is not None:
                    on_read()
                    ran = True
            for fd in sorted(w):
                on_write = self.writers.get(fd)
                if on_write is not None:
                    on_write()
                    ran = True
        return ran

    def settle(self, advance: bool) -> None:
        """Step until nothing is ready; with ``advance``, also run every timer (jumping the
        clock to it) until none is left."""
        for _ in range(5000):
            if self.step():
                continue
            if advance and self.timers:
                when, _, cb, args = heapq.heappop(self.timers)
                self.now = max(self.now, when)
                cb(*args)
                continue
            return
        raise AssertionError("the server did not settle")

    def tick(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, running the timers due on the way."""
        end = self.now + seconds
        while self.timers and self.timers[0][0] <= end:
            when, _, cb, args = heapq.heappop(self.timers)
            self.now = max(self.now, when)
            cb(*args)
            self.settle(False)
        self.now = end


class Run:
    """One server, its two connections and what their clients received."""

    def __init__(self, serve: Callable[..., tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch
                 ) -> None:
        self.loop = SteppedLoop()
        monkeypatch.setattr(xs_server, "_serve", serve)
        monkeypatch.setattr(xs_server, "time", SimpleNamespace(monotonic=self.loop.monotonic))
        self.server = xs_server.XenstoredServer(quotas=Quotas(**QUOTAS))  # type: ignore[arg-type]
        self.server.introduce_domain(GUEST)
        self.clients: list[socket.socket] = []
        self.conns: list[xs_server._XsConnection] = []
        self.received = [bytearray(), bytearray()]
        self.reading = [True, True]
        self.eof_seen = [False, False]
        for domid in (0, GUEST):
            client, srv = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            srv.setblocking(False)
            xc = xs_server._XsConnection(self.server, domid, srv, self.loop)  # type: ignore[arg-type]
            xc.start()
            self.clients.append(client)
            self.conns.append(xc)
        self.loop.settle(False)
        # a large readable value, so that replies can outgrow what a paused client takes
        big = b"/big\0" + b"v" * 2000
        self.send(0, HEADER.pack(XsType.WRITE, 1, 0, len(big)) + big)
        perms = b"/big\0b0\0r5\0"
        self.send(0, HEADER.pack(XsType.SET_PERMS, 2, 0, len(perms)) + perms)

    def drain(self, who: int) -> None:
        client = self.clients[who]
        while not self.eof_seen[who]:
            try:
                data = client.recv(65536)
            except BlockingIOError:
                return
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof_seen[who] = True
                return
            self.received[who] += data

    def settle(self, advance: bool = False) -> None:
        for _ in range(1000):
            self.loop.settle(advance)
            before = [len(r) for r in self.received]
            for who in (0, 1):
                if self.reading[who]:
                    self.drain(who)
            if [len(r) for r in self.received] == before and not self.loop.step():
                return
        raise AssertionError("no quiescence")

    def send(self, who: int, data: bytes) -> None:
        if not data:
            return
        try:
            self.clients[who].sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return
        except BlockingIOError:
            # The server is not reading (backpressure): deliver what fits, drop the rest
            # the same way in both runs.
            pass
        self.settle()

    def outcome(self) -> dict[str, Any]:
        self.reading = [True, True]
        self.settle(advance=True)
        state = self.server.store.to_state()
        result = {
            "received": [bytes(r) for r in self.received],
            "closed": [xc.closed for xc in self.conns],
            "eof_seen": self.eof_seen,
            "state": state,
            "throttles": dict(self.server.throttles),
            "dropped": [xc.dropped_events for xc in self.conns],
            "queued": [len(xc.queue) for xc in self.conns],
            "problems": self.server.store.check(),
        }
        for xc in self.conns:
            xc.abort()
        self.loop.settle(False)
        for client in self.clients:
            client.close()
        return result


# -- generated requests ------------------------------------------------------------------

PATHS = [b"/a", b"/a/b", b"/a/b/c", b"data", b"data/x", b"/local/domain/5/k",
         b"/local/domain/0/k", b"@releaseDomain", b"@introduceDomain",
         b"/a/", b"//a", b"", b"/a\x01", b"/" + b"x" * 3100]
READ_BIG = HEADER.pack(XsType.READ, 9, 0, 5) + b"/big\0"
TX_IDS = [0, 0, 0, 1, 2, 3, 0xFFFFFFFF]
VALID_TYPES = [t for t in XsType if t not in (XsType.WATCH_EVENT, XsType.ERROR)]


@st.composite
def request(draw: st.DrawFn) -> bytes:
    # weights: mostly valid requests; a dropped connection ends a run's interest
    kind = draw(st.sampled_from([0, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10]))
    req_id = draw(st.sampled_from([0, 1, 7, 0xFFFFFFFF]))
    tx = draw(st.sampled_from(TX_IDS))
    path = draw(st.sampled_from(PATHS))
    if kind == 0:  # unknown message type
        type_ = draw(st.sampled_from([23, 24, 99, 0xFFFF, 0xFFFFFFFF, int(XsType.ERROR),
                                      int(XsType.WATCH_EVENT)]))
        payload = draw(st.binary(max_size=16))
    elif kind == 1 and draw(st.integers(0, 2)) == 0:  # payload over the limit: dropped
        return HEADER.pack(XsType.WRITE, req_id, tx, 4097 + draw(st.integers(0, 3))) + b"z" * 64
    elif kind <= 2:  # arbitrary payload for any type
        type_ = draw(st.sampled_from(VALID_TYPES))
        payload = draw(st.binary(max_size=24))
    elif kind in (3, 4, 5):
        type_ = draw(st.sampled_from([XsType.WRITE, XsType.WRITE, XsType.MKDIR, XsType.RM]))
        payload = path + b"\0"
        if type_ == XsType.WRITE:
            payload += draw(st.binary(max_size=8))
    elif kind == 6:
        type_ = draw(st.sampled_from([XsType.READ, XsType.DIRECTORY, XsType.GET_PERMS]))
        payload = path + b"\0"
        if draw(st.booleans()):
            tx = 0
    elif kind == 7:
        type_ = draw(st.sampled_from([XsType.WATCH, XsType.UNWATCH]))
        payload = path + b"\0" + draw(st.sampled_from([b"t1", b"t2"])) + b"\0"
        tx = 0
    elif kind == 8:
        type_ = draw(st.sampled_from([XsType.TRANSACTION_START, XsType.TRANSACTION_END]))
        payload = b"\0" if type_ == XsType.TRANSACTION_START else draw(
            st.sampled_from([b"T\0", b"F\0", b"X\0"]))
        if type_ == XsType.TRANSACTION_START:
            tx = 0
    elif kind == 10:  # large values: replies the client may not take at once
        type_ = draw(st.sampled_from([XsType.WRITE, XsType.READ, XsType.READ]))
        payload = b"/big\0" + (b"w" * 2000 if type_ == XsType.WRITE else b"")
        tx = 0
    else:
        type_, payload = draw(st.sampled_from([
            (XsType.SET_PERMS, b"/a\0b5\0"),
            (XsType.SET_PERMS, b"/a/b\0n0\0r5\0"),
            (XsType.SET_PERMS, b"data\0n5\0"),
            (XsType.GET_DOMAIN_PATH, b"5\0"),
            (XsType.IS_DOMAIN_INTRODUCED, b"5\0"),
            (XsType.RESET_WATCHES, b"\0"),
            (XsType.DIRECTORY_PART, b"/\0" + b"0\0"),
            (XsType.CONTROL, b"print\0hello\0"),
            (XsType.INTRODUCE, b"7\0" + b"1\0" + b"1\0"),
            (XsType.RELEASE, b"7\0"),
            (XsType.RELEASE, b"5\0"),
            (XsType.SET_TARGET, b"7\0" + b"5\0"),
        ]))
        tx = 0
    return HEADER.pack(type_, req_id, tx, len(payload)) + payload


streams = st.lists(request(), min_size=2, max_size=24)
action = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.sampled_from([1, 7, 16, 23, 40, 300, 4096])),
    st.tuples(st.just("send"), st.integers(0, 1), st.sampled_from([20, 64, 200, 9000])),
    st.tuples(st.just("msgs"), st.integers(0, 1), st.integers(1, 6)),
    st.tuples(st.just("msgs"), st.integers(0, 1), st.integers(1, 6)),
    st.tuples(st.just("pause"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("flood"), st.integers(0, 1), st.integers(1, 8)),
    st.tuples(st.just("resume"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("tick"), st.just(0), st.sampled_from([0, 1, 3, 30])),
    st.tuples(st.just("send"), st.integers(0, 1), st.sampled_from([20, 64, 200, 9000])),
    st.tuples(st.just("eof"), st.integers(0, 1), st.sampled_from([0, 1, 8])),
)


def play(run: Run, requests: list[list[bytes]], actions: list[tuple[str, int, int]]
         ) -> dict[str, Any]:
    data = [b"".join(r) for r in requests]
    # message boundaries of each stream, to send whole requests only
    bounds = [list(itertools.accumulate(len(m) for m in r)) for r in requests]
    pos = [0, 0]
    shut = [False, False]
    for kind, who, arg in actions:
        if kind == "msgs" and not shut[who]:
            ends = [b for b in bounds[who] if b > pos[who]][:arg]
            if ends:
                run.send(who, data[who][pos[who] : ends[-1]])
                pos[who] = ends[-1]
        elif kind == "flood" and not shut[who] and pos[who] in (0, *bounds[who]):
            # whole READs of the large value, between two requests of the stream
            run.send(who, READ_BIG * arg)
        elif kind == "send" and not shut[who]:
            chunk = data[who][pos[who] : pos[who] + arg]
            pos[who] += len(chunk)
            run.send(who, chunk)
        elif kind == "eof" and not shut[who]:
            if arg == 8:  # half a header first
                run.send(who, struct.pack("=II", XsType.READ, 1))
            shut[who] = True
            if arg == 1:  # the client goes away, maybe leaving replies unread (ECONNRESET)
                run.eof_seen[who] = True
                run.clients[who].close()
            else:
                run.clients[who].shutdown(socket.SHUT_WR)
            run.settle()
        elif kind == "pause":
            run.reading[who] = False
        elif kind == "resume":
            run.reading[who] = True
            run.settle()
        elif kind == "tick":
            run.loop.tick(arg)
            run.settle()
    for who in (0, 1):
        run.reading[who] = True
        if not shut[who]:
            run.send(who, data[who][pos[who] :])
    return run.outcome()


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.lists(streams, min_size=2, max_size=2),
       actions=st.lists(action, min_size=4, max_size=40))
def test_direct_paths_agree(monkeypatch: pytest.MonkeyPatch, data: list[list[bytes]],
                            actions: list[tuple[str, int, int]]) -> None:
    outcomes = []
    for serve in (_compiled_serve(), xs_server._XsConnection._serve_direct, _general_only):
        with monkeypatch.context() as m:
            outcomes.append(play(Run(serve, m), data, actions))
    compiled, python, general = outcomes
    assert compiled["problems"] == [] and python["problems"] == []
    for key in compiled:
        assert compiled[key] == python[key], key
        assert compiled[key] == general[key], f"{key} (direct path vs general path)"

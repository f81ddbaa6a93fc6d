"""Differential test: our embedded xenstored against Xen's C xenstored.

Two loopback emulators with guests 1 and 2 (each built with its xenstore ring): one with
our embedded xenstored as dom0's, one with Xen's C xenstored (``--xenstored xen-c``).
Hypothesis generates request streams from two dom0 socket connections and from the two
guests over their rings — reads, writes, mkdir, rm, directory listings, get/set
permissions, watches and unwatches (relative ones from guests), transactions
(committed, aborted, conflicting), a guest's own nodes and the other guest's, and
limits (path length, node size, transactions per guest) — sends each stream to both
servers, and compares every reply and every watch event byte for byte, in order.  What
is deliberately not compared is listed in docs/xenstore.md ("Against Xen's C
xenstored").

``XENPV_XS_DIFF_EXAMPLES`` sets the example count (CI: the default, about 20 s, with a
fixed seed; elsewhere each run draws new streams).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ClientPlatform, ControlConnection
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.xenstore import wire
from xenpv.xenstore.ops import WatchEvent
from xenpv.xenstore.ring import BlockingRingClient
from xenpv.xenstore.wire import XenstoreError, XsType

EXAMPLES = int(os.environ.get("XENPV_XS_DIFF_EXAMPLES", "200"))
TIMEOUT = 10.0
GUESTS = (1, 2)

#: Node names below the example's base; overlapping on purpose (parents, children).
NODES = ("a", "a/b", "a/b/c", "a/d", "x", "x/y")
TOKENS = ("t1", "t2")
VALUES = (b"", b"v", b"value-2", b"\x00\xffbin")
PERMS = (("n0",), ("r0",), ("b0", "r1"), ("w0", "n2", "r3"), ("n1", "b0"), ("n2", "r1"),
         ("b1",), ("n2",))
#: Domains the streams create and destroy (permissions may name 3 before it exists).
LIFECYCLE = (3, 4)
#: Watched paths: below the example's base, or the special ones (absolute).
WATCHED = ("", "a", "a/b", "x/y", "@introduceDomain", "@releaseDomain")
#: connections: 0 and 1 are dom0's sockets, 2 and 3 guests 1 and 2 over their rings
DOMID = (0, 0, 1, 2)


class Raw:
    """A blocking dom0 socket client that keeps the wire exactly as the server sent it:
    one request at a time, watch events collected in arrival order."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # blocking connect: C xenstored listens with a backlog of 1, and a connect with
        # a timeout set fails with EAGAIN instead of waiting for room
        self.sock.connect(path)
        self.sock.settimeout(TIMEOUT)
        self.decoder = wire.Decoder()
        self.events: list[bytes] = []
        self.req = 0

    def call(self, type_: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        """Send one request; its reply ``(type, payload)`` (events seen meanwhile are
        kept in :attr:`events`)."""
        self.req += 1
        self.sock.sendall(wire.encode(type_, self.req, tx_id, payload))
        while True:
            for msg in self.decoder:
                if msg.type == XsType.WATCH_EVENT:
                    self.events.append(msg.payload)
                    continue
                assert msg.req_id == self.req, (msg, self.req)
                return msg.type, msg.payload
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.decoder.feed(data)

    def close(self) -> None:
        self.sock.close()


class _LoggingRingClient(BlockingRingClient):
    """The blocking ring client keeping every watch event, in arrival order."""

    log: list[bytes]

    def _queue_event(self, event: WatchEvent) -> None:
        self.log.append(event.path.encode() + b"\0" + event.token.encode() + b"\0")


class RawRing:
    """A guest's connection over its own xenstore ring, used like :class:`Raw`."""

    def __init__(self, rundir: str, domid: int) -> None:
        self.platform = ClientPlatform.for_domain(rundir, domid)
        ring = self.platform.xenstore_ring()
        _LoggingRingClient.log = []  # (set per instance below, before any event)
        self.client = _LoggingRingClient(ring.mem, self.platform.events, ring.port,
                                         timeout=TIMEOUT, on_close=ring.release)
        self.client.log = self.events = []

    def call(self, type_: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        """As :meth:`Raw.call` (an ERROR reply as its type and errno name)."""
        try:
            return type_, self.client.request(type_, payload, tx_id=tx_id)
        except XenstoreError as exc:
            return XsType.ERROR, exc.errno_name.encode() + b"\0"

    def close(self) -> None:
        self.client.close()
        self.platform.close()


@dataclass
class Server:
    """One emulator and its dom0 xenstored: dom0's socket, the guests' ring clients,
    the domains a stream created (destroyed at its end)."""

    rundir: str
    guests: list[RawRing]
    alive: set[int] = field(default_factory=set)

    def domain_op(self, op: int, payload: bytes) -> None:
        """A toolstack request to the emulator as dom0 (create or destroy a domain)."""
        ctl = ControlConnection(os.path.join(self.rundir, "dom0", "control"), timeout=30.0)
        try:
            ctl.call(op, payload)
        finally:
            ctl.close()

    @property
    def dom0(self) -> str:
        return os.path.join(self.rundir, "dom0", "xenstore")


@dataclass
class Servers:
    ours: Server
    xen_c: Server

    def log_tail(self) -> str:
        path = os.path.join(self.xen_c.rundir, "xen-c", "xenstored.log")
        try:
            with open(path, "rb") as f:
                return f.read()[-500:].decode(errors="replace")
        except OSError:
            return "(no log)"


def _emulators(*xenstoreds: str) -> Iterator[list[Server]]:
    """One emulator per dom0 xenstored named, each with guests 1 and 2 on their rings."""
    made: list[tuple[str, Any, list[RawRing]]] = []
    try:
        for xenstored in xenstoreds:
            rundir = tempfile.mkdtemp(prefix="xenpv-xsdiff-")
            # domains 1 and 2 exist (permissions may name them); domain 3 does not
            made.append((rundir, start_daemon(rundir, domains=GUESTS, xenstored=xenstored), []))
            made[-1][2].extend(RawRing(rundir, d) for d in GUESTS)
        yield [Server(rundir, guests) for rundir, _, guests in made]
    finally:
        for rundir, daemon, guests in made:
            for g in guests:
                g.close()
            stop_daemon(daemon)
            shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    for ours, xen_c in _emulators("ours", "xen-c"):
        yield Servers(ours, xen_c)


@pytest.fixture(scope="module")
def oxenstored() -> Iterator[Server]:
    for (ox,) in _emulators("oxenstored"):
        yield ox


def _z(*parts: str | bytes) -> bytes:
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


# --------------------------------------------------------------------------- requests

conn_ = st.integers(0, 3)
where_ = st.sampled_from(("own", "g1", "g2"))
node_ = st.sampled_from(NODES)
in_tx_ = st.booleans()

ops_ = st.one_of(
    st.tuples(st.just("write"), conn_, in_tx_, where_, node_, st.sampled_from(VALUES)),
    st.tuples(st.just("read"), conn_, in_tx_, where_, node_),
    st.tuples(st.just("mkdir"), conn_, in_tx_, where_, node_),
    st.tuples(st.just("rm"), conn_, in_tx_, where_, node_),
    st.tuples(st.just("directory"), conn_, in_tx_, where_, st.sampled_from(("", "a", "x"))),
    st.tuples(st.just("get_perms"), conn_, in_tx_, where_, node_),
    st.tuples(st.just("set_perms"), conn_, in_tx_, where_, node_, st.sampled_from(PERMS)),
    st.tuples(st.just("watch"), conn_, where_, st.sampled_from(WATCHED), st.sampled_from(TOKENS)),
    st.tuples(st.just("unwatch"), conn_, where_, st.sampled_from(WATCHED),
              st.sampled_from(TOKENS)),
    # domains made and destroyed by the emulator's toolstack (INTRODUCE by the domain
    # builder; the release: ours told by the daemon, C through VIRQ_DOM_EXC), and the
    # requests about them
    st.tuples(st.just("create"), st.sampled_from(LIFECYCLE)),
    st.tuples(st.just("destroy"), st.sampled_from(LIFECYCLE)),
    st.tuples(st.just("release"), conn_, st.sampled_from(LIFECYCLE)),
    st.tuples(st.just("introduced"), conn_, st.sampled_from((*GUESTS, *LIFECYCLE))),
    st.tuples(st.just("introduce"), st.sampled_from((2, 3)), st.sampled_from(LIFECYCLE)),
    st.tuples(st.just("tstart"), conn_),
    st.tuples(st.just("tend"), conn_, st.booleans()),
    st.tuples(st.just("long_path"), conn_, st.sampled_from((2048, 2049, 3072, 3073))),
    st.tuples(st.just("big"), conn_, st.sampled_from((1000, 3000))),
    st.tuples(st.just("many_tx"), conn_),
)
streams_ = st.lists(ops_, min_size=1, max_size=25)


def _base(n: int, c: int, where: str) -> str:
    """The example's subtree as connection ``c`` names it: its own (dom0: an absolute
    path of its own; a guest: relative, in its home) or guest 1's / 2's (absolute)."""
    if where == "own":
        return f"/xsdiff/{n}" if DOMID[c] == 0 else f"data/xd{n}"
    return f"/local/domain/{where[1]}/data/xd{n}"


def _run(server: Server, n: int, stream: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Run ``stream`` as example ``n`` against ``server``; the transcript."""
    conns: list[Any] = [Raw(server.dom0), Raw(server.dom0), *server.guests]
    tx: list[int] = [0, 0, 0, 0]  # each connection's open transaction (0: none)
    out: list[tuple[Any, ...]] = []

    def node(c: int, where: str, name: str) -> bytes:
        if name.startswith("@"):
            return _z(name)
        return _z(f"{_base(n, c, where)}/{name}".rstrip("/"))

    alive = server.alive

    try:
        # the example's private subtrees: dom0's, and one in each guest's home (its own)
        conns[0].call(XsType.WRITE, _z(f"/xsdiff/{n}"))
        for c in (2, 3):
            conns[c].call(XsType.WRITE, _z(f"data/xd{n}"))
        for op in stream:
            kind = op[0]
            c = op[1] if kind not in ("create", "destroy") else 0
            conn = conns[c]
            tid = tx[c] if len(op) > 2 and op[2] is True and kind != "tend" else 0
            if kind == "write":
                reply = conn.call(XsType.WRITE, node(c, op[3], op[4]) + op[5], tid)
            elif kind in ("read", "mkdir", "rm", "directory", "get_perms"):
                typ = {"read": XsType.READ, "mkdir": XsType.MKDIR, "rm": XsType.RM,
                       "directory": XsType.DIRECTORY, "get_perms": XsType.GET_PERMS}[kind]
                reply = conn.call(typ, node(c, op[3], op[4]), tid)
            elif kind == "set_perms":
                reply = conn.call(XsType.SET_PERMS, node(c, op[3], op[4]) + _z(*op[5]), tid)
                if reply[1] == b"EPERM\0":  # documented difference: a guest changing the
                    reply = (reply[0], b"EACCES\0")  # owner (C: EPERM, ours: EACCES)
            elif kind in ("watch", "unwatch"):
                typ = XsType.WATCH if kind == "watch" else XsType.UNWATCH
                reply = conn.call(typ, node(c, op[2], op[3]) + _z(op[4]))
            elif kind == "tstart":
                reply = conn.call(XsType.TRANSACTION_START, _z(""))
                if reply[0] == XsType.TRANSACTION_START:
                    if tx[c]:  # a second one: keep the first, end this one
                        new = int(reply[1].rstrip(b"\0"))
                        conn.call(XsType.TRANSACTION_END, _z("F"), new)
                    else:
                        tx[c] = int(reply[1].rstrip(b"\0"))
                    reply = (reply[0], b"<tx>")
            elif kind == "tend":
                reply = conn.call(XsType.TRANSACTION_END, _z("T" if op[2] else "F"), tx[c])
                tx[c] = 0
            elif kind == "long_path":
                base = _base(n, c, "own")
                length = op[2]
                if DOMID[c] and length == 2048:
                    # documented difference (node size): a guest's 2048-byte name makes
                    # its parent's record too big for C xenstored (ENOSPC), not for ours
                    length += 1
                name = base + "/" + "p" * (length - len(base) - 1)
                reply = conn.call(XsType.WRITE, _z(name) + b"v")
            elif kind == "big":
                reply = conn.call(XsType.WRITE, node(c, "own", "big") + b"b" * op[2])
                if DOMID[c] and reply[1] in (b"E2BIG\0", b"ENOSPC\0"):
                    reply = (reply[0], b"<too big>")  # documented difference (node size)
            elif kind == "create":
                if op[1] not in alive:
                    server.domain_op(proto.Op.DOMAIN_CREATE, proto.U32.pack(op[1]))
                    alive.add(op[1])
                reply = (XsType.INTRODUCE, b"")
            elif kind == "destroy":
                if op[1] in alive:
                    server.domain_op(proto.Op.DOMAIN_DESTROY, proto.U32.pack(op[1]))
                    alive.discard(op[1])
                reply = (XsType.RELEASE, b"")
            elif kind == "release":
                reply = conn.call(XsType.RELEASE, _z(str(op[2])))
            elif kind == "introduced":
                reply = conn.call(XsType.IS_DOMAIN_INTRODUCED, _z(str(op[2])))
            elif kind == "introduce":  # a guest introducing a domain: refused
                reply = conn.call(XsType.INTRODUCE, _z(str(op[2]), "1", "1"))
            elif kind == "many_tx":  # past the transaction quota (10 per guest)
                started: list[int] = []
                last = b""
                for _ in range(12):
                    typ, last = conn.call(XsType.TRANSACTION_START, _z(""))
                    if typ == XsType.TRANSACTION_START:
                        started.append(int(last.rstrip(b"\0")))
                for t in started:
                    conn.call(XsType.TRANSACTION_END, _z("F"), t)
                # documented difference: C lets a connection open one more than the quota
                # (10 here, 11 there); compared: whether the quota was hit, and its errno
                hit = DOMID[c] != 0 and len(started) + bool(tx[c]) in (10, 11)
                reply = (XsType.TRANSACTION_START, last if hit else b"%d" % len(started))
            else:  # pragma: no cover - the strategy has no other kind
                raise AssertionError(kind)
            out.append((op, XsType(reply[0]).name, reply[1]))
            # every event the request caused has been sent once a later reply arrives
            for i, other in enumerate(conns):
                other.call(XsType.GET_DOMAIN_PATH, _z("0"))
                if kind == "watch" and i == c and DOMID[c] and op[3].startswith("@"):
                    # documented difference: a guest's watch of a special path it may
                    # not read gets its initial event from C, not from ours
                    other.events[:] = [e for e in other.events if e != _z(op[3], op[4])]
                if other.events:
                    out.append(("events", i, list(other.events)))
                    other.events.clear()
    finally:
        for domid in sorted(alive):  # the next example starts without them
            server.domain_op(proto.Op.DOMAIN_DESTROY, proto.U32.pack(domid))
            alive.discard(domid)
        for c, conn in enumerate(conns):
            if c >= 2:  # the guests' connections stay: drop what the example left
                conn.call(XsType.RESET_WATCHES, b"")
                conn.call(XsType.RM, _z(f"data/xd{n}"))
                conn.events.clear()
            else:
                if tx[c]:
                    conn.call(XsType.TRANSACTION_END, _z("F"), tx[c])
                if c == 0:
                    conn.call(XsType.RM, _z(f"/xsdiff/{n}"))
                conn.close()
    return out


_counter = iter(range(1 << 30))


# CI (CI=true) runs a fixed set of examples; elsewhere every run explores new streams
@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stream=streams_)
def test_request_streams_get_the_same_replies_and_events_from_both_servers(
    servers: Servers, stream: list[tuple[Any, ...]]
) -> None:
    n = next(_counter)
    theirs = _run(servers.xen_c, n, stream)
    ours = _run(servers.ours, n, stream)
    assert ours == theirs, servers.log_tail()


#: Transactions against a concurrent change by another connection: what each commit
#: answers on C xenstored (and so must on ours).  A node the transaction only wrote
#: counts as looked at: a concurrent write to it fails the commit (no blind write wins).
CONFLICTS = {
    "blind write, concurrent write": (
        [("write", 0, False, "own", "a", b"0"), ("tstart", 0), ("write", 0, True, "own", "a", b"1"),
         ("write", 1, False, "own", "a", b"2"), ("tend", 0, True), ("read", 0, False, "own", "a")],
        "EAGAIN"),
    "blind create, concurrent create": (
        [("tstart", 0), ("write", 0, True, "own", "x", b"1"), ("write", 1, False, "own", "x", b"2"),
         ("tend", 0, True)],
        "EAGAIN"),
    "unrelated nodes": (
        [("write", 0, False, "own", "a", b"0"), ("tstart", 0), ("write", 0, True, "own", "x", b"1"),
         ("write", 1, False, "own", "a", b"2"), ("tend", 0, True)],
        "OK"),
    "child created, parent's value changed": (
        [("write", 0, False, "own", "a", b"0"), ("tstart", 0), ("write", 0, True, "own", "a/b", b"1"),
         ("write", 1, False, "own", "a", b"2"), ("tend", 0, True)],
        "EAGAIN"),
    "removed, concurrent write": (
        [("write", 0, False, "own", "a", b"0"), ("tstart", 0), ("rm", 0, True, "own", "a"),
         ("write", 1, False, "own", "a", b"2"), ("tend", 0, True)],
        "EAGAIN"),
    "read, concurrent write": (
        [("write", 0, False, "own", "a", b"0"), ("tstart", 0), ("read", 0, True, "own", "a"),
         ("write", 1, False, "own", "a", b"2"), ("tend", 0, True)],
        "EAGAIN"),
    "re-permissioned, concurrent write": (
        [("write", 0, False, "own", "a", b"0"), ("tstart", 0), ("set_perms", 0, True, "own", "a", ("n0", "r1")),
         ("write", 1, False, "own", "a", b"2"), ("tend", 0, True)],
        "EAGAIN"),
    "aborted": (
        [("tstart", 0), ("write", 0, True, "own", "a", b"1"), ("write", 1, False, "own", "a", b"2"),
         ("tend", 0, False)],
        "OK"),
}


def test_transaction_conflicts_end_alike(servers: Servers) -> None:
    for n, (name, (stream, commit)) in enumerate(CONFLICTS.items(), start=1 << 20):
        theirs = _run(servers.xen_c, n, stream)
        ours = _run(servers.ours, n, stream)
        assert ours == theirs, name
        ends = [r for r in theirs if r[0] != "events" and r[0][0] == "tend"]
        assert ends[-1][2] == (b"OK\0" if commit == "OK" else commit.encode() + b"\0"), name


#: A domain's life as the toolstack and dom0 see it, on both servers: its introduction
#: and destruction fire @introduceDomain and @releaseDomain (for dom0; a guest may not
#: read them), a permission naming it outlives it, its domid is reused, and dom0 may
#: release a live domain itself (RELEASE) before it is destroyed.
LIFE = [
    ("write", 0, False, "own", "a", b"0"),
    ("watch", 0, "own", "@releaseDomain", "t1"),
    ("watch", 1, "own", "@introduceDomain", "t2"),
    ("watch", 2, "own", "@releaseDomain", "t1"),
    ("create", 3),
    ("introduced", 0, 3),
    ("introduced", 2, 3),
    ("set_perms", 0, False, "own", "a", ("n0", "r3")),
    ("destroy", 3),
    ("introduced", 0, 3),
    ("get_perms", 0, False, "own", "a"),
    ("create", 3),
    ("get_perms", 0, False, "own", "a"),
    ("release", 0, 3),
    ("introduced", 0, 3),
    ("destroy", 3),
    ("release", 2, 1),
    ("introduce", 3, 4),
    ("release", 0, 4),
]


def test_domain_lifecycle_alike(servers: Servers) -> None:
    n = 1 << 21
    theirs = _run(servers.xen_c, n, LIFE)
    ours = _run(servers.ours, n, LIFE)
    assert ours == theirs, servers.log_tail()
    # what followed each creation, destruction and RELEASE (the same on both servers)
    follows = [*theirs[1:], ("end",)]
    after = [(step[0], follows[i] if follows[i][0] == "events" else None)
             for i, step in enumerate(theirs)
             if step[0] != "events" and step[0][0] in ("create", "destroy", "release")]
    introduced = ("events", 1, [b"@introduceDomain\0t2\0"])
    released = ("events", 0, [b"@releaseDomain\0t1\0"])
    assert after == [(("create", 3), introduced), (("destroy", 3), released),
                     (("create", 3), introduced), (("release", 0, 3), released),
                     (("destroy", 3), None),  # released already: nothing more fires
                     (("release", 2, 1), None), (("release", 0, 4), None)]


# ----------------------------------------------------------- oxenstored against C

#: Permissions naming only domains that live through a stream (oxenstored drops an entry
#: naming a domain when that domain is destroyed; C keeps it).
OX_PERMS = tuple(p for p in PERMS if not any(e[1:] in ("3", "4") for e in p))
own_ = st.just("own")
no_tx_ = st.just(False)
#: What oxenstored and C answer alike (docs/xenstore.md, "oxenstored"): every connection
#: on its own nodes, outside transactions, with watches (special paths included) and
#: domains made and destroyed; not transactions (oxenstored merges them), other guests'
#: nodes (it answers ENOENT before EACCES), limits, RELEASE and INTRODUCE.
ox_streams_ = st.lists(st.one_of(
    st.tuples(st.just("write"), conn_, no_tx_, own_, node_, st.sampled_from(VALUES)),
    st.tuples(st.just("read"), conn_, no_tx_, own_, node_),
    st.tuples(st.just("mkdir"), conn_, no_tx_, own_, node_),
    st.tuples(st.just("rm"), conn_, no_tx_, own_, node_),
    st.tuples(st.just("directory"), conn_, no_tx_, own_, st.sampled_from(("", "a", "x"))),
    st.tuples(st.just("get_perms"), conn_, no_tx_, own_, node_),
    st.tuples(st.just("set_perms"), conn_, no_tx_, own_, node_, st.sampled_from(OX_PERMS)),
    st.tuples(st.just("watch"), conn_, own_, st.sampled_from(WATCHED), st.sampled_from(TOKENS)),
    st.tuples(st.just("unwatch"), conn_, own_, st.sampled_from(WATCHED), st.sampled_from(TOKENS)),
    st.tuples(st.just("create"), st.sampled_from(LIFECYCLE)),
    st.tuples(st.just("destroy"), st.sampled_from(LIFECYCLE)),
    st.tuples(st.just("introduced"), conn_, st.sampled_from((*GUESTS, *LIFECYCLE))),
), min_size=1, max_size=25)


def _unordered(transcript: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The transcript with DIRECTORY replies' names sorted and each connection's events of
    one request as a sorted set: oxenstored lists children in another order than C; when
    one request fires several watches of one connection it sends their events in the
    reverse order of C's (newest watch first), and when two of them (same token, one a
    parent of the other) make the same event, it sends it twice where C sends it once.
    Neither order nor a repeat of the same event carries meaning."""
    return [(r[0], r[1], sorted(set(r[2]))) if r[0] == "events"
            else (r[0], r[1], b"".join(sorted(n + b"\0" for n in r[2].split(b"\0")[:-1])))
            if r[1] == "DIRECTORY" else r for r in transcript]


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None,
          derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stream=ox_streams_)
@example(stream=[("watch", 2, "own", "a", "t1"), ("watch", 2, "own", "a", "t2"),
                 ("write", 2, False, "own", "a/b", b"v")])  # two watches, one request
@example(stream=[("watch", 0, "own", "", "t1"), ("watch", 0, "own", "a", "t1"),
                 ("write", 0, False, "own", "a", b"")])  # the same event from two watches
def test_oxenstored_answers_like_c_where_they_agree(
    servers: Servers, oxenstored: Server, stream: list[tuple[Any, ...]]
) -> None:
    n = next(_counter)
    theirs = _unordered(_run(servers.xen_c, n, stream))
    ox = _unordered(_run(oxenstored, n, stream))
    assert ox == theirs

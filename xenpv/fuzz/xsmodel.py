"""A naive reference model of the xenstore server, and a harness comparing the store with it.

Theory of operation
-------------------
The model (:class:`Model`) keeps whole-node copies in plain dicts and lists, recounts quotas
by scanning, and implements C xenstored's transaction rule directly: a transaction's first
look at a node snapshots it and remembers its version; a commit fails with EAGAIN exactly
when a remembered version changed.  Every request looks at the node it changes first (a
WRITE checks permissions), so a node a transaction wrote is checked too: there is no
"blind write" that wins over a concurrent writer.

:class:`XsHarness` sends the same operations to a real :class:`~xenpv.xenstore.store.Store`
(over its ``handle`` entry point, as encoded wire requests) and to the model, from four
connections (two of dom0, domains 5 and 6).  After every step the store's reply, the watch
events of every connection, the per-domain node counts and the store's own consistency
check must match, and :meth:`XsHarness.round_trip` checks a serialise/restore round trip
(hostile-inputs.md scenario 30).  A mismatch is an ``AssertionError``.

The Hypothesis state machine in ``tests/property/test_xs_model.py`` and the
``xenstore:model`` fuzz target both drive this harness.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from xenpv.xenstore import wire
from xenpv.xenstore.store import Quotas, Store
from xenpv.xenstore.wire import XsType as T

__all__ = ["CONNS", "PATHS", "PERM_SETS", "WATCH_PATHS", "Model", "XsHarness"]

READ, WRITE, OWNER = 1, 2, 8
LETTER = {"n": 0, "r": 1, "w": 2, "b": 3}
NODE_QUOTA = 2

PATHS = ["/a", "/a/b", "/a/b/c", "/a/d", "/local/domain/5", "/local/domain/5/x",
         "/local/domain/5/x/y", "/local/domain/6/z"]  # fmt: skip
WATCH_PATHS = ["/", "/a", "/a/b", "/local/domain/5", "/local/domain/6/z"]
PERM_SETS = [("n0",), ("n5", "r0"), ("r0", "b6"), ("n6",), ("b5",), ("r5", "w6")]
CONNS = {"c0": 0, "c0b": 0, "c5": 5, "c6": 6}

Perms = tuple[tuple[int, int], ...]


def parent(path: str) -> str:
    """The parent of a xenstore path."""
    return path.rsplit("/", 1)[0] or "/"


def is_below(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or lies below it."""
    return path == top or top == "/" or path.startswith(top + "/")


@dataclass
class MNode:
    """A model node: value, permissions, version and child names."""

    value: bytes
    perms: Perms
    ver: int
    children: list[str] = field(default_factory=list)

    def clone(self) -> MNode:
        return MNode(self.value, self.perms, self.ver, list(self.children))


@dataclass
class MTx:
    """A model transaction: snapshots, local changes, read versions and replayable ops."""

    seen: dict[str, MNode | None] = field(default_factory=dict)
    local: dict[str, MNode | None] = field(default_factory=dict)
    reads: dict[str, int | None] = field(default_factory=dict)
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    delta: dict[int, int] = field(default_factory=dict)
    poisoned: str | None = None


class Fail(Exception):
    """A model request failed with the errno name in its message."""


class Model:
    """Naive xenstore: dict of whole nodes, scans for counts, copies for transactions."""

    def __init__(self) -> None:
        self.ver = 0
        root: Perms = ((0, 0),)
        self.live: dict[str, MNode] = {
            "/": MNode(b"", root, 0, ["tool"]),
            "/tool": MNode(b"", root, 0, ["xenstored"]),
            "/tool/xenstored": MNode(b"", root, 0),
        }
        self.watches: list[tuple[str, str, str]] = []  # (conn, path, token)
        self.events: dict[str, list[tuple[str, str]]] = {c: [] for c in CONNS}
        # (path, removed descendants, perms) of each change not yet reported
        self.fired: list[tuple[str, frozenset[str], Perms]] = []

    def next(self) -> int:
        self.ver += 1
        return self.ver

    @staticmethod
    def perm(domid: int, perms: Perms) -> int:
        if domid == 0 or perms[0][0] == domid:
            return READ | WRITE | OWNER
        for d, bits in perms[1:]:
            if d == domid:
                return bits
        return perms[0][1]

    def count(self, domid: int, tx: MTx | None) -> int:
        n = sum(1 for node in self.live.values() if node.perms[0][0] == domid)
        return n + (tx.delta.get(domid, 0) if tx else 0)

    # -- views ----------------------------------------------------------------------------
    def get(self, tx: MTx | None, path: str) -> MNode | None:
        if tx is None:
            return self.live.get(path)
        if path in tx.local:
            return tx.local[path]
        if path in tx.seen:
            return tx.seen[path]
        node = self.live.get(path)
        snap = node.clone() if node else None
        tx.seen[path] = snap
        tx.reads[path] = node.ver if node else None
        return snap

    def own(self, tx: MTx, path: str) -> MNode:
        node = tx.local.get(path)
        if node is None:
            base = self.get(tx, path)
            assert base is not None
            node = tx.local[path] = base.clone()
        return node

    # -- mutations ------------------------------------------------------------------------
    def create(self, tx: MTx | None, path: str, value: bytes, perms: Perms, fire: bool) -> None:
        ver = self.next()
        name = path.rsplit("/", 1)[1]
        if tx is None:
            self.live[path] = MNode(value, perms, ver)
            self.live[parent(path)].children.append(name)
            self.live[parent(path)].ver = ver
            if fire:
                self.fired.append((path, frozenset(), perms))
        else:
            tx.local[path] = MNode(value, perms, ver)
            p = self.own(tx, parent(path))
            p.children.append(name)
            p.ver = ver
            tx.delta[perms[0][0]] = tx.delta.get(perms[0][0], 0) + 1
            tx.ops.append(("create", path, value, perms, fire))

    def set_value(self, tx: MTx | None, path: str, value: bytes) -> None:
        node = self.live[path] if tx is None else self.own(tx, path)
        node.value = value
        node.ver = self.next()
        if tx is None:
            self.fired.append((path, frozenset(), node.perms))
        else:
            tx.ops.append(("value", path, value))

    def set_perms(self, tx: MTx | None, path: str, perms: Perms) -> None:
        node = self.live[path] if tx is None else self.own(tx, path)
        if tx is not None and node.perms[0][0] != perms[0][0]:
            tx.delta[node.perms[0][0]] = tx.delta.get(node.perms[0][0], 0) - 1
            tx.delta[perms[0][0]] = tx.delta.get(perms[0][0], 0) + 1
        node.perms = perms
        node.ver = self.next()
        if tx is None:
            self.fired.append((path, frozenset(), perms))
        else:
            tx.ops.append(("perms", path, perms))

    def subtree(self, tx: MTx | None, path: str) -> list[str]:
        out, i = [path], 0
        while i < len(out):
            node = self.get(tx, out[i])
            base = out[i]
            i += 1
            if node:
                out += [f"{base}/{c}" if base != "/" else f"/{c}" for c in node.children]
        return out

    def delete(self, tx: MTx | None, path: str) -> None:
        name = path.rsplit("/", 1)[1]
        if tx is None:
            top = self.live[path]
            subs = self.subtree(None, path)
            for sub in subs:
                del self.live[sub]
            p = self.live[parent(path)]
            p.children.remove(name)
            p.ver = self.next()
            self.fired.append((path, frozenset(subs) - {path}, top.perms))
        else:
            if self.get(tx, parent(path)) is None:
                raise Fail("EINVAL")  # parent read as absent (C xenstored: EINVAL)
            for sub in self.subtree(tx, path):
                node = self.get(tx, sub)
                if node is None:  # named by the view's copy of its parent, removed since
                    continue
                tx.delta[node.perms[0][0]] = tx.delta.get(node.perms[0][0], 0) - 1
                tx.local[sub] = None
            p = self.own(tx, parent(path))
            if name in p.children:  # absent when the node appeared after the parent was read
                p.children.remove(name)
            p.ver = self.next()
            tx.ops.append(("delete", path))

    # -- events ---------------------------------------------------------------------------
    def fire(self, path: str, removed: frozenset[str], perms: Perms) -> None:
        sent: set[tuple[str, str, str]] = set()  # an identical event goes once per conn
        for conn, wpath, token in self.watches:
            domid = CONNS[conn]
            if is_below(path, wpath):
                reported = path
            elif wpath in removed:  # a removed node below (never one that did not exist)
                reported = wpath
            else:
                continue
            if (conn, reported, token) in sent:
                continue
            visible = self.perm(domid, perms) & READ or (
                path != "/"
                and parent(path) in self.live
                and self.perm(domid, self.live[parent(path)].perms) & READ
            )
            if visible:
                sent.add((conn, reported, token))
                self.events[conn].append((reported, token))

    def flush(self) -> None:
        fired, self.fired = self.fired, []
        for ev in fired:
            self.fire(*ev)

    # -- requests -------------------------------------------------------------------------
    def missing(self, domid: int, tx: MTx | None, path: str, perm: int) -> str:
        probe = path
        while probe != "/":
            probe = parent(probe)
            node = self.get(tx, probe)
            if node is not None:
                return "ENOENT" if self.perm(domid, node.perms) & perm == perm else "EACCES"
        return "ENOENT"

    def checked(self, domid: int, tx: MTx | None, path: str, perm: int) -> MNode:
        node = self.get(tx, path)
        if node is None:
            raise Fail(self.missing(domid, tx, path, perm))
        if self.perm(domid, node.perms) & perm != perm:
            raise Fail("EACCES")
        return node

    def create_path(self, domid: int, tx: MTx | None, path: str, value: bytes) -> None:
        missing, probe = [path], path
        while True:
            probe = parent(probe)
            node = self.get(tx, probe)
            if node is not None:
                break
            missing.append(probe)
        if self.perm(domid, node.perms) & WRITE != WRITE:
            raise Fail("EACCES")
        if domid and self.count(domid, tx) + len(missing) > NODE_QUOTA:
            raise Fail("ENOSPC")
        for sub in reversed(missing):
            perms = node.perms
            if domid:
                perms = ((domid, perms[0][1]), *perms[1:])
            self.create(tx, sub, value if sub == path else b"", perms, sub == path)
            node = self.get(tx, sub)
            assert node is not None

    def request(
        self, domid: int, tx: MTx | None, op: str, path: str, arg: object
    ) -> tuple[str, object]:
        try:
            result = self._request(domid, tx, op, path, arg)
        except Fail as exc:
            self.fired.clear()
            if tx is not None and str(exc) in ("ENOSPC", "E2BIG"):
                tx.poisoned = tx.poisoned or str(exc)
            return "error", str(exc)
        self.flush()
        return "ok", result

    def _request(self, domid: int, tx: MTx | None, op: str, path: str, arg: object) -> object:
        if op == "read":
            return self.checked(domid, tx, path, READ).value
        if op == "dir":
            return sorted(self.checked(domid, tx, path, READ).children)
        if op == "getperms":
            return self.checked(domid, tx, path, READ).perms
        if op == "write":
            assert isinstance(arg, bytes)
            node = self.get(tx, path)
            if node is None:
                self.create_path(domid, tx, path, arg)
            elif self.perm(domid, node.perms) & WRITE != WRITE:
                raise Fail("EACCES")
            else:
                self.set_value(tx, path, arg)
            return None
        if op == "mkdir":
            node = self.get(tx, path)
            if node is None:
                self.create_path(domid, tx, path, b"")
            elif self.perm(domid, node.perms) & WRITE != WRITE:
                raise Fail("EACCES")
            return None
        if op == "rm":
            node = self.get(tx, path)
            if node is None:
                err = self.missing(domid, tx, path, WRITE)
                if err == "EACCES":
                    raise Fail(err)
                if self.get(tx, parent(path)) is not None:
                    return None
                raise Fail("ENOENT")
            if self.perm(domid, node.perms) & WRITE != WRITE:
                raise Fail("EACCES")
            if path == "/":
                raise Fail("EINVAL")  # the root is never removed, even by dom0
            self.delete(tx, path)
            return None
        if op == "setperms":
            assert isinstance(arg, tuple)
            node = self.checked(domid, tx, path, WRITE)
            if not self.perm(domid, node.perms) & OWNER:
                raise Fail("EACCES")
            if domid and arg[0][0] != node.perms[0][0]:
                raise Fail("EACCES")
            self.set_perms(tx, path, arg)
            return None
        raise AssertionError(op)

    def commit(self, domid: int, tx: MTx) -> str:
        if tx.poisoned:
            return tx.poisoned
        for path, ver in tx.reads.items():
            node = self.live.get(path)
            if (node.ver if node else None) != ver:
                return "EAGAIN"
        backup = {p: n.clone() for p, n in self.live.items()}
        counts = {d: self.count(d, None) for d in (0, 5, 6)}
        for op in tx.ops:
            if op[0] == "create":
                if op[1] in self.live:
                    self.set_value(None, op[1], op[2])
                    self.set_perms(None, op[1], op[3])
                else:
                    self.create(None, op[1], op[2], op[3], op[4])
            elif op[0] == "value":
                self.set_value(None, op[1], op[2])
            elif op[0] == "perms":
                self.set_perms(None, op[1], op[2])
            elif op[1] in self.live:
                self.delete(None, op[1])
        if domid:
            for d in (5, 6):
                now = self.count(d, None)
                if now > counts[d] and now > NODE_QUOTA:
                    self.live = backup
                    self.fired.clear()
                    return "ENOSPC"
        # One event per path, in first-modification order, visible by the permissions the
        # path has at the end of the commit.
        merged: dict[str, tuple[str, frozenset[str], Perms]] = {}
        for ev in self.fired:
            prev = merged.get(ev[0])
            merged[ev[0]] = ev if prev is None else (ev[0], prev[1] | ev[1], ev[2])
        self.fired = list(merged.values())
        self.flush()
        return "OK"


def parse_perms_text(items: tuple[str, ...]) -> Perms:
    """Wire permission strings (``"n5"``, ``"r0"``) as (domid, bits) pairs."""
    return tuple((int(p[1:]), LETTER[p[0]]) for p in items)




class XsHarness:
    """The store and the model side by side, driven by named operations."""

    def __init__(self) -> None:
        self.store = Store(Quotas(nodes=NODE_QUOTA))
        self.store.introduce_domain(5)
        self.store.introduce_domain(6)
        self.model = Model()
        self.conns = {name: self.store.connect(domid) for name, domid in CONNS.items()}
        self.txs: dict[str, tuple[int, MTx]] = {}
        self.req_id = 0

    def homes(self) -> None:
        """Create the guests' home directories (owned by them) through dom0."""
        for domid in (5, 6):
            self.op("c0", False, "mkdir", f"/local/domain/{domid}")
            self.op("c0", False, "setperms", f"/local/domain/{domid}", (f"n{domid}",))

    def send(self, conn: str, type_: int, payload: bytes, tx_id: int = 0) -> tuple[str, bytes]:
        """One request to the store: ("ok" | "error", reply payload)."""
        self.req_id += 1
        reply = self.store.handle(self.conns[conn], type_, self.req_id, tx_id, payload)
        rtype, rid, rtx, length = wire.HEADER.unpack_from(reply)
        assert (rid, rtx, length) == (self.req_id, tx_id, len(reply) - 16)
        if rtype == T.ERROR:
            return "error", reply[16:]
        assert rtype == type_
        return "ok", reply[16:]

    def touched(self, conn: str) -> list[str]:
        """The paths the open transaction of ``conn`` looked at or changed."""
        if conn not in self.txs:
            return []
        mtx = self.txs[conn][1]
        return sorted(set(mtx.seen) | set(mtx.local))

    def rewritten(self, conn: str) -> list[str]:
        """The existing nodes (not "/") the open transaction of ``conn`` changed."""
        if conn not in self.txs:
            return []
        mtx = self.txs[conn][1]
        return sorted(
            p for p, n in mtx.local.items() if n is not None and mtx.seen.get(p) and p != "/"
        )

    def check_events(self) -> None:
        """Every connection got exactly the watch events the model predicts."""
        for name, conn in self.conns.items():
            got = []
            for msg in conn.events:
                path, token = wire.fields(msg[16:])
                got.append((path.decode(), token.decode()))
            conn.events.clear()
            expected = self.model.events[name]
            self.model.events[name] = []
            assert sorted(got) == sorted(expected), (name, got, expected)

    def op(self, conn: str, use_tx: bool, op: str, path: str, arg: object = None) -> None:
        """One node operation (read, dir, getperms, write, mkdir, rm, setperms) on both."""
        domid = CONNS[conn]
        if use_tx and conn not in self.txs:
            self.start(conn)
        tx_id, mtx = self.txs[conn] if use_tx else (0, None)
        if op == "write":
            assert isinstance(arg, bytes)
            type_, payload = T.WRITE, path.encode() + b"\0" + arg
        elif op == "setperms":
            assert isinstance(arg, tuple)
            type_, payload = T.SET_PERMS, wire.join(path, *arg)
            arg = parse_perms_text(arg)
        else:
            type_ = {"read": T.READ, "dir": T.DIRECTORY, "getperms": T.GET_PERMS,
                     "mkdir": T.MKDIR, "rm": T.RM}[op]  # fmt: skip
            payload = wire.join(path)
        kind, payload = self.send(conn, type_, payload, tx_id)
        mkind, mresult = self.model.request(domid, mtx, op, path, arg)
        if kind == "error":
            assert (kind, wire.parse_error(payload)) == (mkind, mresult), (op, path)
        else:
            assert mkind == "ok", (op, path, mresult)
            if op == "read":
                assert payload == mresult
            elif op == "dir":
                assert sorted(n.decode() for n in wire.fields(payload)) == mresult
            elif op == "getperms":
                assert isinstance(mresult, tuple)
                assert parse_perms_text(tuple(p.decode() for p in wire.fields(payload))) == mresult
            else:
                assert payload == wire.OK
        self.check_events()

    def watch(self, conn: str, path: str, token: str) -> None:
        """WATCH on both; a fresh watch fires once at once."""
        kind, payload = self.send(conn, T.WATCH, wire.join(path, token))
        if (conn, path, token) in self.model.watches:
            assert (kind, wire.parse_error(payload)) == ("error", "EEXIST")
        else:
            assert kind == "ok"
            self.model.watches.append((conn, path, token))
            self.model.events[conn].append((path, token))
        self.check_events()

    def unwatch(self, conn: str, path: str, token: str) -> None:
        """UNWATCH on both."""
        kind, payload = self.send(conn, T.UNWATCH, wire.join(path, token))
        if (conn, path, token) in self.model.watches:
            assert kind == "ok"
            self.model.watches.remove((conn, path, token))
        else:
            assert (kind, wire.parse_error(payload)) == ("error", "ENOENT")

    def start(self, conn: str) -> None:
        """TRANSACTION_START (one open transaction per connection here)."""
        if conn in self.txs:
            return
        kind, payload = self.send(conn, T.TRANSACTION_START, b"\0")
        assert kind == "ok"
        self.txs[conn] = (int(payload[:-1]), MTx())

    def end(self, conn: str, commit: bool) -> None:
        """TRANSACTION_END of ``conn``'s transaction (commit or abort)."""
        tx_id, mtx = self.txs.pop(conn)
        kind, payload = self.send(conn, T.TRANSACTION_END, b"T\0" if commit else b"F\0", tx_id)
        expected = self.model.commit(CONNS[conn], mtx) if commit else "OK"
        got = "OK" if kind == "ok" else wire.parse_error(payload)
        assert got == expected
        self.check_events()

    def round_trip(self) -> None:
        """Serialise and restore the store: the same tree as the model comes back."""
        state = json.loads(json.dumps(self.store.to_state()))
        copy = Store.from_state(state)
        assert copy.to_state() == state
        assert copy.check() == []
        assert {p: (n.value, n.perms, sorted(n.children)) for p, n in copy.nodes.items()} == {
            p: (n.value, n.perms, sorted(n.children)) for p, n in self.model.live.items()
        }

    def same_tree_and_counts(self) -> None:
        """The store's tree, node counts and own consistency check agree with the model."""
        store, model = self.store, self.model
        assert store.nodes.keys() == model.live.keys()
        for path, node in model.live.items():
            mine = store.nodes[path]
            assert (mine.value, mine.perms, sorted(mine.children)) == (
                node.value, node.perms, sorted(node.children))  # fmt: skip
        for domid in (0, 5, 6):
            assert store.node_count(domid) == model.count(domid, None)
        assert store.check() == []

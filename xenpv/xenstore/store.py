"""The xenstore database of the embedded xenstored (sans-IO).

Theory of operation
-------------------
The tree is a flat ``dict`` from absolute path to :class:`Node`; each node keeps its
value (raw bytes), its permission list, the names of its children (an insertion-ordered
``dict`` used as a set), its *generation* (a global counter stamped on every
modification, xen-protocols.md §4.4) and ``perm_gen``, the generation at which its
permission list was last set.

Connections (:class:`Connection`) belong to a domain.  :meth:`Store.handle` takes one
request (type, req_id, tx_id, payload) and returns the encoded reply; watch events that
the request causes are appended, already encoded, to the ``events`` list of every
connection concerned, and the store adds that connection to :attr:`Store.dirty`.  The
I/O layer (:mod:`xenpv.xenstore.server`) drains both.  Nothing here touches a socket, a
clock or the event loop.

Transactions follow C xenstored: a transaction is not a snapshot.  The first time a
transaction touches a node it looks at the live tree and records the node's generation
(``NO_GEN`` if absent) in its *read set*; later accesses see the transaction's private
copy (the *overlay*).  Every request looks at the nodes it changes first (a WRITE checks
the node's permissions, as C xenstored's does), so a node a transaction wrote is in its
read set too: a concurrent write of the same node makes the commit fail, there are no
"blind" writes that win.  Mutations are also appended to an operation log.  At commit
the read set is compared with the live tree: a changed generation gives ``EAGAIN``;
nothing else does (except the ``always_eagain`` chaos knob).  Then the log is
replayed against the live tree under an undo log; if the replay breaks the node or
memory quota the undo log restores everything and the commit answers ``ENOSPC`` /
``ENOMEM``.  Watch events of the replay fire only once the commit succeeded (one per
modified path).  Quota failures inside a transaction poison it: its commit fails with
that error (hostile-inputs R17).

Permissions follow hostile-inputs.md "Permission rules": entry 0 is the owner (full
access; its letter is the default for everyone else); a domain's entries count only if
that domain's record is older than the permission list (domid reuse starts fresh);
nodes owned by a released domain are removed with their subtrees.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from xenpv.xenstore import paths
from xenpv.xenstore.wire import (
    ABS_PATH_MAX,
    HEADER,
    OK,
    PAYLOAD_MAX,
    XenstoreError,
    XsType,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "BOTH",
    "NONE",
    "NO_GEN",
    "OWNER",
    "READ",
    "SPECIAL_NODES",
    "WRITE",
    "Connection",
    "Domain",
    "Node",
    "Quotas",
    "Store",
    "Transaction",
    "Watch",
    "footprint",
    "format_perms",
    "parse_perms",
]

# Library-internal permission bits (xen-protocols.md §4.6; not on the wire).
NONE = 0
READ = 1
WRITE = 2
BOTH = READ | WRITE
OWNER = 8
_FULL = READ | WRITE | OWNER
_LETTER_BITS = {ord("n"): NONE, ord("r"): READ, ord("w"): WRITE, ord("b"): BOTH}
_BITS_LETTER = {NONE: "n", READ: "r", WRITE: "w", BOTH: "b"}

#: Generation recorded for a node that did not exist when a transaction looked at it.
NO_GEN = -1
#: Highest domid accepted in requests (domids are 16-bit).
DOMID_MAX = 0xFFFF
#: The special watch nodes (they carry permissions but no value, and are not in the tree).
SPECIAL_NODES = (paths.SPECIAL_INTRODUCE, paths.SPECIAL_RELEASE)
#: Bounds of a connection's cache of validated paths: entries, and bytes of keys plus
#: paths.  Past either the cache starts afresh (hostile-inputs scenario 23: a client's
#: requests never make the server keep more than this per connection).
PATH_CACHE_ENTRIES = 1024
PATH_CACHE_BYTES = 65536

Perms = tuple[tuple[int, int], ...]


_NONE_REMOVED: tuple[str, ...] = ()


def _by_seq(hit: tuple[Watch, str]) -> int:
    return hit[0].seq


def _home_prefix_len(path: str) -> int:
    """Length of a leading ``/local/domain/<1-5 digits>/`` (0 without one): what
    ``path_max`` does not count (C xenstored matches ``/local/domain/%5u/``)."""
    if not path.startswith("/local/domain/"):
        return 0
    digits, slash, _ = path[14:20].partition("/")
    if slash and 1 <= len(digits) <= 5 and digits.isascii() and digits.isdigit():
        return 15 + len(digits)
    return 0


@dataclass
class Quotas:
    """Per-domain limits for unprivileged domains (C xenstored defaults; 0 disables one).

    Dom0 is exempt from all of them but ``path_max``: the length of a path relative to
    ``/local/domain/<domid>/`` (dom0's paths too, as C xenstored 4.17); absolute paths are
    always capped at 3072 bytes.
    """

    nodes: int = 1000
    node_size: int = 2048
    watches: int = 128
    transactions: int = 10
    transaction_nodes: int = 1024
    node_permissions: int = 5
    path_max: int = 2048
    outstanding: int = 20
    #: Bytes of node data a domain may own (path + value + 8 per permission entry).
    memory: int = 2_621_440
    #: Unread watch events kept per connection while its client is not reading.
    watch_events: int = 1024
    #: Seconds after which an unread watch event is dropped (C xenstored: 20 s).
    watch_event_timeout: float = 20.0
    #: Sustained WRITE-type requests per second per domain (XSA-206 rate limit).
    write_rate: float = 200.0
    #: Burst of WRITE-type requests a domain may make before the rate limit applies.
    write_burst: float = 10.0
    #: Shared reserve any domain may draw on once its own burst is spent (C: WRL_GBURST).
    write_global_burst: float = 1000.0
    #: Open socket connections per domain; more are refused (closed at once).
    connections: int = 64

    @classmethod
    def names(cls) -> list[str]:
        """Return the quota names as used on the command line (``node-size`` …)."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    def set(self, name: str, value: str) -> None:
        """Set quota ``name`` (dashes or underscores) from its decimal text.

        Raises ``KeyError`` for an unknown name and ``ValueError`` for a bad value.
        """
        attr = name.replace("-", "_")
        fields_ = {f.name: f for f in dataclasses.fields(self)}
        if attr not in fields_:
            raise KeyError(name)
        current = getattr(self, attr)
        number: float | int = float(value) if isinstance(current, float) else int(value)
        if number < 0:
            raise ValueError(f"quota {name} must not be negative")
        setattr(self, attr, number)


def footprint(path: str, value: bytes, perms: Perms) -> int:
    """Bytes a node counts against its owner's ``memory`` quota."""
    return len(path) + len(value) + 8 * len(perms)


def _over(limit: int | float, value: int | float) -> bool:
    """True if ``value`` breaks ``limit`` (a limit of 0 is disabled)."""
    return bool(limit) and value > limit


class Node:
    """One xenstore node."""

    __slots__ = ("children", "gen", "perm_gen", "perms", "value")

    def __init__(
        self, value: bytes, perms: Perms, children: dict[str, None], gen: int, perm_gen: int
    ) -> None:
        """Create a node (``children`` is owned by the node afterwards)."""
        self.value = value
        self.perms = perms
        self.children = children
        self.gen = gen
        self.perm_gen = perm_gen

    def copy(self) -> Node:
        """Return a copy with its own children set."""
        return Node(self.value, self.perms, dict(self.children), self.gen, self.perm_gen)

    @property
    def owner(self) -> int:
        """The owning domid (entry 0 of the permission list)."""
        return self.perms[0][0]


@dataclass
class Domain:
    """What the store knows about a domain.

    A record is created when a domain is introduced, when a connection acts as it, or
    when a permission list first names it; ``gen`` is the generation at creation, so
    permission entries older than the record (left over from an earlier domain with
    the same domid) are ignored.
    """

    domid: int
    gen: int
    introduced: bool = False
    target: int | None = None
    watches: int = 0
    transactions: int = 0


class Watch:
    """A registered watch (``path`` is absolute or a special name)."""

    __slots__ = ("conn", "depth", "path", "relative", "seq", "token")

    def __init__(
        self,
        conn: Connection,
        path: str,
        token: bytes,
        relative: bool,
        depth: int | None,
        seq: int = 0,
    ) -> None:
        """Create a watch of ``conn`` on ``path``; ``seq`` orders a connection's watches
        by registration (the order C xenstored sends one change's events in)."""
        self.conn = conn
        self.path = path
        self.token = token
        self.relative = relative
        self.depth = depth
        self.seq = seq


class Connection:
    """Per-connection state: the domain it acts as, its watches and transactions.

    ``events`` holds encoded WATCH_EVENT messages not yet taken by the I/O layer.
    """

    __slots__ = (
        "closed",
        "domid",
        "events",
        "next_tx",
        "path_cache",
        "path_cache_bytes",
        "privileged",
        "store",
        "transactions",
        "watches",
    )

    def __init__(self, store: Store, domid: int) -> None:
        """Create a connection of ``domid`` on ``store`` (use :meth:`Store.connect`)."""
        self.store = store
        self.domid = domid
        self.privileged = domid == 0
        self.watches: dict[tuple[str, bytes], Watch] = {}
        self.transactions: dict[int, Transaction] = {}
        self.next_tx = 1
        self.events: list[bytes] = []
        #: Validated paths by the raw bytes that named them (see :meth:`cache_path`).
        self.path_cache: dict[bytes, str] = {}
        self.path_cache_bytes = 0
        self.closed = False

    def cache_path(self, key: bytes, path: str) -> None:
        """Remember that ``key`` names the validated absolute ``path``.

        ``key`` is a path as sent (or a READ payload that is exactly that path and its
        NUL), never bytes the client may vary freely, and the cache holds at most
        :data:`PATH_CACHE_ENTRIES` entries and :data:`PATH_CACHE_BYTES` bytes.
        """
        size = len(key) + len(path)
        cache = self.path_cache
        if len(cache) >= PATH_CACHE_ENTRIES or self.path_cache_bytes + size > PATH_CACHE_BYTES:
            cache.clear()
            self.path_cache_bytes = 0
        cache[key] = path
        self.path_cache_bytes += size


class _Fail(Exception):
    """Internal: a request fails with errno name ``name`` (becomes an ERROR reply)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# Errors raised by a mutating request inside a transaction that poison it (R17).
_POISONING = frozenset({"ENOSPC", "E2BIG", "ENOMEM"})
_MUTATING = frozenset({11, 12, 13, 14})  # WRITE, MKDIR, RM, SET_PERMS


class Transaction:
    """A transaction's private view and commit log (see the module docstring)."""

    __slots__ = (
        "accessed",
        "conn",
        "delta",
        "id",
        "mem_delta",
        "ops",
        "overlay",
        "poisoned",
        "reads",
        "seen",
        "store",
    )

    def __init__(self, store: Store, conn: Connection, tx_id: int) -> None:
        """Create transaction ``tx_id`` of ``conn``."""
        self.store = store
        self.conn = conn
        self.id = tx_id
        self.overlay: dict[str, Node | None] = {}
        self.reads: dict[str, int] = {}
        self.seen: dict[str, Node | None] = {}
        self.accessed: set[str] = set()
        self.ops: list[tuple[Any, ...]] = []
        self.delta: dict[int, int] = {}
        self.mem_delta: dict[int, int] = {}
        self.poisoned: str | None = None

    # -- view ------------------------------------------------------------------------
    def _touch(self, path: str) -> None:
        accessed = self.accessed
        if path not in accessed:
            accessed.add(path)
            limit = self.store.quotas.transaction_nodes
            if not self.conn.privileged and _over(limit, len(accessed)):
                raise _Fail("ENOSPC")

    def lookup(self, path: str) -> Node | None:
        """Return the transaction's view of ``path``.

        The first look at a node from the live tree records its generation in the read
        set and keeps a private copy, so later reads in the transaction see the value
        as it was then (C xenstored copies read nodes into the transaction too).
        """
        try:
            return self.overlay[path]
        except KeyError:
            pass
        try:
            return self.seen[path]
        except KeyError:
            pass
        node = self.store.nodes.get(path)
        self._touch(path)
        if node is not None:
            node = node.copy()
        self.reads[path] = node.gen if node is not None else NO_GEN
        self.seen[path] = node
        return node

    def _own(self, path: str) -> Node:
        node = self.overlay.get(path)
        if node is None:
            base = self.lookup(path)
            assert base is not None
            node = base.copy()
            self.overlay[path] = node
        return node

    # -- mutations (same interface as the Store's) ---------------------------------
    def create(self, path: str, value: bytes, perms: Perms, fire: bool = True) -> None:
        """Create ``path`` (its parent exists in the view)."""
        store = self.store
        self._touch(path)
        gen = store.next_gen()
        self.overlay[path] = Node(value, perms, {}, gen, gen)
        parent = self._own(paths.parent(path))
        parent.children[paths.basename(path)] = None
        parent.gen = gen
        self.delta[perms[0][0]] = self.delta.get(perms[0][0], 0) + 1
        self._charge(perms[0][0], footprint(path, value, perms))
        self.ops.append(("create", path, value, perms, fire))

    def set_value(self, path: str, value: bytes) -> None:
        """Replace the value of existing ``path``."""
        node = self._own(path)
        self._charge(node.owner, len(value) - len(node.value))
        node.value = value
        node.gen = self.store.next_gen()
        self.ops.append(("value", path, value))

    def set_perms(self, path: str, perms: Perms) -> None:
        """Replace the permission list of existing ``path``."""
        node = self._own(path)
        old = node.owner
        self._charge(old, -footprint(path, node.value, node.perms))
        self._charge(perms[0][0], footprint(path, node.value, perms))
        node.perms = perms
        node.gen = node.perm_gen = self.store.next_gen()
        if old != perms[0][0]:
            self.delta[old] = self.delta.get(old, 0) - 1
            self.delta[perms[0][0]] = self.delta.get(perms[0][0], 0) + 1
        self.ops.append(("perms", path, perms))

    def delete(self, path: str) -> None:
        """Remove ``path`` and its subtree from the view.

        The view is taken node by node, so it can hold a node whose parent it saw absent
        (the parent was read before another writer created both).  Such a transaction read
        the parent's absence, which is no longer true: its commit fails with EAGAIN, and
        the removal has nothing consistent to change: EINVAL, as C xenstored answers.
        The reverse, a child the view's copy of a node names but another writer has
        removed since, is skipped: it is gone already, and the commit fails with EAGAIN.
        """
        if path != "/" and self.lookup(paths.parent(path)) is None:
            raise _Fail("EINVAL")
        for sub in self.store.subtree(path, self.lookup):
            node = self.lookup(sub)
            if node is None:
                # a child this view's copy of its parent names, removed since by another
                # writer: already gone (the commit fails with EAGAIN: the parent changed)
                continue
            self.delta[node.owner] = self.delta.get(node.owner, 0) - 1
            self._charge(node.owner, -footprint(sub, node.value, node.perms))
            self.overlay[sub] = None
        parent = self._own(paths.parent(path))
        parent.children.pop(paths.basename(path), None)
        parent.gen = self.store.next_gen()
        self.ops.append(("delete", path))

    def count(self, domid: int) -> int:
        """Nodes owned by ``domid`` as seen by this transaction."""
        return self.store.owned.get(domid, 0) + self.delta.get(domid, 0)

    def mem(self, domid: int) -> int:
        """Bytes owned by ``domid`` as seen by this transaction."""
        return self.store.memory.get(domid, 0) + self.mem_delta.get(domid, 0)

    def _charge(self, domid: int, nbytes: int) -> None:
        self.mem_delta[domid] = self.mem_delta.get(domid, 0) + nbytes


Lookup = Callable[[str], "Node | None"]


class Store:
    """The xenstore tree with C xenstored semantics (see the module docstring)."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        """Create a store holding ``/``, ``/tool`` and ``/tool/xenstored`` (owner dom0)."""
        self.quotas = quotas if quotas is not None else Quotas()
        self.generation = 0
        self.nodes: dict[str, Node] = {}
        self.owned: dict[int, int] = {}
        #: Bytes of node data per owning domid (see :func:`footprint`).
        self.memory: dict[int, int] = {}
        self.domains: dict[int, Domain] = {0: Domain(0, 0, introduced=True)}
        self.specials: dict[str, Node] = {}
        self.connections: set[Connection] = set()
        self.watch_index: dict[str, list[Watch]] = {}
        #: Connections whose ``events`` list gained entries since the last drain.
        self.dirty: set[Connection] = set()
        #: Domids released since the I/O layer last looked (their connections must go).
        self.released: list[int] = []
        #: Lines sent with ``CONTROL print`` (bounded).
        self.log: deque[str] = deque(maxlen=256)
        #: Watch events dropped because they would exceed the payload limit.
        self.dropped_events = 0
        #: Whether a domid names a live domain (the hypervisor's view); ``None``: no
        #: hypervisor to ask, every domid is accepted.  C xenstored refuses SET_PERMS
        #: whose owner is not a live domain (ENOENT).
        self.domain_exists: Callable[[int], bool] | None = None
        #: Chaos knob (oxenstored ``test-eagain``): every commit answers EAGAIN.
        self.always_eagain = False
        #: Requests that failed with EIO because of an unexpected exception in the store.
        self.internal_errors = 0
        #: The I/O layer's ring set-up, run by INTRODUCE before the domain is introduced:
        #: ``(domid, gfn, port)`` -> None, or the errno name to answer (the server sets it
        #: when it can serve rings; see :mod:`xenpv.xenstore.ringserver`).
        self.on_introduce: Callable[[int, int, int], str | None] | None = None
        # (path, removed descendants, perms, perm_gen) of each change not yet reported
        self._fired: list[tuple[str, tuple[str, ...], Perms, int]] = []
        self._watch_seq = 0
        root_perms: Perms = ((0, NONE),)
        gen = self.next_gen()
        self.nodes["/"] = Node(b"", root_perms, {}, gen, gen)
        self.owned[0] = 1
        self.memory[0] = footprint("/", b"", root_perms)
        for name in SPECIAL_NODES:
            self.specials[name] = Node(b"", root_perms, {}, gen, gen)
        self.create("/tool", b"", root_perms)
        self.create("/tool/xenstored", b"", root_perms)
        self._fired.clear()

    # -- generations, domains, accounting ------------------------------------------
    def next_gen(self) -> int:
        """Return a fresh generation number."""
        self.generation += 1
        return self.generation

    def domain_ref(self, domid: int) -> Domain:
        """Return the record of ``domid``, creating one (newer than every node) if needed."""
        rec = self.domains.get(domid)
        if rec is None:
            rec = self.domains[domid] = Domain(domid, self.next_gen())
        return rec

    def entry_live(self, domid: int, node: Node) -> bool:
        """True if a permission entry for ``domid`` on ``node`` is still honoured."""
        if domid == 0:
            return True
        rec = self.domains.get(domid)
        return rec is not None and rec.gen <= node.perm_gen

    def perm_for(self, conn: Connection, node: Node) -> int:
        """Return the access bits ``conn`` has on ``node``."""
        if conn.privileged:
            return _FULL
        perms = node.perms
        me = conn.domid
        rec = self.domains.get(me)
        target = rec.target if rec is not None else None
        owner = perms[0][0]
        if (owner == me or owner == target) and self.entry_live(owner, node):
            return _FULL
        for domid, bits in perms[1:]:
            if (domid == me or domid == target) and self.entry_live(domid, node):
                return bits
        return perms[0][1]

    def node_count(self, domid: int) -> int:
        """Number of nodes owned by ``domid`` (what the ``nodes`` quota counts)."""
        return self.owned.get(domid, 0)

    def watch_count(self, domid: int) -> int:
        """Number of watches registered by ``domid``'s connections."""
        rec = self.domains.get(domid)
        return rec.watches if rec is not None else 0

    def transaction_count(self, domid: int) -> int:
        """Number of open transactions of ``domid``'s connections."""
        rec = self.domains.get(domid)
        return rec.transactions if rec is not None else 0

    def recount(self) -> dict[int, int]:
        """Count owned nodes by walking the whole tree (used to verify ``owned``)."""
        counts: dict[int, int] = {}
        for node in self.nodes.values():
            counts[node.owner] = counts.get(node.owner, 0) + 1
        return counts

    def check(self) -> list[str]:
        """Return a list of inconsistencies in the tree and its accounting (empty = fine)."""
        problems: list[str] = []
        owned = {d: n for d, n in self.owned.items() if n}
        if owned != self.recount():
            problems.append(f"node accounting {owned} != recount {self.recount()}")
        memory = {d: n for d, n in self.memory.items() if n}
        if memory != self.remeasure():
            problems.append(f"memory accounting {memory} != {self.remeasure()}")
        for path, node in self.nodes.items():
            for child in node.children:
                if paths.join_path(path, child) not in self.nodes:
                    problems.append(f"{path} lists missing child {child}")
            if path != "/" and paths.basename(path) not in self.nodes[paths.parent(path)].children:
                problems.append(f"{path} not listed by its parent")
        for rec in self.domains.values():
            watches = sum(
                len(c.watches) for c in self.connections if c.domid == rec.domid and not c.closed
            )
            trans = sum(
                len(c.transactions)
                for c in self.connections
                if c.domid == rec.domid and not c.closed
            )
            if (watches, trans) != (rec.watches, rec.transactions):
                problems.append(f"domain {rec.domid} watch/transaction accounting off")
        return problems

    def _account(self, domid: int, delta: int) -> None:
        self.owned[domid] = self.owned.get(domid, 0) + delta

    def _charge(self, domid: int, nbytes: int) -> None:
        self.memory[domid] = self.memory.get(domid, 0) + nbytes

    def mem(self, domid: int) -> int:
        """Bytes of node data owned by ``domid`` (what the ``memory`` quota counts)."""
        return self.memory.get(domid, 0)

    def remeasure(self) -> dict[int, int]:
        """Recompute :attr:`memory` by walking the whole tree (used to verify it)."""
        usage: dict[int, int] = {}
        for path, node in self.nodes.items():
            usage[node.owner] = usage.get(node.owner, 0) + footprint(path, node.value, node.perms)
        return usage

    # -- live-tree mutations (also used to replay a transaction) ---------------------
    def lookup(self, path: str) -> Node | None:
        """Return the live node at ``path`` (no transaction)."""
        return self.nodes.get(path)

    def count(self, domid: int) -> int:
        """Nodes owned by ``domid`` in the live tree."""
        return self.owned.get(domid, 0)

    def create(self, path: str, value: bytes, perms: Perms, fire: bool = True) -> None:
        """Create ``path`` under its existing parent; queues its watch event if ``fire``."""
        parent = self.nodes[paths.parent(path)]
        gen = self.next_gen()
        self.nodes[path] = Node(value, perms, {}, gen, gen)
        parent.children[paths.basename(path)] = None
        parent.gen = gen
        self._account(perms[0][0], 1)
        self._charge(perms[0][0], footprint(path, value, perms))
        if fire:
            self._fired.append((path, _NONE_REMOVED, perms, gen))

    def set_value(self, path: str, value: bytes) -> None:
        """Replace the value of ``path``; queues its watch event."""
        node = self.nodes[path]
        self._charge(node.owner, len(value) - len(node.value))
        node.value = value
        node.gen = self.next_gen()
        self._fired.append((path, _NONE_REMOVED, node.perms, node.perm_gen))

    def set_perms(self, path: str, perms: Perms) -> None:
        """Replace the permissions of ``path``; queues its watch event."""
        node = self.nodes[path]
        if node.owner != perms[0][0]:
            self._account(node.owner, -1)
            self._account(perms[0][0], 1)
        self._charge(node.owner, -footprint(path, node.value, node.perms))
        self._charge(perms[0][0], footprint(path, node.value, perms))
        node.perms = perms
        node.gen = node.perm_gen = self.next_gen()
        self._fired.append((path, _NONE_REMOVED, perms, node.perm_gen))

    def delete(self, path: str) -> None:
        """Remove ``path`` and its subtree; queues one recursive watch event."""
        nodes = self.nodes
        top = nodes[path]
        subs = self.postorder(path, nodes.get)
        for sub in subs:
            node = nodes.pop(sub)
            self._account(node.owner, -1)
            self._charge(node.owner, -footprint(sub, node.value, node.perms))
        parent = nodes[paths.parent(path)]
        parent.children.pop(paths.basename(path), None)
        parent.gen = self.next_gen()
        self._fired.append((path, tuple(subs[:-1]), top.perms, top.perm_gen))

    @staticmethod
    def subtree(path: str, lookup: Lookup) -> list[str]:
        """Return ``path`` and all its descendants (iteratively, parents first)."""
        out = [path]
        i = 0
        while i < len(out):
            base = out[i]
            node = lookup(base)
            i += 1
            if node is not None and node.children:
                prefix = base + "/" if base != "/" else "/"
                out.extend(prefix + child for child in node.children)
        return out

    @staticmethod
    def postorder(path: str, lookup: Lookup) -> list[str]:
        """Return the descendants of ``path`` children first, then ``path`` itself (the
        order C xenstored removes a subtree in, and reports it)."""
        out: list[str] = []
        stack: list[tuple[str, bool]] = [(path, False)]
        while stack:
            here, done = stack.pop()
            if done:
                out.append(here)
                continue
            stack.append((here, True))
            node = lookup(here)
            if node is not None and node.children:
                prefix = here + "/" if here != "/" else "/"
                stack.extend((prefix + child, False) for child in reversed(node.children))
        return out

    # -- connections -----------------------------------------------------------------
    def connect(self, domid: int) -> Connection:
        """Return a new connection acting as ``domid`` (0 = privileged)."""
        conn = Connection(self, domid)
        self.domain_ref(domid)
        self.connections.add(conn)
        return conn

    def disconnect(self, conn: Connection) -> None:
        """Forget ``conn``: drop its watches and abort its transactions (idempotent)."""
        if conn.closed:
            return
        self._reset_watches(conn)
        conn.closed = True
        conn.events.clear()
        self.connections.discard(conn)
        self.dirty.discard(conn)

    def _reset_watches(self, conn: Connection) -> None:
        rec = self.domains.get(conn.domid)
        for watch in conn.watches.values():
            self._unindex(watch)
        if rec is not None:
            rec.watches -= len(conn.watches)
            rec.transactions -= len(conn.transactions)
        conn.watches.clear()
        conn.transactions.clear()

    def _unindex(self, watch: Watch) -> None:
        lst = self.watch_index.get(watch.path)
        if lst is not None:
            lst.remove(watch)
            if not lst:
                del self.watch_index[watch.path]

    # -- domains ---------------------------------------------------------------------
    def introduce_domain(self, domid: int) -> bool:
        """Mark ``domid`` introduced; fires ``@introduceDomain`` if it was not yet."""
        rec = self.domain_ref(domid)
        if rec.introduced:
            return False
        rec.introduced = True
        self._fire_special(paths.SPECIAL_INTRODUCE)
        return True

    def release_domain(self, domid: int) -> bool:
        """Forget ``domid``: remove the nodes it owns, fire ``@releaseDomain``.

        Its connections lose their watches and transactions and are listed in
        :attr:`released` for the I/O layer to close.  Returns False if unknown.
        """
        if domid == 0 or domid not in self.domains:
            return False
        for conn in [c for c in self.connections if c.domid == domid]:
            self.disconnect(conn)
        owned_roots = sorted((p for p, n in self.nodes.items() if n.owner == domid), key=len)
        for path in owned_roots:
            if path in self.nodes and path != "/":
                self.delete(path)
        root = self.nodes["/"]
        if root.owner == domid:  # dom0 gave it the root, which stays: the root goes back to dom0
            self.set_perms("/", ((0, root.perms[0][1]), *root.perms[1:]))
        del self.domains[domid]
        self.owned.pop(domid, None)
        self.memory.pop(domid, None)
        for rec in self.domains.values():
            if rec.target == domid:
                rec.target = None
        self._flush_fired()
        self.released.append(domid)
        self._fire_special(paths.SPECIAL_RELEASE)
        return True

    # -- watch events -----------------------------------------------------------------
    def _emit(self, watch: Watch, path: str) -> None:
        conn = watch.conn
        if watch.relative:
            path = paths.relative_to(path, conn.domid)
        payload = path.encode() + b"\0" + watch.token + b"\0"
        if len(payload) > PAYLOAD_MAX:
            self.dropped_events += 1
            return
        # A domain's events not yet taken by the I/O layer are bounded too (R11).
        if not conn.privileged and _over(self.quotas.watch_events, len(conn.events) + 1):
            self.dropped_events += 1
            return
        conn.events.append(HEADER.pack(XsType.WATCH_EVENT, 0, 0, len(payload)) + payload)
        self.dirty.add(conn)

    def _fire_special(self, name: str) -> None:
        special = self.specials[name]
        for watch in list(self.watch_index.get(name, ())):
            if self.perm_for(watch.conn, special) & READ:
                self._emit(watch, name)

    def _visible(self, conn: Connection, path: str, perms: Perms, perm_gen: int) -> bool:
        if conn.privileged:
            return True
        probe = Node(b"", perms, {}, 0, perm_gen)
        if self.perm_for(conn, probe) & READ:
            return True
        if path == "/":
            return False
        parent = self.nodes.get(paths.parent(path))
        return parent is not None and bool(self.perm_for(conn, parent) & READ)

    def _fire(self, path: str, removed: tuple[str, ...], perms: Perms, perm_gen: int) -> None:
        index = self.watch_index
        if not index:
            return
        hits: list[tuple[Watch, str]] = []
        if removed:
            # watches on removed descendants, children first (nodes that existed: as C
            # xenstored, a watch below on a path that never existed does not fire)
            for wpath in removed:
                group = [(w, wpath) for w in index.get(wpath, ())]
                if len(group) > 1:
                    group.sort(key=_by_seq)
                hits += group
        top = len(hits)
        # Watches on the path itself and on each ancestor (depth-limited).
        depth = 0
        probe = path
        while True:
            for watch in index.get(probe, ()):
                if watch.depth is None or watch.depth >= depth:
                    hits.append((watch, path))
            if probe == "/":
                break
            probe = paths.parent(probe)
            depth += 1
        if len(hits) - top > 1:  # a connection's events in watch registration order
            hits[top:] = sorted(hits[top:], key=_by_seq)
        seen: dict[Connection, bool] = {}
        # one change sends a connection a given event once, however many of its watches
        # match (C xenstored: two watches with one token on a node and its parent)
        sent: set[tuple[Connection, bytes, bool, str]] = set()
        for watch, reported in hits:
            ok = seen.get(watch.conn)
            if ok is None:
                ok = seen[watch.conn] = self._visible(watch.conn, path, perms, perm_gen)
            if ok:
                key = (watch.conn, watch.token, watch.relative, reported)
                if key not in sent:
                    sent.add(key)
                    self._emit(watch, reported)

    def _flush_fired(self) -> None:
        fired = self._fired
        self._fired = []
        for path, removed, perms, perm_gen in fired:
            self._fire(path, removed, perms, perm_gen)

    # -- request entry point ----------------------------------------------------------
    def handle(
        self, conn: Connection, type_: int, req_id: int, tx_id: int, payload: bytes
    ) -> bytes:
        """Process one request of ``conn``; return the encoded reply message.

        Watch events caused by the request are queued on the connections concerned
        (see :attr:`dirty`).  Never raises for anything the client sent; an unexpected
        exception inside a handler (a bug) is logged and answered with ``EIO``.
        """
        if type_ == _READ and not tx_id and not conn.closed:
            # Fast path of the commonest request: a readable node outside a transaction.
            # Anything else (an error to report) takes the general path below.  The
            # compiled ring pass answers the cached-path case itself with the same
            # lookups (cython/xsring.pyx, RingPass._read): keep the two in step.
            path = conn.path_cache.get(payload)
            if path is None:
                end = payload.find(b"\0")
                try:
                    path = self._path(conn, payload if end < 0 else payload[:end])
                except _Fail:
                    path = ""
                else:
                    if end == len(payload) - 1:
                        # The usual "path\0": the payload is the path, so it may be a key
                        # too (bytes after the NUL would make every request a new key).
                        conn.cache_path(payload, path)
            node = self.nodes.get(path)
            if node is not None and (conn.privileged or self.perm_for(conn, node) & READ):
                value = node.value
                # (values are at most PAYLOAD_MAX bytes: WRITE payloads are bounded)
                return _pack_header(_READ, req_id, 0, len(value)) + value
        handler = _HANDLERS.get(type_)
        tx: Transaction | None = None
        try:
            if handler is None:
                raise _Fail("ENOSYS")
            if conn.closed:  # released domain or dropped connection: nothing more is done
                raise _Fail("EINVAL")
            if tx_id and type_ not in _NO_TX:
                tx = conn.transactions.get(tx_id)
                if tx is None:
                    raise _Fail("ENOENT")
            try:
                reply = handler(self, conn, tx, payload)
            except _Fail:
                raise
            except Exception:
                # A bug of ours, not the client's doing: the client gets EIO (and the
                # transaction can no longer commit), everyone else is still served.
                _logger.exception(
                    "xenstore request of type %d from domain %d failed", type_, conn.domid
                )
                self.internal_errors += 1
                if tx is not None:
                    tx.poisoned = tx.poisoned or "EIO"
                raise _Fail("EIO") from None
            if len(reply) > PAYLOAD_MAX:
                raise _Fail("E2BIG")
        except _Fail as exc:
            self._fired.clear()
            # A quota failure (or a refused modification) poisons the transaction; a reply
            # that is merely too big (DIRECTORY → E2BIG, then DIRECTORY_PART) does not.
            if tx is not None and (
                exc.name == "ENOSPC" or (exc.name in _POISONING and type_ in _MUTATING)
            ):
                tx.poisoned = tx.poisoned or exc.name
            name = exc.name.encode() + b"\0"
            return HEADER.pack(XsType.ERROR, req_id, tx_id, len(name)) + name
        if self._fired:
            self._flush_fired()
        return HEADER.pack(type_, req_id, tx_id, len(reply)) + reply

    # -- argument helpers ---------------------------------------------------------------
    def _path(self, conn: Connection, raw: bytes) -> str:
        cache = conn.path_cache
        path = cache.get(raw)
        if path is not None:
            return path
        try:
            text = raw.decode("ascii")
            paths.validate_path(text, allow_special=False)
        except (UnicodeDecodeError, paths.InvalidPathError):
            raise _Fail("EINVAL") from None
        path = paths.resolve(text, conn.domid)
        if len(path) > ABS_PATH_MAX:
            raise _Fail("EINVAL")
        # C xenstored 4.17 applies path_max to every connection, dom0's included
        if self.quotas.path_max and len(path) - _home_prefix_len(path) > self.quotas.path_max:
            raise _Fail("EINVAL")
        conn.cache_path(raw, path)
        return path

    @staticmethod
    def _arg(payload: bytes) -> bytes:
        end = payload.find(b"\0")
        return payload if end < 0 else payload[:end]

    @staticmethod
    def _domid(raw: bytes) -> int:
        if not raw.isdigit() or len(raw) > 5:
            raise _Fail("EINVAL")
        domid = int(raw)
        if domid > DOMID_MAX:
            raise _Fail("EINVAL")
        return domid

    def _missing_errno(
        self, conn: Connection, view: Transaction | Store, path: str, perm: int
    ) -> str:
        """ENOENT, or EACCES if the nearest existing ancestor denies ``perm``."""
        probe = path
        while probe != "/":
            probe = paths.parent(probe)
            node = view.lookup(probe)
            if node is not None:
                return "ENOENT" if self.perm_for(conn, node) & perm == perm else "EACCES"
        return "ENOENT"

    def _get(self, conn: Connection, view: Transaction | Store, path: str, perm: int) -> Node:
        node = view.lookup(path)
        if node is None:
            raise _Fail(self._missing_errno(conn, view, path, perm))
        if self.perm_for(conn, node) & perm != perm:
            raise _Fail("EACCES")
        return node

    def _inherit(self, conn: Connection, parent: Node) -> Perms:
        perms = tuple(
            (d, b) for i, (d, b) in enumerate(parent.perms) if i == 0 or self.entry_live(d, parent)
        )
        if not conn.privileged:
            perms = ((conn.domid, perms[0][1]), *perms[1:])
        return perms

    def _create_path(
        self, conn: Connection, view: Transaction | Store, path: str, value: bytes
    ) -> None:
        """Create ``path`` and any missing ancestors (checks permission and quota first)."""
        missing = [path]
        probe = path
        while True:
            probe = paths.parent(probe)
            node = view.lookup(probe)
            if node is not None:
                break
            missing.append(probe)
        if self.perm_for(conn, node) & WRITE != WRITE:
            raise _Fail("EACCES")
        if not conn.privileged:
            if _over(self.quotas.nodes, view.count(conn.domid) + len(missing)):
                raise _Fail("ENOSPC")
            grow = sum(footprint(p, b"", node.perms) for p in missing) + len(value)
            if _over(self.quotas.memory, view.mem(conn.domid) + grow):
                raise _Fail("ENOMEM")
        parent = node
        for sub in reversed(missing):
            perms = self._inherit(conn, parent)
            # Implicitly created parents fire no event of their own.
            view.create(sub, value if sub == path else b"", perms, sub == path)
            created = view.lookup(sub)
            assert created is not None
            parent = created

    # -- handlers -------------------------------------------------------------------
    def _read(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, self._arg(payload))
        return self._get(conn, tx or self, path, READ).value

    def _directory(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, self._arg(payload))
        node = self._get(conn, tx or self, path, READ)
        if not node.children:
            return b""
        return "\0".join(node.children).encode() + b"\0"

    def _directory_part(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        parts = payload.split(b"\0")
        if len(parts) < 2:
            raise _Fail("EINVAL")
        path = self._path(conn, parts[0])
        if not parts[1].isdigit():
            raise _Fail("EINVAL")
        offset = int(parts[1])
        node = self._get(conn, tx or self, path, READ)
        gen = str(node.gen).encode() + b"\0"
        names = b"".join(c.encode() + b"\0" for c in node.children)
        if offset >= len(names):
            return gen + b"\0"
        budget = PAYLOAD_MAX - len(gen) - 1
        end = offset
        while end < len(names):
            nxt = names.index(b"\0", end) + 1
            if nxt - offset > budget:
                break
            end = nxt
        if end == offset:
            raise _Fail("E2BIG")
        chunk = names[offset:end]
        return gen + chunk + (b"\0" if end >= len(names) else b"")

    def _get_perms(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        raw = self._arg(payload)
        special = self.specials.get(raw.decode("ascii", "replace"))
        if special is not None:
            node = special
            if self.perm_for(conn, node) & READ != READ:
                raise _Fail("EACCES")
        else:
            node = self._get(conn, tx or self, self._path(conn, raw), READ)
        return format_perms(node.perms)

    def _write(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        end = payload.find(b"\0")
        if end < 0:
            raise _Fail("EINVAL")
        path = self._path(conn, payload[:end])
        value = payload[end + 1 :]
        if not conn.privileged and _over(self.quotas.node_size, len(value)):
            raise _Fail("E2BIG")
        view: Transaction | Store = tx or self
        node = view.lookup(path)
        if node is None:
            self._create_path(conn, view, path, value)
        else:
            if self.perm_for(conn, node) & WRITE != WRITE:
                raise _Fail("EACCES")
            # The growth is charged to the node's owner, so the owner's quota is the one
            # checked; quotas never apply to dom0, whoever writes to its nodes.
            grow = len(value) - len(node.value)
            owner = node.owner
            if (
                not conn.privileged
                and owner != 0
                and grow > 0
                and _over(self.quotas.memory, view.mem(owner) + grow)
            ):
                raise _Fail("ENOMEM")
            view.set_value(path, value)
        return OK

    def _mkdir(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, self._arg(payload))
        view: Transaction | Store = tx or self
        node = view.lookup(path)
        if node is None:
            self._create_path(conn, view, path, b"")
        elif self.perm_for(conn, node) & WRITE != WRITE:
            raise _Fail("EACCES")
        return OK

    def _rm(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, self._arg(payload))
        view: Transaction | Store = tx or self
        node = view.lookup(path)
        if node is None:
            err = self._missing_errno(conn, view, path, WRITE)
            if err == "EACCES":
                raise _Fail(err)
            if path != "/" and view.lookup(paths.parent(path)) is not None:
                return OK
            raise _Fail("ENOENT")
        if self.perm_for(conn, node) & WRITE != WRITE:
            raise _Fail("EACCES")
        if path == "/":
            raise _Fail("EINVAL")
        view.delete(path)
        return OK

    def _set_perms(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        parts = payload.split(b"\0")
        if parts and parts[-1] == b"":
            parts.pop()
        if len(parts) < 2:
            raise _Fail("EINVAL")
        perms = parse_perms(parts[1:])
        if perms is None:
            raise _Fail("EINVAL")
        if not conn.privileged and _over(self.quotas.node_permissions, len(perms)):
            raise _Fail("ENOSPC")
        exists = self.domain_exists
        if exists is not None and not exists(perms[0][0]):
            raise _Fail("ENOENT")  # the owner is no live domain (checked before the node)
        name = parts[0].decode("ascii", "replace")
        special = self.specials.get(name)
        view: Transaction | Store = tx or self
        # WRITE as C xenstored asks for it: a missing node is EACCES unless its nearest
        # existing ancestor is writable
        node = (
            special
            if special is not None
            else self._get(conn, view, self._path(conn, parts[0]), WRITE)
        )
        access = self.perm_for(conn, node)
        if not access & OWNER:
            raise _Fail("EACCES")
        if not conn.privileged and perms[0][0] != node.owner:
            # only dom0 changes owners: EACCES, as hostile-inputs scenario 24 requires
            # (C xenstored 4.17 answers EPERM: a documented difference)
            raise _Fail("EACCES")
        for domid, _ in perms:
            self.domain_ref(domid)
        if special is not None:
            special.perms = perms
            special.perm_gen = self.next_gen()
            return OK
        view.set_perms(self._path(conn, parts[0]), perms)
        return OK

    def _watch(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        parts = payload.split(b"\0")
        if len(parts) < 3:
            raise _Fail("EINVAL")
        raw, token = parts[0], parts[1]
        depth: int | None = None
        if len(parts) >= 4 and parts[2] != b"":
            if not parts[2].isdigit():
                raise _Fail("EINVAL")
            depth = int(parts[2])
        path, relative = self._watch_path(conn, raw)
        key = (path, token)
        if key in conn.watches:
            raise _Fail("EEXIST")
        rec = self.domain_ref(conn.domid)
        if not conn.privileged and _over(self.quotas.watches, rec.watches + 1):
            raise _Fail("ENOSPC")
        self._watch_seq += 1
        watch = Watch(conn, path, token, relative, depth, self._watch_seq)
        conn.watches[key] = watch
        self.watch_index.setdefault(path, []).append(watch)
        rec.watches += 1
        # Fire on register (queued after this reply); special names only if readable.
        special = self.specials.get(path)
        if special is None or self.perm_for(conn, special) & READ:
            self._emit(watch, path)
        return OK

    def _watch_path(self, conn: Connection, raw: bytes) -> tuple[str, bool]:
        if raw[:1] == b"@":
            name = raw.decode("ascii", "replace")
            if name not in self.specials:
                raise _Fail("EINVAL")
            return name, False
        return self._path(conn, raw), raw[:1] != b"/"

    def _unwatch(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        parts = payload.split(b"\0")
        if len(parts) < 3:
            raise _Fail("EINVAL")
        path, _ = self._watch_path(conn, parts[0])
        watch = conn.watches.pop((path, parts[1]), None)
        if watch is None:
            raise _Fail("ENOENT")
        self._unindex(watch)
        self.domain_ref(conn.domid).watches -= 1
        return OK

    def _reset_watches_req(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        self._reset_watches(conn)
        return OK

    def _transaction_start(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if tx is not None:
            raise _Fail("EBUSY")
        rec = self.domain_ref(conn.domid)
        if not conn.privileged and _over(self.quotas.transactions, rec.transactions + 1):
            raise _Fail("ENOSPC")
        tx_id = conn.next_tx
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx = (tx_id + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = Transaction(self, conn, tx_id)
        rec.transactions += 1
        return str(tx_id).encode() + b"\0"

    def _transaction_end(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        arg = self._arg(payload)
        if arg not in (b"T", b"F"):
            raise _Fail("EINVAL")
        if tx is None:
            raise _Fail("ENOENT")
        del conn.transactions[tx.id]
        self.domain_ref(conn.domid).transactions -= 1
        if arg == b"F":
            return OK
        if tx.poisoned:
            raise _Fail(tx.poisoned)
        if self.always_eagain:
            raise _Fail("EAGAIN")
        self._commit(tx)
        return OK

    def _commit(self, tx: Transaction) -> None:
        nodes = self.nodes
        for path, gen in tx.reads.items():
            node = nodes.get(path)
            if (node.gen if node is not None else NO_GEN) != gen:
                raise _Fail("EAGAIN")
        if not tx.ops:
            return
        # Replay under an undo log: snapshot every node the replay may touch.
        saved: dict[str, Node | None] = {}
        owned = dict(self.owned)
        memory = dict(self.memory)

        def save(path: str) -> None:
            if path not in saved:
                node = nodes.get(path)
                saved[path] = node.copy() if node is not None else None

        for op in tx.ops:
            kind, path = op[0], op[1]
            if kind == "delete":
                for sub in self.subtree(path, nodes.get):
                    save(sub)
            else:
                save(path)
            if path != "/":
                save(paths.parent(path))
        before = self._fired
        self._fired = []
        for op in tx.ops:
            kind, path = op[0], op[1]
            if kind == "create":
                if path in nodes:
                    self.set_value(path, op[2])
                    self.set_perms(path, op[3])
                else:
                    self.create(path, op[2], op[3], op[4])
            elif kind == "value":
                self.set_value(path, op[2])
            elif kind == "perms":
                self.set_perms(path, op[2])
            elif path in nodes:
                self.delete(path)
        conn = tx.conn
        broken = None
        if not conn.privileged:
            q = self.quotas
            for domid, count in self.owned.items():
                if domid and count > owned.get(domid, 0) and _over(q.nodes, count):
                    broken = "ENOSPC"
            for domid, used in self.memory.items():
                if domid and used > memory.get(domid, 0) and _over(q.memory, used):
                    broken = broken or "ENOMEM"
        if broken:
            for path, node in saved.items():
                if node is None:
                    nodes.pop(path, None)
                else:
                    nodes[path] = node
            self.owned = owned
            self.memory = memory
            self._fired = before
            raise _Fail(broken)
        # One event per modified path, in first-modification order; visibility is decided
        # by the permissions the path has at the end of the commit (a transaction that
        # creates a node and then grants a domain read access must notify that domain).
        merged: dict[str, tuple[str, tuple[str, ...], Perms, int]] = {}
        for ev in self._fired:
            prev = merged.get(ev[0])
            if prev is not None:
                removed = prev[1] + tuple(p for p in ev[1] if p not in prev[1])
                ev = (ev[0], removed, ev[2], ev[3])
            merged[ev[0]] = ev
        self._fired = before + list(merged.values())

    def _introduce(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if not conn.privileged:
            raise _Fail("EACCES")
        parts = payload.split(b"\0")
        if len(parts) < 3:
            raise _Fail("EINVAL")
        domid = self._domid(parts[0])
        if domid == 0:
            raise _Fail("EINVAL")
        hook = self.on_introduce
        if hook is not None:
            # The ring is mapped and its port bound before the domain counts as
            # introduced; a failure leaves nothing introduced.
            gfn, port = self._number(parts[1], 64), self._number(parts[2], 32)
            failed = hook(domid, gfn, port)
            if failed:
                raise _Fail(failed)
        self.introduce_domain(domid)
        return OK

    @staticmethod
    def _number(raw: bytes, bits: int) -> int:
        """A decimal argument below 2**bits (EINVAL otherwise)."""
        if not raw.isdigit() or len(raw) > 20 or int(raw) >> bits:
            raise _Fail("EINVAL")
        return int(raw)

    def _release(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if not conn.privileged:
            raise _Fail("EACCES")
        domid = self._domid(self._arg(payload))
        if domid == 0:
            raise _Fail("EINVAL")
        rec = self.domains.get(domid)
        if rec is None or not rec.introduced:
            raise _Fail("ENOENT")
        self.release_domain(domid)
        return OK

    def _get_domain_path(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        domid = self._domid(self._arg(payload))
        return paths.domain_path(domid).encode() + b"\0"

    def _is_introduced(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if not conn.privileged:
            raise _Fail("EACCES")
        domid = self._domid(self._arg(payload))
        rec = self.domains.get(domid)
        return b"T\0" if rec is not None and rec.introduced else b"F\0"

    def _resume(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if not conn.privileged:
            raise _Fail("EACCES")
        rec = self.domains.get(self._domid(self._arg(payload)))
        if rec is None or not rec.introduced:
            raise _Fail("ENOENT")
        return OK

    def _set_target(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if not conn.privileged:
            raise _Fail("EACCES")
        parts = payload.split(b"\0")
        if len(parts) < 2:
            raise _Fail("EINVAL")
        domid, target = self._domid(parts[0]), self._domid(parts[1])
        rec, trec = self.domains.get(domid), self.domains.get(target)
        if rec is None or trec is None or not rec.introduced or not trec.introduced:
            raise _Fail("ENOENT")
        rec.target = target
        return OK

    def _control(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if not conn.privileged:
            raise _Fail("EACCES")
        args = [a.decode("ascii", "replace") for a in payload.split(b"\0")]
        if args and args[-1] == "":
            args.pop()
        if not args:
            raise _Fail("EINVAL")
        cmd, rest = args[0], args[1:]
        if cmd == "help":
            text = "".join(f"{name} {usage}\n" for name, usage in _CONTROL_HELP)
        elif cmd == "print":
            self.log.append(" ".join(rest))
            return OK
        elif cmd == "check":
            problems = self.check()
            text = "\n".join(problems) if problems else "OK"
        elif cmd == "quota":
            text = self._control_quota(rest)
        else:
            raise _Fail("EINVAL")
        return text.encode() + b"\0"

    def _control_quota(self, args: list[str]) -> str:
        if not args:
            q = dataclasses.asdict(self.quotas)
            return "".join(f"{k.replace('_', '-')}: {v}\n" for k, v in q.items())
        if args[0] == "set" and len(args) == 3:
            try:
                self.quotas.set(args[1], args[2])
            except (KeyError, ValueError):
                raise _Fail("EINVAL") from None
            return "OK"
        domid = self._domid(args[0].encode())
        rec = self.domains.get(domid)
        if rec is None:
            raise _Fail("ENOENT")
        return (
            f"nodes: {self.node_count(domid)}\nwatches: {rec.watches}\n"
            f"transactions: {rec.transactions}\n"
        )

    # -- persistence -------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Return the whole database as a JSON-serialisable dict (no connections)."""
        return {
            "version": 1,
            "generation": self.generation,
            "nodes": [
                [
                    p,
                    base64.b64encode(n.value).decode(),
                    format_perms(n.perms).decode(),
                    n.gen,
                    n.perm_gen,
                ]
                for p, n in self._ordered()
            ],
            "specials": {
                name: [format_perms(n.perms).decode(), n.perm_gen]
                for name, n in self.specials.items()
            },
            "domains": [[r.domid, r.gen, r.introduced, r.target] for r in self.domains.values()],
        }

    def _ordered(self) -> Iterable[tuple[str, Node]]:
        for path in self.subtree("/", self.nodes.get):
            yield path, self.nodes[path]

    @classmethod
    def from_state(cls, state: dict[str, Any], quotas: Quotas | None = None) -> Store:
        """Rebuild a store saved with :meth:`to_state` (raises ``ValueError`` if malformed)."""
        if state.get("version") != 1:
            raise ValueError("unknown xenstore state version")
        store = cls(quotas)
        store.nodes.clear()
        store.owned.clear()
        store.memory.clear()
        store.domains.clear()
        for path, value, perms_text, gen, perm_gen in state["nodes"]:
            perms = parse_perms(perms_text.encode().split(b"\0")[:-1])
            if perms is None:
                raise ValueError(f"bad permissions for {path}")
            node = Node(base64.b64decode(value), perms, {}, int(gen), int(perm_gen))
            store.nodes[path] = node
            if path != "/":
                store.nodes[paths.parent(path)].children[paths.basename(path)] = None
            store._account(node.owner, 1)
            store._charge(node.owner, footprint(path, node.value, node.perms))
        for name, (perms_text, perm_gen) in state["specials"].items():
            perms = parse_perms(perms_text.encode().split(b"\0")[:-1])
            if name in store.specials and perms is not None:
                store.specials[name].perms = perms
                store.specials[name].perm_gen = int(perm_gen)
        for domid, gen, introduced, target in state["domains"]:
            store.domains[int(domid)] = Domain(int(domid), int(gen), bool(introduced), target)
        store.domains.setdefault(0, Domain(0, 0, introduced=True))
        store.generation = int(state["generation"])
        return store


def parse_perms(items: list[bytes]) -> Perms | None:
    """Parse wire permission entries (``b"r5"`` …); ``None`` if any is malformed."""
    if not items:
        return None
    out = []
    for item in items:
        if len(item) < 2 or len(item) > 6:
            return None
        bits = _LETTER_BITS.get(item[0])
        digits = item[1:]
        if bits is None or not digits.isdigit():
            return None
        domid = int(digits)
        if domid > DOMID_MAX:
            return None
        out.append((domid, bits))
    return tuple(out)


def format_perms(perms: Perms) -> bytes:
    """Return the wire form of a permission list (``b"n0\\0r5\\0"``)."""
    return "".join(f"{_BITS_LETTER[b]}{d}\0" for d, b in perms).encode()


_CONTROL_HELP = (
    ("help", "show this list"),
    ("print", "<text>: add a line to the daemon's log"),
    ("check", "verify the tree and its accounting"),
    ("quota", "[<domid> | set <name> <value>]: show or set quotas"),
)

Handler = Callable[[Store, Connection, "Transaction | None", bytes], bytes]

# io/xs_wire.h: enum xsd_sockmsg_type.  Absent here, and so answered ENOSYS: XS_RESTRICT
# (20, removed), the upstream-only GET/SET_FEATURE and GET/SET_QUOTA (23-26), and the
# server-to-client types WATCH_EVENT and ERROR.
_HANDLERS: dict[int, Handler] = {
    XsType.CONTROL: Store._control,
    XsType.DIRECTORY: Store._directory,
    XsType.READ: Store._read,
    XsType.GET_PERMS: Store._get_perms,
    XsType.WATCH: Store._watch,
    XsType.UNWATCH: Store._unwatch,
    XsType.TRANSACTION_START: Store._transaction_start,
    XsType.TRANSACTION_END: Store._transaction_end,
    XsType.INTRODUCE: Store._introduce,
    XsType.RELEASE: Store._release,
    XsType.GET_DOMAIN_PATH: Store._get_domain_path,
    XsType.WRITE: Store._write,
    XsType.MKDIR: Store._mkdir,
    XsType.RM: Store._rm,
    XsType.SET_PERMS: Store._set_perms,
    XsType.IS_DOMAIN_INTRODUCED: Store._is_introduced,
    XsType.RESUME: Store._resume,
    XsType.SET_TARGET: Store._set_target,
    XsType.RESET_WATCHES: Store._reset_watches_req,
    XsType.DIRECTORY_PART: Store._directory_part,
}

_READ = int(XsType.READ)
_pack_header = HEADER.pack

# Types whose header tx_id is not looked up (WATCH ignores it; RESET_WATCHES drops all).
_NO_TX = frozenset({XsType.WATCH, XsType.UNWATCH, XsType.RESET_WATCHES})

# Re-exported for callers that want to raise store-style errors themselves.
StoreError = XenstoreError

"""The store's transactions, watch index and saved state at the edges a mutation run found
unchecked (docs/testing.md, "Mutation testing").

The rules checked, from hostile-inputs.md ("Transaction isolation semantics", "Quota
defaults", R17) and docs/xenstore.md:

- what a transaction sees is its own copy: a node it changed (value, permissions,
  removal) reads back changed inside it and unchanged outside until the commit; every
  change stamps a fresh generation, inside a transaction too (DIRECTORY_PART shows it);
- quotas count inside a transaction: the nodes and bytes a transaction's own changes
  add or free count at once, so the request that breaks a quota is the one refused, and
  a transaction's view of a domain's node and byte counts is what the commit makes them;
- a commit is all-or-nothing, accounting included: one that breaks a quota leaves the
  tree (a removed subtree too) and the counts exactly as they were;
- a restart loses nothing: a saved and restored store has the same tree, domains,
  targets and quotas, and treats its requests the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from test_xs_store import Client, perms_of

from xenpv.xenstore.store import Quotas, Store
from xenpv.xenstore.wire import XsType as T

HOME5 = "/local/domain/5"


def new_store(quotas: Quotas | None = None) -> tuple[Store, Client, Client]:
    """A store with domains 5, 6 and 7 introduced, dom0 and domain 5 connected, 5's home
    owned by 5 (as a toolstack sets it up)."""
    store = Store(quotas or Quotas())
    for domid in (5, 6, 7):
        store.introduce_domain(domid)
    dom0 = Client(store, 0)
    dom0.ok(T.MKDIR, HOME5)
    dom0.ok(T.SET_PERMS, HOME5, "n5")
    return store, dom0, Client(store, 5)


def gen_of(client: Client, path: str, tx: int = 0) -> int:
    """The generation DIRECTORY_PART reports for ``path`` (decimal, xen-protocols §4.4)."""
    text = client.ok(T.DIRECTORY_PART, path, "0", tx=tx).split(b"\0")[0]
    assert text.isdigit(), text
    return int(text)


def children(client: Client, path: str, tx: int = 0) -> list[bytes]:
    return sorted(client.ok(T.DIRECTORY, path, tx=tx).split(b"\0")[:-1])


# -- a transaction's own view -----------------------------------------------------------
def test_tx_changes_read_back_inside_with_fresh_generations_and_stay_private() -> None:
    """Value, permission and removal changes made in a transaction: visible in it (each
    with a new decimal generation), invisible outside, all there after the commit."""
    store, dom0, _ = new_store()
    dom0.write("/a", b"v0")
    dom0.write("/a/kid", b"k")
    dom0.write("/a/kid/grand", b"g")
    tx = dom0.start()
    gens = [gen_of(dom0, "/a", tx)]
    dom0.write("/a", b"v1", tx=tx)
    gens.append(gen_of(dom0, "/a", tx))
    dom0.ok(T.SET_PERMS, "/a", "n0", "r5", tx=tx)
    gens.append(gen_of(dom0, "/a", tx))
    assert perms_of_tx(dom0, "/a", tx) == ["n0", "r5"] and perms_of(dom0, "/a") == ["n0"]
    dom0.ok(T.RM, "/a/kid", tx=tx)
    gens.append(gen_of(dom0, "/a", tx))
    assert len(set(gens)) == 4 and gens == sorted(gens), gens
    assert dom0.read("/a", tx=tx) == b"v1" and children(dom0, "/a", tx) == []
    for gone in ("/a/kid", "/a/kid/grand"):
        assert dom0.err(T.READ, gone, tx=tx) == "ENOENT"
        assert dom0.err(T.GET_PERMS, gone, tx=tx) == "ENOENT"
    # a removed node can be made again in the same transaction
    dom0.write("/a/kid", b"again", tx=tx)
    assert dom0.read("/a/kid", tx=tx) == b"again" and children(dom0, "/a", tx) == [b"kid"]
    # outside: nothing happened yet
    assert dom0.read("/a") == b"v0" and dom0.read("/a/kid/grand") == b"g"
    assert perms_of(dom0, "/a") == ["n0"]
    assert dom0.commit(tx) == "OK"
    assert dom0.read("/a") == b"v1" and dom0.read("/a/kid") == b"again"
    assert dom0.err(T.READ, "/a/kid/grand") == "ENOENT"
    assert perms_of(dom0, "/a") == ["n0", "r5"]
    assert store.check() == []


def perms_of_tx(client: Client, path: str, tx: int) -> list[str]:
    return [p.decode() for p in client.ok(T.GET_PERMS, path, tx=tx).split(b"\0")[:-1]]


def test_tx_removal_under_a_parent_the_transaction_saw_absent_is_einval() -> None:
    """A transaction that read ``/p`` as absent, then removes ``/p/c`` made meanwhile by
    another writer: its view has nothing consistent to change (EINVAL, as C xenstored),
    and its commit fails with EAGAIN; the outside nodes stay."""
    store, dom0, _ = new_store()
    outside = Client(store, 0)
    tx = dom0.start()
    assert dom0.err(T.READ, "/p", tx=tx) == "ENOENT"
    outside.write("/p/c", b"x")
    assert dom0.req(T.RM, "/p/c", tx=tx) == ("error", b"EINVAL\0")  # the name as sent
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.read("/p/c") == b"x" and store.check() == []



def test_tx_removal_of_a_node_whose_child_was_removed_outside_is_not_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A transaction changed ``/a`` (its copy lists child ``b``), then another writer
    removed ``/a`` with ``/a/b``: the transaction's removal of ``/a`` meets a child its
    view names but no longer finds.  That child is gone already; the removal goes on
    (OK, no internal error, the transaction not poisoned) and the commit fails with
    EAGAIN, as every transaction whose reads another writer changed; nothing comes back.
    (Found by the model state machine; the removal answered EIO before.)"""
    store, dom0, _ = new_store()
    outside = Client(store, 0)
    outside.write("/a/b", b"x")
    tx = dom0.start()
    dom0.write("/a", b"", tx=tx)
    outside.ok(T.RM, "/a")
    with caplog.at_level(logging.ERROR, logger="xenpv.xenstore.store"):
        assert dom0.req(T.RM, "/a", tx=tx) == ("ok", b"OK\0")
    assert store.internal_errors == 0 and not caplog.records
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.err(T.READ, "/a") == "ENOENT" and store.check() == []

# -- quotas inside a transaction ---------------------------------------------------------
OWNERS = (0, 5, 6, 7, 8)  # 7 owns nothing before the transaction, 8 nothing at all

# dom0's transaction: creates, value changes, owner changes and removals, nodes of
# several owners (only dom0 may change owners, hostile-inputs "Permission rules")
DOM0_STEPS: list[tuple[str, ...]] = [
    ("perms", f"{HOME5}/x", "n7", "r5"),
    ("write", "/d/a", "xyz"),
    ("perms", "/d/a", "n5", "r6"),
    ("write", "/d/a", "a longer value"),
    ("write", "/d/a", "s"),
    ("perms", "/d/a", "n6"),
    ("perms", "/d/a", "n6", "r5", "b7"),
    ("write", "/d/b/c", "cc"),
    ("perms", "/d/b", "n6"),
    ("perms", "/d/b", "n5"),
    ("perms", "/d/b/c", "n7"),
    ("write", f"{HOME5}/new", "by dom0, owned by 5"),
    ("rm", "/d/b"),
    ("rm", f"{HOME5}/x"),
    ("write", f"{HOME5}/x", "made again"),
    ("perms", f"{HOME5}/x", "n7", "r5"),
    ("rm", "/d"),
]

# domain 5's own transaction (no owner changes: EACCES for it)
GUEST_STEPS: list[tuple[str, ...]] = [
    ("write", f"{HOME5}/g/h", "hh"),
    ("write", f"{HOME5}/g", "longer value"),
    ("perms", f"{HOME5}/g", "n5", "r6", "w7"),
    ("write", f"{HOME5}/g", ""),
    ("rm", f"{HOME5}/x"),
    ("write", f"{HOME5}/x/y", "again"),
    ("perms", f"{HOME5}/x", "n5", "b6"),
    ("rm", f"{HOME5}/g"),
]


def run_step(client: Client, step: tuple[str, ...], tx: int) -> None:
    kind, path, *rest = step
    if kind == "write":
        client.write(path, rest[0].encode(), tx=tx)
    elif kind == "perms":
        client.ok(T.SET_PERMS, path, *rest, tx=tx)
    else:
        client.ok(T.RM, path, tx=tx)


@pytest.mark.parametrize("who, steps", [(0, DOM0_STEPS), (5, GUEST_STEPS)])
def test_tx_view_of_node_and_byte_counts_is_what_the_commit_makes_them(
    who: int, steps: list[tuple[str, ...]]
) -> None:
    """After every prefix of a transaction's changes, its view of each domain's node count
    and bytes (what the quotas are checked against inside it) equals what a walk of the
    tree finds once it is committed; before the commit the live counts are untouched."""
    for end in range(1, len(steps) + 1):
        store, dom0, guest = new_store()
        guest.write("x/old", b"o")  # 5 owns x and x/old
        dom0.ok(T.SET_PERMS, f"{HOME5}/x/old", "n6")  # a child of another owner
        client = dom0 if who == 0 else guest
        before = (dict(store.owned), dict(store.memory))
        tx = client.start()
        for step in steps[:end]:
            run_step(client, step, tx)
        view = client.conn.transactions[tx]
        seen = {d: (view.count(d), view.mem(d)) for d in OWNERS}
        assert (dict(store.owned), dict(store.memory)) == before, steps[end - 1]
        assert client.commit(tx) == "OK"
        counts, usage = store.recount(), store.remeasure()
        after = {d: (counts.get(d, 0), usage.get(d, 0)) for d in OWNERS}
        assert seen == after, steps[end - 1]
        assert store.check() == []


def test_tx_node_quota_counts_the_transactions_creations_and_removals() -> None:
    """With room for three more nodes, a transaction makes three (one request each) and
    the fourth is ENOSPC; one that first removes a two-node subtree has room for five.
    The refused request poisons the transaction: its commit fails, nothing changes."""
    store, _, guest = new_store()
    guest.write("old/leaf", b"")
    store.quotas.nodes = store.node_count(5) + 3
    for removed, room in (("", 3), ("old", 5)):
        tx = guest.start()
        if removed:
            guest.ok(T.RM, removed, tx=tx)
        for i in range(room):
            guest.write(f"n{i}", b"v", tx=tx)
        assert guest.write_err(f"n{room}", b"v", tx=tx) == "ENOSPC"
        assert guest.commit(tx) == "ENOSPC"
        assert children(guest, HOME5) == [b"old"] and store.check() == []
    # without the refused request the same transaction commits, and the count is exact
    tx = guest.start()
    guest.ok(T.RM, "old", tx=tx)
    for i in range(5):
        guest.write(f"n{i}", b"v", tx=tx)
    assert guest.commit(tx) == "OK"
    assert store.node_count(5) == store.quotas.nodes and store.check() == []


def test_tx_memory_quota_counts_the_transactions_values_permissions_and_removals() -> None:
    """The memory quota (path + value + 8 bytes per permission entry) inside a
    transaction: a value may grow to exactly the limit and not a byte past it, an extra
    permission entry uses 8 of those bytes, a removal gives its node's bytes back, and a
    shrunk value gives its bytes back too."""
    store, _, guest = new_store()
    guest.write("v", b"")
    guest.write("gone", b"z" * 50)
    path = f"{HOME5}/v"
    gone = len(f"{HOME5}/gone") + 50 + 8
    store.quotas.memory = store.mem(5) + 100

    def try_write(grow: int, **kw: bool) -> bool:
        tx = guest.start()
        if kw.get("shrink"):
            guest.write(path, b"s" * 100, tx=tx)
            guest.write(path, b"", tx=tx)
        if kw.get("perms"):
            guest.ok(T.SET_PERMS, path, "n5", "r6", tx=tx)
        if kw.get("remove"):
            guest.ok(T.RM, "gone", tx=tx)
        kind, payload = guest.req(T.WRITE, tx=tx, raw=path.encode() + b"\0" + b"x" * grow)
        guest.ok(T.TRANSACTION_END, "F", tx=tx)
        assert kind == "ok" or payload == b"ENOMEM\0", payload
        return kind == "ok"

    assert try_write(100) and not try_write(101)
    assert try_write(100, shrink=True) and not try_write(101, shrink=True)
    assert try_write(92, perms=True) and not try_write(93, perms=True)
    assert try_write(100 + gone, remove=True) and not try_write(101 + gone, remove=True)
    assert store.check() == []


def test_tx_accessed_node_limit_is_exact_with_created_nodes() -> None:
    """``transaction-nodes`` counts each node a transaction looked at or made once: with a
    limit of 4, a transaction that creates a node under its home (the home and 3 new
    nodes: 4) commits; one more node is ENOSPC."""
    store, _, guest = new_store(Quotas(transaction_nodes=4))
    tx = guest.start()
    guest.write("a/b/c", b"v", tx=tx)  # HOME5, a, a/b, a/b/c
    assert guest.commit(tx) == "OK"
    tx = guest.start()
    guest.write("p/q/r", b"v", tx=tx)
    assert guest.write_err("p/q/s", b"v", tx=tx) == "ENOSPC"
    assert guest.commit(tx) == "ENOSPC"
    assert guest.err(T.READ, "p") == "ENOENT" and store.check() == []


def test_tx_commit_that_breaks_a_quota_restores_a_removed_subtree() -> None:
    """All-or-nothing (R17): a commit that removes a subtree and makes nodes, refused with
    ENOSPC because another writer gave the domain nodes meanwhile, leaves the subtree,
    its values and every count as they were."""
    store, dom0, guest = new_store()
    for leaf in ("a", "b", "b/c"):
        guest.write(f"old/{leaf}", leaf.encode())
    store.quotas.nodes = store.node_count(5) + 2
    tx = guest.start()
    guest.ok(T.RM, "old", tx=tx)  # 4 nodes freed in the transaction
    for i in range(6):
        guest.write(f"new{i}", b"v", tx=tx)
    for i in range(3):  # nodes the transaction never looked at, owned by 5
        dom0.write(f"/other/{i}")
        dom0.ok(T.SET_PERMS, f"/other/{i}", "n5")
    counts = (store.node_count(5), store.mem(5))
    assert guest.commit(tx) == "ENOSPC"
    assert guest.read("old/b/c") == b"b/c" and guest.read("old/a") == b"a"
    assert children(guest, f"{HOME5}/old") == [b"a", b"b"]
    assert children(guest, HOME5) == [b"old"]
    assert (store.node_count(5), store.mem(5)) == counts and store.check() == []


# -- watches -------------------------------------------------------------------------------
def test_unwatching_one_of_several_watches_on_a_path_keeps_the_others() -> None:
    """Two connections (and a second token) watch one path; removing one watch leaves the
    others firing, and removing the last leaves nothing behind; UNWATCH without a token is
    EINVAL."""
    store, dom0, guest = new_store()
    other = Client(store, 0)
    for client, token in ((dom0, "t1"), (dom0, "t2"), (other, "t1")):
        client.ok(T.WATCH, "/w", token)
    dom0.events(), other.events()
    dom0.ok(T.UNWATCH, "/w", "t1")
    dom0.write("/w", b"1")
    assert dom0.events() == [("/w", "t2")] and other.events() == [("/w", "t1")]
    other.ok(T.UNWATCH, "/w", "t1")
    dom0.write("/w", b"2")
    assert dom0.events() == [("/w", "t2")] and other.events() == []
    dom0.ok(T.UNWATCH, "/w", "t2")
    dom0.write("/w", b"3")
    assert dom0.events() == [] and "/w" not in store.watch_index
    # a path and a token are needed (the name as sent)
    assert dom0.req(T.UNWATCH, raw=b"/w\0") == ("error", b"EINVAL\0")
    assert store.watch_count(0) == 0 and guest.events() == []


# -- INTRODUCE's numbers ---------------------------------------------------------------
def test_introduce_numbers_longer_than_the_longest_64_bit_value_are_refused() -> None:
    """A gfn is at most 20 digits (2^64 - 1 has 20): a 21-digit one is EINVAL even when
    leading zeros keep its value small, so the store never parses unbounded numbers."""
    store, dom0, _ = new_store()
    calls: list[tuple[int, int, int]] = []
    store.on_introduce = lambda domid, gfn, port: calls.append((domid, gfn, port))  # type: ignore[func-returns-value]
    dom0.ok(T.INTRODUCE, "9", "0" * 19 + "1", "0" * 19 + "2")
    assert calls == [(9, 1, 2)]
    for gfn, port in (("0" * 20 + "1", "2"), ("1", "0" * 20 + "2")):
        assert dom0.err(T.INTRODUCE, "10", gfn, port) == "EINVAL"
    assert calls == [(9, 1, 2)] and dom0.ok(T.IS_DOMAIN_INTRODUCED, "10") == b"F\0"


# -- saved state ---------------------------------------------------------------------------
def restored(store: Store, quotas: Quotas | None = None) -> Store:
    return Store.from_state(json.loads(json.dumps(store.to_state())), quotas)


def test_restored_store_keeps_targets_and_uses_the_quotas_it_is_given() -> None:
    """A restart loses nothing (docs/xenstore.md): a stub domain keeps acting with its
    target's rights, and the restored store enforces the quotas the daemon passes."""
    store, dom0, guest = new_store()
    guest.write("secret", b"s")
    dom0.ok(T.SET_TARGET, "7", "5")
    assert Client(store, 7).read(f"{HOME5}/secret") == b"s"
    quotas = Quotas(nodes=store.node_count(5) + 1)
    copy = restored(store, quotas)
    assert copy.quotas is quotas
    stub, guest2 = Client(copy, 7), Client(copy, 5)
    assert stub.read(f"{HOME5}/secret") == b"s"
    assert Client(copy, 6).err(T.READ, f"{HOME5}/secret") == "EACCES"
    guest2.write("one", b"")
    assert guest2.write_err("two", b"") == "ENOSPC"


def test_a_state_without_dom0s_record_still_has_an_introduced_privileged_dom0() -> None:
    """dom0 is always there: a state file whose domain list lacks it (written by hand, or
    trimmed) restores dom0 as introduced, and its watches and transactions are counted."""
    store, _, _ = new_store()
    state = json.loads(json.dumps(store.to_state()))
    state["domains"] = [d for d in state["domains"] if d[0] != 0]
    copy = Store.from_state(state)
    dom0 = Client(copy, 0)
    assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "0") == b"T\0"
    dom0.ok(T.WATCH, "/w", "t")
    tx = dom0.start()
    assert (copy.watch_count(0), copy.transaction_count(0)) == (1, 1)
    assert dom0.ok(T.CONTROL, "quota", "0") == b"nodes: %d\nwatches: 1\ntransactions: 1\n\0" % (
        copy.node_count(0)
    )
    assert dom0.ok(T.CONTROL, "check") == b"OK\0"
    assert dom0.commit(tx) == "OK"


def test_restoring_a_state_ignores_unknown_or_malformed_special_nodes() -> None:
    """A special node's entry with a malformed permission list, or a name the store does
    not know, is ignored: the special keeps its default (dom0 only) permissions."""
    store, _, _ = new_store()
    state = json.loads(json.dumps(store.to_state()))
    state["specials"]["@releaseDomain"] = ["x5\0", 3]
    state["specials"]["@futureNode"] = ["r5\0", 3]
    copy = Store.from_state(state)
    dom0 = Client(copy, 0)
    assert perms_of(dom0, "@releaseDomain") == ["n0"]
    assert sorted(copy.specials) == ["@introduceDomain", "@releaseDomain"]
    assert Client(copy, 5).err(T.GET_PERMS, "@releaseDomain") == "EACCES"


def newer_version(state: dict[str, Any]) -> None:
    state["version"] = 2


def bad_home_perms(state: dict[str, Any]) -> None:
    next(n for n in state["nodes"] if n[0] == HOME5)[2] = "q0\0"


@pytest.mark.parametrize("spoil, words", [(newer_version, "version"), (bad_home_perms, HOME5)])
def test_an_unusable_state_is_refused_with_a_message_naming_the_problem(
    spoil: Callable[[dict[str, Any]], None], words: str
) -> None:
    """An unknown version, or a node with a malformed permission list: ValueError whose
    message names the version or the node (the daemon shows it when it refuses to start)."""
    store, _, _ = new_store()
    state = json.loads(json.dumps(store.to_state()))
    spoil(state)
    with pytest.raises(ValueError, match=words):
        Store.from_state(state)


# -- generations, quotas and commits outside the transaction's own view ------------------
def test_every_change_outside_a_transaction_stamps_a_fresh_generation() -> None:
    """A value write and a removal below a node both give it a new, larger, decimal
    generation; and a transaction that read the node fails on each of them (EAGAIN)."""
    _, dom0, _ = new_store()
    dom0.write("/g/kid", b"k")
    gens = [gen_of(dom0, "/g")]
    for change in (lambda: dom0.write("/g", b"v"), lambda: dom0.ok(T.RM, "/g/kid")):
        tx = dom0.start()
        dom0.read("/g", tx=tx)
        change()
        gens.append(gen_of(dom0, "/g"))
        assert dom0.commit(tx) == "EAGAIN"
    assert gens == sorted(set(gens)), gens


def test_quotas_of_a_domain_that_owns_nothing_yet() -> None:
    """A domain that never owned a node has 0 nodes and 0 bytes: with a node quota of 1 it
    may create exactly one node, and with a memory quota of exactly that node's bytes the
    write fits, outside a transaction or committed from one."""
    for in_tx in (False, True):
        store, dom0, _ = new_store()
        dom0.write("/shared")
        dom0.ok(T.SET_PERMS, "/shared", "n0", "b7")
        guest = Client(store, 7)
        assert store.node_count(7) == 0 and store.mem(7) == 0
        store.quotas.nodes = 1
        store.quotas.memory = len("/shared/one") + 3 + 8 * 2  # path, value, two entries
        tx = guest.start() if in_tx else 0
        guest.write("/shared/one", b"abc", tx=tx)
        assert guest.write_err("/shared/two", b"", tx=tx) == "ENOSPC"
        if in_tx:
            assert guest.commit(tx) == "ENOSPC"  # poisoned by the refused write
            tx = guest.start()
            guest.write("/shared/one", b"abc", tx=tx)
            assert guest.commit(tx) == "OK"
        assert guest.read("/shared/one") == b"abc" and store.node_count(7) == 1
        assert store.mem(7) == store.quotas.memory and store.check() == []


def test_a_commit_is_refused_only_for_quotas_it_breaks_by_growing() -> None:
    """dom0 (exempt from quotas) may leave a domain over its quotas; another domain's
    commit is not refused for that, nor is a commit that does not grow the domain over
    its limit; a commit that grows a domain past a limit lowered meanwhile is refused."""
    store, dom0, guest = new_store()
    dom0.write("/big", b"x" * 3000)
    dom0.ok(T.SET_PERMS, "/big", "n6")  # domain 6: over the memory quota set below
    for i in range(12):
        dom0.write(f"/dom0/{i}", b"")  # dom0 owns more nodes than 5 will
    guest.write("v", b"12345")
    store.quotas.memory = store.mem(5) + 500
    store.quotas.nodes = store.node_count(5) + 5
    assert store.mem(6) > store.quotas.memory > store.mem(5)
    tx = guest.start()
    guest.write("v", b"abcde", tx=tx)  # same size: no growth
    assert guest.commit(tx) == "OK"
    tx = guest.start()
    for i in range(4):
        guest.write(f"n{i}", b"", tx=tx)
    store.quotas.nodes = store.node_count(5) + 2  # lowered while the transaction is open
    assert guest.commit(tx) == "ENOSPC"
    assert children(guest, HOME5) == [b"v"] and store.check() == []


def test_a_refused_commit_also_undoes_a_node_it_made_and_removed() -> None:
    """All-or-nothing with a node the transaction created and removed again: the refused
    commit (quota broken meanwhile) leaves no trace of it and answers ENOSPC."""
    store, dom0, guest = new_store()
    store.quotas.nodes = store.node_count(5) + 2
    tx = guest.start()
    guest.write("tmp/x", b"t", tx=tx)
    guest.ok(T.RM, "tmp", tx=tx)
    guest.write("keep", b"k", tx=tx)
    guest.write("keep2", b"k", tx=tx)
    dom0.write("/other")
    dom0.ok(T.SET_PERMS, "/other", "n5")
    assert guest.commit(tx) == "ENOSPC"
    assert children(guest, HOME5) == [] and guest.err(T.READ, "tmp") == "ENOENT"
    assert store.check() == []


def test_a_commit_reports_removed_nodes_even_when_their_parent_is_made_again() -> None:
    """One event per modified path at commit, but none lost: a transaction that writes
    ``/a``, removes it (with ``/a/b``) and makes it again notifies a watcher of ``/a/b``
    (the node is gone) and a watcher of ``/a`` once."""
    store, dom0, _ = new_store()
    dom0.write("/a/b", b"b")
    watch_a, watch_b = Client(store, 0), Client(store, 0)
    watch_a.ok(T.WATCH, "/a", "ta")
    watch_b.ok(T.WATCH, "/a/b", "tb")
    watch_a.events(), watch_b.events()
    tx = dom0.start()
    dom0.write("/a", b"1", tx=tx)
    dom0.ok(T.RM, "/a", tx=tx)
    dom0.write("/a", b"2", tx=tx)
    assert dom0.commit(tx) == "OK"
    assert watch_b.events() == [("/a/b", "tb")]
    assert watch_a.events() == [("/a", "ta")]
    assert dom0.err(T.READ, "/a/b") == "ENOENT" and dom0.read("/a") == b"2"


# -- visibility, special nodes, release ---------------------------------------------------
def test_changes_to_an_unreadable_root_are_not_shown_to_its_watchers() -> None:
    """The root has no parent to be seen through: a domain that may not read ``/`` gets no
    event for a change of ``/`` itself, but does once it may read it."""
    _, dom0, guest = new_store()
    guest.ok(T.WATCH, "/", "t")
    guest.events()
    dom0.write("/", b"v")
    assert guest.events() == []
    dom0.ok(T.SET_PERMS, "/", "r0")
    assert guest.events() == [("/", "t")]


def test_special_node_permissions_on_the_wire() -> None:
    """GET_PERMS on a special node: EACCES (the name as sent) unless granted; a path with
    non-ASCII bytes is EINVAL, never an internal error."""
    store, dom0, guest = new_store()
    assert guest.req(T.GET_PERMS, "@releaseDomain") == ("error", b"EACCES\0")
    dom0.ok(T.SET_PERMS, "@releaseDomain", "n0", "r5")
    assert perms_of(guest, "@releaseDomain") == ["n0", "r5"]
    for client in (dom0, guest):
        assert client.req(T.GET_PERMS, raw=b"@release\xffDomain\0") == ("error", b"EINVAL\0")
    assert store.internal_errors == 0


def test_a_released_owner_of_the_root_leaves_the_roots_other_entries() -> None:
    """The root goes back to dom0 when the domain dom0 gave it to is released; the other
    domains' entries on it stay as they were."""
    store, dom0, _ = new_store()
    dom0.ok(T.SET_PERMS, "/", "r5", "w6", "b7")
    assert store.release_domain(5)
    assert perms_of(dom0, "/") == ["r0", "w6", "b7"] and store.check() == []


# -- WATCH and TRANSACTION_END arguments, event ordering and size (fourth round) ------------
def test_watch_arguments_and_their_errors() -> None:
    """WATCH is ``path\\0token\\0`` [+ ``depth\\0``]: too few fields, a depth that is not a
    number and an unknown special name are EINVAL (a special name with non-ASCII bytes too,
    never an internal error); an empty or unterminated third field is no depth at all."""
    store, dom0, guest = new_store()
    for raw in (b"/w", b"/w\0tok", b"/w\0tok\0x\0", b"/w\0tok\0-1\0", b"@nosuch\0tok\0",
                b"@\xffrelease\0tok\0", b"@\0tok\0"):
        for client in (dom0, guest):
            assert client.req(T.WATCH, raw=raw) == ("error", b"EINVAL\0"), raw
    assert store.internal_errors == 0
    deep = "/w/a/b/c"
    for raw, token in ((b"/w\0empty\0\0", "empty"), (b"/w\0open\0" + b"1", "open"),
                       (b"/w\0one\0" + b"1\0", "one")):
        dom0.ok(T.WATCH, raw=raw)
        assert dom0.events() == [("/w", token)]  # fired on registration
    dom0.write(deep, b"v")
    # depth 1 stops at /w/a's level; the others have no limit
    assert sorted(dom0.events()) == [(deep, "empty"), (deep, "open")]
    dom0.write("/w/a", b"v")
    assert sorted(dom0.events()) == [("/w/a", "empty"), ("/w/a", "one"), ("/w/a", "open")]


def test_one_changes_events_come_in_watch_registration_order() -> None:
    """A connection with watches on a node and on its ancestors gets one change's events in
    the order it registered the watches (as C xenstored sends them), not tree order."""
    _, dom0, _ = new_store()
    for path, token in (("/o", "first"), ("/o/p/q", "second"), ("/", "third"),
                        ("/o/p", "fourth")):
        dom0.ok(T.WATCH, path, token)
    dom0.events()
    dom0.write("/o/p/q", b"v")
    assert [token for _, token in dom0.events()] == ["first", "second", "third", "fourth"]


def test_an_event_of_exactly_the_largest_payload_is_sent_and_a_larger_one_counted() -> None:
    """A watch event of PAYLOAD_MAX (4096) bytes is sent; one byte more is dropped and
    counted (``dropped_events``), every time."""
    store, dom0, _ = new_store()
    fits, over = "f" * (4096 - len("/w/x") - 2), "o" * (4096 - len("/w/x") - 1)
    dom0.ok(T.WATCH, "/w", fits)
    dom0.ok(T.WATCH, "/w", over)
    assert [len(t) for _, t in dom0.events()] == [len(fits), len(over)]
    assert store.dropped_events == 0
    dom0.write("/w/x", b"v")
    assert dom0.events() == [("/w/x", fits)] and store.dropped_events == 1
    dom0.write("/w/y", b"v")
    assert dom0.events() == [("/w/y", fits)] and store.dropped_events == 2


def test_transaction_end_arguments_and_their_errors() -> None:
    """TRANSACTION_END takes ``T`` or ``F``: anything else is EINVAL (inside a transaction
    too, which stays open); with no transaction it is ENOENT - the errno names exactly, as
    the reply carries them (a client reads an unknown name as EINVAL)."""
    _, dom0, guest = new_store()
    einval, enoent = ("error", b"EINVAL\0"), ("error", b"ENOENT\0")
    for client in (dom0, guest):
        for arg in ("X", "t", "", "TF"):
            assert client.req(T.TRANSACTION_END, arg) == einval
        assert client.req(T.TRANSACTION_END, "T") == enoent
        assert client.req(T.TRANSACTION_END, "F") == enoent
        tx = client.start()
        assert client.req(T.TRANSACTION_END, "X", tx=tx) == einval
        assert client.commit(tx) == "OK"
        assert client.req(T.TRANSACTION_END, "T", tx=tx) == enoent  # ended: gone


def test_check_names_what_is_inconsistent() -> None:
    """``Store.check()`` (the consistency oracle of the model and fuzz tests) names the
    node, the child or the domain at fault, so a failing run says what broke."""
    store, dom0, _ = new_store()
    dom0.write("/a/b", b"v")
    client5 = Client(store, 5)
    client5.ok(T.WATCH, "/a", "t")
    assert store.check() == []
    store.nodes["/a"].children["ghost"] = None
    assert "/a lists missing child ghost" in store.check()
    del store.nodes["/a"].children["ghost"]
    del store.nodes["/a"].children["b"]
    assert store.check() == ["/a/b not listed by its parent"]
    store.nodes["/a"].children["b"] = None
    store.domains[5].watches += 1
    assert store.check() == ["domain 5 watch/transaction accounting off"]


def write_result(client: Client, path: str, value: bytes = b"") -> str:
    """WRITE: ``"OK"`` or the error's name."""
    kind, payload = client.req(T.WRITE, raw=path.encode() + b"\0" + value)
    return "OK" if kind == "ok" else payload[:-1].decode()


def test_path_max_counts_what_follows_a_home_prefix_of_one_to_five_digits() -> None:
    """``path_max`` (every connection, dom0's too) counts the bytes after
    ``/local/domain/<1-5 digits>/`` - a short domid with nested names after it, and a
    five-digit one - and the whole path when what follows ``/local/domain/`` is no
    domid."""
    store, dom0, _ = new_store(Quotas(path_max=40))
    store.introduce_domain(10000)
    rest = "a/b/" + "c" * 36  # 40 bytes, slashes within the first six after the prefix
    for home in ("/local/domain/7/", "/local/domain/10000/"):
        assert write_result(dom0, home + rest) == "OK"
        assert write_result(dom0, home + rest + "d") == "EINVAL"
    other = "/local/domain/abc/"
    assert write_result(dom0, other + "e" * (40 - len(other))) == "OK"
    assert write_result(dom0, other + "e" * (41 - len(other))) == "EINVAL"
    six = "/local/domain/123456/"  # no domid has six digits: counted whole
    assert write_result(dom0, six + "f" * (40 - len(six))) == "OK"
    assert write_result(dom0, six + "f" * (41 - len(six))) == "EINVAL"
    # without path_max, an absolute path may have exactly XENSTORE_ABS_PATH_MAX bytes
    _, free, _ = new_store(Quotas(path_max=0))
    assert write_result(free, "/" + "g" * 3071) == "OK"
    assert write_result(free, "/" + "g" * 3072) == "EINVAL"


def test_the_path_cache_holds_exactly_its_bounds() -> None:
    """hostile-inputs.md scenario 23: a connection's cache of validated paths holds at
    most 1024 entries and 65536 bytes (keys plus paths) and starts afresh past either -
    and not before."""
    store, _, _ = new_store()
    dom0 = Client(store, 0)  # a fresh connection: an empty cache
    conn = dom0.conn
    for i in range(1024):  # 14 bytes an entry: the entry bound comes first
        assert dom0.err(T.DIRECTORY, f"/e/{i:04d}") == "ENOENT"
    assert len(conn.path_cache) == 1024
    assert dom0.err(T.DIRECTORY, "/e/next") == "ENOENT"
    assert len(conn.path_cache) == 1
    dom0b = Client(store, 0)
    for i in range(512):  # 128 bytes an entry: exactly 65536 bytes
        assert dom0b.err(T.DIRECTORY, f"/b/{i:061d}") == "ENOENT"
    assert (len(dom0b.conn.path_cache), dom0b.conn.path_cache_bytes) == (512, 65536)
    assert dom0b.err(T.DIRECTORY, "/b/" + "x" * 61) == "ENOENT"
    assert (len(dom0b.conn.path_cache), dom0b.conn.path_cache_bytes) == (1, 128)


def test_two_watches_and_removed_nodes_events_in_registration_order() -> None:
    """The registration order holds for exactly two watches on a path and its parent,
    and for several watches on a node that a removal of its ancestor takes away."""
    _, dom0, _ = new_store()
    dom0.ok(T.WATCH, "/t", "1st")
    dom0.ok(T.WATCH, "/t/u", "2nd")
    dom0.events()
    dom0.write("/t/u", b"v")
    assert dom0.events() == [("/t/u", "1st"), ("/t/u", "2nd")]
    for token in ("r1", "r2", "r3"):
        dom0.ok(T.WATCH, "/t/u", token)
    dom0.events()
    dom0.ok(T.RM, "/t")
    assert dom0.events() == [("/t/u", "2nd"), ("/t/u", "r1"), ("/t/u", "r2"), ("/t/u", "r3"),
                             ("/t", "1st")]


def test_memory_quota_checks_growth_only_at_its_exact_edge() -> None:
    """A guest's rewrite is refused (ENOMEM) only when it grows the owner past the memory
    quota: growing to exactly the quota is fine, one byte more is not; a domain already
    over a lowered quota may still rewrite without growing, and shrink."""
    store, _, guest = new_store()
    guest.write(HOME5 + "/v", b"1234")
    room = 40
    store.quotas.memory = store.mem(5) + room
    assert write_result(guest, HOME5 + "/v", b"1234" + b"x" * (room + 1)) == "ENOMEM"
    assert write_result(guest, HOME5 + "/v", b"1234" + b"x" * room) == "OK"
    assert store.mem(5) == store.quotas.memory
    assert write_result(guest, HOME5 + "/v", b"1234" + b"x" * (room + 1)) == "ENOMEM"
    store.quotas.memory -= 10  # lowered below what domain 5 holds
    assert write_result(guest, HOME5 + "/v", b"5678" + b"y" * room) == "OK"  # same size
    assert write_result(guest, HOME5 + "/v", b"5678" + b"y" * (room + 1)) == "ENOMEM"
    assert write_result(guest, HOME5 + "/v", b"short") == "OK"
    assert store.check() == []


def test_mkdir_set_perms_and_one_argument_requests_at_their_edges() -> None:
    """MKDIR of an existing node the guest may not write is EACCES (one it may write: OK,
    unchanged); SET_PERMS of a path with non-ASCII bytes is EINVAL, never an internal
    error, and its last permission is read with or without a closing NUL; a one-argument
    request reads its argument up to the first NUL, as WRITE reads its path."""
    store, dom0, guest = new_store()
    dom0.write("/ro", b"keep")
    dom0.ok(T.SET_PERMS, "/ro", "n0", "r5")
    assert guest.err(T.MKDIR, "/ro") == "EACCES"
    guest.write(HOME5 + "/mine", b"mine")
    guest.ok(T.MKDIR, HOME5 + "/mine")
    assert guest.read(HOME5 + "/mine") == b"mine"
    for client in (dom0, guest):
        assert client.err(T.SET_PERMS, raw=b"/r\xffo\0n0\0") == "EINVAL"
    assert store.internal_errors == 0
    dom0.ok(T.SET_PERMS, raw=b"/ro\0n0\0r5")
    assert perms_of(dom0, "/ro") == ["n0", "r5"]
    dom0.ok(T.SET_PERMS, raw=b"/ro\0n0\0b6")
    assert perms_of(dom0, "/ro") == ["n0", "b6"]
    # too few fields: a WRITE without the NUL after its path, a SET_PERMS without a
    # permission
    for client in (dom0, guest):
        for type_, raw in ((T.WRITE, b"/ro"), (T.SET_PERMS, b"/ro\0"), (T.SET_PERMS, b"/ro")):
            assert client.req(type_, raw=raw) == ("error", b"EINVAL\0"), raw
    # one-argument requests: bytes after the argument's NUL are not part of it
    assert dom0.ok(T.READ, raw=b"/ro\0/other\0") == b"keep"
    dom0.ok(T.MKDIR, raw=b"/made\0junk\0")
    dom0.ok(T.RM, raw=b"/made\0junk\0")
    assert dom0.err(T.READ, "/made") == "ENOENT"
    tx = dom0.start()
    assert dom0.req(T.TRANSACTION_END, raw=b"F\0T\0", tx=tx) == ("ok", b"OK\0")


def test_a_new_store_and_its_bounded_log() -> None:
    """A new store holds ``/``, ``/tool`` and ``/tool/xenstored``, empty and dom0's, with
    decimal generations; the lines CONTROL ``print`` adds are kept to the last 256."""
    store = Store(Quotas())
    dom0 = Client(store, 0)
    assert sorted(store.nodes) == ["/", "/tool", "/tool/xenstored"]
    for path in store.nodes:
        assert dom0.read(path) == b"" and perms_of(dom0, path) == ["n0"]
        gen_of(dom0, path)  # decimal
    assert store.check() == [] and store.memory == store.remeasure()
    for i in range(300):
        dom0.ok(T.CONTROL, "print", f"line {i}")
    assert list(store.log) == [f"line {i}" for i in range(44, 300)]


def test_reads_on_closed_connections_unterminated_paths_and_one_trailing_byte() -> None:
    """The READ fast path answers as the general one: a closed connection gets EINVAL, a
    path sent without its NUL is the whole payload (not one byte less), and READs of a
    path followed by one varying byte after its NUL never grow the path cache (hostile-
    inputs.md scenario 23)."""
    store, dom0, _ = new_store()
    dom0.write("/a", b"A")
    dom0.write("/ab", b"AB")
    for path in ("/a", "/ab"):
        dom0.ok(T.SET_PERMS, path, "n0", "r5")
    for client in (Client(store, 0), Client(store, 5)):  # nothing cached yet
        assert client.ok(T.READ, raw=b"/ab") == b"AB"
        assert client.ok(T.READ, raw=b"/ab\0") == b"AB"
    fresh = Client(store, 5)
    for i in range(256):
        assert fresh.ok(T.READ, raw=b"/ab\0" + bytes([i])) == b"AB"
    assert len(fresh.conn.path_cache) <= 2
    closed = Client(store, 0)
    closed.ok(T.READ, "/a")  # its path is cached now
    store.disconnect(closed.conn)
    assert closed.req(T.READ, "/a") == ("error", b"EINVAL\0")
    assert closed.req(T.READ, raw=b"/a\0") == ("error", b"EINVAL\0")


def test_a_reply_of_exactly_the_largest_payload_is_sent() -> None:
    """A reply of exactly PAYLOAD_MAX (4096) bytes goes out; one byte more is E2BIG."""
    _, dom0, _ = new_store()
    for i in range(64):  # 64 names of 63 bytes, each with its NUL: 4096 bytes
        dom0.write(f"/d/{i:063d}")
    assert len(dom0.ok(T.DIRECTORY, "/d")) == 4096
    dom0.write("/d/x")
    assert dom0.err(T.DIRECTORY, "/d") == "E2BIG"


def test_an_internal_error_is_logged_counted_and_poisons_the_transaction(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a handler (an unexpected exception, injected here) answers EIO, counts
    in ``internal_errors``, is logged with the request type and the domain, and makes
    the transaction it happened in fail its commit with EIO; other requests are served."""
    import xenpv.xenstore.store as store_module

    def broken(*_: object) -> bytes:
        raise RuntimeError("injected")

    store, dom0, guest = new_store()
    monkeypatch.setitem(store_module._HANDLERS, T.GET_DOMAIN_PATH, broken)
    with caplog.at_level(logging.ERROR, logger="xenpv.xenstore.store"):
        assert guest.req(T.GET_DOMAIN_PATH, "5") == ("error", b"EIO\0")
        assert store.internal_errors == 1
        tx = dom0.start()
        dom0.write("/in-tx", b"v", tx=tx)
        assert dom0.req(T.GET_DOMAIN_PATH, "5", tx=tx) == ("error", b"EIO\0")
        assert store.internal_errors == 2
        assert dom0.req(T.GET_DOMAIN_PATH, "6", tx=tx) == ("error", b"EIO\0")
        assert dom0.commit(tx) == "EIO" and dom0.err(T.READ, "/in-tx") == "ENOENT"
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"xenstore request of type {int(T.GET_DOMAIN_PATH)} from domain 5 failed"
    assert messages[1:] == [messages[0].replace("domain 5", "domain 0")] * 2
    assert guest.read(HOME5) == b"" and store.check() == []

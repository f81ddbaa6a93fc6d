"""One named test per rule of hostile-inputs.md's transaction and permission sections.

Each test is named after the rule it checks (``test_tx_*`` for "Transaction isolation
semantics", ``test_perm_*`` for "Permission rules") and checks the exact outcome: the
error name, the values and permissions left in the tree, the node counts, and the whole
list of watch events each connection received (not only that nothing raised).
"""

from __future__ import annotations

import pytest
from test_xs_store import Client, perms_of

from xenpv.xenstore.store import Quotas, Store
from xenpv.xenstore.wire import XsType as T


@pytest.fixture
def store() -> Store:
    s = Store(Quotas())
    for domid in (5, 6, 7):
        s.introduce_domain(domid)
    return s


@pytest.fixture
def dom0(store: Store) -> Client:
    return Client(store, 0)


@pytest.fixture
def outside(store: Store) -> Client:
    """A second dom0 connection: the writer outside the transaction."""
    return Client(store, 0)


def guest_of(store: Store, dom0: Client, domid: int) -> Client:
    dom0.ok(T.MKDIR, f"/local/domain/{domid}")
    dom0.ok(T.SET_PERMS, f"/local/domain/{domid}", f"n{domid}")
    return Client(store, domid)


@pytest.fixture
def g5(store: Store, dom0: Client) -> Client:
    return guest_of(store, dom0, 5)


@pytest.fixture
def g6(store: Store, dom0: Client) -> Client:
    return guest_of(store, dom0, 6)


def watching(client: Client, path: str, token: str = "t") -> None:
    """Register a watch and consume its registration event (checked exactly)."""
    client.ok(T.WATCH, path, token)
    assert client.events() == [(path, token)]


# == Transaction isolation semantics ==================================================
def test_tx_a_non_zero_tx_id_in_transaction_start_is_illegal(dom0: Client, store: Store) -> None:
    tx = dom0.start()
    assert dom0.err(T.TRANSACTION_START, "", tx=tx) == "EBUSY"
    assert dom0.err(T.TRANSACTION_START, "", tx=tx + 1) == "ENOENT"
    assert store.transaction_count(0) == 1


def test_tx_reads_and_writes_happen_on_the_copy(dom0: Client, outside: Client) -> None:
    dom0.write("/a/x", b"old")
    tx = dom0.start()
    dom0.write("/a/x", b"new", tx=tx)
    dom0.write("/a/y", b"born", tx=tx)
    assert dom0.read("/a/x", tx=tx) == b"new"
    assert outside.read("/a/x") == b"old"
    assert outside.err(T.READ, "/a/y") == "ENOENT"
    assert sorted(dom0.ok(T.DIRECTORY, "/a", tx=tx).split(b"\0")[:-1]) == [b"x", b"y"]
    assert outside.ok(T.DIRECTORY, "/a") == b"x\0"


def test_tx_end_f_discards_the_transaction(dom0: Client, outside: Client, store: Store) -> None:
    dom0.write("/a/x", b"old")
    watching(outside, "/a")
    before = store.node_count(0)
    tx = dom0.start()
    dom0.write("/a/x", b"new", tx=tx)
    dom0.write("/a/y/z", b"1", tx=tx)
    dom0.ok(T.RM, "/a/x", tx=tx)
    dom0.ok(T.TRANSACTION_END, "F", tx=tx)
    assert outside.read("/a/x") == b"old"
    assert outside.err(T.READ, "/a/y") == "ENOENT"
    assert store.node_count(0) == before
    assert outside.events() == []
    assert dom0.err(T.READ, "/a/x", tx=tx) == "ENOENT"  # the id is gone


def test_tx_an_intervening_write_to_a_read_node_gives_eagain(dom0: Client, outside: Client) -> None:
    dom0.write("/a/x", b"old")
    watching(outside, "/a/y")
    tx = dom0.start()
    assert dom0.read("/a/x", tx=tx) == b"old"
    dom0.write("/a/y", b"from-tx", tx=tx)
    outside.write("/a/x", b"outside")
    assert outside.events() == []
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.read("/a/x") == b"outside"
    assert outside.err(T.READ, "/a/y") == "ENOENT"
    assert outside.events() == []


def test_tx_every_write_stamps_a_fresh_generation_even_with_the_same_value(
    dom0: Client, outside: Client
) -> None:
    dom0.write("/a/x", b"same")
    tx = dom0.start()
    dom0.read("/a/x", tx=tx)
    outside.write("/a/x", b"same")
    assert dom0.commit(tx) == "EAGAIN"


def test_tx_a_deleted_read_node_gives_eagain(dom0: Client, outside: Client) -> None:
    dom0.write("/a/x", b"v")
    tx = dom0.start()
    dom0.read("/a/x", tx=tx)
    dom0.write("/a/z", b"1", tx=tx)
    outside.ok(T.RM, "/a/x")
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.err(T.READ, "/a/z") == "ENOENT"


def test_tx_a_node_read_as_absent_that_appears_gives_eagain(dom0: Client, outside: Client) -> None:
    tx = dom0.start()
    assert dom0.err(T.READ, "/a/x", tx=tx) == "ENOENT"
    outside.write("/a/x", b"appeared")
    assert dom0.commit(tx) == "EAGAIN"


def test_tx_only_nodes_the_transaction_looked_at_are_checked(
    dom0: Client, outside: Client, g5: Client
) -> None:
    dom0.write("/a/x", b"v")
    dom0.write("/b/y", b"v")
    tx = dom0.start()
    dom0.read("/a/x", tx=tx)
    dom0.write("/a/x", b"tx", tx=tx)
    outside.write("/b/y", b"other")
    outside.write("/b/new", b"other")
    g5.write("data", b"guest")
    assert dom0.commit(tx) == "OK"
    assert outside.read("/a/x") == b"tx"
    assert outside.read("/b/y") == b"other"


def test_tx_a_write_reads_the_node_first_so_a_concurrent_write_gives_eagain(
    dom0: Client, outside: Client
) -> None:
    """Modified nodes are checked when the transaction read them first, and a WRITE does."""
    dom0.write("/a/x", b"old")
    watching(outside, "/a/x")
    tx = dom0.start()
    dom0.write("/a/x", b"tx", tx=tx)  # never READ: still checked (the permission check reads)
    outside.write("/a/x", b"outside")
    assert outside.events() == [("/a/x", "t")]
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.read("/a/x") == b"outside"
    assert outside.events() == []


def test_tx_outside_removal_of_a_node_the_transaction_wrote_gives_eagain(
    dom0: Client, outside: Client, store: Store
) -> None:
    """The sequence the short fuzz box never reached: a removal of a node written unread."""
    dom0.write("/a/x", b"old")
    watching(outside, "/a")
    tx = dom0.start()
    dom0.write("/a/x", b"tx", tx=tx)
    outside.ok(T.RM, "/a/x")
    assert outside.events() == [("/a/x", "t")]
    count = store.node_count(0)
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.err(T.READ, "/a/x") == "ENOENT"
    assert outside.ok(T.DIRECTORY, "/a") == b""
    assert store.node_count(0) == count
    assert outside.events() == []
    assert store.check() == []


def test_tx_outside_removal_of_the_parent_of_a_written_node_gives_eagain(
    dom0: Client, outside: Client, store: Store
) -> None:
    dom0.write("/a/x", b"old")
    tx = dom0.start()
    dom0.write("/a/x", b"tx", tx=tx)
    outside.ok(T.RM, "/a")
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.err(T.READ, "/a") == "ENOENT"
    assert store.check() == []


def test_tx_outside_removal_and_recreation_of_a_written_node_gives_eagain(
    dom0: Client, outside: Client
) -> None:
    dom0.write("/a/x", b"old")
    tx = dom0.start()
    dom0.write("/a/x", b"tx", tx=tx)
    outside.ok(T.RM, "/a/x")
    outside.write("/a/x", b"again")  # the same path, a new generation
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.read("/a/x") == b"again"


def test_tx_outside_permission_change_of_a_read_node_gives_eagain(
    dom0: Client, outside: Client
) -> None:
    dom0.write("/a/x", b"v")
    tx = dom0.start()
    dom0.ok(T.GET_PERMS, "/a/x", tx=tx)
    outside.ok(T.SET_PERMS, "/a/x", "n0", "r5")
    assert dom0.commit(tx) == "EAGAIN"
    assert perms_of(outside, "/a/x") == ["n0", "r5"]


def test_tx_outside_permission_change_of_a_written_node_gives_eagain(
    dom0: Client, outside: Client
) -> None:
    dom0.write("/a/x", b"v")
    tx = dom0.start()
    dom0.write("/a/x", b"tx", tx=tx)
    outside.ok(T.SET_PERMS, "/a/x", "n0", "r5")
    assert dom0.commit(tx) == "EAGAIN"
    assert outside.read("/a/x") == b"v"
    assert perms_of(outside, "/a/x") == ["n0", "r5"]


def test_tx_watches_fire_only_if_and_when_committed(dom0: Client, outside: Client) -> None:
    watching(outside, "/a")
    tx = dom0.start()
    dom0.write("/a/x", b"1", tx=tx)
    dom0.write("/a/x", b"2", tx=tx)
    dom0.write("/a/y", b"1", tx=tx)
    assert outside.events() == []
    assert dom0.commit(tx) == "OK"
    assert sorted(outside.events()) == [("/a/x", "t"), ("/a/y", "t")]  # one per path
    tx = dom0.start()
    dom0.write("/a/z", b"1", tx=tx)
    dom0.ok(T.TRANSACTION_END, "F", tx=tx)
    assert outside.events() == []


def test_tx_the_tx_id_of_watch_is_ignored(dom0: Client, outside: Client) -> None:
    tx = dom0.start()
    dom0.ok(T.WATCH, "/w", "t", tx=tx)
    assert dom0.events() == [("/w", "t")]
    dom0.ok(T.TRANSACTION_END, "F", tx=tx)
    outside.write("/w", b"1")
    assert dom0.events() == [("/w", "t")]  # the watch outlives the transaction


def test_tx_at_most_10_open_transactions_per_domain(g5: Client, dom0: Client, store: Store) -> None:
    ids = [g5.start() for _ in range(10)]
    assert len(set(ids)) == 10
    assert g5.err(T.TRANSACTION_START, "") == "ENOSPC"
    for _ in range(11):
        dom0.start()  # quotas never apply to dom0
    g5.ok(T.TRANSACTION_END, "F", tx=ids[0])
    g5.start()
    assert store.transaction_count(5) == 10


def test_tx_at_most_1024_accessed_nodes_per_transaction(g5: Client) -> None:
    tx = g5.start()
    assert g5.read("/local/domain/5", tx=tx) == b""  # the home: accessed node 1
    for i in range(1023):  # a missing child's parent (the home) is already counted
        assert g5.err(T.READ, f"data{i}", tx=tx) == "ENOENT"
    assert g5.err(T.READ, "data0", tx=tx) == "ENOENT"  # again: not a new node
    assert g5.err(T.READ, "one-more", tx=tx) == "ENOSPC"  # node 1025
    assert g5.commit(tx) == "ENOSPC"


def test_tx_a_failure_inside_a_transaction_fails_the_commit(g5: Client, dom0: Client) -> None:
    tx = g5.start()
    g5.write("ok", b"1", tx=tx)
    assert g5.write_err("big", b"x" * 2049, tx=tx) == "E2BIG"
    g5.write("after", b"1", tx=tx)
    assert g5.commit(tx) == "E2BIG"
    assert dom0.err(T.READ, "/local/domain/5/ok") == "ENOENT"
    assert dom0.err(T.READ, "/local/domain/5/after") == "ENOENT"


def test_tx_the_always_eagain_knob_fails_every_commit(dom0: Client, store: Store) -> None:
    store.always_eagain = True
    tx = dom0.start()
    dom0.write("/a", b"1", tx=tx)
    assert dom0.commit(tx) == "EAGAIN"
    assert dom0.err(T.READ, "/a") == "ENOENT"


# == Permission rules =================================================================
def test_perm_the_first_entry_names_the_owner_whose_letter_is_the_default(
    dom0: Client, g5: Client, g6: Client, store: Store
) -> None:
    g7 = Client(store, 7)
    dom0.write("/p", b"v")
    dom0.ok(T.SET_PERMS, "/p", "r5", "w6")
    assert g5.read("/p") == b"v"  # the owner: full access whatever its letter
    g5.write("/p", b"owner")
    assert g6.err(T.READ, "/p") == "EACCES"  # explicit w: write only
    g6.write("/p", b"six")
    assert g7.read("/p") == b"six"  # no entry: the owner's letter r
    assert g7.write_err("/p", b"x") == "EACCES"


def test_perm_only_the_owner_may_change_permissions(dom0: Client, g5: Client, g6: Client) -> None:
    g5.write("x", b"v")
    g5.ok(T.SET_PERMS, "x", "n5", "b6")
    g6.write("/local/domain/5/x", b"w")  # 6 may write ...
    assert g6.err(T.SET_PERMS, "/local/domain/5/x", "n5", "b6", "r7") == "EACCES"  # ... not chmod
    assert perms_of(dom0, "/local/domain/5/x") == ["n5", "b6"]


def test_perm_only_the_control_domain_may_change_the_owner(dom0: Client, g5: Client) -> None:
    g5.write("x", b"v")
    assert g5.err(T.SET_PERMS, "x", "n6") == "EACCES"
    assert g5.err(T.SET_PERMS, "x", "b0") == "EACCES"
    assert perms_of(dom0, "/local/domain/5/x") == ["n5"]
    dom0.ok(T.SET_PERMS, "/local/domain/5/x", "n6")
    assert perms_of(dom0, "/local/domain/5/x") == ["n6"]


def test_perm_entries_for_domids_that_no_longer_exist_are_ignored(
    dom0: Client, store: Store
) -> None:
    dom0.write("/p", b"v")
    dom0.ok(T.SET_PERMS, "/p", "n0", "r7")
    assert Client(store, 7).read("/p") == b"v"
    store.release_domain(7)
    store.introduce_domain(7)
    assert Client(store, 7).err(T.READ, "/p") == "EACCES"
    assert perms_of(dom0, "/p") == ["n0", "r7"]


def test_perm_nodes_a_removed_domain_owns_go_with_their_children(
    dom0: Client, g5: Client, store: Store
) -> None:
    dom0.write("/pub")
    dom0.ok(T.SET_PERMS, "/pub", "b0")
    g5.write("/pub/mine/deep", b"1")
    dom0.write("/pub/mine/by-dom0", b"1")
    dom0.write("/pub/theirs", b"1")
    watching(dom0, "/pub")
    store.release_domain(5)
    assert dom0.ok(T.DIRECTORY, "/pub") == b"theirs\0"
    assert dom0.err(T.READ, "/local/domain/5") == "ENOENT"
    assert store.node_count(5) == 0
    assert sorted(set(dom0.events())) == [("/pub/mine", "t")]
    assert store.check() == []


def test_perm_write_access_to_a_directory_cannot_delete_and_recreate_a_read_only_child(
    dom0: Client, g5: Client
) -> None:
    dom0.write("/local/domain/5/device/ro", b"backend")
    dom0.ok(T.SET_PERMS, "/local/domain/5/device/ro", "n0", "r5")
    assert g5.err(T.RM, "device/ro") == "EACCES"
    assert g5.write_err("device/ro", b"mine") == "EACCES"
    assert dom0.read("/local/domain/5/device/ro") == b"backend"
    assert perms_of(dom0, "/local/domain/5/device/ro") == ["n0", "r5"]


def test_perm_the_root_gets_no_special_case_bypass(dom0: Client, g5: Client) -> None:
    assert g5.err(T.RM, "/") == "EACCES"
    assert g5.err(T.SET_PERMS, "/", "b5") == "EACCES"
    assert g5.write_err("/top") == "EACCES"
    assert dom0.err(T.RM, "/") == "EINVAL"  # not even dom0 removes the root
    assert perms_of(dom0, "/") == ["n0"]


def test_perm_new_nodes_inherit_the_parents_permissions_and_an_unprivileged_creator_owns(
    dom0: Client, g5: Client
) -> None:
    dom0.write("/pub")
    dom0.ok(T.SET_PERMS, "/pub", "r0", "b5", "n6")
    g5.write("/pub/a/b/c", b"1")  # /pub/a and /pub/a/b created implicitly
    for path in ("/pub/a", "/pub/a/b", "/pub/a/b/c"):
        assert perms_of(dom0, path) == ["r5", "b5", "n6"], path
    dom0.write("/pub/d/e", b"1")  # dom0 inherits the list unchanged
    assert perms_of(dom0, "/pub/d") == perms_of(dom0, "/pub/d/e") == ["r0", "b5", "n6"]


def test_perm_watch_events_only_for_nodes_the_watcher_may_read(dom0: Client, g5: Client) -> None:
    dom0.write("/s/x", b"1")  # /s and /s/x unreadable to 5 (default n0)
    watching(g5, "/s")
    dom0.write("/s/x", b"2")
    dom0.ok(T.RM, "/s/x")
    assert g5.events() == []


def test_perm_an_unreadable_node_under_a_readable_parent_is_seen_as_a_child(
    dom0: Client, g5: Client
) -> None:
    dom0.write("/pub/secret", b"1")
    dom0.ok(T.SET_PERMS, "/pub", "n0", "r5")
    dom0.ok(T.SET_PERMS, "/pub/secret", "n0")
    watching(g5, "/pub")
    dom0.write("/pub/secret", b"2")
    assert g5.events() == [("/pub/secret", "t")]
    assert g5.err(T.READ, "/pub/secret") == "EACCES"
    dom0.write("/pub/secret/deeper", b"x")  # parent /pub/secret unreadable: withheld
    assert g5.events() == []


def test_perm_a_readable_node_under_an_unreadable_parent_is_seen(
    dom0: Client, g5: Client, g6: Client
) -> None:
    dom0.write("/priv/open", b"1")
    dom0.ok(T.SET_PERMS, "/priv/open", "n0", "r5")
    watching(g5, "/priv")
    watching(g6, "/priv")
    dom0.write("/priv/open", b"2")
    dom0.write("/priv/other", b"2")
    assert g5.events() == [("/priv/open", "t")]
    assert g6.events() == []


def test_perm_a_watch_fires_once_at_registration(dom0: Client, g5: Client) -> None:
    g5.ok(T.WATCH, "/nowhere/readable", "r")
    assert g5.events() == [("/nowhere/readable", "r")]
    assert g5.events() == []


def test_perm_special_watches_go_only_to_privileged_or_granted_domains(
    dom0: Client, g5: Client, g6: Client, store: Store
) -> None:
    g5.ok(T.WATCH, "@releaseDomain", "r")
    g6.ok(T.WATCH, "@releaseDomain", "r")
    dom0.ok(T.SET_PERMS, "@releaseDomain", "n0", "r5")
    assert g5.events() == g6.events() == []
    store.introduce_domain(9)
    store.release_domain(9)
    assert g5.events() == [("@releaseDomain", "r")]
    assert g6.events() == []
    assert g6.err(T.SET_PERMS, "@releaseDomain", "n0", "r6") == "EACCES"


def test_perm_introduce_and_release_are_dom0_only(dom0: Client, g5: Client, store: Store) -> None:
    assert g5.err(T.INTRODUCE, "9", "1", "2") == "EACCES"
    assert g5.err(T.RELEASE, "6") == "EACCES"
    assert store.released == []
    assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "9") == b"F\0"


def test_perm_is_domain_introduced_is_privileged(dom0: Client, g5: Client) -> None:
    assert g5.err(T.IS_DOMAIN_INTRODUCED, "5") == "EACCES"
    assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "5") == b"T\0"


def test_perm_set_target_lets_a_stub_domain_act_with_its_targets_rights(
    dom0: Client, g5: Client, store: Store
) -> None:
    stub = Client(store, 7)
    g5.write("dm", b"1")
    assert stub.err(T.READ, "/local/domain/5/dm") == "EACCES"
    assert g5.err(T.SET_TARGET, "7", "5") == "EACCES"
    dom0.ok(T.SET_TARGET, "7", "5")
    assert stub.read("/local/domain/5/dm") == b"1"
    stub.write("/local/domain/5/dm", b"2")
    assert g5.read("dm") == b"2"
    assert Client(store, 6).err(T.READ, "/local/domain/5/dm") == "EACCES"

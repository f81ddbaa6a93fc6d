"""Semantics of the embedded xenstored's store (sans-IO), one behaviour per test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.xenstore import wire
from xenpv.xenstore.store import Quotas, Store
from xenpv.xenstore.wire import XsType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostile"))
from test_xenstore_support import Requests


class Client(Requests):
    """A connection of one domain to a store, speaking encoded messages."""

    def __init__(self, store: Store, domid: int) -> None:
        self.store = store
        self.domid = domid
        self.conn = store.connect(domid)
        self.req_id = 0

    def req(
        self, type_: int, *args: str | bytes, tx: int = 0, raw: bytes | None = None
    ) -> tuple[str, bytes]:
        self.req_id += 1
        payload = raw if raw is not None else wire.join(*args)
        reply = self.store.handle(self.conn, type_, self.req_id, tx, payload)
        rtype, rid, rtx, length = wire.HEADER.unpack_from(reply)
        assert (rid, rtx, length) == (self.req_id, tx, len(reply) - 16)
        assert length <= wire.PAYLOAD_MAX
        if rtype == T.ERROR:
            # exactly an errno name xs_wire.h lists (a client reads any other text as
            # EINVAL, so a wrong name would otherwise pass unseen)
            name = reply[16:]
            assert name[-1:] == b"\0" and name[:-1].decode("ascii", "replace") in wire.ERRNO, name
            return "error", name
        assert rtype == type_
        return "ok", reply[16:]

    def write(self, path: str, value: bytes = b"", tx: int = 0) -> str:
        result = super().write(path, value, tx)
        assert result == "OK", result
        return result

    def write_err(self, path: str, value: bytes = b"", tx: int = 0) -> str:
        return self.err(T.WRITE, tx=tx, raw=path.encode() + b"\0" + value)

    def start(self) -> int:
        return int(self.ok(T.TRANSACTION_START, "")[:-1])

    def commit(self, tx: int) -> str:
        kind, payload = self.req(T.TRANSACTION_END, "T", tx=tx)
        return "OK" if kind == "ok" else wire.parse_error(payload)

    def events(self) -> list[tuple[str, str]]:
        out = []
        for msg in self.conn.events:
            assert wire.HEADER.unpack_from(msg)[:3] == (T.WATCH_EVENT, 0, 0)
            path, token = wire.fields(msg[16:])
            out.append((path.decode(), token.decode()))
        self.conn.events.clear()
        return out


@pytest.fixture
def store() -> Store:
    s = Store(Quotas())
    s.introduce_domain(5)
    s.introduce_domain(6)
    return s


@pytest.fixture
def dom0(store: Store) -> Client:
    return Client(store, 0)


@pytest.fixture
def guest(store: Store, dom0: Client) -> Client:
    """Domain 5 with its home directory owned by itself (as a toolstack would set up)."""
    dom0.ok(T.MKDIR, "/local/domain/5")
    dom0.ok(T.SET_PERMS, "/local/domain/5", "n5")
    return Client(store, 5)


@pytest.fixture
def other(store: Store, dom0: Client) -> Client:
    dom0.ok(T.MKDIR, "/local/domain/6")
    dom0.ok(T.SET_PERMS, "/local/domain/6", "n6")
    return Client(store, 6)


def perms_of(client: Client, path: str) -> list[str]:
    return [p.decode() for p in wire.fields(client.ok(T.GET_PERMS, path))]


# -- basic operations ----------------------------------------------------------------
def test_write_creates_missing_parents_with_empty_values(dom0: Client) -> None:
    dom0.write("/a/b/c", b"v")
    assert dom0.read("/a/b/c") == b"v"
    assert dom0.read("/a/b") == b"" and dom0.read("/a") == b""


def test_write_value_may_hold_any_bytes(dom0: Client) -> None:
    value = bytes(range(256))
    dom0.write("/bin", value)
    assert dom0.read("/bin") == value


def test_read_of_missing_node_is_enoent(dom0: Client) -> None:
    assert dom0.err(T.READ, "/nope") == "ENOENT"


def test_rm_of_missing_node_with_existing_parent_is_ok(dom0: Client) -> None:
    dom0.write("/a")
    dom0.ok(T.RM, "/a/missing")
    assert dom0.err(T.RM, "/nothere/missing") == "ENOENT"


def test_rm_removes_subtree(dom0: Client, store: Store) -> None:
    dom0.write("/a/b/c")
    dom0.ok(T.RM, "/a")
    assert dom0.err(T.READ, "/a/b/c") == "ENOENT"
    assert store.check() == []


def test_mkdir_creates_parents_and_keeps_existing_values(dom0: Client) -> None:
    dom0.write("/a", b"keep")
    dom0.ok(T.MKDIR, "/a")
    dom0.ok(T.MKDIR, "/x/y")
    assert dom0.read("/a") == b"keep" and dom0.read("/x/y") == b""


def test_directory_lists_leaf_names(dom0: Client) -> None:
    for name in ("b", "c", "d"):
        dom0.write(f"/a/{name}/deep")
    assert wire.fields(dom0.ok(T.DIRECTORY, "/a")) == [b"b", b"c", b"d"]
    assert dom0.ok(T.DIRECTORY, "/a/b/deep") == b""


def test_oversized_directory_is_e2big_and_directory_part_chunks_it(dom0: Client) -> None:
    names = [f"child-with-a-long-name-{i:04d}" for i in range(300)]
    for name in names:
        dom0.write(f"/big/{name}")
    assert dom0.err(T.DIRECTORY, "/big") == "E2BIG"
    got: list[bytes] = []
    offset = 0
    gens = set()
    while True:
        reply = dom0.ok(T.DIRECTORY_PART, "/big", str(offset))
        gen, _, rest = reply.partition(b"\0")
        gens.add(gen)
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += wire.fields(rest[:-1])
            break
        chunk = wire.fields(rest)
        got += chunk
        offset += sum(len(c) + 1 for c in chunk)
    assert [g.decode() for g in got] == names
    assert len(gens) == 1


def test_directory_part_offset_past_end_is_generation_and_empty(dom0: Client) -> None:
    dom0.write("/a/b")
    reply = dom0.ok(T.DIRECTORY_PART, "/a", "100")
    assert reply.endswith(b"\0\0") and reply[:-2].isdigit()


def test_directory_part_generation_changes_with_the_list(dom0: Client) -> None:
    dom0.write("/a/b")
    gen1 = dom0.ok(T.DIRECTORY_PART, "/a", "0").split(b"\0")[0]
    dom0.write("/a/c")
    gen2 = dom0.ok(T.DIRECTORY_PART, "/a", "0").split(b"\0")[0]
    assert gen1 != gen2


def test_relative_paths_resolve_under_domain_home(guest: Client, dom0: Client) -> None:
    guest.write("data/x", b"1")
    assert dom0.read("/local/domain/5/data/x") == b"1"
    assert guest.read("data/x") == b"1"


def test_invalid_paths_are_einval(dom0: Client) -> None:
    for bad in ("/a//b", "/a/", "", "/a b", "@foo", "/a@b"):
        assert dom0.err(T.READ, bad) == "EINVAL", bad
    assert dom0.err(T.WRITE, raw=b"/no-terminator") == "EINVAL"


def test_unsupported_and_removed_types_are_enosys(dom0: Client) -> None:
    for type_ in (T.RESTRICT, 99, T.INVALID, T.GET_FEATURE, T.SET_QUOTA, T.WATCH_EVENT, T.ERROR):
        assert dom0.err(type_, "x") == "ENOSYS"


def test_get_domain_path(guest: Client) -> None:
    assert guest.ok(T.GET_DOMAIN_PATH, "7") == b"/local/domain/7\0"
    assert guest.err(T.GET_DOMAIN_PATH, "x7") == "EINVAL"


# -- watches -------------------------------------------------------------------------
def test_watch_fires_once_on_register(dom0: Client) -> None:
    dom0.ok(T.WATCH, "/w", "tok")
    assert dom0.events() == [("/w", "tok")]


def test_duplicate_watch_is_eexist(dom0: Client) -> None:
    dom0.ok(T.WATCH, "/w", "tok")
    assert dom0.err(T.WATCH, "/w", "tok") == "EEXIST"
    dom0.ok(T.WATCH, "/w", "tok2")


def test_watch_matches_path_and_descendants(dom0: Client) -> None:
    dom0.ok(T.WATCH, "/w", "t")
    dom0.events()
    dom0.write("/w/a/b", b"1")
    dom0.write("/other", b"1")
    assert dom0.events() == [("/w/a/b", "t")]


def test_one_change_sends_an_identical_event_once_per_connection(dom0: Client) -> None:
    # as C xenstored: watches on a node and its parent with one token give one event
    dom0.ok(T.WATCH, "/w", "t")
    dom0.ok(T.WATCH, "/w/a", "t")
    dom0.ok(T.WATCH, "/w/a", "u")
    dom0.events()
    dom0.write("/w/a", b"1")
    assert sorted(dom0.events()) == [("/w/a", "t"), ("/w/a", "u")]
    dom0.write("/w/b", b"1")
    assert dom0.events() == [("/w/b", "t")]


def test_one_changes_events_come_in_c_xenstored_order(dom0: Client) -> None:
    # a connection's watches in registration order; a removal reports children first
    # and only nodes that existed
    dom0.write("/o/a/b/c")
    dom0.write("/o/a/d")
    dom0.ok(T.WATCH, "/o/a", "late")
    dom0.ok(T.WATCH, "/o", "early")
    dom0.ok(T.WATCH, "/o/a/d", "d")
    dom0.ok(T.WATCH, "/o/a/b/c", "c")
    dom0.ok(T.WATCH, "/o/a/b/never", "n")
    dom0.events()
    dom0.write("/o/a", b"1")
    assert dom0.events() == [("/o/a", "late"), ("/o/a", "early")]
    dom0.ok(T.RM, "/o/a")
    assert dom0.events() == [("/o/a/b/c", "c"), ("/o/a/d", "d"), ("/o/a", "late"),
                             ("/o/a", "early")]


def test_relative_watch_reports_relative_event_paths(guest: Client) -> None:
    guest.ok(T.WATCH, "data", "t")
    assert guest.events() == [("data", "t")]
    guest.write("data/x", b"1")
    assert guest.events() == [("data/x", "t")]


def test_watch_depth_limits_matches(dom0: Client) -> None:
    dom0.ok(T.WATCH, "/w", "t", "1")
    dom0.events()
    dom0.write("/w/a", b"1")
    dom0.write("/w/a/b", b"1")
    assert dom0.events() == [("/w/a", "t")]


def test_removal_of_ancestor_reports_the_watched_path(dom0: Client) -> None:
    dom0.write("/a/b/c")
    dom0.ok(T.WATCH, "/a/b/c", "t")
    dom0.events()
    dom0.ok(T.RM, "/a")
    assert dom0.events() == [("/a/b/c", "t")]


def test_unwatch_stops_events(dom0: Client, store: Store) -> None:
    dom0.ok(T.WATCH, "/w", "t")
    dom0.ok(T.UNWATCH, "/w", "t")
    dom0.events()
    dom0.write("/w")
    assert dom0.events() == []
    assert dom0.err(T.UNWATCH, "/w", "t") == "ENOENT"
    assert store.watch_count(0) == 0


def test_watch_events_only_for_readable_nodes(dom0: Client, guest: Client) -> None:
    guest.ok(T.WATCH, "/", "root")
    guest.events()
    dom0.write("/secret/deeper", b"x")  # parent /secret unreadable too
    assert guest.events() == []
    dom0.write("/public", b"x")
    dom0.ok(T.SET_PERMS, "/public", "n0", "r5")
    assert ("/public", "root") in guest.events()


def test_oversized_watch_event_is_dropped(dom0: Client, store: Store) -> None:
    token = "t" * 3900
    dom0.ok(T.WATCH, "/w", token)
    dom0.events()
    dom0.write("/w/" + "x" * 300)
    assert dom0.events() == []
    assert store.dropped_events == 1


def test_reset_watches_drops_watches_and_transactions(guest: Client, store: Store) -> None:
    guest.ok(T.WATCH, "data", "t")
    tx = guest.start()
    guest.ok(T.RESET_WATCHES, "", tx=tx)
    assert store.watch_count(5) == 0 and store.transaction_count(5) == 0
    assert guest.err(T.READ, "data", tx=tx) == "ENOENT"


def test_special_watches_go_to_privileged_or_granted_domains(
    store: Store, dom0: Client, guest: Client
) -> None:
    dom0.ok(T.WATCH, "@introduceDomain", "i")
    dom0.ok(T.WATCH, "@releaseDomain", "r")
    guest.ok(T.WATCH, "@releaseDomain", "r")
    assert dom0.events() == [("@introduceDomain", "i"), ("@releaseDomain", "r")]
    assert guest.events() == []  # not even the registration event
    store.introduce_domain(9)
    store.release_domain(9)
    assert dom0.events() == [("@introduceDomain", "i"), ("@releaseDomain", "r")]
    assert guest.events() == []
    dom0.ok(T.SET_PERMS, "@releaseDomain", "n0", "r5")
    assert perms_of(dom0, "@releaseDomain") == ["n0", "r5"]
    store.introduce_domain(9)
    store.release_domain(9)
    assert guest.events() == [("@releaseDomain", "r")]


# -- transactions ----------------------------------------------------------------------
def test_transaction_changes_are_private_until_commit(dom0: Client) -> None:
    dom0.ok(T.WATCH, "/t", "w")
    dom0.events()
    tx = dom0.start()
    dom0.write("/t/a", b"1", tx=tx)
    assert dom0.read("/t/a", tx=tx) == b"1"
    assert dom0.err(T.READ, "/t/a") == "ENOENT"
    assert dom0.events() == []
    assert dom0.commit(tx) == "OK"
    assert dom0.read("/t/a") == b"1"
    assert dom0.events() == [("/t/a", "w")]


def test_transaction_abort_discards(dom0: Client) -> None:
    tx = dom0.start()
    dom0.write("/a", b"1", tx=tx)
    dom0.ok(T.TRANSACTION_END, "F", tx=tx)
    assert dom0.err(T.READ, "/a") == "ENOENT"


def test_transaction_conflict_on_read_node_is_eagain(dom0: Client) -> None:
    dom0.write("/a", b"a")
    tx = dom0.start()
    assert dom0.read("/a", tx=tx) == b"a"
    dom0.write("/a", b"b")
    assert dom0.read("/a", tx=tx) == b"a"  # the transaction keeps what it read
    dom0.write("/a", b"c", tx=tx)
    assert dom0.commit(tx) == "EAGAIN"
    assert dom0.read("/a") == b"b"


def test_transaction_write_conflicts_with_a_concurrent_write(dom0: Client) -> None:
    dom0.write("/a", b"a")
    tx = dom0.start()
    dom0.write("/a", b"tx", tx=tx)  # the write looks at /a first (its permissions)
    dom0.write("/a", b"outside")
    assert dom0.commit(tx) == "EAGAIN"
    assert dom0.read("/a") == b"outside"


def test_transaction_unrelated_concurrent_writes_never_eagain(dom0: Client, guest: Client) -> None:
    dom0.write("/a/x", b"1")
    tx = dom0.start()
    dom0.read("/a/x", tx=tx)
    dom0.write("/a/y", b"2", tx=tx)
    guest.write("data/z", b"3")  # elsewhere in the tree
    assert dom0.commit(tx) == "OK"


def test_transaction_conflict_when_read_node_is_deleted(dom0: Client) -> None:
    dom0.write("/a", b"1")
    tx = dom0.start()
    dom0.read("/a", tx=tx)
    dom0.ok(T.RM, "/a")
    assert dom0.commit(tx) == "EAGAIN"


def test_transaction_conflict_when_absent_node_appears(dom0: Client) -> None:
    dom0.write("/a")
    tx = dom0.start()
    assert dom0.err(T.READ, "/a/b", tx=tx) == "ENOENT"
    dom0.write("/a/b", b"new")
    dom0.write("/a/c", b"1", tx=tx)
    assert dom0.commit(tx) == "EAGAIN"


def test_at_most_ten_transactions_per_domain(guest: Client, store: Store) -> None:
    for _ in range(10):
        guest.start()
    assert guest.err(T.TRANSACTION_START, "") == "ENOSPC"
    assert store.transaction_count(5) == 10


def test_transaction_start_inside_transaction_is_an_error(dom0: Client) -> None:
    tx = dom0.start()
    assert dom0.err(T.TRANSACTION_START, "", tx=tx) == "EBUSY"
    assert dom0.err(T.TRANSACTION_START, "", tx=tx + 100) == "ENOENT"


def test_unknown_transaction_id_is_enoent(dom0: Client) -> None:
    assert dom0.err(T.READ, "/", tx=42) == "ENOENT"
    assert dom0.err(T.TRANSACTION_END, "T", tx=42) == "ENOENT"
    tx = dom0.start()
    assert dom0.err(T.TRANSACTION_END, "X", tx=tx) == "EINVAL"


def test_transaction_node_limit_poisons_the_transaction(guest: Client, store: Store) -> None:
    store.quotas.transaction_nodes = 20
    tx = guest.start()
    results = [guest.req(T.READ, f"data/n{i}", tx=tx)[0] for i in range(30)]
    assert "error" in results
    assert guest.commit(tx) == "ENOSPC"


def test_commit_is_atomic_including_node_quota(guest: Client, store: Store) -> None:
    guest.write("in")
    guest.write("out")
    store.quotas.nodes = 12
    tx = guest.start()
    for i in range(5):
        guest.write(f"in/{i}", tx=tx)  # 5 nodes in the transaction
    for i in range(5):
        guest.write(f"out/{i}")  # meanwhile 5 more outside: 3 + 5 + 5 > 12
    before = store.node_count(5)
    assert guest.commit(tx) == "ENOSPC"
    assert store.node_count(5) == before
    assert guest.err(T.READ, "in/0") == "ENOENT"
    assert store.check() == []


def test_create_and_delete_in_transaction_keeps_accounting_exact(
    guest: Client, store: Store
) -> None:
    before = store.node_count(5)
    tx = guest.start()
    guest.write("tmp/a/b", tx=tx)
    guest.ok(T.RM, "tmp", tx=tx)
    assert guest.commit(tx) == "OK"
    assert store.node_count(5) == before
    assert store.check() == []


def test_always_eagain_knob(dom0: Client, store: Store) -> None:
    store.always_eagain = True
    tx = dom0.start()
    assert dom0.commit(tx) == "EAGAIN"
    store.always_eagain = False
    assert dom0.commit(dom0.start()) == "OK"


# -- permissions -------------------------------------------------------------------------
def test_owner_has_full_access_and_first_letter_is_the_default(
    dom0: Client, guest: Client, other: Client
) -> None:
    dom0.write("/shared", b"v")
    dom0.ok(T.SET_PERMS, "/shared", "r0", "b6")
    assert guest.read("/shared") == b"v"  # default r
    assert guest.write_err("/shared", b"x") == "EACCES"
    other.write("/shared", b"y")  # explicit b6
    assert dom0.read("/shared") == b"y"


def test_new_nodes_inherit_parent_perms_and_unprivileged_creator_owns(
    dom0: Client, guest: Client
) -> None:
    dom0.ok(T.SET_PERMS, "/local/domain/5", "n5", "r0", "r6")
    guest.write("a/b")
    assert perms_of(dom0, "/local/domain/5/a/b") == ["n5", "r0", "r6"]
    dom0.write("/local/domain/5/c")
    assert perms_of(dom0, "/local/domain/5/c") == ["n5", "r0", "r6"]


def test_guest_creates_under_dir_it_may_write_and_owns_what_it_creates(
    dom0: Client, guest: Client
) -> None:
    dom0.write("/pub")
    dom0.ok(T.SET_PERMS, "/pub", "b0")
    guest.write("/pub/mine", b"1")
    assert perms_of(dom0, "/pub/mine") == ["b5"]


def test_only_owner_sets_perms_and_only_dom0_changes_owner(
    dom0: Client, guest: Client, other: Client
) -> None:
    guest.write("x")
    assert other.err(T.SET_PERMS, "/local/domain/5/x", "n6") == "EACCES"
    assert guest.err(T.SET_PERMS, "x", "n6") == "EACCES"
    guest.ok(T.SET_PERMS, "x", "n5", "r6")
    dom0.ok(T.SET_PERMS, "/local/domain/5/x", "n6")
    assert perms_of(dom0, "/local/domain/5/x") == ["n6"]


def test_guest_cannot_delete_and_recreate_read_only_child(dom0: Client, guest: Client) -> None:
    dom0.write("/local/domain/5/device/ro", b"backend-owned")
    dom0.ok(T.SET_PERMS, "/local/domain/5/device/ro", "n0", "r5")
    assert guest.err(T.RM, "device/ro") == "EACCES"
    assert guest.write_err("device/ro", b"x") == "EACCES"
    assert dom0.read("/local/domain/5/device/ro") == b"backend-owned"


def test_root_gets_no_special_case(guest: Client) -> None:
    assert guest.err(T.RM, "/") == "EACCES"
    assert guest.err(T.SET_PERMS, "/", "b5") == "EACCES"
    assert guest.write_err("/newtop") == "EACCES"


def test_missing_node_under_unreadable_parent_is_eacces(dom0: Client, guest: Client) -> None:
    dom0.write("/secret")
    assert guest.err(T.READ, "/secret/missing") == "EACCES"
    assert guest.err(T.READ, "/local/domain/5/missing") == "ENOENT"


def test_malformed_perms_are_einval(dom0: Client) -> None:
    dom0.write("/a")
    for bad in (["x5"], ["r"], ["r70000"], ["r-1"], []):
        assert dom0.err(T.SET_PERMS, "/a", *bad) == "EINVAL", bad


def test_set_target_gives_target_rights(store: Store, dom0: Client, guest: Client) -> None:
    stub = Client(store, 7)
    store.introduce_domain(7)
    guest.write("dm", b"1")
    assert stub.err(T.READ, "/local/domain/5/dm") == "EACCES"
    dom0.ok(T.SET_TARGET, "7", "5")
    assert stub.read("/local/domain/5/dm") == b"1"
    stub.write("/local/domain/5/dm", b"2")
    assert guest.err(T.SET_TARGET, "7", "5") == "EACCES"


# -- domains ------------------------------------------------------------------------------
def test_privileged_operations_are_refused_to_guests(guest: Client) -> None:
    assert guest.err(T.INTRODUCE, "9", "1", "2") == "EACCES"
    assert guest.err(T.RELEASE, "6") == "EACCES"
    assert guest.err(T.IS_DOMAIN_INTRODUCED, "5") == "EACCES"
    assert guest.err(T.RESUME, "5") == "EACCES"
    assert guest.err(T.CONTROL, "help") == "EACCES"


def test_introduce_release_and_is_domain_introduced(dom0: Client, store: Store) -> None:
    dom0.ok(T.WATCH, "@introduceDomain", "i")
    dom0.events()
    assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "9") == b"F\0"
    dom0.ok(T.INTRODUCE, "9", "1234", "3")
    assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "9") == b"T\0"
    assert dom0.events() == [("@introduceDomain", "i")]
    dom0.ok(T.RESUME, "9")
    dom0.ok(T.RELEASE, "9")
    assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "9") == b"F\0"
    assert dom0.err(T.RELEASE, "9") == "ENOENT"
    assert dom0.err(T.RESUME, "9") == "ENOENT"
    assert store.released == [9]


def test_release_removes_owned_nodes_with_subtrees(
    dom0: Client, guest: Client, store: Store
) -> None:
    dom0.write("/pub")
    dom0.ok(T.SET_PERMS, "/pub", "b0")
    guest.write("/pub/mine/deep", b"1")
    dom0.write("/pub/mine/dom0-child", b"1")
    store.release_domain(5)
    assert dom0.err(T.READ, "/pub/mine") == "ENOENT"
    assert dom0.err(T.READ, "/local/domain/5") == "ENOENT"
    assert store.node_count(5) == 0
    assert guest.conn.closed
    assert store.check() == []


def test_domid_reuse_starts_fresh(dom0: Client, guest: Client, store: Store) -> None:
    dom0.write("/backend/x", b"secret")
    dom0.ok(T.SET_PERMS, "/backend/x", "n0", "r5")
    assert guest.read("/backend/x") == b"secret"
    store.release_domain(5)
    store.introduce_domain(5)
    reborn = Client(store, 5)
    assert reborn.err(T.READ, "/backend/x") == "EACCES"
    dom0.write("/backend/x/child")  # inherits the list: the stale entry is not revived
    assert reborn.err(T.READ, "/backend/x/child") == "EACCES"
    assert store.node_count(5) == 0


# -- quotas ----------------------------------------------------------------------------------
def test_node_quota(guest: Client, store: Store) -> None:
    store.quotas.nodes = 50
    n = store.node_count(5)
    for i in range(50 - n):
        guest.write(f"n{i}")
    assert guest.write_err("one-more") == "ENOSPC"
    assert store.node_count(5) == 50


def test_value_size_quota(guest: Client, dom0: Client) -> None:
    guest.write("ok", b"x" * 2048)
    assert guest.write_err("big", b"x" * 2049) == "E2BIG"
    dom0.write("/big", b"x" * 3000)


def test_watch_quota(guest: Client) -> None:
    for i in range(128):
        guest.ok(T.WATCH, f"w{i}", "t")
    assert guest.err(T.WATCH, "w-extra", "t") == "ENOSPC"


def test_set_perms_owner_must_be_a_live_domain_when_the_store_can_ask(
    dom0: Client, store: Store
) -> None:
    dom0.write("/p")
    dom0.ok(T.SET_PERMS, "/p", "n9")  # no hypervisor to ask: any domid
    store.domain_exists = {0, 5}.__contains__
    assert dom0.err(T.SET_PERMS, "/p", "n9") == "ENOENT"
    assert dom0.err(T.SET_PERMS, "/missing", "n9") == "ENOENT"  # before the node lookup
    dom0.ok(T.SET_PERMS, "/p", "n5", "r9")  # other entries may name any domid
    assert perms_of(dom0, "/p") == ["n5", "r9"]


def test_set_perms_of_a_missing_node_is_eacces_unless_its_parent_is_writable(
    dom0: Client, guest: Client
) -> None:
    # as C xenstored, which looks SET_PERMS's node up for writing
    dom0.write("/ro")
    dom0.ok(T.SET_PERMS, "/ro", "n0", "r5")  # readable, not writable, by domain 5
    assert guest.err(T.SET_PERMS, "/ro/missing", "n5") == "EACCES"
    assert guest.err(T.GET_PERMS, "/ro/missing") == "ENOENT"
    assert guest.err(T.RM, "/ro/missing/below") == "EACCES"
    guest.write("mine")
    assert guest.err(T.SET_PERMS, "mine/missing", "n5") == "ENOENT"


def test_permission_entry_quota(guest: Client, dom0: Client) -> None:
    guest.write("p")
    guest.ok(T.SET_PERMS, "p", "n5", "r1", "r2", "r3", "r4")
    assert guest.err(T.SET_PERMS, "p", "n5", "r1", "r2", "r3", "r4", "r6") == "ENOSPC"
    dom0.ok(T.SET_PERMS, "/local/domain/5/p", "n5", "r1", "r2", "r3", "r4", "r6")


def test_path_length_limits(guest: Client, dom0: Client) -> None:
    assert guest.write_err("a" * 2049) == "EINVAL"
    assert guest.write_err("/" + "a" * 3072) == "EINVAL"
    guest.write("a" * 2000)
    # as C xenstored 4.17: dom0 too, counted after /local/domain/<domid>/
    assert dom0.write_err("/" + "b" * 2500) == "EINVAL"
    assert dom0.write_err("/" + "b" * 2048) == "EINVAL"
    dom0.write("/" + "b" * 2047)
    dom0.write("/local/domain/7/" + "c" * 2048)
    assert dom0.write_err("/local/domain/7/" + "c" * 2049) == "EINVAL"
    assert dom0.write_err("/local/domain/x/" + "c" * 2040) == "EINVAL"  # no domid: counted whole


def test_control_commands(dom0: Client, store: Store) -> None:
    assert b"print" in dom0.ok(T.CONTROL, "help")
    dom0.ok(T.CONTROL, "print", "hello")
    assert store.log[-1] == "hello"
    assert dom0.ok(T.CONTROL, "check") == b"OK\0"
    assert b"nodes: 1000" in dom0.ok(T.CONTROL, "quota")
    assert dom0.ok(T.CONTROL, "quota", "set", "nodes", "5") == b"OK\0"
    assert store.quotas.nodes == 5
    assert dom0.err(T.CONTROL, "frobnicate") == "EINVAL"
    # the arguments: NUL-separated, the last NUL optional, non-ASCII bytes replaced
    dom0.ok(T.CONTROL, raw=b"print\0no trailing nul")
    assert store.log[-1] == "no trailing nul"
    dom0.ok(T.CONTROL, raw=b"print\0a\xffb\0c\0")
    assert store.log[-1] == "a\ufffdb c"
    assert dom0.err(T.CONTROL, raw=b"") == "EINVAL" and dom0.err(T.CONTROL, raw=b"\0") == "EINVAL"



def test_control_quota_lists_sets_refuses_and_reports_a_domain(
    dom0: Client, guest: Client, store: Store
) -> None:
    """``quota``: every limit in declaration order with dashed names; ``set`` by dashed or
    underscored name (integers and rates, 0 allowed: it disables a limit); an unknown
    name, a negative or malformed value, or a ``set`` without its two arguments is
    EINVAL with nothing changed; ``quota <domid>`` gives that domain's counts, an unknown
    domain ENOENT."""
    names = Quotas.names()
    assert names[:3] == ["nodes", "node-size", "watches"] and names[-1] == "connections"
    assert "watch-event-timeout" in names and all("_" not in n for n in names)
    listing = "".join(f"{n}: {getattr(store.quotas, n.replace('-', '_'))}\n" for n in names)
    assert dom0.ok(T.CONTROL, "quota") == listing.encode() + b"\0"
    assert dom0.ok(T.CONTROL, "quota", "set", "node-size", "100") == b"OK\0"
    assert dom0.ok(T.CONTROL, "quota", "set", "write_rate", "2.5") == b"OK\0"
    assert dom0.ok(T.CONTROL, "quota", "set", "nodes", "0") == b"OK\0"
    assert (store.quotas.node_size, store.quotas.write_rate, store.quotas.nodes) == (100, 2.5, 0)
    assert isinstance(store.quotas.write_rate, float) and isinstance(store.quotas.nodes, int)
    for bad in (("no-such", "1"), ("nodes", "-1"), ("nodes", "x"), ("nodes", "1.5"), ("nodes",)):
        # the raw reply: Client.err reads any unknown errno name as EINVAL
        assert dom0.req(T.CONTROL, "quota", "set", *bad) == ("error", b"EINVAL\0"), bad
    assert (store.quotas.node_size, store.quotas.nodes) == (100, 0)
    with pytest.raises(KeyError) as unknown:
        store.quotas.set("no-such", "1")
    assert unknown.value.args == ("no-such",)
    with pytest.raises(ValueError, match=r"^quota node-size must not be negative$"):
        store.quotas.set("node-size", "-1")
    # a domain's counts
    guest.write("data", b"x")
    guest.ok(T.WATCH, "data", "tok")
    guest.start()
    assert (store.watch_count(5), store.transaction_count(5)) == (1, 1)
    assert (store.watch_count(7), store.transaction_count(7)) == (0, 0)
    report = f"nodes: {store.node_count(5)}\nwatches: 1\ntransactions: 1\n\0".encode()
    assert store.node_count(5) == 2 and dom0.ok(T.CONTROL, "quota", "5") == report
    assert dom0.ok(T.CONTROL, "quota", "5", "a", "b") == report  # three args, not a set
    assert dom0.err(T.CONTROL, "quota", "7") == "ENOENT"


def test_disconnect_and_release_forget_the_connection(
    dom0: Client, guest: Client, store: Store
) -> None:
    """A disconnected connection leaves ``connections`` and the set of connections with
    pending events; dom0 and unknown domains are never released; a known one is, once."""
    guest.ok(T.WATCH, "data", "tok")
    dom0.write("/local/domain/5/data", b"1")
    assert guest.conn in store.dirty and guest.conn in store.connections
    store.disconnect(guest.conn)
    assert guest.conn not in store.dirty and guest.conn not in store.connections
    assert store.watch_count(5) == 0
    dom0.write("/tool/kept", b"k")
    assert store.release_domain(0) is False and store.release_domain(9) is False
    assert dom0.ok(T.READ, "/tool/kept") == b"k"
    assert store.release_domain(5) is True and store.release_domain(5) is False
    store.introduce_domain(1)
    assert store.release_domain(1) is True


def test_release_forgets_the_domains_accounting_and_targets_but_never_the_root(
    store: Store, dom0: Client, guest: Client
) -> None:
    """Releasing a domain removes what it owns (but never ``/``, even when dom0 gave it
    the root: the root goes back to dom0, so the accounting stays exact and a later domain
    reusing the id does not own it), drops its node and memory accounting, and clears the
    target of exactly the domains that targeted it."""
    guest.write("data", b"x")
    dom0.write("/tool/kept", b"k")
    dom0.ok(T.SET_PERMS, "/", "n5")
    for domid in (7, 8):
        store.introduce_domain(domid)
    dom0.ok(T.SET_TARGET, "7", "5")
    dom0.ok(T.SET_TARGET, "6", "8")
    assert store.node_count(5) == 3 and store.mem(5) > 0
    assert store.release_domain(5) is True
    assert dom0.ok(T.READ, "/tool/kept") == b"k" and dom0.err(T.READ, "/local/domain/5") == "ENOENT"
    assert 5 not in store.owned and 5 not in store.memory and 5 not in store.domains
    assert store.domains[7].target is None and store.domains[6].target == 8
    assert perms_of(dom0, "/") == ["n0"]
    assert store.check() == []

# -- persistence ------------------------------------------------------------------------------
def test_state_round_trip_keeps_everything(dom0: Client, guest: Client, store: Store) -> None:
    dom0.write("/odd", bytes(range(256)) + b"\0\0")
    dom0.ok(T.SET_PERMS, "/odd", "r0", "b5", "w6")
    guest.write("mine/x", b"\xff")
    dom0.ok(T.SET_PERMS, "@releaseDomain", "n0", "r5")
    state = json.loads(json.dumps(store.to_state()))
    copy = Store.from_state(state)
    assert copy.to_state() == store.to_state()
    assert copy.check() == []
    assert {p: (n.value, n.perms) for p, n in copy.nodes.items()} == {
        p: (n.value, n.perms) for p, n in store.nodes.items()
    }
    c = Client(copy, 5)
    assert c.read("mine/x") == b"\xff"
    assert c.read("/odd")[:3] == b"\0\1\2"


# -- robustness ---------------------------------------------------------------------------------
_FIELD = st.one_of(
    st.sampled_from(
        [b"/", b"/a", b"/a/b", b"data", b"@releaseDomain", b"T", b"F", b"5", b"0", b"b5", b"n0"]
    ),
    st.binary(max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([0, 5]),
            st.integers(min_value=0, max_value=30) | st.just(0xFFFF),
            st.sampled_from([0, 0, 1, 2, 0xFFFFFFFF]),
            st.lists(_FIELD, max_size=4).map(lambda fs: b"\0".join(fs) + b"\0"),
        ),
        max_size=25,
    )
)
def test_any_request_gets_one_bounded_reply_and_keeps_the_store_consistent(
    steps: list[tuple[int, int, int, bytes]],
) -> None:
    store = Store(Quotas())
    store.introduce_domain(5)
    conns = {0: store.connect(0), 5: store.connect(5)}
    for domid, type_, tx_id, payload in steps:
        reply = store.handle(conns[domid], type_, 9, tx_id, payload)
        rtype, rid, rtx, length = wire.HEADER.unpack_from(reply)
        assert (rid, rtx, length) == (9, tx_id, len(reply) - 16) and length <= wire.PAYLOAD_MAX
        assert rtype in (type_, T.ERROR)
    assert store.check() == []


def test_requests_on_a_released_domains_connection_change_nothing(
    store: Store, guest: Client
) -> None:
    store.release_domain(5)
    assert guest.err(T.WATCH, "/", "t") == "EINVAL"
    assert guest.write_err("/local/domain/5/x") == "EINVAL"
    assert store.check() == [] and store.watch_count(5) == 0


def test_too_big_directory_reply_does_not_poison_the_transaction(dom0: Client) -> None:
    for i in range(300):
        dom0.write(f"/big/child-with-a-long-name-{i:04d}")
    tx = dom0.start()
    assert dom0.err(T.DIRECTORY, "/big", tx=tx) == "E2BIG"
    dom0.ok(T.DIRECTORY_PART, "/big", "0", tx=tx)
    assert dom0.commit(tx) == "OK"


def test_refused_oversized_write_poisons_the_transaction(guest: Client) -> None:
    tx = guest.start()
    assert guest.write_err("big", b"x" * 3000, tx=tx) == "E2BIG"
    assert guest.commit(tx) == "E2BIG"


def test_memory_quota_counts_node_bytes(guest: Client, store: Store, dom0: Client) -> None:
    store.quotas.memory = store.mem(5) + 2000
    guest.write("a", b"x" * 1500)
    assert guest.write_err("b", b"x" * 1000) == "ENOMEM"
    assert guest.write_err("a", b"x" * 2048) == "ENOMEM"
    guest.write("a", b"small")  # shrinking is always allowed
    guest.write("b", b"x" * 1000)
    dom0.write("/local/domain/5/b", b"x" * 4000)  # dom0 is exempt
    assert store.mem(5) == sum(
        len(p) + len(n.value) + 8 * len(n.perms) for p, n in store.nodes.items() if n.owner == 5
    )
    assert store.check() == []


def test_commit_breaking_the_memory_quota_is_undone(guest: Client, store: Store) -> None:
    guest.write("in")
    guest.write("out")
    store.quotas.memory = store.mem(5) + 3000
    tx = guest.start()
    guest.write("in/a", b"x" * 1500, tx=tx)
    guest.write("out/b", b"x" * 1600)
    before = dict(store.memory)
    assert guest.commit(tx) == "ENOMEM"
    assert store.memory == before and store.check() == []


def test_scenario_21_dom0_usage_never_counts_against_a_guest_write(
    guest: Client, store: Store, dom0: Client
) -> None:
    """hostile-inputs.md quota section and scenario 21: quotas never apply to dom0, so a
    guest's permitted write to a dom0-owned node succeeds however much dom0 owns, in and
    outside a transaction (issue 14 item 8; failed with ENOMEM before)."""
    store.quotas.memory = 3000
    dom0.write("/local/domain/0/bulk", b"x" * 4000)  # dom0 alone owns more than the quota
    assert store.mem(0) > store.quotas.memory
    dom0.write("/shared/slot", b"")
    dom0.ok(T.SET_PERMS, "/shared/slot", "n0", "b5")
    assert guest.write("/shared/slot", b"y" * 1000) == "OK"
    tx = guest.start()
    guest.write("/shared/slot", b"z" * 1500, tx=tx)
    assert guest.commit(tx) == "OK"
    assert dom0.read("/shared/slot") == b"z" * 1500
    assert store.check() == [] and store.remeasure() == {k: v for k, v in store.memory.items() if v}


def test_scenario_21_writing_another_guests_node_checks_that_guests_quota(
    guest: Client, other: Client, store: Store, dom0: Client
) -> None:
    """The other way round: growth of a node owned by another unprivileged domain is still
    checked against the owner's memory quota, in and outside a transaction."""
    other.write("shared", b"")
    other.ok(T.SET_PERMS, "shared", "n6", "b5")
    store.quotas.memory = store.mem(6) + 500
    assert guest.write_err("/local/domain/6/shared", b"x" * 600) == "ENOMEM"
    tx = guest.start()
    assert guest.write_err("/local/domain/6/shared", b"x" * 600, tx=tx) == "ENOMEM"
    assert guest.commit(tx) == "ENOMEM"
    assert guest.write("/local/domain/6/shared", b"x" * 400) == "OK"
    assert store.check() == []


def _path_cache_size(conn: object) -> tuple[int, int]:
    cache = conn.path_cache  # type: ignore[attr-defined]
    return len(cache), sum(len(k) + len(v) for k, v in cache.items())


def test_scenario_23_reads_with_varying_trailing_bytes_keep_the_path_cache_bounded(
    store: Store, dom0: Client, guest: Client
) -> None:
    """hostile-inputs.md scenario 23 (server memory stays bounded): READs of one path with
    different bytes after the NUL used to add a cache entry each (issue 14 item 2)."""
    dom0.write("/local/domain/5/v", b"value")
    for client in (dom0, guest):
        for i in range(5000):
            raw = b"/local/domain/5/v\0" + i.to_bytes(4, "little") + b"#" * 900
            assert client.ok(T.READ, raw=raw) == b"value"
        entries, nbytes = _path_cache_size(client.conn)
        assert entries <= 4 and nbytes <= 200


def test_scenario_23_many_long_distinct_paths_keep_the_path_cache_bounded(
    store: Store, guest: Client
) -> None:
    """Distinct valid paths (each read once, each near the length limit) are bounded by
    bytes as well as by entries."""
    for i in range(1500):
        path = f"{i:05d}/" + "p" * 2000
        assert guest.err(T.READ, path) == "ENOENT"
        assert guest.err(T.READ, raw=path.encode() + b"\0") == "ENOENT"
    entries, nbytes = _path_cache_size(guest.conn)
    assert entries <= 1024 and nbytes <= 65536
    guest.write("still-served", b"1")
    assert guest.read("still-served") == b"1"


def test_pending_events_of_a_domain_are_bounded(guest: Client, dom0: Client, store: Store) -> None:
    store.quotas.watch_events = 10
    dom0.ok(T.SET_PERMS, "/local/domain/5", "n5", "r0")
    for i in range(5):
        guest.ok(T.WATCH, "/local/domain/5", f"tok{i}")
    for i in range(10):
        dom0.write(f"/local/domain/5/k{i}")
    assert len(guest.conn.events) == 10
    assert store.dropped_events == 5 + 50 - 10


def test_commit_that_creates_and_grants_read_notifies_the_grantee(
    dom0: Client, guest: Client
) -> None:
    """Visibility of a committed event follows the node's permissions after the commit."""
    dom0.write("/local/domain/0/data/vchan/5/p")
    dom0.ok(T.SET_PERMS, "/local/domain/0/data/vchan/5", "n0", "r5")
    guest.ok(T.WATCH, "/local/domain/0/data/vchan/5/p/ring-ref", "tok")
    assert guest.events() == [("/local/domain/0/data/vchan/5/p/ring-ref", "tok")]
    tx = dom0.start()
    dom0.write("/local/domain/0/data/vchan/5/p/ring-ref", b"8", tx=tx)
    dom0.ok(T.SET_PERMS, "/local/domain/0/data/vchan/5/p/ring-ref", "n0", "r5", tx=tx)
    assert dom0.commit(tx) == "OK"
    assert guest.events() == [("/local/domain/0/data/vchan/5/p/ring-ref", "tok")]


def test_transaction_rm_of_node_whose_parent_it_saw_absent_ends_in_eagain(dom0: Client) -> None:
    """A node created outside after the transaction saw its parent absent: the removal
    inside changes nothing and answers EINVAL (as C xenstored), and the commit is an exact
    conflict (the parent's absence was read)."""
    tx = dom0.start()
    assert dom0.err(T.SET_PERMS, "/a", "n0", tx=tx) == "ENOENT"
    dom0.write("/a/b")
    assert dom0.err(T.RM, "/a/b", tx=tx) == "EINVAL"
    assert dom0.commit(tx) == "EAGAIN"
    assert dom0.ok(T.READ, "/a/b") == b""


def test_transaction_rm_of_node_created_after_its_parent_was_read_ends_in_eagain(
    dom0: Client,
) -> None:
    """The transaction read the parent's child list before the node existed."""
    dom0.write("/p/keep")
    tx = dom0.start()
    assert dom0.ok(T.DIRECTORY, "/p", tx=tx) == b"keep\0"
    dom0.write("/p/x")
    assert dom0.ok(T.RM, "/p/x", tx=tx) == b"OK\0"
    assert dom0.commit(tx) == "EAGAIN"
    assert dom0.ok(T.READ, "/p/x") == b""

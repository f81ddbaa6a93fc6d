"""Hostile-inputs scenarios 21-25 against the embedded xenstored, over real sockets.

Each attack is driven through the attacking domain's own (unprivileged) socket with raw
wire bytes; after (and where it matters, during) each attack another domain's
operations must keep succeeding.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_xenstore_support import (
    RawClient,
    ServerThread,
    assert_other_domain_served,
    running_server,
    setup_home,
)

from xenpv.xenstore import wire
from xenpv.xenstore.store import Quotas
from xenpv.xenstore.wire import XsType as T

pytestmark = pytest.mark.usefixtures("direct_path")


@contextmanager
def _serve(tmp_path: Path, quotas: Quotas) -> Iterator[tuple[ServerThread, RawClient, RawClient]]:
    with running_server(tmp_path, quotas) as st:
        dom0 = RawClient(st.path(0))
        setup_home(dom0, 5)
        setup_home(dom0, 6)
        guest = RawClient(st.path(5))
        try:
            yield st, dom0, guest
        finally:
            guest.close()
            dom0.close()


@pytest.fixture
def xs(tmp_path: Path) -> Iterator[tuple[ServerThread, RawClient, RawClient]]:
    """Server (write rate limit off, so bulk attacks run fast), dom0 and guest 5."""
    with _serve(tmp_path, Quotas(write_rate=0)) as parts:
        yield parts


@pytest.fixture
def xs_limited(tmp_path: Path) -> Iterator[tuple[ServerThread, RawClient, RawClient]]:
    """Server with C xenstored's default quotas, write rate limit included."""
    with _serve(tmp_path, Quotas()) as parts:
        yield parts


# -- scenario 21: quotas -------------------------------------------------------------------
def test_scenario_21_node_quota(xs: tuple[ServerThread, RawClient, RawClient]) -> None:
    st, _, guest = xs
    assert guest.write("n") == "OK"
    room = 1000 - st.call(lambda: st.srv.node_count(5))
    for i in range(room):
        guest.send(T.WRITE, f"n/{i}".encode() + b"\0v")  # pipelined
    replies = [guest.reply() for _ in range(room)]
    assert all(r.type == T.WRITE for r in replies)
    assert guest.write("n/one-more", b"v") == "ENOSPC"
    assert st.call(lambda: st.srv.node_count(5)) == 1000
    assert_other_domain_served(st)


def test_scenario_21_value_size(xs: tuple[ServerThread, RawClient, RawClient]) -> None:
    st, _, guest = xs
    assert guest.write("big", b"x" * 2049) == "E2BIG"
    assert guest.write("fits", b"x" * 2048) == "OK"
    assert_other_domain_served(st)


def test_scenario_21_watch_quota(xs: tuple[ServerThread, RawClient, RawClient]) -> None:
    st, _, guest = xs
    for i in range(128):
        guest.ok(T.WATCH, f"w{i}", "t")
    assert guest.err(T.WATCH, "w128", "t") == "ENOSPC"
    assert st.call(lambda: st.srv.watch_count(5)) == 128
    assert_other_domain_served(st)


def test_scenario_21_transaction_quota(xs: tuple[ServerThread, RawClient, RawClient]) -> None:
    st, _, guest = xs
    for _ in range(10):
        guest.ok(T.TRANSACTION_START, "")
    assert guest.err(T.TRANSACTION_START, "") == "ENOSPC"
    assert_other_domain_served(st)


def test_scenario_21_nodes_touched_in_one_transaction(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    tx = int(guest.ok(T.TRANSACTION_START, "")[:-1])
    for i in range(1025):
        guest.send(T.READ, f"t/{i}".encode() + b"\0", tx)
    errors = [
        wire.parse_error(r.payload)
        for r in (guest.reply() for _ in range(1025))
        if r.type == T.ERROR
    ]
    assert "ENOSPC" in errors
    assert guest.err(T.TRANSACTION_END, "T", tx=tx) == "ENOSPC"  # poisoned
    assert_other_domain_served(st)


def test_scenario_21_permission_entries(xs: tuple[ServerThread, RawClient, RawClient]) -> None:
    st, _, guest = xs
    guest.write("p")
    assert guest.err(T.SET_PERMS, "p", "n5", "r1", "r2", "r3", "r4", "r6") == "ENOSPC"
    assert_other_domain_served(st)


def test_scenario_21_path_length(xs: tuple[ServerThread, RawClient, RawClient]) -> None:
    st, _, guest = xs
    assert guest.write("a" * 2049) == "EINVAL"
    assert guest.write("/local/domain/5/" + "a" * 2049) == "EINVAL"
    assert guest.write("/" + "a" * 3072) == "EINVAL"
    assert_other_domain_served(st)


def test_scenario_21_payload_over_4096_kills_the_connection(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    guest.sock.sendall(wire.HEADER.pack(T.WRITE, 1, 0, 4097) + b"a\0" + b"x" * 4095)
    assert guest.closed_by_server()
    assert_other_domain_served(st)


# -- scenario 22: transactions ---------------------------------------------------------------
def test_scenario_22_create_delete_in_one_transaction_keeps_accounting_exact(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    before = st.call(lambda: st.srv.node_count(5))
    tx = int(guest.ok(T.TRANSACTION_START, "")[:-1])
    assert guest.write("tmp/a/b", b"1", tx=tx) == "OK"
    guest.ok(T.RM, "tmp", tx=tx)
    guest.ok(T.TRANSACTION_END, "T", tx=tx)
    assert st.call(lambda: st.srv.node_count(5)) == before
    store = st.srv.store
    assert st.call(lambda: store.recount().get(5, 0)) == before
    assert st.call(store.check) == []


def test_scenario_22_transactions_left_open_forever(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, dom0, guest = xs
    for _ in range(10):
        guest.ok(T.TRANSACTION_START, "")
    assert st.call(lambda: st.srv.transaction_count(5)) == 10
    tx = int(dom0.ok(T.TRANSACTION_START, "")[:-1])
    assert dom0.write("/x", b"1", tx=tx) == "OK"
    dom0.ok(T.TRANSACTION_END, "T", tx=tx)
    assert_other_domain_served(st)
    guest.close()
    deadline = time.monotonic() + 5
    while st.call(lambda: st.srv.transaction_count(5)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert st.call(lambda: st.srv.transaction_count(5)) == 0


def test_scenario_22_reset_watches_inside_a_transaction(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    guest.ok(T.WATCH, "data", "t")
    tx = int(guest.ok(T.TRANSACTION_START, "")[:-1])
    assert guest.write("data/x", b"1", tx=tx) == "OK"
    guest.ok(T.RESET_WATCHES, "", tx=tx)
    assert guest.err(T.TRANSACTION_END, "T", tx=tx) == "ENOENT"
    assert st.call(lambda: (st.srv.watch_count(5), st.srv.transaction_count(5))) == (0, 0)
    assert st.call(st.srv.store.check) == []
    assert guest.write("data/y", b"1") == "OK"
    assert_other_domain_served(st)


def test_scenario_22_guest_cannot_starve_dom0_commits(
    xs_limited: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, dom0, guest = xs_limited
    dom0.write("/local/domain/5/hot", b"0")
    dom0.ok(T.SET_PERMS, "/local/domain/5/hot", "n5")
    # The guest floods rewrites of a node dom0's transactions read, never waiting.
    guest.sock.setblocking(False)
    flood = b"".join(
        wire.HEADER.pack(T.WRITE, i + 1, 0, 10) + b"hot\0" + b"%06d" % i for i in range(3000)
    )
    sent = 0
    committed_after = None
    for attempt in range(200):
        try:
            sent += guest.sock.send(flood[sent : sent + 65536])
        except BlockingIOError:
            pass
        tx = int(dom0.ok(T.TRANSACTION_START, "")[:-1])
        dom0.read("/local/domain/5/hot", tx=tx)
        assert dom0.write("/dom0-result", b"%d" % attempt, tx=tx) == "OK"
        kind, payload = dom0.req(T.TRANSACTION_END, "T", tx=tx)
        if kind == "ok":
            committed_after = attempt
            break
        assert wire.parse_error(payload) == "EAGAIN"
    assert committed_after is not None
    deadline = time.monotonic() + 5
    while not st.call(lambda: st.srv.throttles.get(5, 0)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert st.call(lambda: st.srv.throttles.get(5, 0)) > 0  # the rate limit kicked in
    guest.sock.settimeout(5)


# -- scenario 23: a guest that never reads -------------------------------------------------------
def test_scenario_23_guest_not_reading_stays_bounded(tmp_path: Path) -> None:
    quotas = Quotas(write_rate=0, watch_events=64, watch_event_timeout=0.5)
    with _serve(tmp_path, quotas) as (st, dom0, guest):
        dom0.write("/local/domain/5/w", b"")
        dom0.ok(T.SET_PERMS, "/local/domain/5/w", "n0", "r5")
        dom0.write("/local/domain/5/big", b"x" * 4000)
        guest.ok(T.WATCH, "w", "tok")
        # Pipeline thousands of requests with big replies and never read them.
        guest.sock.setblocking(False)
        request = wire.HEADER.pack(T.READ, 7, 0, 4) + b"big\0"
        stream = request * 3000
        sent = 0
        for _ in range(200):
            try:
                sent += guest.sock.send(stream[sent:])
            except BlockingIOError:
                time.sleep(0.005)
            if sent == len(stream):
                break
        assert sent == len(stream)  # 60 KB fit in the socket buffers
        # Only once the server has answered enough to pause the guest do its watch events
        # wait in the bounded queue (on a loaded machine that takes a while).
        deadline = time.monotonic() + 10
        while not st.call(lambda: any(p.write_paused for p in st.srv._protocols.values()
                                      if p.domid == 5)):  # fmt: skip
            assert time.monotonic() < deadline, "the guest was never paused"
            time.sleep(0.01)
        # Dom0 churns 1000 nodes under the watched subtree.
        for i in range(1000):
            dom0.send(T.WRITE, f"/local/domain/5/w/n{i}".encode() + b"\0v")
        for _ in range(1000):
            dom0.reply()
        dom0.ok(T.RM, "/local/domain/5/w")
        # Unsent replies (high-water mark + one batch), queued events, unparsed input.
        bound = 2 * quotas.outstanding * 4112 + 64 * 4200 + (1 << 16) + (1 << 18)
        held = st.call(lambda: st.srv.buffered_bytes(5))
        assert held < bound
        assert st.call(lambda: st.srv.queued_events(5)) <= 64
        assert_other_domain_served(st)
        time.sleep(0.6)  # unread events older than the timeout expire
        dom0.write("/local/domain/5/w/late", b"v")
        assert st.call(lambda: st.srv.dropped_events(5)) > 0
        # Once the guest reads again, it is served as before.
        guest.sock.settimeout(10)
        replies = 0
        while replies < 3000:
            msg = guest.recv_message()
            assert msg is not None
            if msg.type == T.READ:
                replies += 1
        assert guest.read("big") == b"x" * 4000


# -- scenario 24: permission attacks --------------------------------------------------------------
def test_scenario_23_reads_with_varying_trailing_bytes_keep_server_memory_bounded(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    """Plain READs of one path, each with different bytes after the NUL, on both direct
    paths: every one is answered and the connection's path cache stays a few entries
    (issue 14 item 2: it grew by one entry per read)."""
    st, dom0, guest = xs
    dom0.ok(T.WRITE, raw=b"/local/domain/5/v\0value")
    for client in (dom0, guest):
        count = 3000
        for i in range(count):  # pipelined, as a hostile client would
            client.send(T.READ, b"/local/domain/5/v\0" + i.to_bytes(4, "little") + b"#" * 500)
        replies = [client.reply() for _ in range(count)]
        assert all(r.type == T.READ and r.payload == b"value" for r in replies)
    caches = st.call(lambda: [len(c.path_cache) for c in st.srv._protocols])
    assert caches and max(caches) <= 4
    assert_other_domain_served(st)


def _served(path: str) -> RawClient | None:
    """A new connection on ``path`` if the server answers on it, else None (refused)."""
    c = RawClient(path, timeout=5.0)
    try:
        c.send(T.GET_DOMAIN_PATH, b"0\0")
        msg = c.recv_message()
    except BrokenPipeError:  # closed by the server before the request went out
        msg = None
    if msg is None:
        c.close()
        return None
    return c


def test_scenario_21_connection_quota_refuses_more_and_dom0_is_served(tmp_path: Path) -> None:
    """A guest opening connection after connection on its own socket gets the
    ``connections`` quota and no more (the rest are closed at once); dom0 and other
    domains are still answered, and a closed connection frees its slot (issue 14 item 4)."""
    with _serve(tmp_path, Quotas(write_rate=0, connections=8)) as (st, dom0, guest):
        opened = [c for c in (_served(st.path(5)) for _ in range(40)) if c is not None]
        try:
            assert len(opened) == 7  # plus the fixture's guest connection
            assert st.call(lambda: st.srv.connection_count(5)) == 8
            assert st.call(lambda: st.srv.refused[5]) == 33
            assert dom0.read("/local/domain/5") == b""
            with RawClient(st.path(0), timeout=5.0) as fresh:
                assert fresh.ok(T.GET_DOMAIN_PATH, "5") == b"/local/domain/5\0"
            assert_other_domain_served(st)
            assert guest.write("still", b"ok") == "OK"
            opened.pop().close()
            deadline = time.monotonic() + 5
            while st.call(lambda: st.srv.connection_count(5)) > 7:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            again = _served(st.path(5))
            assert again is not None
            opened.append(again)
        finally:
            for c in opened:
                c.close()


def test_scenario_24_guest_cannot_change_owner(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, dom0, guest = xs
    guest.write("mine")
    assert guest.err(T.SET_PERMS, "mine", "b0") == "EACCES"
    dom0.write("/local/domain/5/dom0s", b"")
    dom0.ok(T.SET_PERMS, "/local/domain/5/dom0s", "n0", "b5")
    assert guest.err(T.SET_PERMS, "dom0s", "n5") == "EACCES"
    assert dom0.ok(T.GET_PERMS, "/local/domain/5/dom0s") == b"n0\0b5\0"
    assert_other_domain_served(st)


def test_scenario_24_guest_cannot_chmod_or_rm_root(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, dom0, guest = xs
    assert guest.err(T.SET_PERMS, "/", "b5") == "EACCES"
    assert guest.err(T.RM, "/") == "EACCES"
    assert dom0.ok(T.GET_PERMS, "/") == b"n0\0"
    assert dom0.read("/local/domain/5") == b""
    assert_other_domain_served(st)


def test_scenario_24_no_events_for_unreadable_nodes(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, dom0, guest = xs
    guest.ok(T.WATCH, "/", "root")
    guest.ok(T.WATCH, "@releaseDomain", "rel")
    guest.ok(T.WATCH, "@introduceDomain", "intro")
    dom0.write("/secret/key", b"s")
    dom0.write("/local/domain/6/private", b"p")
    st.call(lambda: st.srv.introduce_domain(9))
    st.call(lambda: st.srv.release_domain(9))
    dom0.write("/local/domain/5/mine", b"visible")  # a readable change, as a marker
    deadline = time.monotonic() + 5
    while (b"/local/domain/5/mine", b"root") not in guest.events and time.monotonic() < deadline:
        guest.req(T.GET_DOMAIN_PATH, "5")  # collects events that arrived meanwhile
    tokens = {token for _, token in guest.events}
    paths = {path for path, _ in guest.events}
    assert b"rel" not in tokens and b"intro" not in tokens
    assert paths <= {b"/", b"/local/domain/5/mine"}
    assert_other_domain_served(st)


def test_scenario_24_nodes_of_a_destroyed_domain_are_deleted(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, dom0, guest = xs
    dom0.write("/shared", b"")
    dom0.ok(T.SET_PERMS, "/shared", "b0")
    assert guest.write("/shared/planted/deep", b"x") == "OK"
    assert guest.write("data/x", b"x") == "OK"
    st.call(lambda: st.srv.release_domain(5))
    assert guest.closed_by_server()
    assert dom0.err(T.READ, "/shared/planted") == "ENOENT"
    assert dom0.err(T.READ, "/local/domain/5") == "ENOENT"
    assert dom0.ok(T.DIRECTORY, "/shared") == b""
    assert st.call(lambda: st.srv.node_count(5)) == 0
    with RawClient(st.path(5), timeout=5) as late:  # no domain 5 any more: refused
        assert late.closed_by_server()
    assert_other_domain_served(st)


def test_scenario_24_domid_reuse_starts_fresh(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, dom0, guest = xs
    dom0.write("/backend/vif/5", b"cfg")
    dom0.ok(T.SET_PERMS, "/backend/vif/5", "n0", "b5")
    assert guest.read("/backend/vif/5") == b"cfg"
    for i in range(20):
        assert guest.write(f"data/{i}", b"x") == "OK"
    st.call(lambda: st.srv.release_domain(5))
    assert guest.closed_by_server()
    st.call(lambda: st.srv.introduce_domain(5))
    setup_home(dom0, 5)
    with RawClient(st.path(5)) as reborn:
        assert reborn.err(T.READ, "/backend/vif/5") == "EACCES"
        assert reborn.write("/backend/vif/5", b"evil") == "EACCES"
        assert reborn.err(T.READ, "data/0") == "ENOENT"
    assert st.call(lambda: st.srv.node_count(5)) == 1  # only the new home
    assert_other_domain_served(st)


# -- scenario 25: garbage on the wire -----------------------------------------------------------
@pytest.mark.parametrize("length", [4097, 0x80000000, 0xFFFFFFFF])
def test_scenario_25_oversized_length_kills_connection_keeps_domain(
    xs: tuple[ServerThread, RawClient, RawClient], length: int
) -> None:
    st, dom0, guest = xs
    guest.sock.sendall(wire.HEADER.pack(T.READ, 1, 0, length) + b"x" * 64)
    assert guest.closed_by_server()
    assert dom0.ok(T.IS_DOMAIN_INTRODUCED, "5") == b"T\0"
    assert dom0.read("/local/domain/5") == b""
    with RawClient(st.path(5)) as again:  # the domain itself is kept
        assert again.ok(T.GET_DOMAIN_PATH, "5") == b"/local/domain/5\0"
    assert_other_domain_served(st)


def test_scenario_25_half_header_then_silence_blocks_nobody(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    guest.sock.sendall(wire.HEADER.pack(T.READ, 1, 0, 4)[:9])
    for _ in range(3):
        assert_other_domain_served(st)
    with RawClient(st.path(5)) as sibling:
        assert sibling.write("data/ok", b"1") == "OK"


@pytest.mark.parametrize("type_", [T.RESTRICT, 99, T.INVALID])
def test_scenario_25_removed_or_unknown_type_gets_an_error(
    xs: tuple[ServerThread, RawClient, RawClient], type_: int
) -> None:
    st, _, guest = xs
    assert guest.err(type_, "5") == "ENOSYS"
    assert guest.write("data/still-works", b"1") == "OK"
    assert_other_domain_served(st)


def test_scenario_25_transaction_start_with_nonzero_tx_id(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    assert guest.err(T.TRANSACTION_START, "", tx=77) == "ENOENT"
    tx = int(guest.ok(T.TRANSACTION_START, "")[:-1])
    assert guest.err(T.TRANSACTION_START, "", tx=tx) == "EBUSY"
    assert_other_domain_served(st)


def test_scenario_25_oversized_watch_event_is_dropped(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    token = "t" * 4000
    guest.ok(T.WATCH, "w", token)
    assert guest.write("w/" + "x" * 200, b"1") == "OK"
    assert guest.read("w") == b""
    assert [p for p, _ in guest.events] == [b"w"]  # only the registration event
    assert st.call(lambda: st.srv.store.dropped_events) == 1
    assert_other_domain_served(st)


def test_scenario_25_garbage_bytes_never_crash_the_server(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, _ = xs
    import random

    rng = random.Random(25)
    for _ in range(30):
        with RawClient(st.path(5), timeout=5) as c:
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400)))
            c.sock.sendall(blob)
            c.sock.shutdown(socket.SHUT_WR)
            c.closed_by_server()
    assert st.call(st.srv.store.check) == []
    assert_other_domain_served(st)


def test_unlisten_removes_a_domain_socket_and_keeps_others(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    assert guest.write("data/accepted", b"1") == "OK"  # accepted before the socket goes
    st.run(st.srv.unlisten(st.path(5)))
    assert not Path(st.path(5)).exists()
    assert guest.write("data/still-connected", b"1") == "OK"
    assert_other_domain_served(st)


def test_scenario_22_rate_limit_leaves_ordinary_bursts_alone(
    xs_limited: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs_limited
    for i in range(600):  # well inside the domain burst plus the shared reserve
        guest.send(T.WRITE, f"data/k{i}".encode() + b"\0v")
    assert all(guest.reply().type == T.WRITE for _ in range(600))
    assert st.call(lambda: st.srv.throttles.get(5, 0)) == 0


def test_requests_sent_before_a_half_close_are_all_answered(
    xs: tuple[ServerThread, RawClient, RawClient],
) -> None:
    st, _, guest = xs
    for i in range(100):
        guest.send(T.GET_DOMAIN_PATH, b"%d\0" % i)
    guest.sock.shutdown(socket.SHUT_WR)
    replies = []
    while (msg := guest.recv_message()) is not None:
        replies.append(msg)
    assert [m.payload for m in replies] == [b"/local/domain/%d\0" % i for i in range(100)]
    assert_other_domain_served(st)

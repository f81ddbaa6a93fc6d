"""The embedded xenstored's socket layer: replies the client does not read yet are kept,
written later in order, and bounded; clients that vanish mid-reply are dropped cleanly."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostile"))

from test_xenstore_support import RawClient, running_server, setup_home

from xenpv.xenstore import wire
from xenpv.xenstore.store import Quotas
from xenpv.xenstore.wire import XsType as T

VALUE = bytes(range(256)) * 15 + b"tail"  # 3844 bytes: one near-maximal reply each

pytestmark = pytest.mark.usefixtures("direct_path")


def _pipeline_reads(client: RawClient, count: int) -> list[int]:
    """Send ``count`` READs of /big without reading any reply; return their req_ids."""
    ids = []
    for _ in range(count):
        ids.append(client.send(T.READ, b"/big\0"))
    return ids


def _wait_held(held_now: Callable[[], int], want: int, deadline_s: float = 10.0) -> int:
    """Poll ``held_now()`` until it reaches ``want`` (or the deadline); return the last value."""
    deadline = time.monotonic() + deadline_s
    while True:
        held = held_now()
        if held >= want or time.monotonic() > deadline:
            return held
        time.sleep(0.02)


def _read_replies(client: RawClient, ids: list[int]) -> None:
    for req_id in ids:
        msg = client.recv_message()
        assert msg is not None, "server closed the connection"
        assert (msg.type, msg.req_id, msg.payload) == (T.READ, req_id, VALUE)


def test_replies_to_a_client_that_does_not_read_are_kept_and_sent_in_order(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path) as st, RawClient(st.path(0)) as dom0:
        dom0.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert dom0.write("/big", VALUE) == "OK"
        ids = _pipeline_reads(dom0, 150)  # ~580 KiB of replies: below dom0's 1 MiB mark
        held = _wait_held(lambda: st.call(lambda: st.srv.buffered_bytes(0)), 100_000)
        assert held >= 100_000, "the server should hold what the socket did not take"
        _read_replies(dom0, ids)
        # Drained: nothing is held any more and the connection still answers.
        assert dom0.read("/big") == VALUE
        assert st.call(lambda: st.srv.buffered_bytes(0)) == 0


def test_a_client_that_stops_reading_pauses_its_connection_within_the_bound(
    tmp_path: Path,
) -> None:
    count = 1000  # ~3.9 MB of replies: more than dom0's mark plus one batch
    with running_server(tmp_path) as st, RawClient(st.path(0)) as dom0:
        dom0.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert dom0.write("/big", VALUE) == "OK"
        payload = b"/big\0"
        first = dom0.req_id + 1
        ids = list(range(first, first + count))
        dom0.sock.sendall(
            b"".join(wire.HEADER.pack(T.READ, i, 0, len(payload)) + payload for i in ids)
        )
        dom0.req_id = ids[-1]
        mark = 1 << 20
        held = _wait_held(lambda: st.call(lambda: st.srv.buffered_bytes(0)), mark)
        time.sleep(0.3)  # give a server that ignores the mark time to go on
        held = st.call(lambda: st.srv.buffered_bytes(0))
        bound = mark + 512 * (16 + 4096) + 65536  # mark + one batch + decoder input
        assert mark <= held <= bound
        assert held < count * len(VALUE), "the server answered everything regardless"
        _read_replies(dom0, ids)
        assert dom0.read("/big") == VALUE


def test_a_client_that_disconnects_with_replies_held_is_dropped(tmp_path: Path) -> None:
    with running_server(tmp_path) as st:
        with RawClient(st.path(0)) as dom0:
            assert dom0.write("/big", VALUE) == "OK"
        slow = RawClient(st.path(0))
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _pipeline_reads(slow, 100)
        assert _wait_held(lambda: st.call(lambda: st.srv.buffered_bytes(0)), 50_000) > 0
        slow.close()
        deadline = time.monotonic() + 10
        while st.call(lambda: st.srv.connection_count(0)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert st.call(lambda: st.srv.connection_count(0)) == 0
        assert st.call(lambda: st.srv.buffered_bytes(0)) == 0
        with RawClient(st.path(0)) as again:
            assert again.read("/big") == VALUE


def _frame(req_id: int, type_: int, payload: bytes) -> bytes:
    return wire.HEADER.pack(type_, req_id, 0, len(payload)) + payload


def test_a_burst_ending_in_a_partial_request_is_answered_whole_and_in_order(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path) as st, RawClient(st.path(0)) as dom0:
        assert dom0.write("/k", b"v") == "OK"
        burst = b"".join(_frame(100 + i, T.READ, b"/k\0") for i in range(3))
        last = _frame(103, T.WRITE, b"/k2\0" + b"x" * 300)
        dom0.sock.sendall(burst + last[:40])  # three whole requests and a piece of one
        time.sleep(0.1)
        dom0.sock.sendall(last[40:] + _frame(104, T.READ, b"/k2\0"))
        got = [dom0.recv_message() for _ in range(5)]
        assert [(m.req_id, m.type) for m in got if m is not None] == [
            (100, T.READ), (101, T.READ), (102, T.READ), (103, T.WRITE), (104, T.READ),
        ]  # fmt: skip
        assert [m.payload for m in got if m is not None] == [b"v"] * 3 + [b"OK\0", b"x" * 300]


def test_rate_limited_writes_inside_a_burst_keep_their_place(tmp_path: Path) -> None:
    quotas = Quotas(write_rate=20.0, write_burst=1.0, write_global_burst=0.0)
    with running_server(tmp_path, quotas) as st:
        with RawClient(st.path(0)) as dom0:
            setup_home(dom0, 5)
        with RawClient(st.path(5)) as guest:
            ops = [(T.WRITE, b"a\x001"), (T.READ, b"a\0"), (T.WRITE, b"a\x002"), (T.READ, b"a\0"),
                   (T.WRITE, b"a\x003"), (T.READ, b"a\0")]  # fmt: skip
            guest.sock.sendall(b"".join(_frame(10 + i, t, p) for i, (t, p) in enumerate(ops)))
            got = [guest.recv_message() for _ in ops]
            assert [m.req_id for m in got if m is not None] == [10 + i for i in range(len(ops))]
            assert [m.payload for m in got if m is not None] == [
                b"OK\0", b"1", b"OK\0", b"2", b"OK\0", b"3",
            ]  # fmt: skip
        assert st.call(lambda: st.srv.throttles.get(5, 0)) >= 1


def test_requests_before_an_oversized_header_are_answered_then_the_connection_drops(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path) as st, RawClient(st.path(0)) as dom0:
        assert dom0.write("/k", b"v") == "OK"
        bad = wire.HEADER.pack(T.READ, 9, 0, 4097)  # io/xs_wire.h: len > XENSTORE_PAYLOAD_MAX
        dom0.sock.sendall(_frame(7, T.READ, b"/k\0") + _frame(8, T.READ, b"/k\0") + bad)
        first, second = dom0.recv_message(), dom0.recv_message()
        assert first is not None and second is not None
        assert (first.req_id, first.payload, second.req_id, second.payload) == (7, b"v", 8, b"v")
        assert dom0.recv_message() is None  # then the server closed the connection


def test_an_internal_error_answers_eio_and_the_server_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug inside a request handler (simulated: MKDIR's handler raises) is logged and
    answered with EIO; the transaction it was in cannot commit; the connection and
    everyone else keep being served."""
    from xenpv.xenstore import store as store_module

    def broken(*args: object) -> bytes:
        raise RuntimeError("simulated bug")

    with running_server(tmp_path, domids=(3,)) as st, RawClient(st.path(0)) as dom0:
        setup_home(dom0, 3)
        monkeypatch.setitem(store_module._HANDLERS, T.MKDIR, broken)
        with RawClient(st.path(3)) as guest:
            assert dom0.err(T.MKDIR, "/a") == "EIO"
            assert guest.err(T.MKDIR, "/local/domain/3/x") == "EIO"
            tx = int(dom0.ok(T.TRANSACTION_START, "").rstrip(b"\0"))
            assert dom0.write("/in-tx", b"1", tx=tx) == "OK"
            assert dom0.err(T.MKDIR, "/b", tx=tx) == "EIO"
            assert dom0.err(T.TRANSACTION_END, "T", tx=tx) == "EIO"
            assert dom0.err(T.READ, "/in-tx") == "ENOENT"  # nothing of it was committed
            assert dom0.write("/after", b"ok") == "OK"
            assert guest.read("/local/domain/3") == b""
        assert st.call(lambda: st.srv.store.internal_errors) == 3


def test_polling_after_a_reply_serves_everyone_in_order(tmp_path: Path) -> None:
    """With spin_us set, a connection is polled after each reply; sequential and
    pipelined clients, a guest, a dribbled request and a hang-up during the poll are all
    served exactly as without it."""
    with running_server(tmp_path) as st, RawClient(st.path(0)) as dom0:
        st.call(lambda: setattr(st.srv, "spin", 0.002))  # 2 ms: the poll really happens
        setup_home(dom0, 5)
        with RawClient(st.path(5)) as guest:
            for i in range(100):
                assert dom0.write(f"/spin/{i}", str(i).encode()) == "OK"
                assert guest.read("/local/domain/5") == b""
                assert dom0.read(f"/spin/{i}") == str(i).encode()
            ids = [dom0.send(T.READ, f"/spin/{i}\0".encode()) for i in range(50)]
            for i, req_id in enumerate(ids):
                msg = dom0.recv_message()
                assert msg is not None and (msg.req_id, msg.payload) == (req_id, str(i).encode())
            whole = _frame(900, T.READ, b"/spin/7\0")
            dom0.sock.sendall(whole[:5])
            time.sleep(0.01)
            dom0.sock.sendall(whole[5:])
            msg = dom0.recv_message()
            assert msg is not None and (msg.req_id, msg.payload) == (900, b"7")
        with RawClient(st.path(0)) as brief:
            assert brief.read("/spin/3") == b"3"
        # the hang-up during the poll is noticed: the connection is gone from the server
        deadline = time.monotonic() + 10
        while st.call(lambda: st.srv.connection_count(0)) > 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert dom0.read("/spin/99") == b"99"

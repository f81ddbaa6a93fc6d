"""The blocking xenstore client: against the embedded xenstored process, and against
scripted servers (threads on real Unix sockets or a pty) that answer out of the rules."""

from __future__ import annotations

import os
import pty
import socket
import threading
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from xenpv.errors import LocalError, PeerError
from xenpv.xenstore import wire
from xenpv.xenstore.blocking import BlockingClient, BlockingTransaction
from xenpv.xenstore.ops import Perm, WatchEvent, XenstoreConnectionError
from xenpv.xenstore.wire import WireError, XenstoreError, XsType

TIMEOUT = 10.0


# -- against the embedded xenstored ---------------------------------------------------------


def test_node_operations_and_errors(xs_server: Any) -> None:
    with BlockingClient(xs_server.socket, timeout=TIMEOUT) as c:
        c.write("/b/a", b"\x00\xffraw")
        c.mkdir("/b/d")
        assert c.read("/b/a") == b"\x00\xffraw"
        assert c.read("/b/d") == b""
        assert c.exists("/b/d") and not c.exists("/b/none")
        assert sorted(c.directory("/b")) == ["a", "d"]
        c.set_perms("/b/a", [Perm("n", 0), "r3"])
        assert c.get_perms("/b/a") == [Perm("n", 0), Perm("r", 3)]
        with pytest.raises(XenstoreError) as err:
            c.read("/b/none")
        assert err.value.errno_name == "ENOENT"
        with pytest.raises(LocalError):
            c.read("bad//path")
        with pytest.raises(LocalError):
            c.set_perms("/b/a", [])
        assert c.get_domain_path(7) == "/local/domain/7"
        assert not c.is_domain_introduced(7)
        assert b"print" in c.control("help")
        c.rm("/b")
        assert not c.exists("/b")
        assert c.connected  # errors the server legitimately sent do not close it


def test_large_directory_uses_directory_part(xs_server: Any) -> None:
    names = [f"child-with-a-long-name-{i:04d}" for i in range(300)]  # ~9 KiB of names
    with BlockingClient(xs_server.socket, timeout=TIMEOUT) as c:
        c.transact(lambda t: [t.write(f"/big/{n}", "") for n in names])
        assert sorted(c.directory("/big")) == names


def test_transactions(xs_server: Any) -> None:
    with BlockingClient(xs_server.socket, timeout=TIMEOUT) as c, BlockingClient(
        xs_server.socket, timeout=TIMEOUT
    ) as other:
        c.write("/t/n", "1")
        with c.transaction() as t:
            assert t.tx_id != 0
            t.write("/t/n", "2")
            assert t.read("/t/n") == b"2"
            assert other.read("/t/n") == b"1"  # not visible before the commit
        assert other.read("/t/n") == b"2"
        with pytest.raises(LocalError):
            t.read("/t/n")  # over

        # a conflicting writer makes the commit fail with EAGAIN, exactly once
        tx = c.transaction().start()
        tx.read("/t/n")
        other.write("/t/n", "3")
        tx.write("/t/n", "4")
        with pytest.raises(XenstoreError) as err:
            tx.commit()
        assert err.value.errno_name == "EAGAIN"
        assert c.read("/t/n") == b"3"

        attempts = 0

        def incr(t: BlockingTransaction) -> int:
            nonlocal attempts
            attempts += 1
            value = int(t.read("/t/n")) + 1
            if attempts == 1:
                other.write("/t/n", "10")
            t.write("/t/n", str(value))
            return value

        assert c.transact(incr) == 11 and attempts == 2
        with pytest.raises(ZeroDivisionError):
            c.transact(lambda t: (t.rm("/t/n"), 1 / 0))
        assert c.read("/t/n") == b"11"  # aborted


def test_watches(xs_server: Any) -> None:
    with BlockingClient(xs_server.socket, timeout=TIMEOUT) as c, BlockingClient(
        xs_server.socket, timeout=TIMEOUT
    ) as other:
        token = c.watch("/w")
        assert c.read_watch() == WatchEvent("/w", token)  # the initial event
        other.write("/w/x", "1")
        other.write("/w/y", "1")
        # events that arrive while a reply is awaited wait in the queue
        assert c.read("/w/x") == b"1"
        got = {c.read_watch(), c.read_watch()}
        assert got == {WatchEvent("/w/x", token), WatchEvent("/w/y", token)}
        with pytest.raises(TimeoutError):
            c.read_watch(timeout=0.2)
        c.unwatch("/w", token)
        other.write("/w/z", "1")
        assert c.read("/w/z") == b"1"
        assert c.pending_watch_events == 0
        with pytest.raises(TimeoutError):
            c.read_watch(timeout=0.2)


def test_watch_queue_is_bounded(xs_server: Any) -> None:
    with BlockingClient(xs_server.socket, timeout=TIMEOUT, max_pending=8) as c:
        token = c.watch("/q")
        c.transact(lambda t: [t.write(f"/q/{i}", "") for i in range(50)])
        c.read("/q/0")  # every event of the commit arrives before this reply
        assert c.pending_watch_events <= 8 and c.overflows >= 1
        events = []
        while c.pending_watch_events:
            events.append(c.read_watch())
        assert WatchEvent("/q", token) in events  # collapsed into the watch path


def test_threads_share_one_client(xs_server: Any) -> None:
    errors: list[BaseException] = []
    with BlockingClient(xs_server.socket, timeout=TIMEOUT) as c:

        def work(n: int) -> None:
            try:
                for i in range(100):
                    c.write(f"/thr/{n}", str(i))
                    assert c.read(f"/thr/{n}") == str(i).encode()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors and not any(th.is_alive() for th in threads)
        assert sorted(c.directory("/thr")) == ["0", "1", "2", "3"]


def test_server_going_away(xs_server: Any) -> None:
    c = BlockingClient(xs_server.socket, timeout=TIMEOUT)
    try:
        c.write("/x", "1")
        xs_server.proc.terminate()
        xs_server.proc.wait(20)
        with pytest.raises(XenstoreConnectionError):
            c.read("/x")
        assert not c.connected
        with pytest.raises(XenstoreConnectionError):
            c.read("/x")
    finally:
        c.close()


def test_connects_like_libxenstore(xs_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENSTORED_PATH", xs_server.socket)
    with BlockingClient(timeout=TIMEOUT) as c:
        c.write("/env", "ok")
    monkeypatch.delenv("XENSTORED_PATH")
    monkeypatch.setenv("XENSTORED_RUNDIR", str(Path(xs_server.socket).parent / "nowhere"))
    with pytest.raises(XenstoreConnectionError):
        BlockingClient(timeout=TIMEOUT)


def test_guest_connection_acts_as_its_domain(xs_server: Any) -> None:
    with BlockingClient(xs_server.guest_socket, timeout=TIMEOUT) as g:
        assert g.get_domain_path(5) == "/local/domain/5"
        with pytest.raises(XenstoreError) as err:
            g.write("/not-mine", "x")
        assert err.value.errno_name == "EACCES"


# -- scripted servers -----------------------------------------------------------------------

Script = Callable[[socket.socket], None]


def recv_request(s: socket.socket) -> wire.Message:
    """Read one whole request."""
    header = _exactly(s, wire.HEADER_SIZE)
    t, r, x, n = wire.HEADER.unpack(header)
    return wire.Message(t, r, x, _exactly(s, n))


def _exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("client went away")
        out += chunk
    return out


@contextmanager
def scripted(tmp_path: Path, script: Script) -> Iterator[str]:
    """A one-connection server running ``script(conn)`` in a thread."""
    path = str(tmp_path / "scripted.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    failures: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                script(conn)
            except (ConnectionError, OSError):
                pass
            except BaseException as exc:
                failures.append(exc)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        yield path
    finally:
        th.join(20)
        listener.close()
    assert not failures and not th.is_alive()


def answer(s: socket.socket, req: wire.Message, payload: bytes, **fields: int) -> None:
    """Send a reply to ``req`` (fields override type, req_id, tx_id)."""
    s.sendall(
        wire.encode(
            fields.get("type", req.type),
            fields.get("req_id", req.req_id),
            fields.get("tx_id", req.tx_id),
            payload,
        )
    )


@pytest.mark.parametrize(
    "fields",
    [{"req_id": 999}, {"type": XsType.DIRECTORY}, {"tx_id": 5}],
    ids=["unknown-req-id", "wrong-type", "wrong-tx-id"],
)
def test_mismatched_reply_is_a_peer_error(tmp_path: Path, fields: dict[str, int]) -> None:
    def script(s: socket.socket) -> None:
        answer(s, recv_request(s), b"v", **fields)
        s.recv(1)  # until the client closes

    with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
        with pytest.raises(WireError) as err:
            c.read("/k")
        assert isinstance(err.value, PeerError)
        assert not c.connected
        with pytest.raises(WireError):
            c.read("/k")  # the connection stays failed


def test_oversized_reply_is_a_peer_error(tmp_path: Path) -> None:
    def script(s: socket.socket) -> None:
        req = recv_request(s)
        s.sendall(wire.HEADER.pack(req.type, req.req_id, 0, wire.PAYLOAD_MAX + 1))
        s.recv(1)

    with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
        with pytest.raises(WireError, match="payload bytes"):
            c.read("/k")


def test_malformed_watch_event_is_a_peer_error(tmp_path: Path) -> None:
    def script(s: socket.socket) -> None:
        req = recv_request(s)
        s.sendall(wire.encode(XsType.WATCH_EVENT, 0, 0, b"no-token-terminator"))
        answer(s, req, b"v")
        s.recv(1)

    with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
        with pytest.raises(WireError, match="watch event"):
            c.read("/k")


def test_error_replies_and_byte_by_byte_framing(tmp_path: Path) -> None:
    def script(s: socket.socket) -> None:
        answer(s, recv_request(s), b"EWHATEVER\0", type=XsType.ERROR)
        data = wire.encode(XsType.READ, recv_request(s).req_id, 0, b"slow")
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
        s.recv(1)

    with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
        with pytest.raises(XenstoreError) as err:
            c.read("/k")
        assert err.value.errno_name == "EINVAL"  # unknown error strings map to EINVAL
        assert c.read("/k") == b"slow"


def test_timeout_then_late_reply_is_discarded(tmp_path: Path) -> None:
    def script(s: socket.socket) -> None:
        first = recv_request(s)
        second = recv_request(s)  # sent after the first timed out
        answer(s, first, b"late")
        answer(s, second, b"fresh")
        s.recv(1)

    with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
        with pytest.raises(TimeoutError):
            c._call(XsType.READ, b"/k\0", 0, timeout=0.2)
        assert c.read("/k") == b"fresh"
        assert c.connected


def test_server_hangs_up_mid_reply(tmp_path: Path) -> None:
    def script(s: socket.socket) -> None:
        req = recv_request(s)
        s.sendall(wire.encode(req.type, req.req_id, 0, b"value")[:10])

    with scripted(tmp_path, script) as path, BlockingClient(path, timeout=TIMEOUT) as c:
        with pytest.raises(XenstoreConnectionError):
            c.read("/k")


def test_device_path_carries_the_same_framing(tmp_path: Path) -> None:
    """A character device (a raw pty standing in for /dev/xen/xenbus) is opened, not
    connected, and carries the same messages."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    done = threading.Event()

    def serve() -> None:
        header = b""
        while len(header) < wire.HEADER_SIZE:
            header += os.read(master, wire.HEADER_SIZE - len(header))
        t, r, x, n = wire.HEADER.unpack(header)
        body = b""
        while len(body) < n:
            body += os.read(master, n - len(body))
        os.write(master, wire.encode(t, r, x, b"dev:" + body.rstrip(b"\0")))
        done.set()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with BlockingClient(path, timeout=TIMEOUT) as c:
            assert c.read("/k") == b"dev:/k"
        assert done.wait(10)
    finally:
        th.join(10)
        os.close(master)
        os.close(slave)

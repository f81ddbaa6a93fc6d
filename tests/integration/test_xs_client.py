"""The asyncio xenstore client against scripted servers on real Unix sockets.

Each test runs a small server that answers the way a test needs (out of order, with
errors, with garbage, or by hanging up), so the client's matching and failure rules are
checked exactly.  Tests against the embedded xenstored are in test_xs_client_server.py.
"""

from __future__ import annotations

import asyncio
import os
import pty
import socket
import threading
import tty
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError, PeerError
from xenpv.xenstore import client as xsclient
from xenpv.xenstore import wire
from xenpv.xenstore.client import Perm, XenstoreConnectionError
from xenpv.xenstore.wire import Message, WireError, XenstoreError, XsType

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def recv(reader: asyncio.StreamReader) -> Message:
    """Read one whole message from the client."""
    header = await reader.readexactly(wire.HEADER_SIZE)
    t, r, x, n = wire.HEADER.unpack(header)
    return Message(t, r, x, await reader.readexactly(n))


def reply(writer: asyncio.StreamWriter, req: Message, payload: bytes, type_: int | None = None) -> None:
    """Answer ``req`` echoing req_id and tx_id."""
    writer.write(wire.encode(req.type if type_ is None else type_, req.req_id, req.tx_id, payload))


async def with_server(tmp_path: Path, handler: Handler, body: Callable[[str], Awaitable[None]]) -> None:
    """Run ``body(socket_path)`` while ``handler`` serves connections; clean up after."""
    path = str(tmp_path / "xs.sock")
    tasks: list[asyncio.Task[None]] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(on_conn, path)
    try:
        async with asyncio.timeout(20):
            await body(path)
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def echo_store(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tiny store: WRITE/READ/DIRECTORY/RM, OK for the rest, events on WATCH."""
    store: dict[str, bytes] = {}
    while True:
        req = await recv(reader)
        if req.type == XsType.WRITE:
            path, _, value = req.payload.partition(b"\0")
            store[path.decode()] = value
            reply(writer, req, b"OK\0")
        elif req.type == XsType.READ:
            key = req.payload.rstrip(b"\0").decode()
            if key in store:
                reply(writer, req, store[key])
            else:
                reply(writer, req, b"ENOENT\0", XsType.ERROR)
        elif req.type == XsType.WATCH:
            p, tok, _ = req.payload.split(b"\0")
            reply(writer, req, b"OK\0")
            writer.write(wire.encode(XsType.WATCH_EVENT, 0, 0, p + b"\0" + tok + b"\0"))
        else:
            reply(writer, req, b"OK\0")


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_pipelined_replies_out_of_order_are_matched_by_req_id(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reqs = [await recv(reader) for _ in range(10)]
        for req in reversed(reqs):
            reply(writer, req, b"value-of-" + req.payload.rstrip(b"\0"))
        await reader.read()

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            vals = await asyncio.gather(*(c.read(f"/k{i}") for i in range(10)))
            assert vals == [b"value-of-/k%d" % i for i in range(10)]

    run(with_server(tmp_path, handler, body))


def test_wire_format_of_requests(tmp_path: Path) -> None:
    seen: list[Message] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await recv(reader)
            seen.append(req)
            answers = {
                XsType.GET_PERMS: b"b0\0r5\0",
                XsType.GET_DOMAIN_PATH: b"/local/domain/3\0",
                XsType.IS_DOMAIN_INTRODUCED: b"T\0",
                XsType.DIRECTORY: b"a\0b\0",
                XsType.CONTROL: b"some output\0",
                XsType.READ: b"v",
            }
            reply(writer, req, answers.get(XsType(req.type), b"OK\0"))

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            await c.write("/a/b", b"x\0y")
            await c.write("rel/path", "text")
            await c.mkdir("/m")
            await c.rm("/r")
            assert await c.directory("/d") == ["a", "b"]
            assert await c.get_perms("/p") == [Perm("b", 0), Perm("r", 5)]
            await c.set_perms("/p", [Perm("n", 3), "r0"])
            assert await c.get_domain_path(3) == "/local/domain/3"
            assert await c.is_domain_introduced(3) is True
            await c.introduce(3, 1234, 5)
            await c.release(3)
            await c.resume(3)
            await c.set_target(4, 3)
            assert await c.control("log", "on") == b"some output\0"
            await c.reset_watches()
            assert await c.exists("/e") is True

    run(with_server(tmp_path, handler, body))
    payloads = [(XsType(m.type).name, m.payload, m.tx_id) for m in seen]
    assert payloads == [
        ("WRITE", b"/a/b\0x\0y", 0),
        ("WRITE", b"rel/path\0text", 0),
        ("MKDIR", b"/m\0", 0),
        ("RM", b"/r\0", 0),
        ("DIRECTORY", b"/d\0", 0),
        ("GET_PERMS", b"/p\0", 0),
        ("SET_PERMS", b"/p\0n3\0r0\0", 0),
        ("GET_DOMAIN_PATH", b"3\0", 0),
        ("IS_DOMAIN_INTRODUCED", b"3\0", 0),
        ("INTRODUCE", b"3\x001234\x005\0", 0),
        ("RELEASE", b"3\0", 0),
        ("RESUME", b"3\0", 0),
        ("SET_TARGET", b"4\x003\0", 0),
        ("CONTROL", b"log\0on\0", 0),
        ("RESET_WATCHES", b"\0", 0),
        ("READ", b"/e\0", 0),
    ]
    assert len({m.req_id for m in seen}) == len(seen) and all(m.req_id for m in seen)


def test_error_reply_raises_xenstore_error_and_connection_survives(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            with pytest.raises(XenstoreError) as info:
                await c.read("/missing")
            assert info.value.errno_name == "ENOENT" and info.value.errno == 2
            assert await c.exists("/missing") is False
            await c.write("/k", b"1")
            assert await c.read("/k") == b"1"

    run(with_server(tmp_path, echo_store, body))


def test_invalid_path_is_local_error_and_nothing_is_sent(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            for bad in ("", "/a//b", "/a/", "/a b", "@releaseDomain"):
                with pytest.raises(LocalError):
                    await c.read(bad)
            with pytest.raises(LocalError):
                await c.write("/big", b"x" * 5000)
            assert await c.exists("/nothing") is False

    run(with_server(tmp_path, echo_store, body))


def test_transaction_context_commits_and_aborts(tmp_path: Path) -> None:
    seen: list[Message] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while True:
            req = await recv(reader)
            seen.append(req)
            if req.type == XsType.TRANSACTION_START:
                n += 1
                reply(writer, req, b"%d\0" % (40 + n))
            elif req.type == XsType.TRANSACTION_END and n == 3 and req.payload == b"T\0":
                reply(writer, req, b"EAGAIN\0", XsType.ERROR)
            else:
                reply(writer, req, b"OK\0")

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            async with c.transaction() as t:
                assert t.tx_id == 41
                await t.write("/a", b"1")
            with pytest.raises(RuntimeError):
                async with c.transaction() as t:
                    await t.write("/b", b"2")
                    raise RuntimeError("boom")
            with pytest.raises(LocalError):
                await t.write("/c", b"late")
            with pytest.raises(XenstoreError) as info:
                async with c.transaction() as t:
                    await t.mkdir("/c")
            assert info.value.errno_name == "EAGAIN"

    run(with_server(tmp_path, handler, body))
    summary = [(XsType(m.type).name, m.tx_id, m.payload) for m in seen]
    assert summary == [
        ("TRANSACTION_START", 0, b"\0"),
        ("WRITE", 41, b"/a\x001"),
        ("TRANSACTION_END", 41, b"T\0"),
        ("TRANSACTION_START", 0, b"\0"),
        ("WRITE", 42, b"/b\x002"),
        ("TRANSACTION_END", 42, b"F\0"),
        ("TRANSACTION_START", 0, b"\0"),
        ("MKDIR", 43, b"/c\0"),
        ("TRANSACTION_END", 43, b"T\0"),
    ]


def test_transact_retries_whole_function_on_eagain(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ends = 0
        while True:
            req = await recv(reader)
            if req.type == XsType.TRANSACTION_START:
                reply(writer, req, b"7\0")
            elif req.type == XsType.TRANSACTION_END:
                ends += 1
                if ends != 3:
                    reply(writer, req, b"EAGAIN\0", XsType.ERROR)
                else:
                    reply(writer, req, b"OK\0")
            elif req.type == XsType.READ:
                reply(writer, req, b"5")
            else:
                reply(writer, req, b"OK\0")

    async def body(path: str) -> None:
        calls = 0

        async def incr(t: xsclient.Transaction) -> int:
            nonlocal calls
            calls += 1
            value = int(await t.read("/counter")) + 1
            await t.write("/counter", str(value))
            return value

        async with await xsclient.connect(path) as c:
            assert await c.transact(incr) == 6
            assert calls == 3
            with pytest.raises(XenstoreError):
                await c.transact(incr, retries=0)

    run(with_server(tmp_path, handler, body))


def test_directory_part_fallback_on_e2big(tmp_path: Path) -> None:
    names = [b"child-%04d" % i for i in range(700)]
    blob = b"".join(n + b"\0" for n in names)
    offsets: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await recv(reader)
            if req.type == XsType.DIRECTORY:
                reply(writer, req, b"E2BIG\0", XsType.ERROR)
                continue
            _, off, _ = req.payload.split(b"\0")
            offset = int(off)
            offsets.append(offset)
            chunk = blob[offset:]
            if len(chunk) > 3000:
                cut = chunk.rindex(b"\0", 0, 3000) + 1
                reply(writer, req, b"17\0" + chunk[:cut])
            else:
                reply(writer, req, b"17\0" + chunk + b"\0")

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            assert await c.directory("/big") == [n.decode() for n in names]

    run(with_server(tmp_path, handler, body))
    assert offsets[0] == 0 and len(offsets) >= 3


def test_directory_part_restarts_when_generation_changes(tmp_path: Path) -> None:
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        while True:
            req = await recv(reader)
            if req.type == XsType.DIRECTORY:
                reply(writer, req, b"E2BIG\0", XsType.ERROR)
                continue
            calls += 1
            offset = int(req.payload.split(b"\0")[1])
            if calls == 1:
                reply(writer, req, b"1\0a\0")
            elif calls == 2:
                reply(writer, req, b"2\0b\0\0")  # changed under us: restart
            elif offset == 0:
                reply(writer, req, b"2\0a\0")
            else:
                reply(writer, req, b"2\0x\0\0")

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            assert await c.directory("/d") == ["a", "x"]

    run(with_server(tmp_path, handler, body))


@pytest.mark.parametrize(
    "bad_reply",
    [
        pytest.param(lambda req: wire.encode(req.type, req.req_id + 1000, 0, b"x"), id="unknown-req-id"),
        pytest.param(lambda req: wire.encode(XsType.WRITE, req.req_id, 0, b"x"), id="wrong-type"),
        pytest.param(lambda req: wire.encode(req.type, req.req_id, 9, b"x"), id="wrong-tx-id"),
        pytest.param(lambda req: wire.HEADER.pack(req.type, req.req_id, 0, 5000), id="oversized"),
        pytest.param(lambda req: wire.encode(XsType.WATCH_EVENT, 0, 0, b"no-token"), id="bad-event"),
        pytest.param(lambda req: wire.encode(XsType.WATCH_EVENT, 0, 0, b"/p\0\xff\0"), id="non-ascii-token"),
    ],
)
def test_malformed_reply_is_peer_error_and_closes_connection(
    tmp_path: Path, bad_reply: Callable[[Message], bytes]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await recv(reader)
        writer.write(bad_reply(req))
        await reader.read()

    async def body(path: str) -> None:
        c = await xsclient.connect(path)
        try:
            second = asyncio.ensure_future(c.read("/other"))
            with pytest.raises(WireError):
                await c.read("/x")
            with pytest.raises(PeerError):
                await second
            assert not c.connected
            with pytest.raises(PeerError):
                await c.read("/again")
        finally:
            await c.close()

    run(with_server(tmp_path, handler, body))


def test_malformed_transaction_id_and_perms_are_peer_errors(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await recv(reader)
            if req.type == XsType.TRANSACTION_START:
                reply(writer, req, b"abc\0")
            else:
                reply(writer, req, b"q9\0")

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            with pytest.raises(WireError):
                await c.get_perms("/p")
        async with await xsclient.connect(path) as c:
            with pytest.raises(WireError):
                async with c.transaction():
                    pass

    run(with_server(tmp_path, handler, body))


def test_connection_loss_fails_pending_requests_and_watches(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await recv(reader)
        assert req.type == XsType.WATCH
        reply(writer, req, b"OK\0")
        await recv(reader)  # a read that never gets an answer
        writer.close()

    async def body(path: str) -> None:
        c = await xsclient.connect(path)
        try:
            async with c.watch("/w", "tok") as w:
                with pytest.raises(XenstoreConnectionError):
                    await c.read("/never")
                with pytest.raises(XenstoreConnectionError):
                    await w.get(timeout=5)
            with pytest.raises(XenstoreConnectionError):
                await c.write("/after", b"")
        finally:
            await c.close()

    run(with_server(tmp_path, handler, body))


def test_request_timeout_and_late_reply_is_ignored(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        slow = await recv(reader)
        nxt = await recv(reader)
        reply(writer, slow, b"late")
        reply(writer, nxt, b"fresh")
        while True:
            req = await recv(reader)
            reply(writer, req, b"more")

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            with pytest.raises(TimeoutError):
                await c.read("/slow", timeout=0.05)
            assert await c.read("/next") == b"fresh"
            assert await c.read("/more", timeout=5) == b"more"
            assert c.connected

    run(with_server(tmp_path, handler, body))


def test_watch_initial_event_tokens_and_unwatch(tmp_path: Path) -> None:
    seen: list[Message] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await recv(reader)
            seen.append(req)
            reply(writer, req, b"OK\0")
            if req.type == XsType.WATCH:
                p, tok, _ = req.payload.split(b"\0")
                ev = p + b"\0" + tok + b"\0"
                writer.write(wire.encode(XsType.WATCH_EVENT, 0, 0, ev))
                writer.write(wire.encode(XsType.WATCH_EVENT, 0, 0, p + b"/child\0" + tok + b"\0"))
                writer.write(wire.encode(XsType.WATCH_EVENT, 0, 0, b"/x\0other-token\0"))

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            async with c.watch("dev/vif", "mytoken") as w:
                events = [await w.get(timeout=5), await w.get(timeout=5)]
                assert events == [("dev/vif", "mytoken"), ("dev/vif/child", "mytoken")]
                assert w.pending == 0
            async with c.watch("@releaseDomain") as w2:
                path_, token = await w2.get(timeout=5)
                assert path_ == "@releaseDomain" and token.startswith("xenpv-")
            async for _ in w2:
                raise AssertionError("an unregistered watch yields nothing more")

    run(with_server(tmp_path, handler, body))
    kinds = [(XsType(m.type).name, m.payload.split(b"\0")[0]) for m in seen]
    assert kinds == [
        ("WATCH", b"dev/vif"),
        ("UNWATCH", b"dev/vif"),
        ("WATCH", b"@releaseDomain"),
        ("UNWATCH", b"@releaseDomain"),
    ]


def test_scenario_20_watch_flood_keeps_queue_bounded(tmp_path: Path) -> None:
    """A peer floods watch events: the pending queue stays bounded, duplicates dropped."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await recv(reader)
        p, tok, _ = req.payload.split(b"\0")
        reply(writer, req, b"OK\0")
        for _ in range(50):
            writer.write(wire.encode(XsType.WATCH_EVENT, 0, 0, p + b"/same\0" + tok + b"\0"))
        for i in range(1000):
            writer.write(wire.encode(XsType.WATCH_EVENT, 0, 0, p + b"/n%d\0" % i + tok + b"\0"))
        writer.write(wire.encode(XsType.WATCH_EVENT, 0, 0, p + b"/last\0" + tok + b"\0"))
        sync = await recv(reader)
        reply(writer, sync, b"done")
        await reader.read()

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            w = await c.watch("/w", "t", max_pending=8).register()
            assert await c.read("/sync") == b"done"
            assert w.pending <= 8
            assert w.overflows >= 1
            got = [await w.get(timeout=5) for _ in range(w.pending)]
            assert ("/w", "t") in got and ("/w/last", "t") in got
            assert len(set(got)) == len(got)

    run(with_server(tmp_path, handler, body))


def test_connect_follows_libxenstore_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(path: str) -> None:
        monkeypatch.setenv("XENSTORED_PATH", path)
        assert xsclient.daemon_socket_path() == path
        async with await xsclient.connect() as c:
            await c.write("/k", b"v")
        monkeypatch.delenv("XENSTORED_PATH")
        monkeypatch.setenv("XENSTORED_RUNDIR", str(tmp_path))
        assert xsclient.daemon_socket_path() == str(tmp_path / "socket")
        os.symlink(path, tmp_path / "socket")
        async with await xsclient.connect() as c:
            await c.write("/k", b"v")
        monkeypatch.setenv("XENSTORED_RUNDIR", str(tmp_path / "nowhere"))
        monkeypatch.setattr(xsclient, "XENBUS_DEVICES", (str(tmp_path / "no-device"),))
        with pytest.raises(XenstoreConnectionError):
            await xsclient.connect()

    run(with_server(tmp_path, echo_store, body))


def test_device_transport_over_a_raw_pty(tmp_path: Path) -> None:
    """A path that is not a socket is opened as a device with the same framing."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    slave_name = os.ttyname(slave)  # kept open: a pty master reads EIO with no slave open
    srv_sock, relay_sock = socket.socketpair()
    stop = threading.Event()

    def relay() -> None:
        import select

        while not stop.is_set():
            ready, _, _ = select.select([master, relay_sock], [], [], 0.1)
            for fd in ready:
                if fd == master:
                    try:
                        data = os.read(master, 65536)
                    except OSError:
                        return
                    relay_sock.sendall(data)
                else:
                    data = relay_sock.recv(65536)
                    if not data:
                        return
                    os.write(master, data)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()

    async def main() -> None:
        reader, writer = await asyncio.open_connection(sock=srv_sock)
        server = asyncio.ensure_future(echo_store(reader, writer))
        try:
            async with asyncio.timeout(20):
                c = await xsclient.connect(slave_name)
                try:
                    await c.write("/dev/k", b"over the device")
                    assert await c.read("/dev/k") == b"over the device"
                    async with c.watch("/dev", "t") as w:
                        assert await w.get(timeout=5) == ("/dev", "t")
                finally:
                    await c.close()
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
            writer.close()

    try:
        asyncio.run(main())
    finally:
        stop.set()
        thread.join(5)
        os.close(master)
        os.close(slave)
        relay_sock.close()


def test_perm_parse_and_format() -> None:
    assert Perm.parse("b0") == Perm("b", 0) and str(Perm("r", 12)) == "r12"
    assert Perm.parse(b"n65535").domid == 65535
    assert Perm("b", 1).can_read and Perm("w", 1).can_write and not Perm("r", 1).can_write
    for bad in ("", "b", "x1", "b-1", "r65536", "b1a", "r٣"):
        with pytest.raises(xsclient.InvalidPermError):
            Perm.parse(bad)


class _NullTransport(asyncio.Transport):
    """Records writes (the client's requests) and whether the connection was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.written = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


_hostile_message = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda t, r, x, p: wire.encode(t, r, x, p),
        st.sampled_from([0, 1, 2, 3, 4, 6, 7, 11, 15, 16, 17, 22, 99, 0xFFFF]),
        st.integers(0, 6),
        st.integers(0, 3),
        st.binary(max_size=64) | st.sampled_from([b"OK\0", b"ENOENT\0", b"/p\0tok\0", b"7\0", b"T\0"]),
    ),
    st.builds(lambda n: wire.HEADER.pack(2, 1, 0, n), st.integers(4097, 2**32 - 1)),
)


def _frames(stream: bytes) -> list[tuple[int, int, bytes]]:
    """(type, req_id, payload) of every whole message in ``stream``, read header by header
    (independently of the client) up to the first length over 4096 or a cut message."""
    out, pos = [], 0
    while pos + 16 <= len(stream):
        mtype, rid, _tx, length = wire.HEADER.unpack_from(stream, pos)
        if length > 4096 or pos + 16 + length > len(stream):
            break
        out.append((mtype, rid, stream[pos + 16 : pos + 16 + length]))
        pos += 16 + length
    return out


def _check_outcome(kind: str, value: object, req: tuple[int, int], stream: bytes,
                   requests: list[tuple[int, int]]) -> None:
    """A request's outcome must be backed by what the server sent for its req_id."""
    rtype, rid = req
    frames = _frames(stream)
    if kind == "ok":
        ok_ids = {(rtype, rid)}
        if rtype == XsType.DIRECTORY:  # the E2BIG fallback asks again with DIRECTORY_PART
            ok_ids |= {r for r in requests if r[0] == XsType.DIRECTORY_PART}
        backing = [p for t, i, p in frames if (t, i) in ok_ids]
        assert backing, f"request {req} succeeded with {value!r} but no reply of its type and id came"
        if rtype == XsType.READ:
            assert value in backing, (value, backing)
    elif kind == "error":
        names = [p.split(b"\0", 1)[0].decode("ascii", "replace") for t, i, p in frames
                 if t == XsType.ERROR and i == rid]
        assert names, f"request {req} raised XenstoreError {value} but no ERROR reply had its id"
        assert value in names or value == "EINVAL", (value, names)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_hostile_message, max_size=12), st.lists(st.integers(1, 50), min_size=1, max_size=5))
def test_hostile_server_bytes_only_ever_give_peer_errors(chunks: list[bytes], cuts: list[int]) -> None:
    """Whatever a server sends, every request ends with a result or XenstoreError backed by
    a reply with its req_id (a read's result is that reply's payload), or a PeerError."""

    async def main() -> None:
        conn = xsclient._Connection()
        transport = _NullTransport()
        conn.connection_made(transport)
        c = xsclient.XenstoreClient(conn)
        w = c.watch("/p", "tok")
        conn.watches["tok"] = [w]
        w._registered = True
        futs = [
            asyncio.ensure_future(c.read("/a")),
            asyncio.ensure_future(c.directory("/d")),
            asyncio.ensure_future(c.is_domain_introduced(3)),
            asyncio.ensure_future(c.get_perms("/p")),
        ]
        for _ in range(20):  # let every request reach the transport
            await asyncio.sleep(0)
        first = [(t, i) for t, i, _p in _frames(bytes(transport.written))]
        assert [t for t, _i in first] == [XsType.READ, XsType.DIRECTORY, XsType.IS_DOMAIN_INTRODUCED,
                                          XsType.GET_PERMS]
        stream = b"".join(chunks)
        pos = i = 0
        while pos < len(stream):
            n = cuts[i % len(cuts)]
            conn.data_received(stream[pos : pos + n])
            pos += n
            i += 1
            await asyncio.sleep(0)
        conn.connection_lost(None)
        outcomes: list[tuple[str, object]] = []
        for f in futs:
            try:
                outcomes.append(("ok", await asyncio.wait_for(f, 5)))
            except XenstoreError as e:
                outcomes.append(("error", e.errno_name))
            except (PeerError, XenstoreConnectionError):
                outcomes.append(("failed", None))
        requests = [(t, i) for t, i, _p in _frames(bytes(transport.written))]
        for (kind, value), req in zip(outcomes, first, strict=True):
            _check_outcome(kind, value, req, stream, requests)
        assert transport.closed
        assert w.pending <= w.max_pending

    asyncio.run(main())


def test_req_id_wraps_around_skipping_zero_and_ids_in_use(tmp_path: Path) -> None:
    seen: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reqs = [await recv(reader) for _ in range(4)]
        seen.extend(r.req_id for r in reqs)
        for r in reqs:
            reply(writer, r, b"v")
        await reader.read()

    async def body(path: str) -> None:
        import itertools

        async with await xsclient.connect(path) as c:
            stuck = c.submit(XsType.READ, b"/stuck\0")  # takes id 1, still pending
            c._conn._ids = itertools.count(2**32 - 2)
            rest = [c.submit(XsType.READ, b"/k\0") for _ in range(3)]
            assert [await f for f in (stuck, *rest)] == [b"v"] * 4

    run(with_server(tmp_path, handler, body))
    assert seen == [1, 2**32 - 2, 2**32 - 1, 2]

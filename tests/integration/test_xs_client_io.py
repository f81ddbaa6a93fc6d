"""The asyncio xenstore client's I/O paths: the fd transport over a socket, requests made
while others are in flight leaving together, and request deadlines sharing one timer."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_xs_client import echo_store, run, with_server

from xenpv.errors import LocalError
from xenpv.xenstore import client as xsclient
from xenpv.xenstore import wire
from xenpv.xenstore.wire import XsType


def _drain(sock: socket.socket) -> list[wire.Message]:
    """Every whole message readable now on non-blocking ``sock``."""
    decoder = wire.Decoder()
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            break
        if not data:
            break
        decoder.feed(data)
    messages = list(decoder)
    assert decoder.buffered == 0, "a request was torn"
    return messages


def _paired_client() -> tuple[xsclient.XenstoreClient, socket.socket]:
    """A client on one end of a socket pair (fd transport); the other end, non-blocking."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    conn = xsclient._Connection()
    xsclient._FdTransport(asyncio.get_running_loop(), ours.detach(), conn)
    return xsclient.XenstoreClient(conn), theirs


def test_requests_made_while_one_is_in_flight_leave_together_on_the_next_pass() -> None:
    async def main() -> None:
        c, theirs = _paired_client()
        try:
            first = c.submit(XsType.READ, b"/a\0")
            assert [m.payload for m in _drain(theirs)] == [b"/a\0"]  # a lone request: at once
            rest = [c.submit(XsType.READ, f"/b{i}\0".encode()) for i in range(20)]
            assert _drain(theirs) == []  # gathered while /a is in flight ...
            await asyncio.sleep(0)
            sent = _drain(theirs)  # ... and written on the loop's next pass, in order
            assert [m.payload for m in sent] == [f"/b{i}\0".encode() for i in range(20)]
            for m in sent[::-1]:  # answers in any order still find their requests
                theirs.send(wire.encode(XsType.READ, m.req_id, 0, m.payload[1:-1]))
            theirs.send(wire.encode(XsType.READ, 1, 0, b"A"))
            async with asyncio.timeout(10):
                assert await first == b"A"
                assert await asyncio.gather(*rest) == [f"b{i}".encode() for i in range(20)]
        finally:
            await c.close()
            theirs.close()

    run(main())


def test_a_connection_closed_before_its_gathered_requests_leave_fails_them() -> None:
    async def main() -> None:
        c, theirs = _paired_client()
        try:
            futs = [c.submit(XsType.READ, b"/a\0") for _ in range(3)]
            await c.close()
            for f in futs:
                with pytest.raises(xsclient.XenstoreConnectionError):
                    await f
            assert len(_drain(theirs)) == 1  # only the first one ever left
        finally:
            theirs.close()

    run(main())


def test_deadlines_of_mixed_timeouts_expire_in_their_own_time(tmp_path: Path) -> None:
    async def silent_on_slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            header = await reader.readexactly(wire.HEADER_SIZE)
            t, r, x, n = wire.HEADER.unpack(header)
            payload = await reader.readexactly(n)
            if not payload.startswith(b"/slow"):
                writer.write(wire.encode(t, r, x, b"fast"))

    async def body(path: str) -> None:
        async with await xsclient.connect(path) as c:
            long_slow = asyncio.ensure_future(c.read("/slow/long", timeout=0.6))
            short_slow = asyncio.ensure_future(c.read("/slow/short", timeout=0.1))
            fast = asyncio.ensure_future(c.read("/fast", timeout=5))
            assert await fast == b"fast"
            with pytest.raises(TimeoutError):
                await short_slow
            assert not long_slow.done()  # the earlier deadline did not take it along
            with pytest.raises(TimeoutError):
                await long_slow
            assert await c.read("/fast", timeout=5) == b"fast"

    run(with_server(tmp_path, silent_on_slow, body))


def test_answered_requests_do_not_pile_up_in_the_deadline_heap(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        async with await xsclient.connect(path, timeout=30) as c:
            await c.write("/k", b"v")
            for _ in range(500):
                assert await c.read("/k") == b"v"
            assert len(c._conn._deadlines) <= 2 + xsclient._DEADLINE_SLACK + 1  # not 500

    run(with_server(tmp_path, echo_store, body))


def test_encoded_path_cache_keeps_validation(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        async with await xsclient.connect(path, timeout=10) as c:
            await c.write("/k", b"v")
            for _ in range(3):
                assert await c.read("/k") == b"v"
                with pytest.raises(LocalError):
                    await c.read("/k//bad")  # never cached, refused every time
                with pytest.raises(LocalError):
                    await c.read("@releaseDomain")  # special names only where allowed

    run(with_server(tmp_path, echo_store, body))


def test_connect_waits_while_the_servers_backlog_is_full(tmp_path: Path) -> None:
    # C xenstored listens with a backlog of 1: a connect beyond it fails with EAGAIN and
    # leaves the socket unconnected (reading it then fails with EINVAL)
    path = str(tmp_path / "full.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(0)
    fillers: list[socket.socket] = []
    try:
        while True:  # fill the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)

        async def main() -> bytes:
            task = asyncio.ensure_future(xsclient.connect(path))
            await asyncio.sleep(0.05)
            assert not task.done()  # still waiting for room
            for _ in fillers:
                lsock.accept()[0].close()  # (blocking: they are queued)
            lsock.setblocking(False)
            while True:  # the client's connection, once there was room for it
                try:
                    conn, _ = lsock.accept()
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            client = await task
            try:
                reply = asyncio.ensure_future(client.read("/x"))
                loop = asyncio.get_running_loop()
                conn.setblocking(False)
                req = await asyncio.wait_for(loop.sock_recv(conn, 4096), 10)
                _t, req_id, _tx, _n = wire.HEADER.unpack_from(req)
                await loop.sock_sendall(conn, wire.encode(XsType.READ, req_id, 0, b"value"))
                return await asyncio.wait_for(reply, 10)
            finally:
                await client.close()
                conn.close()

        assert asyncio.run(main()) == b"value"
    finally:
        for s in fillers:
            s.close()
        lsock.close()

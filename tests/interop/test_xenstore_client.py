"""Our asyncio client against our embedded xenstored (a separate process)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from xenpv.errors import LocalError
from xenpv.xenstore import client as xsclient
from xenpv.xenstore.client import Perm, Transaction, XenstoreClient
from xenpv.xenstore.wire import XenstoreError, XsType

TIMEOUT = 60


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(TIMEOUT):
            await body()

    asyncio.run(main())


async def dom0(server: Any) -> XenstoreClient:
    return await xsclient.connect(server.socket, timeout=TIMEOUT)


def test_node_operations(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c:
            await c.write("/a/b/c", b"value\x00with nul")
            assert await c.read("/a/b/c") == b"value\x00with nul"
            assert await c.read("/a/b") == b""  # implicit parent
            await c.mkdir("/a/m")
            await c.mkdir("/a/b/c")  # existing: value untouched
            assert await c.read("/a/b/c") == b"value\x00with nul"
            assert sorted(await c.directory("/a")) == ["b", "m"]
            assert await c.directory("/a/m") == []
            assert await c.exists("/a/m") and not await c.exists("/a/zz")
            await c.rm("/a/b")
            assert not await c.exists("/a/b/c")
            await c.rm("/a/absent")  # absent, parent exists: OK
            with pytest.raises(XenstoreError) as info:
                await c.rm("/a/no/such")
            assert info.value.errno_name == "ENOENT"
            with pytest.raises(XenstoreError):
                await c.read("/a/b")
            await c.write("/a/str", "text")
            assert await c.read("/a/str") == b"text"
            with pytest.raises(LocalError):
                await c.write("/a/too-big", b"x" * 4096)

    run(body)


def test_permissions(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c:
            await c.write("/p/node", b"1")
            assert (await c.get_perms("/p/node"))[0].domid == 0
            await c.set_perms("/p/node", [Perm("n", 5), Perm("r", 7), "w9"])
            assert await c.get_perms("/p/node") == [Perm("n", 5), Perm("r", 7), Perm("w", 9)]
            await c.write("/p/node/child", b"")
            assert await c.get_perms("/p/node/child") == await c.get_perms("/p/node")
            assert len(await c.get_perms("@releaseDomain")) >= 1
            with pytest.raises(XenstoreError):
                await c.set_perms("/p/missing", [Perm("b", 0)])

    run(body)


def test_pipelined_requests(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c:
            await asyncio.gather(*(c.write(f"/pipe/k{i}", str(i)) for i in range(200)))
            values = await asyncio.gather(*(c.read(f"/pipe/k{i}") for i in range(200)))
            assert values == [str(i).encode() for i in range(200)]
            futs = [c.submit(XsType.READ, b"/pipe/k%d\0" % i) for i in range(64)]
            assert [await f for f in futs] == [str(i).encode() for i in range(64)]

    run(body)


def test_directory_part_for_big_directory(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c:
            names = [f"a-rather-long-child-name-{i:04d}" for i in range(300)]
            await asyncio.gather(*(c.write(f"/big/{n}", "") for n in names))
            with pytest.raises(XenstoreError) as info:
                await c.request(XsType.DIRECTORY, b"/big\0")
            assert info.value.errno_name == "E2BIG"
            assert await c.directory("/big") == names

    run(body)


def test_transactions_isolation_commit_abort(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c, await dom0(xs_server) as other:
            await c.write("/tx/v", b"0")
            async with c.transaction() as t:
                await t.write("/tx/v", b"1")
                await t.write("/tx/new", b"n")
                assert await t.read("/tx/v") == b"1"
                assert await other.read("/tx/v") == b"0"
                assert not await other.exists("/tx/new")
            assert await other.read("/tx/v") == b"1"
            with pytest.raises(RuntimeError):
                async with c.transaction() as t:
                    await t.rm("/tx/new")
                    raise RuntimeError
            assert await other.read("/tx/new") == b"n"

    run(body)


def test_transaction_conflict_gives_eagain(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c, await dom0(xs_server) as other:
            await c.write("/cf/v", b"0")
            with pytest.raises(XenstoreError) as info:
                async with c.transaction() as t:
                    seen = await t.read("/cf/v")
                    await other.write("/cf/v", b"other")
                    await t.write("/cf/v", seen + b"+1")
            assert info.value.errno_name == "EAGAIN"
            assert await c.read("/cf/v") == b"other"

    run(body)


def test_transact_retries_real_conflicts(xs_server: Any) -> None:
    """Concurrent read-modify-write increments: EAGAIN retries make none get lost."""
    workers, rounds = 4, 10

    async def body() -> None:
        clients = [await dom0(xs_server) for _ in range(workers)]
        attempts = 0
        # Every worker's first transaction reads before any of them writes, so at least
        # workers - 1 of those commits must conflict (not left to the scheduler's timing).
        all_read = asyncio.Barrier(workers)
        try:
            await clients[0].write("/counter", b"0")

            def incr_for(first: list[bool]) -> Callable[[Transaction], Awaitable[None]]:
                async def incr(t: Transaction) -> None:
                    nonlocal attempts
                    attempts += 1
                    value = int(await t.read("/counter"))
                    if first:
                        first.clear()
                        await all_read.wait()
                    else:
                        await asyncio.sleep(0)  # let the others read the same value
                    await t.write("/counter", str(value + 1))

                return incr

            async def worker(c: XenstoreClient) -> None:
                incr = incr_for([True])
                for _ in range(rounds):
                    await c.transact(incr, retries=1000)

            await asyncio.gather(*(worker(c) for c in clients))
            assert await clients[0].read("/counter") == str(workers * rounds).encode()
            assert attempts >= workers * rounds + workers - 1  # the first commits hit EAGAIN
        finally:
            for c in clients:
                await c.close()

    run(body)


def test_watches_initial_event_changes_and_unwatch(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c, await dom0(xs_server) as other:
            async with c.watch("/w", "tok") as w:
                assert await w.get(timeout=10) == ("/w", "tok")
                await other.write("/w/a", b"1")
                assert await w.get(timeout=10) == ("/w/a", "tok")
                async with other.transaction() as t:
                    await t.write("/w/b", b"2")
                    await asyncio.sleep(0.05)
                    assert w.pending == 0  # nothing before commit
                assert await w.get(timeout=10) == ("/w/b", "tok")
                await other.rm("/w")
                assert await w.get(timeout=10) == ("/w", "tok")
            await other.write("/w/c", b"3")
            async with c.watch("/w/c") as w2:
                assert (await w2.get(timeout=10)).path == "/w/c"
                with pytest.raises(TimeoutError):
                    await w2.get(timeout=0.2)
            with pytest.raises(XenstoreError) as info:
                async with c.watch("/dup", "same"), c.watch("/dup", "same"):
                    pass
            assert info.value.errno_name == "EEXIST"

    run(body)


def test_guest_relative_paths_and_watch(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c:
            await c.write("/local/domain/5/name", b"guest")
            await c.set_perms("/local/domain/5", [Perm("n", 5)])
            await c.set_perms("/local/domain/5/name", [Perm("n", 5)])
            async with await xsclient.connect(xs_server.guest_socket, timeout=TIMEOUT) as g:
                assert await g.read("name") == b"guest"
                assert await g.get_domain_path(5) == "/local/domain/5"
                async with g.watch("device", "rel") as w:
                    assert await w.get(timeout=10) == ("device", "rel")
                    await c.write("/local/domain/5/device/vif/0/state", b"1")
                    ev = await w.get(timeout=10)
                    assert ev.token == "rel" and ev.path.startswith("device")
                with pytest.raises(XenstoreError) as info:
                    await g.read("/local/domain/0/secret-absent-or-denied")
                assert info.value.errno_name in ("EACCES", "ENOENT")
                with pytest.raises(XenstoreError):
                    await g.introduce(9, 1, 1)

    run(body)


def test_domain_requests_and_special_watches(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c:
            assert await c.get_domain_path(7) == "/local/domain/7"
            assert await c.is_domain_introduced(0)
            async with c.watch("@introduceDomain") as intro, c.watch("@releaseDomain") as rel:
                assert (await intro.get(timeout=10)).path == "@introduceDomain"
                assert (await rel.get(timeout=10)).path == "@releaseDomain"
                await c.introduce(7, 0x1234, 3)
                assert await c.is_domain_introduced(7)
                assert (await intro.get(timeout=10)).path == "@introduceDomain"
                await c.introduce(8, 0x1235, 4)
                await c.set_target(8, 7)
                await c.resume(7)
                await c.release(7)
                assert (await rel.get(timeout=10)).path == "@releaseDomain"
                assert not await c.is_domain_introduced(7)

    run(body)


def test_control_and_reset_watches(xs_server: Any) -> None:
    async def body() -> None:
        async with await dom0(xs_server) as c:
            assert b"help" in await c.control("help")
            w = await c.watch("/rw", "t").register()
            assert await w.get(timeout=10) == ("/rw", "t")
            await c.reset_watches()
            await c.write("/rw/x", b"1")
            async for _ in w:
                raise AssertionError("no events after RESET_WATCHES")
            async with c.watch("/rw", "t") as again:  # the old registration is gone
                assert await again.get(timeout=10) == ("/rw", "t")

    run(body)


def test_server_exit_fails_requests_and_watches(xs_server: Any) -> None:
    async def body() -> None:
        c = await dom0(xs_server)
        try:
            w = await c.watch("/x").register()
            await w.get(timeout=10)
            xs_server.proc.terminate()
            with pytest.raises(xsclient.XenstoreConnectionError):
                await w.get(timeout=20)
            with pytest.raises(xsclient.XenstoreConnectionError):
                await c.read("/x")
            assert not c.connected
        finally:
            await c.close()

    run(body)


def test_blocking_client(xs_server: Any) -> None:
    with xsclient.BlockingClient(xs_server.socket, timeout=TIMEOUT) as c, \
            xsclient.BlockingClient(xs_server.socket, timeout=TIMEOUT) as other:
        c.write("/blk/a", "1")
        c.mkdir("/blk/d")
        assert c.read("/blk/a") == b"1" and c.exists("/blk/d")
        assert sorted(c.directory("/blk")) == ["a", "d"]
        c.set_perms("/blk/a", ["b0", "r3"])
        assert [str(p) for p in c.get_perms("/blk/a")] == ["b0", "r3"]
        assert c.get_domain_path(4) == "/local/domain/4"
        calls = 0

        def incr(t: xsclient.BlockingTransaction) -> int:
            nonlocal calls
            calls += 1
            value = int(t.read("/blk/a")) + 1
            if calls == 1:
                other.write("/blk/a", "10")  # conflict: the first attempt must retry
            t.write("/blk/a", str(value))
            return value

        assert c.transact(incr) == 11 and calls == 2
        assert other.read("/blk/a") == b"11"
        with pytest.raises(ZeroDivisionError):
            c.transact(lambda t: (t.rm("/blk/a"), 1 / 0))
        assert c.exists("/blk/a")
        c.rm("/blk")
        assert not c.exists("/blk")


def test_one_token_watching_two_paths_routes_each_event(xs_server: Any) -> None:
    async def body() -> None:
        c = await dom0(xs_server)
        try:
            async with c.watch("/ra", "shared") as wa, c.watch("/rb", "shared") as wb:
                assert (await wa.get(timeout=10)).path == "/ra"
                assert (await wb.get(timeout=10)).path == "/rb"
                await c.write("/ra/x", "1")
                await c.write("/rb/y", "1")
                assert (await wa.get(timeout=10)).path == "/ra/x"
                assert (await wb.get(timeout=10)).path == "/rb/y"
                await c.read("/ra/x")  # every event has arrived by this reply
                assert wa.pending == 0 and wb.pending == 0
                await wa.unregister(timeout=5)
                await c.write("/rb/z", "1")
                assert (await wb.get(timeout=10)).path == "/rb/z"
        finally:
            await c.close()

    run(body)


def test_cancelled_requests_do_not_pile_up(tmp_path: Any) -> None:
    """Callers that give up on requests a silent server never answers (cancelled, no
    timeout) leave no growing request table behind."""
    import socket

    path = str(tmp_path / "silent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    async def body() -> None:
        c = await xsclient.connect(path)
        conn, _ = listener.accept()
        try:
            for _ in range(10):
                tasks = [asyncio.ensure_future(c.read("/k")) for _ in range(200)]
                await asyncio.sleep(0)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            last = c.submit(XsType.READ, b"/k\0")  # the next request sweeps the cancelled
            assert len(c._conn._pending) <= 256
            last.cancel()
        finally:
            await c.close()
            conn.close()

    try:
        run(body)
    finally:
        listener.close()

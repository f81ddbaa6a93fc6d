"""Xenstore over the domain's ring: the guest client, the embedded xenstored's ring
connections and the emulator's domain builder, in process and across processes.

The client-operation test runs the same body over the domain's socket and over its ring,
so every operation (watches and transactions included) is checked on both transports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.xenstore.client import Perm, XenstoreClient
from xenpv.xenstore.page import (
    FEATURE_ERROR,
    FEATURE_RECONNECTION,
    XS_CONNECTED,
    XsRingPage,
)
from xenpv.xenstore.wire import XenstoreError

TIMEOUT = 30


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(TIMEOUT):
            await body()

    asyncio.run(main())


@pytest.fixture(scope="module")
def emu() -> Iterator[InProcessEmulator]:
    with InProcessEmulator([1, 2]) as e:
        yield e


async def guest(emu: InProcessEmulator, domid: int, transport: str) -> XenstoreClient:
    platform = emu.platform(domid)
    if transport == "ring":
        return await platform.xenstore_over_ring(timeout=TIMEOUT)
    return await platform.xenstore()


@pytest.mark.parametrize("transport", ["socket", "ring"])
def test_every_client_operation(emu: InProcessEmulator, transport: str) -> None:
    dom0 = emu.xenstore(0)
    home = "/local/domain/1/data"

    async def body() -> None:
        async with await guest(emu, 1, transport) as g:
            assert await g.read("domid") == b"1"
            assert await g.get_domain_path(1) == "/local/domain/1"
            # values larger than the 1024-byte ring cross it in several fills
            big = bytes(range(256)) * 7 + b"end"  # 1795 bytes (node-size quota 2048)
            await g.write(f"data/{transport}/big", big)
            assert await g.read(f"{home}/{transport}/big") == big
            assert dom0.read(f"{home}/{transport}/big") == big
            await g.mkdir(f"data/{transport}/dir")
            assert await g.exists(f"data/{transport}/dir")
            assert not await g.exists(f"data/{transport}/nope")
            # many requests in flight: far more bytes than the ring holds at once
            keys = [f"data/{transport}/a-fairly-long-key-name-number-{i:03d}" for i in range(160)]
            await asyncio.gather(*(g.write(k, k) for k in keys))
            values = await asyncio.gather(*(g.read(k) for k in keys))
            assert values == [k.encode() for k in keys]
            # a directory too big for one reply: E2BIG, then DIRECTORY_PART
            names = await g.directory(f"data/{transport}")
            assert len(names) == 162 and "big" in names
            await g.rm(f"data/{transport}/dir")
            assert not await g.exists(f"data/{transport}/dir")
            # permissions act as the domain
            assert await g.get_perms(f"data/{transport}/big") == [Perm("n", 1)]
            await g.set_perms(f"data/{transport}/big", [Perm("n", 1), Perm("r", 2)])
            assert dom0.get_perms(f"{home}/{transport}/big") == [Perm("n", 1), Perm("r", 2)]
            with pytest.raises(XenstoreError) as info:
                await g.write("/local/domain/2/data/x", b"1")
            assert info.value.errno_name == "EACCES"
            with pytest.raises(XenstoreError) as info:
                await g.set_perms(f"data/{transport}/big", [Perm("n", 2)])
            assert info.value.errno_name == "EACCES"  # only dom0 changes owners
            with pytest.raises(LocalError):
                await g.write("data/x", b"x" * 4096)
            # watches: the initial event, a change by dom0, relative paths, unwatch
            async with g.watch(f"data/{transport}/w", "tok") as w:
                assert await w.get(timeout=TIMEOUT) == (f"data/{transport}/w", "tok")
                dom0.write(f"{home}/{transport}/w/a", "1")
                assert await w.get(timeout=TIMEOUT) == (f"data/{transport}/w/a", "tok")
            # transactions: commit, abort, conflict, transact's retry
            async with g.transaction() as t:
                await t.write(f"data/{transport}/t1", "a")
                assert await t.read(f"data/{transport}/t1") == b"a"
                assert not dom0.exists(f"{home}/{transport}/t1")
            assert dom0.read(f"{home}/{transport}/t1") == b"a"
            t = await g.transaction().start()
            await t.write(f"data/{transport}/t2", "b")
            await t.abort()
            assert not await g.exists(f"data/{transport}/t2")
            t = await g.transaction().start()
            await t.read(f"data/{transport}/t1")
            dom0.write(f"{home}/{transport}/t1", "other")
            await t.write(f"data/{transport}/t1", "mine")
            with pytest.raises(XenstoreError) as info:
                await t.commit()
            assert info.value.errno_name == "EAGAIN"
            tries = 0

            async def bump(tx: Any) -> None:
                nonlocal tries
                tries += 1
                value = int(await tx.read(f"data/{transport}/n") or b"0")
                if tries == 1:
                    dom0.write(f"{home}/{transport}/n", "10")
                await tx.write(f"data/{transport}/n", str(value + 1))

            await g.write(f"data/{transport}/n", "0")
            await g.transact(bump)
            assert tries == 2 and dom0.read(f"{home}/{transport}/n") == b"11"
            # RESET_WATCHES drops every watch of this connection
            w2 = await g.watch(f"data/{transport}/r", "r").register()
            assert await w2.get(timeout=TIMEOUT) == (f"data/{transport}/r", "r")
            await g.reset_watches()
            assert emu.xenstored.watch_count(1) == 0
            with pytest.raises(XenstoreError):
                await g.introduce(9, 1, 1)  # dom0 only

    run(body)


@pytest.mark.parametrize("transport", ["socket", "ring"])
def test_blocking_client_operations(emu: InProcessEmulator, transport: str) -> None:
    """The blocking client's operations, watch events and transactions on both."""
    dom0 = emu.xenstore(0)
    platform = emu.platform(2)
    base = f"data/b-{transport}"
    home = f"/local/domain/2/{base}"
    if transport == "ring":
        g = platform.blocking_xenstore_over_ring(timeout=TIMEOUT)
    else:
        g = emu.xenstore(2, timeout=TIMEOUT)
    with g:
        assert g.read("domid") == b"2"
        big = b"x" * 1500 + b"y" * 400
        g.write(f"{base}/big", big)
        assert dom0.read(f"{home}/big") == big
        for i in range(140):
            g.write(f"{base}/d/a-rather-long-child-node-name-{i:03d}", str(i))
        assert len(g.directory(f"{base}/d")) == 140  # past 4096 bytes: DIRECTORY_PART
        assert g.get_perms(f"{base}/big") == [Perm("n", 2)]
        with pytest.raises(XenstoreError) as info:
            g.write("/local/domain/1/data/x", "1")
        assert info.value.errno_name == "EACCES"
        token = g.watch(f"{base}/w")
        assert g.read_watch(timeout=TIMEOUT).path == f"{base}/w"
        dom0.write(f"{home}/w/x", "1")
        assert g.read_watch(timeout=TIMEOUT).path == f"{base}/w/x"
        g.unwatch(f"{base}/w", token)
        with g.transaction() as t:
            t.write(f"{base}/t", t.read(f"{base}/big")[:3])
        assert dom0.read(f"{home}/t") == b"xxx"
        g.rm(f"{base}/d")
        assert not g.exists(f"{base}/d")
        with pytest.raises(TimeoutError):
            g.read_watch(timeout=0.05)
        if transport == "ring":
            # one signal per request each way (Linux's rule: the guest signals after
            # consuming only a full ring), not two
            served = emu.xenstored.rings.rings[2]
            before = served.stats["events"], served.stats["notifies"]
            for _ in range(50):
                g.read("domid")
            assert served.stats["events"] - before[0] <= 50
            assert served.stats["notifies"] - before[1] <= 50


def test_ring_page_reconnect_and_release(emu: InProcessEmulator) -> None:
    """The builder's page at ref 1, the features, the reconnection protocol dropping a
    predecessor's watches and transactions, and release on destroy."""
    emu.create_domain(3)
    dom0 = emu.xenstore(0)
    p3 = emu.platform(3)

    async def body() -> None:
        g = await p3.xenstore_over_ring(timeout=TIMEOUT)
        page = XsRingPage(g._conn.transport.page.mem, server=False)  # type: ignore[union-attr]
        assert page.features & (FEATURE_RECONNECTION | FEATURE_ERROR) == 3
        assert page.connection == XS_CONNECTED and page.error == 0
        page.release()
        with pytest.raises(PlatformError) as busy:
            emu.platform(3).xenstore_ring()  # one taker at a time
        assert busy.value.errno == 16  # EBUSY
        w = await g.watch("data", "t").register()
        assert await w.get(timeout=TIMEOUT) == ("data", "t")
        await g.transaction().start()
        assert emu.xenstored.watch_count(3) == 1
        assert emu.xenstored.transaction_count(3) == 1
        # the process dies without a word; the next one reconnects: nothing of the old
        # connection is left, and the port went back to the domain in between
        transport = g._conn.transport
        assert transport is not None
        transport.close()
        g2 = await p3.xenstore_over_ring(timeout=TIMEOUT)
        assert emu.xenstored.watch_count(3) == 0
        assert emu.xenstored.transaction_count(3) == 0
        assert await g2.read("name") == b"dom3"
        assert emu.xenstored.rings.rings[3].stats["reconnects"] >= 2
        # INTRODUCE again with the same page re-creates the event channel (the same
        # port here); another page is refused
        gfn, port = emu.hv.xenstore_rings[3].gfn, emu.hv.xenstore_rings[3].port
        await asyncio.to_thread(dom0.introduce, 3, gfn, port)
        assert await g2.read("name") == b"dom3"
        with pytest.raises(XenstoreError) as info:
            await asyncio.to_thread(dom0.introduce, 3, gfn + 1, port)
        assert info.value.errno_name == "EINVAL"
        await g2.close()

    run(body)
    token = dom0.watch("@releaseDomain")
    assert dom0.read_watch(timeout=TIMEOUT).path == "@releaseDomain"  # the initial event
    emu.destroy_domain(3)
    assert dom0.read_watch(timeout=TIMEOUT).path == "@releaseDomain"
    dom0.unwatch("@releaseDomain", token)
    assert 3 not in emu.xenstored.rings.rings  # port unbound, page unmapped
    emu.assert_released()


def test_ring_across_processes(tmp_path: Any) -> None:
    """A guest process of the daemon (``xenpv loopback up``) takes its ring over through
    the control socket (``XS_RING``) and is served over it; a second process after it."""
    machine = DaemonMachine(rundir=str(tmp_path / "run"))
    try:
        machine.create_domain(1, "guest")
        dom0 = ClientPlatform.for_domain(machine.rundir, 0)

        async def body() -> None:
            async with await dom0.xenstore() as x0:
                for _ in range(2):
                    guest1 = ClientPlatform.for_domain(machine.rundir, 1)
                    try:
                        async with await guest1.xenstore_over_ring(timeout=TIMEOUT) as g:
                            assert await g.read("name") == b"guest"
                            async with g.watch("data/w", "t") as w:
                                assert await w.get(timeout=TIMEOUT) == ("data/w", "t")
                                await x0.write("/local/domain/1/data/w/x", "1")
                                assert await w.get(timeout=TIMEOUT) == ("data/w/x", "t")
                            async with g.transaction() as t:
                                await t.write("data/tx", "1")
                            assert await x0.read("/local/domain/1/data/tx") == b"1"
                    finally:
                        guest1.close()

        run(body)
        dom0.close()
        machine.destroy_domain(1)
        machine.assert_released()
    finally:
        machine.release()


def test_up_refuses_a_xenstored_it_does_not_have(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``loopback up --xenstored NAME`` without an implementation of NAME: one line, exit
    1, nothing created; ``ours`` is the embedded server (xsd.choose gives None)."""
    from xenpv.cli import main
    from xenpv.platforms.loopback import xsd

    monkeypatch.setattr(xsd, "XENSTOREDS", {})
    rundir = tmp_path / "run"
    assert main(["loopback", "up", "--rundir", str(rundir), "--xenstored", "oxenstored"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "oxenstored" in err[0] and "not available" in err[0], err
    assert not rundir.exists()
    assert xsd.choose("ours") is None
    with pytest.raises(LocalError):
        xsd.choose("nonesuch")


def test_daemon_drives_another_dom0_xenstored_through_the_interface(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--xenstored NAME`` with a registered implementation: the daemon starts no
    embedded server, writes homes through the implementation's dom0 socket, introduces
    each domain with the builder's ring, releases it after a destroy, closes it."""
    from xenpv.platforms.loopback import xsd
    from xenpv.platforms.loopback.daemon import LoopbackDaemon
    from xenpv.xenstore.server import XenstoredServer

    calls: list[tuple[Any, ...]] = []

    class Recording:
        """A dom0 xenstored: our server on a socket, recording what it is asked."""

        def __init__(self) -> None:
            self.server = XenstoredServer()
            self.sock = str(tmp_path / "other.sock")

        async def start(self, rundir: Any) -> None:
            calls.append(("start", str(rundir)))
            await self.server.listen(self.sock)

        def socket_path(self, domid: int) -> str | None:
            return self.sock if domid == 0 else None

        async def introduce(self, domid: int, gfn: int, port: int) -> None:
            calls.append(("introduce", domid, gfn, port))

        async def release(self, domid: int) -> None:
            calls.append(("release", domid))

        async def close(self) -> None:
            calls.append(("close",))
            await self.server.close(save=False)

    monkeypatch.setitem(xsd.XENSTOREDS, "xen-c", Recording)

    async def body() -> None:
        daemon = LoopbackDaemon(tmp_path / "run", xenstored="xen-c")
        try:
            await daemon.start({3: "three"})
            assert daemon.xenstored is None and isinstance(daemon.external_xenstored, Recording)
            ring = daemon.hv.xenstore_rings[3]
            assert calls[1] == ("introduce", 3, ring.gfn, ring.port)
            home = daemon.external_xenstored.server.store.nodes
            assert home["/local/domain/3/name"].value == b"three"
            await daemon.destroy_domain(3)
            assert calls[-1] == ("release", 3)
            assert "/local/domain/3" not in home
        finally:
            await daemon.close()
        assert calls[0][0] == "start" and calls[-1] == ("close",)

    run(body)

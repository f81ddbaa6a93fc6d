"""``InProcessEmulator``: a whole emulated machine in this process (hypervisor, xenstored on
its own thread, domain homes), as the user guide (docs/python-api.md) describes it."""

from __future__ import annotations

import asyncio
import os

import pytest

from xenpv.errors import LocalError
from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.vchan import VchanClient, VchanServer
from xenpv.xenstore.wire import XenstoreError


def test_a_number_gives_domains_one_to_n_with_the_toolstack_homes() -> None:
    with InProcessEmulator(2, names={2: "guest"}) as emu:
        assert emu.domids == [0, 1, 2]
        xs0 = emu.xenstore(0)
        assert xs0.read("/local/domain/2/name") == b"guest"
        assert xs0.read("/local/domain/1/name") == b"dom1"
        xs2 = emu.xenstore(2)
        assert xs2.read("domid") == b"2"  # relative to its home
        xs2.write("data/x", "1")  # its own data directory
        for forbidden in ("/local/domain/2/device/x", "/local/domain/2/name",
                          "/local/domain/1/data/x"):
            with pytest.raises(XenstoreError) as err:
                xs2.write(forbidden, "1")
            assert err.value.errno_name == "EACCES"


def test_blocking_vchan_works_from_the_calling_thread_and_releases_everything() -> None:
    # the blocking calls wait for a helper thread's xenstore requests: the xenstored must
    # not run on the caller's thread
    with InProcessEmulator(domains=[1, 2]) as emu:
        path = "/local/domain/1/data/vchan/2/t"
        server = VchanServer(emu.platform(1), 2, path)
        client = VchanClient(emu.platform(2), 1, path)
        client.send(b"ping")
        assert server.recv_exactly(4, timeout=5) == b"ping"
        server.send(b"pong")
        assert client.recv_exactly(4, timeout=5) == b"pong"
        client.close()
        server.close(linger=5)
        emu.assert_released()


def test_asyncio_code_in_the_calling_thread_reaches_the_xenstore() -> None:
    async def body(emu: InProcessEmulator) -> bytes:
        xs = await emu.platform(1).xenstore()
        try:
            value: bytes = await xs.read("name")
            return value
        finally:
            await xs.close()

    with InProcessEmulator(1) as emu:
        assert asyncio.run(body(emu)) == b"dom1"


def test_domains_come_and_go_with_their_watches_and_homes() -> None:
    with InProcessEmulator(1) as emu:
        xs = emu.xenstore(0)
        xs.watch("@introduceDomain", "in")
        xs.watch("@releaseDomain", "out")
        first = {xs.read_watch(timeout=5).token for _ in range(2)}  # the initial events
        assert first == {"in", "out"}
        emu.create_domain(5, "late")
        assert xs.read_watch(timeout=5).token == "in"
        assert xs.read("/local/domain/5/name") == b"late"
        late = emu.platform(5)
        late.grants.grant(0, 1)  # held when the domain dies: released with it
        emu.destroy_domain(5)
        assert xs.read_watch(timeout=5).token == "out"
        assert not xs.exists("/local/domain/5")
        assert emu.domids == [0, 1]
        emu.assert_released()
        with pytest.raises(LocalError):
            emu.platform(5)
        with pytest.raises(LocalError):
            emu.destroy_domain(0)


def test_close_is_idempotent_and_removes_its_directory() -> None:
    emu = InProcessEmulator(1)
    rundir = emu.rundir
    assert os.path.exists(emu.xenstore_path(1))
    emu.platform(1)
    emu.close()
    emu.close()
    assert not os.path.exists(rundir)

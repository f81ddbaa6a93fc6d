"""Xenbus drivers, watchers and the toolstack helper against the embedded xenstored.

Every test runs a real :class:`~xenpv.xenstore.server.XenstoredServer` on temporary Unix
sockets, with one connection per domain (dom0 as the toolstack, domain 3 the frontend,
domain 2 the backend), and a toy device pair whose ring page and event channel are real
grants and ports of the in-process loopback emulator.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_xenbus_support import (
    BE,
    DEVTYPE,
    FE,
    S,
    ToyBackend,
    ToyFrontend,
    World,
    both,
    eventually,
    run,
    toy_pair,
    xenstore_world,
)

from xenpv.errors import LocalError
from xenpv.xenbus import (
    BackendWatcher,
    DeviceConfigError,
    FrontendWatcher,
    add_device,
    list_devices,
    remove_device,
)
from xenpv.xenbus.toolstack import DeviceExistsError, NoSuchDeviceError
from xenpv.xenstore.client import Perm
from xenpv.xenstore.wire import XenstoreError


def held(world: World) -> dict[str, int]:
    """Grants, mappings and ports still held in the emulator."""
    out = world.machine.outstanding()
    return {k: out[k] for k in ("grants", "mappings", "ports")}


NOTHING = {"grants": 0, "mappings": 0, "ports": 0}


async def connected_pair(world: World, **kw: object) -> tuple[ToyFrontend, ToyBackend, str, str]:
    fp, bp = await world.add()
    fe, be = toy_pair(world, fp, bp, **kw)
    await be.start()
    await fe.start()
    await both(fe.wait_state(S.Connected), be.wait_state(S.Connected))
    return fe, be, fp, bp


def test_connect_exchange_close_reconnect_remove() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            fe, be, fp, bp = await connected_pair(w)
            assert await w.read(f"{fp}/state") == b"4" and await w.read(f"{bp}/state") == b"4"
            assert fe.backend_features == {"feature-toy": True}
            # the connection is real: bytes through the granted page, an event on the port
            fe.pages.mem[0:5] = b"hello"
            assert bytes(be.mapping.mem[0:5]) == b"hello"
            fe.platform.events.notify(fe.port)
            assert await be.platform.events.wait(5) == be.port
            # frontend-initiated close (§5.4): both Closed, everything released
            await fe.close()
            assert fe.done and fe.state is S.Closed
            await be.wait_state(S.Closed)
            assert await w.read(f"{fp}/state") == b"6" and await w.read(f"{bp}/state") == b"6"
            assert held(w) == NOTHING
            assert not be.done  # online: the backend waits for a reconnect
            # a new frontend instance finds its device Closed and re-initialises it
            fe2 = ToyFrontend(w.fe, fp, fe.platform)
            await fe2.start()
            await both(fe2.wait_state(S.Connected), be.wait_state(S.Connected))
            assert be.connects == 2
            # reconnect of a live driver: closes, waits for the backend, connects again
            await fe2.reconnect()
            await eventually(lambda: be.connects == 3 and fe2.state is S.Connected)
            assert held(w)["mappings"] == 1
            # toolstack removal: online=0 + state=5, backend Closed, directories deleted
            assert await remove_device(w.dom0, DEVTYPE, FE, 0, BE, timeout=10) is True
            await both(be.wait_done(), fe2.wait_done())
            assert not await w.dom0.exists(fp) and not await w.dom0.exists(bp)
            # the frontend may have ended its grant while the backend still mapped it
            fe2.retry_quarantine()
            assert fe2.quarantine == []
            assert held(w) == NOTHING
            await fe2.close()  # idempotent after the end
            await be.close()

    run(main())


def test_toolstack_creates_both_directories_with_the_right_permissions() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            info = await add_device(
                w.dom0, "vbd", FE, BE, 51712,
                frontend_keys={"virtual-device": 51712, "device-type": "disk"},
                backend_keys={"params": "/tmp/disk.img", "mode": "w"},
            )  # fmt: skip
            fp, bp = info.frontend_path, info.backend_path
            assert fp == f"/local/domain/{FE}/device/vbd/51712"
            assert bp == f"/local/domain/{BE}/backend/vbd/{FE}/51712"
            for path, perms in (
                (fp, [Perm("n", FE), Perm("r", BE)]),
                (bp, [Perm("n", BE), Perm("r", FE)]),
            ):
                assert await w.dom0.get_perms(path) == perms
                for key in await w.dom0.directory(path):
                    assert await w.dom0.get_perms(f"{path}/{key}") == perms
            expect_fe = {
                "backend": bp,
                "backend-id": str(BE),
                "state": "1",
                "virtual-device": "51712",
                "device-type": "disk",
            }
            expect_be = {
                "frontend": fp,
                "frontend-id": str(FE),
                "online": "1",
                "state": "1",
                "params": "/tmp/disk.img",
                "mode": "w",
            }
            for path, expect in ((fp, expect_fe), (bp, expect_be)):
                got = {
                    k: (await w.dom0.read(f"{path}/{k}")).decode()
                    for k in await w.dom0.directory(path)
                }
                assert got == expect
            # each domain can read the other's directory but write only its own
            assert await w.fe.read(f"{bp}/state") == b"1"
            with pytest.raises(XenstoreError) as info_:
                await w.fe.write(f"{bp}/state", b"4")
            assert info_.value.errno_name == "EACCES"
            with pytest.raises(XenstoreError):
                await w.be.write(f"{fp}/state", b"4")
            with pytest.raises(DeviceExistsError):
                await add_device(w.dom0, "vbd", FE, BE, 51712)
            # next free devid; listing
            again = await add_device(w.dom0, "vbd", FE, BE)
            assert again.devid == 0
            listed = await list_devices(w.dom0, "vbd", backend_domid=BE)
            assert [(d.devid, d.frontend_state, d.backend_state, d.online) for d in listed] == [
                (0, S.Initialising, S.Initialising, True),
                (51712, S.Initialising, S.Initialising, True),
            ]
            # forced removal of a device nobody serves
            assert await remove_device(w.dom0, "vbd", FE, 0, BE, force=True) is False
            assert await remove_device(w.dom0, "vbd", FE, 51712, BE, timeout=0.2) is False
            assert await list_devices(w.dom0, "vbd", backend_domid=BE) == []
            assert not await w.dom0.exists(f"/local/domain/{BE}/backend/vbd/{FE}")
            with pytest.raises(NoSuchDeviceError):
                await remove_device(w.dom0, "vbd", FE, 51712, BE)

    run(main())


def test_watchers_serve_devices_as_they_come_and_go() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            be_plat, fe_plat = w.machine.domain(BE), w.machine.domain(FE)
            bw = BackendWatcher(w.be, BE, DEVTYPE, lambda c, p: ToyBackend(c, p, be_plat))
            fw = FrontendWatcher(w.fe, FE, DEVTYPE, lambda c, p: ToyFrontend(c, p, fe_plat))
            await bw.start()
            await fw.start()
            try:
                for devid in (0, 1):
                    await w.add(devid)
                await eventually(lambda: len(bw.devices) == 2 and len(fw.devices) == 2)
                for d in [*bw.devices.values(), *fw.devices.values()]:
                    await d.wait_state(S.Connected)
                assert held(w)["mappings"] == 2
                assert await remove_device(w.dom0, DEVTYPE, FE, 0, BE) is True
                await eventually(lambda: len(bw.devices) == 1 and len(fw.devices) == 1)
                assert held(w)["mappings"] == 1
            finally:
                await both(bw.close(), fw.close())
            assert bw.devices == {} and fw.devices == {}

    run(main())


def test_backend_refuses_a_device_whose_frontend_path_is_not_the_toolstacks() -> None:
    # R14: the backend decides from its own directory and the frontend dir's owner only
    async def main() -> None:
        async with xenstore_world() as w:
            fp, bp = await w.add()
            plat = w.machine.domain(BE)
            cases = {
                "frontend": f"/local/domain/{FE + 1}/device/{DEVTYPE}/0",  # another domain
                "frontend-id": str(FE + 1),
            }
            for key, value in cases.items():
                old = await w.dom0.read(f"{bp}/{key}")
                await w.dom0.write(f"{bp}/{key}", value)
                with pytest.raises(DeviceConfigError):
                    await ToyBackend(w.be, bp, plat).start()
                await w.dom0.write(f"{bp}/{key}", old)
            # the frontend directory exists but is not owned by the frontend domain
            await w.dom0.set_perms(fp, [Perm("n", 0), Perm("r", BE)])
            with pytest.raises(DeviceConfigError):
                await ToyBackend(w.be, bp, plat).start()
            await w.dom0.set_perms(fp, [Perm("n", FE), Perm("r", BE)])
            # the watcher records the refusal and does not retry on every event
            await w.dom0.write(f"{bp}/frontend", f"/local/domain/{FE}/device/{DEVTYPE}/7")
            bw = BackendWatcher(w.be, BE, DEVTYPE, lambda c, p: ToyBackend(c, p, plat))
            await bw.start()
            try:
                await eventually(lambda: bp in bw.refused)
                assert bw.devices == {}
            finally:
                await bw.close()
            assert w.machine.outstanding()["mappings"] == 0

    run(main())


def test_hook_failure_writes_the_error_node_and_closes() -> None:
    class Failing(ToyBackend):
        async def publish_features(self) -> None:
            raise OSError(errno.ENOSPC, "backing store full")

    async def main() -> None:
        async with xenstore_world() as w:
            _fp, bp = await w.add()
            be = Failing(w.be, bp, w.machine.domain(BE), close_timeout=0.3)
            await be.start()
            await be.wait_state(S.Closing)
            err = await w.read(f"/local/domain/{BE}/error/backend/{DEVTYPE}/{FE}/0/error")
            assert err == b"28 [Errno 28] backing store full"
            assert await w.read(f"{bp}/state") == b"5"
            assert not be.misbehaving  # a local failure does not blame the peer
            # no frontend answers: the close timeout forces Closed, then a retry is made
            await be.wait_state(S.Closed, timeout=5)
            await be.close()
            assert be.done and be.stats["timeouts"] >= 1

    run(main())


def test_hotplug_status_gates_connect() -> None:
    class Hotplug(ToyBackend):
        wait_hotplug = True

    async def main() -> None:
        async with xenstore_world() as w:
            fp, bp = await w.add()
            fe = ToyFrontend(w.fe, fp, w.machine.domain(FE))
            be = Hotplug(w.be, bp, w.machine.domain(BE))
            await be.start()
            await fe.start()
            await fe.wait_state(S.Initialised)
            await asyncio.sleep(0.2)
            assert be.state is S.InitWait and be.connects == 0
            await w.dom0.write(f"{bp}/hotplug-status", b"connected")
            await both(fe.wait_state(S.Connected), be.wait_state(S.Connected))
            await both(fe.close(), be.close())

    run(main())


def test_a_removed_directory_is_never_recreated() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            fe, be, fp, bp = await connected_pair(w)
            await w.dom0.rm(fp)
            await w.dom0.rm(bp)
            await both(fe.wait_done(), be.wait_done())
            await asyncio.sleep(0.1)
            assert not await w.dom0.exists(fp) and not await w.dom0.exists(bp)
            assert held(w) == NOTHING

    run(main())


def test_losing_the_xenstore_connection_ends_the_driver_and_releases() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            fp, bp = await w.add()
            be_client = await w.connect(BE)
            fe = ToyFrontend(w.fe, fp, w.machine.domain(FE), close_timeout=0.3)
            be = ToyBackend(be_client, bp, w.machine.domain(BE))
            await be.start()
            await fe.start()
            await both(fe.wait_state(S.Connected), be.wait_state(S.Connected))
            await be_client.close()
            await be.wait_done()
            assert be.mapping is None and be.port is None
            await be.close()
            with pytest.raises(LocalError):
                await be.wait_state(S.Closed, timeout=1)
            await fe.close()  # the backend is gone: the close timeout forces Closed
            assert fe.state is S.Closed and fe.stats["timeouts"] == 1

    run(main())

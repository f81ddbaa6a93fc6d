"""Shared pieces of the block pair tests (no tests here).

:func:`block_world` is an embedded xenstored on temporary Unix sockets (one client per
domain: dom0 the toolstack, ``FE`` the guest, ``BE`` the backend domain) and an in-process
emulator with room for 1 MiB requests; :class:`Pair` adds a vbd (``backend/vbd``) with an
image file and runs our frontend and backend on it.  Everything is closed afterwards and
the emulator's accounting is checked by the caller (:func:`held`).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from xenpv.backends.block import BlockBackendDriver, BlockConfig
from xenpv.frontends.block import BlockFrontend, FrontConfig
from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.xenbus import XenbusState, add_device
from xenpv.xenbus.paths import error_path
from xenpv.xenstore.client import Perm, XenstoreClient
from xenpv.xenstore.server import XenstoredServer

FE, BE = 3, 2
VDEV = 51712  # xvda
S = XenbusState
T = TypeVar("T")
NOTHING = {"grants": 0, "mappings": 0, "ports": 0}


def run(coro: Awaitable[T], timeout: float = 120.0) -> T:
    """Run ``coro`` in a fresh event loop with an overall timeout."""

    async def main() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(main())


@dataclass
class World:
    """The xenstored, one client per domain and the emulator."""

    server: XenstoredServer
    dom0: XenstoreClient
    fe: XenstoreClient
    be: XenstoreClient
    machine: InProcessMachine
    tmp: Path

    async def read_error(self, device_path: str) -> bytes | None:
        """The error node of a device directory (None if none was written)."""
        path = error_path(device_path)
        if not await self.dom0.exists(path):
            return None
        value: bytes = await self.dom0.read(path)
        return value

    def held(self) -> dict[str, int]:
        """Grants, mappings and ports still held in the emulator."""
        out = self.machine.outstanding()
        return {k: out[k] for k in ("grants", "mappings", "ports")}


@contextlib.asynccontextmanager
async def block_world(max_grants: int = 4096) -> AsyncIterator[World]:
    """See the module docstring."""
    with tempfile.TemporaryDirectory(prefix="xenpv-block-") as tmp:
        server = XenstoredServer()
        machine = InProcessMachine(max_grants=max_grants, max_ports=64)
        clients: list[XenstoreClient] = []
        try:
            for domid in (0, FE, BE):
                sock = str(Path(tmp) / f"dom{domid}.sock")
                await server.listen(sock, domid)
                clients.append(await XenstoreClient.connect(sock, timeout=5.0))
            dom0, fe, be = clients
            for domid in (FE, BE):
                machine.hv.create_domain(domid)
                home = f"/local/domain/{domid}"
                await dom0.mkdir(home)
                await dom0.set_perms(home, [Perm("n", domid)])
            yield World(server, dom0, fe, be, machine, Path(tmp))
        finally:
            for c in clients:
                await c.close()
            await server.close()
            machine.close()


def make_image(path: Path, size: int, seed: int = 1) -> bytes:
    """An image of ``size`` bytes of a fixed pseudo-random pattern; returns its bytes."""
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


@dataclass
class Pair:
    """A vbd with our frontend (as FE) and our backend (as BE) on an image."""

    world: World
    image: Path
    frontend: BlockFrontend
    backend: BlockBackendDriver
    fe_path: str
    be_path: str
    extra: dict[str, Any] = field(default_factory=dict)

    async def close(self) -> None:
        """Close both ends (frontend first, as a guest unplug)."""
        await self.frontend.close()
        await self.backend.close()


async def start_pair(world: World, image: Path, *, mode: str = "w",
                     front: FrontConfig | None = None, back: BlockConfig | None = None,
                     devid: int = VDEV, wait: bool = True,
                     back_kw: dict[str, Any] | None = None, **driver_kw: Any) -> Pair:
    """Add the vbd as the toolstack does, start both ends, wait until connected
    (``back_kw``: more arguments of the backend driver only)."""
    info = await add_device(world.dom0, "vbd", FE, BE, devid,
                            frontend_keys={"virtual-device": devid, "device-type": "disk"},
                            backend_keys={"params": str(image), "mode": mode,
                                          "type": "file", "dev": "xvda"})
    be = BlockBackendDriver(world.machine.domain(BE), world.be, info.backend_path,
                            config=back or BlockConfig(resize_poll=0.05),
                            **(back_kw or {}), **driver_kw)
    fe = BlockFrontend(world.machine.domain(FE), world.fe, info.frontend_path,
                       config=front or FrontConfig(persistent_pages=128), **driver_kw)
    await be.start()
    await fe.start()
    if wait:
        await fe.ready(15.0)
        await be.wait_state(S.Connected, timeout=15.0)
    return Pair(world, image, fe, be, info.frontend_path, info.backend_path)

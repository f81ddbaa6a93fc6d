"""Shared pieces of the block pair tests (no tests here).

:func:`block_world` is an embedded xenstored on temporary Unix sockets (one client per
domain: dom0 the toolstack, ``FE`` the guest, ``BE`` the backend domain) and an in-process
emulator with room for 1 MiB requests: the driver fuzz targets' world
(:func:`xenpv.fuzz.xenbus_driver.xenstore_world`).  :class:`Pair` adds a vbd
(``backend/vbd``) with an image file and runs our frontend and backend on it.  Everything
is closed afterwards and the emulator's accounting is checked by the caller
(``World.held``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from xenpv.backends.block import BlockBackendDriver, BlockConfig
from xenpv.frontends.block import BlockFrontend, FrontConfig
from xenpv.fuzz.xenbus_driver import BE, FE, World, xenstore_world
from xenpv.xenbus import XenbusState, add_device

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


def block_world(max_grants: int = 4096) -> contextlib.AbstractAsyncContextManager[World]:
    """See the module docstring."""
    return xenstore_world("vbd", max_grants=max_grants, max_ports=64, prefix="xenpv-block-")


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

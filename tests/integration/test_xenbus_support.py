"""Shared pieces of the xenbus integration and hostile tests (no tests here).

* :func:`xenstore_world` — an embedded xenstored on temporary Unix sockets, with one
  asyncio client per domain acting as that domain (dom0 = the toolstack, FE and BE the two
  unprivileged domains), their homes owned by them as a toolstack would leave them;
* :class:`ToyFrontend` / :class:`ToyBackend` — a minimal real device pair on the
  in-process loopback emulator: the frontend grants a ring page and offers an event
  channel, the backend maps the page and binds the channel, and they exchange a
  notification and bytes through the page once connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from xenpv.errors import PlatformError
from xenpv.platforms.base import GrantInUse
from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.xenbus import (
    BackendDriver,
    BadKeyError,
    FrontendDriver,
    PeerKeys,
    XenbusState,
    add_device,
)
from xenpv.xenstore.client import Perm, XenstoreClient
from xenpv.xenstore.server import XenstoredServer
from xenpv.xenstore.store import Quotas

FE, BE = 3, 2
DEVTYPE = "toy"
T = TypeVar("T")
S = XenbusState


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run ``coro`` in a fresh event loop with an overall timeout."""

    async def main() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(main())


@dataclass
class World:
    """The xenstored, one client per domain and the loopback emulator."""

    server: XenstoredServer
    dom0: XenstoreClient
    fe: XenstoreClient
    be: XenstoreClient
    machine: InProcessMachine
    sockets: dict[int, str]

    async def connect(self, domid: int) -> XenstoreClient:
        """Another client acting as ``domid``."""
        return await XenstoreClient.connect(self.sockets[domid], timeout=5.0)

    async def add(self, devid: int = 0, **kwargs: Any) -> tuple[str, str]:
        """Create a toy device pair as the toolstack; returns (frontend, backend) paths."""
        info = await add_device(self.dom0, DEVTYPE, FE, BE, devid, **kwargs)
        return info.frontend_path, info.backend_path

    async def read(self, path: str) -> bytes | None:
        """dom0's view of ``path`` (None if missing)."""
        if not await self.dom0.exists(path):
            return None
        return await self.dom0.read(path)


@contextlib.asynccontextmanager
async def xenstore_world(quotas: Quotas | None = None) -> AsyncIterator[World]:
    """An embedded xenstored serving dom0, FE and BE; everything closed afterwards."""
    with tempfile.TemporaryDirectory(prefix="xenbus-") as tmp:
        server = XenstoredServer(quotas=quotas)
        sockets = {d: str(Path(tmp) / f"dom{d}.sock") for d in (0, FE, BE)}
        for domid, path in sockets.items():
            await server.listen(path, domid)
        clients: list[XenstoreClient] = []
        machine = InProcessMachine()
        for domid in (FE, BE):
            machine.hv.create_domain(domid)  # both domains exist in the emulator
        try:
            for domid in sockets:
                clients.append(await XenstoreClient.connect(sockets[domid], timeout=5.0))
            dom0 = clients[0]
            for domid in (FE, BE):
                home = f"/local/domain/{domid}"
                await dom0.mkdir(home)
                await dom0.set_perms(home, [Perm("n", domid)])
            yield World(server, dom0, clients[1], clients[2], machine, sockets)
        finally:
            for c in clients:
                await c.close()
            await server.close()
            machine.close()


class ToyFrontend(FrontendDriver):
    """A frontend with one granted ring page and one event channel."""

    def __init__(self, client: XenstoreClient, path: str, platform: Any, **kw: Any) -> None:
        super().__init__(client, path, **kw)
        self.platform = platform
        self.pages: Any = None
        self.port: int | None = None
        self.quarantine: list[Any] = []
        self.connects = 0
        self.backend_features: dict[str, bool] = {}

    async def publish(self, backend: PeerKeys) -> None:
        self.backend_features = await backend.features()
        self.pages = self.platform.grants.grant(self.peer_domid, 1)
        self.port = self.platform.events.alloc_unbound(self.peer_domid)
        await self.write_keys(
            {"ring-ref": self.pages.refs[0], "event-channel": self.port, "protocol": "x86_64-abi"}
        )

    async def connect(self, backend: PeerKeys) -> None:
        self.connects += 1
        await backend.uint("toy-magic", 0, 0xFFFF)

    async def disconnect(self) -> None:
        if self.port is not None:
            self.platform.events.unbind(self.port)
            self.port = None
        if self.pages is not None:
            pages, self.pages = self.pages, None
            self.quarantine.append(pages)
        self.retry_quarantine()

    def retry_quarantine(self) -> None:
        """End access to quarantined pages the backend no longer maps (R8)."""
        keep = []
        for pages in self.quarantine:
            try:
                self.platform.grants.end_access(pages)
            except GrantInUse:
                keep.append(pages)  # still mapped by the peer: never reuse, retry later
        self.quarantine = keep


class ToyBackend(BackendDriver):
    """A backend that maps the frontend's ring page and binds its event channel."""

    def __init__(self, client: XenstoreClient, path: str, platform: Any, **kw: Any) -> None:
        super().__init__(client, path, **kw)
        self.platform = platform
        self.mapping: Any = None
        self.port: int | None = None
        self.connects = 0
        self.disconnects = 0

    async def publish_features(self) -> None:
        await self.write_keys(
            {"feature-toy": 1, "max-ring-page-order": 1, "multi-queue-max-queues": 1}
        )

    async def connect(self, frontend: PeerKeys) -> None:
        # every key is parsed strictly before anything is allocated (scenario 18)
        await frontend.features()
        await frontend.protocol()
        await frontend.uint("multi-queue-num-queues", 1, 1, default=1)
        refs = await frontend.ring_refs(max_order=1)
        port = await frontend.port()
        try:
            self.mapping = self.platform.grants.map(self.peer_domid, refs)
            self.port = self.platform.events.bind_interdomain(self.peer_domid, port)
        except PlatformError as exc:
            # the refs and the port came from the frontend: refusing them is its fault
            raise BadKeyError(f"frontend ring/port refused: {exc}") from exc
        self.connects += 1
        await self.write_keys({"toy-magic": 4660})

    async def disconnect(self) -> None:
        if self.mapping is not None or self.port is not None:
            self.disconnects += 1
        if self.port is not None:
            self.platform.events.unbind(self.port)
            self.port = None
        if self.mapping is not None:
            mapping, self.mapping = self.mapping, None
            self.platform.grants.unmap(mapping)


def toy_pair(world: World, fe_path: str, be_path: str, **kw: Any) -> tuple[ToyFrontend, ToyBackend]:
    """A toy frontend (acting as FE) and backend (acting as BE) on the world's emulator."""
    fe = ToyFrontend(world.fe, fe_path, world.machine.domain(FE), **kw)
    be = ToyBackend(world.be, be_path, world.machine.domain(BE), **kw)
    return fe, be


async def both(*aws: Awaitable[Any]) -> list[Any]:
    """Await several things concurrently; the first failure propagates."""
    return list(await asyncio.gather(*aws))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds (TimeoutError after ``timeout`` s)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def serve_domain(role: str, rundir: str, domid: int) -> None:
    """Run a toy backend or frontend watcher as domain ``domid`` of a loopback daemon.

    Used as a child process (``python test_xenbus_support.py ROLE RUNDIR DOMID``): prints
    ``ready`` once watching, then ``<path> <state>`` on every state change of a driver,
    and stops cleanly (closing every driver) on SIGTERM.
    """
    import signal
    import sys

    from xenpv.platforms.loopback.client import ClientPlatform
    from xenpv.xenbus import BackendWatcher, FrontendWatcher

    platform = ClientPlatform.for_domain(rundir, domid)
    client = await XenstoreClient.connect(platform.xenstore_path, timeout=5.0)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    watcher: BackendWatcher | FrontendWatcher
    if role == "backend":
        watcher = BackendWatcher(client, domid, DEVTYPE, lambda c, p: ToyBackend(c, p, platform))
    else:
        watcher = FrontendWatcher(client, domid, DEVTYPE, lambda c, p: ToyFrontend(c, p, platform))
    await watcher.start()
    print("ready", flush=True)
    seen: dict[str, XenbusState] = {}
    while not stop.is_set():
        for path, driver in list(watcher.devices.items()):
            if seen.get(path) is not driver.state:
                seen[path] = driver.state
                print(path, int(driver.state), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    await watcher.close()
    await client.close()
    platform.close()
    print("stopped", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    import sys

    asyncio.run(serve_domain(sys.argv[1], sys.argv[2], int(sys.argv[3])))

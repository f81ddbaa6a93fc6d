"""Shared pieces of the xenbus integration and hostile tests (no tests here).

* :func:`xenstore_world` — the world of the ``xenbus:driver`` fuzz target
  (:func:`xenpv.fuzz.xenbus_driver.xenstore_world`) for toy devices: an embedded xenstored
  on temporary Unix sockets, with one asyncio client per domain acting as that domain
  (dom0 = the toolstack, FE and BE the two unprivileged domains), their homes owned by them
  as a toolstack would leave them;
* :class:`ToyFrontend` / :class:`ToyBackend` — a minimal real device pair on the
  in-process loopback emulator: the frontend grants a ring page and offers an event
  channel, the backend (the fuzz target's victim, counting here) maps the page and binds
  the channel, and they exchange a notification and bytes through the page once connected.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from xenpv.fuzz import xenbus_driver
from xenpv.fuzz.xenbus_driver import BE, FE, World
from xenpv.platforms.base import GrantInUse
from xenpv.xenbus import FrontendDriver, PeerKeys, XenbusState
from xenpv.xenstore.client import XenstoreClient
from xenpv.xenstore.store import Quotas

DEVTYPE = "toy"
T = TypeVar("T")
S = XenbusState


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run ``coro`` in a fresh event loop with an overall timeout."""

    async def main() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(main())


def xenstore_world(quotas: Quotas | None = None) -> contextlib.AbstractAsyncContextManager[World]:
    """The fuzz target's world for ``toy`` devices; everything closed afterwards."""
    return xenbus_driver.xenstore_world(DEVTYPE, quotas)


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


class ToyBackend(xenbus_driver.ToyBackend):
    """The fuzz target's toy backend, counting its connects and its disconnects of a
    live connection."""

    def __init__(self, client: XenstoreClient, path: str, platform: Any, **kw: Any) -> None:
        super().__init__(client, path, platform, **kw)
        self.connects = 0
        self.disconnects = 0

    async def connect(self, frontend: PeerKeys) -> None:
        await super().connect(frontend)
        self.connects += 1

    async def disconnect(self) -> None:
        if self.holds():
            self.disconnects += 1
        await super().disconnect()


def toy_pair(world: World, fe_path: str, be_path: str, **kw: Any) -> tuple[ToyFrontend, ToyBackend]:
    """A toy frontend (acting as FE) and backend (acting as BE) on the world's emulator."""
    fe = ToyFrontend(world.fe, fe_path, world.machine.domain(FE), **kw)
    be = ToyBackend(world.be, be_path, world.machine.domain(BE), **kw)
    return fe, be


async def both(*aws: Awaitable[Any]) -> list[Any]:
    """Await several things concurrently; the first failure propagates."""
    return list(await asyncio.gather(*aws))


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check`` (letting the drivers run in between) until it holds; TimeoutError
    after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while not check():
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

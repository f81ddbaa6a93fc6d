"""Device discovery: start and stop one driver per device directory.

Theory of operation
-------------------
A backend watches ``/local/domain/<self>/backend/<type>`` and serves every
``<fe>/<devid>`` directory below it; a frontend watches ``/local/domain/<self>/device/<type>``
and serves every ``<devid>`` whose ``state`` reads Initialising when found (§5.2).  The
watch only sets a flag; each pass lists the tree again (events are hints), so a flood of
events costs one listing per pass and memory stays flat.

Per directory the watcher keeps at most one driver.  A driver that ended (destroyed,
refused by its ownership checks, failed to start) is remembered as *finished* and is not
started again until its directory disappears, so a device a peer broke is not
resurrected by the next unrelated event.  When a directory disappears its driver is
stopped (the driver also notices by itself).  The number of devices served is bounded
(``max_devices``); names that are not canonical decimal numbers are ignored.

Ownership (hostile-inputs.md R14) is checked by the driver's :meth:`start` from the own
directory and the peer directory's owner, never from nodes the peer can write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from xenpv.errors import LocalError
from xenpv.xenbus.driver import BackendDriver, FrontendDriver, XenbusDriver
from xenpv.xenbus.paths import backend_dir, frontend_dir
from xenpv.xenstore.client import Watch, XenstoreClient, XenstoreConnectionError
from xenpv.xenstore.wire import WireError, XenstoreError

__all__ = ["BackendWatcher", "DeviceWatcher", "FrontendWatcher"]

log = logging.getLogger(__name__)


def _is_num(name: str) -> bool:
    return name.isdigit() and name.isascii() and len(name) <= 10 and (name == "0" or name[0] != "0")


class DeviceWatcher:
    """Common part of :class:`BackendWatcher` and :class:`FrontendWatcher`."""

    def __init__(
        self,
        client: XenstoreClient,
        root: str,
        factory: Callable[[XenstoreClient, str], XenbusDriver],
        *,
        max_devices: int = 256,
        op_timeout: float = 5.0,
    ) -> None:
        """Watch ``root``; ``factory(client, path)`` builds the driver of one device."""
        self.client = client
        self.root = root
        self.factory = factory
        self.max_devices = max_devices
        self.op_timeout = op_timeout
        #: Drivers running now, by device path.
        self.devices: dict[str, XenbusDriver] = {}
        #: Paths whose driver ended; not restarted until the directory goes away.
        self.finished: set[str] = set()
        #: Paths refused at start, with the reason.
        self.refused: dict[str, str] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Register the watch and start serving."""
        if self._task is not None:
            raise LocalError("watcher already started")
        watch = self.client.watch(self.root, max_pending=4, timeout=self.op_timeout)
        await watch.register()
        self._task = asyncio.create_task(self._run(watch), name=f"xenbus watcher {self.root}")

    async def scan(self) -> None:
        """One pass: start drivers for new directories, drop ended and vanished ones."""
        present = await self._list()
        for path, driver in list(self.devices.items()):
            if driver.done or path not in present:
                del self.devices[path]
                if path in present:
                    self.finished.add(path)
                else:
                    await driver.close()
        self.finished &= present
        for path in present:
            if path in self.devices or path in self.finished:
                continue
            if len(self.devices) >= self.max_devices:
                break
            if not await self._wanted(path):
                continue
            driver = self.factory(self.client, path)
            try:
                await driver.start()
            except (XenstoreConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:  # refused, or a broken driver: serve the others
                self.refused[path] = str(exc)
                self.finished.add(path)
                log.warning("%s: not served: %s", path, exc)
                continue
            self.devices[path] = driver

    async def close(self) -> None:
        """Stop watching and close every driver (bounded; idempotent)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        drivers, self.devices = list(self.devices.values()), {}
        await asyncio.gather(*(d.close() for d in drivers), return_exceptions=True)

    async def _run(self, watch: Watch) -> None:
        forward = asyncio.create_task(self._forward(watch))
        try:
            while not self._closed:
                self._kick.clear()
                await self.scan()
                await self._kick.wait()
        except (XenstoreConnectionError, WireError, TimeoutError) as exc:
            log.warning("%s: watcher stopped: %r", self.root, exc)
        finally:
            forward.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.unregister(), self.op_timeout)
            with contextlib.suppress(asyncio.CancelledError):
                await forward

    async def _forward(self, watch: Watch) -> None:
        with contextlib.suppress(Exception):
            async for _ in watch:
                self._kick.set()
        self._kick.set()

    async def _children(self, path: str) -> list[str]:
        try:
            names = await self.client.directory(path, timeout=self.op_timeout)
        except XenstoreError:
            return []
        return [n for n in names if _is_num(n)][: self.max_devices]

    async def _list(self) -> set[str]:
        raise NotImplementedError

    async def _wanted(self, path: str) -> bool:
        return True


class BackendWatcher(DeviceWatcher):
    """Serves ``/local/domain/<domid>/backend/<type>/<fe>/<devid>`` with backend drivers."""

    def __init__(
        self,
        client: XenstoreClient,
        domid: int,
        devtype: str,
        factory: Callable[[XenstoreClient, str], BackendDriver],
        **kwargs: int | float,
    ) -> None:
        """Watch ``domid``'s backend directory of ``devtype``."""
        super().__init__(client, backend_dir(domid, devtype), factory, **kwargs)  # type: ignore[arg-type]

    async def _list(self) -> set[str]:
        out: set[str] = set()
        for fe in await self._children(self.root):
            for devid in await self._children(f"{self.root}/{fe}"):
                out.add(f"{self.root}/{fe}/{devid}")
        return out


class FrontendWatcher(DeviceWatcher):
    """Serves ``/local/domain/<domid>/device/<type>/<devid>`` with frontend drivers."""

    def __init__(
        self,
        client: XenstoreClient,
        domid: int,
        devtype: str,
        factory: Callable[[XenstoreClient, str], FrontendDriver],
        **kwargs: int | float,
    ) -> None:
        """Watch ``domid``'s device directory of ``devtype``."""
        super().__init__(client, frontend_dir(domid, devtype), factory, **kwargs)  # type: ignore[arg-type]

    async def _list(self) -> set[str]:
        return {f"{self.root}/{devid}" for devid in await self._children(self.root)}

    async def _wanted(self, path: str) -> bool:
        # §5.2: a frontend device is only probed if its state reads 1 when found.
        try:
            raw = await self.client.read(f"{path}/state", timeout=self.op_timeout)
        except XenstoreError:
            return False
        if raw != b"1":
            self.finished.add(path)
            return False
        return True

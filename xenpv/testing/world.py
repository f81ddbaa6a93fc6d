"""A world for device pairs: domains with their own xenstore clients on one emulator.

:func:`domain_world` starts an embedded :class:`~xenpv.xenstore.server.XenstoredServer` on
temporary Unix sockets (``dom<N>.sock``) with one asyncio client acting as each domain —
dom0 the toolstack, every other domain's home ``/local/domain/<N>`` created and owned by
it, as a toolstack leaves it — and an
:class:`~xenpv.platforms.loopback.harness.InProcessMachine` holding those domains.  The
block and net pair tests, the hostile tests and the driver fuzz targets
(:func:`xenpv.fuzz.xenbus_driver.xenstore_world`) run their devices in it; each gives it
its own class (a subclass of :class:`DomainWorld`) for what it adds.  Everything is
closed afterwards; the emulator's accounting is the caller's to check (:meth:`held`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.xenbus.paths import error_path
from xenpv.xenstore.client import Perm, XenstoreClient
from xenpv.xenstore.server import XenstoredServer
from xenpv.xenstore.store import Quotas

__all__ = ["DomainWorld", "domain_world"]

W = TypeVar("W", bound="DomainWorld")


@dataclass
class DomainWorld:
    """The xenstored, one client per domain (``clients[0]`` is dom0), their sockets, the
    emulator and the temporary directory the sockets are in."""

    server: XenstoredServer
    clients: dict[int, XenstoreClient]
    sockets: dict[int, str]
    machine: InProcessMachine
    tmp: Path

    @property
    def dom0(self) -> XenstoreClient:
        """The toolstack's client."""
        return self.clients[0]

    async def connect(self, domid: int) -> XenstoreClient:
        """Another client acting as ``domid`` (the caller closes it)."""
        return await XenstoreClient.connect(self.sockets[domid], timeout=5.0)

    async def read(self, path: str) -> bytes | None:
        """dom0's view of ``path`` (None if missing)."""
        if not await self.dom0.exists(path):
            return None
        value: bytes = await self.dom0.read(path)
        return value

    async def read_error(self, device_path: str) -> bytes | None:
        """The error node of a device directory (None if none was written)."""
        return await self.read(error_path(device_path))

    def held(self) -> dict[str, int]:
        """Grants, mappings and ports still held in the emulator."""
        out = self.machine.outstanding()
        return {k: out[k] for k in ("grants", "mappings", "ports")}


@contextlib.asynccontextmanager
async def domain_world(domids: Sequence[int], cls: type[W], *, quotas: Quotas | None = None,
                       max_grants: int = 128, max_ports: int = 32, prefix: str = "xenpv-world-",
                       **fields: Any) -> AsyncIterator[W]:
    """A world of dom0 and ``domids`` (module docstring) as a ``cls``, built with its own
    ``fields`` besides :class:`DomainWorld`'s; the store keeps ``quotas``, the emulator
    has room for ``max_grants`` grants and ``max_ports`` ports a domain."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        server = XenstoredServer(quotas=quotas)
        machine = InProcessMachine(max_grants=max_grants, max_ports=max_ports)
        sockets = {d: str(Path(tmp) / f"dom{d}.sock") for d in (0, *domids)}
        clients: dict[int, XenstoreClient] = {}
        try:
            for domid, path in sockets.items():
                await server.listen(path, domid)
                clients[domid] = await XenstoreClient.connect(path, timeout=5.0)
            dom0 = clients[0]
            for domid in domids:
                machine.hv.create_domain(domid)
                home = f"/local/domain/{domid}"
                await dom0.mkdir(home)
                await dom0.set_perms(home, [Perm("n", domid)])
            yield cls(server, clients, sockets, machine, Path(tmp), **fields)
        finally:
            for c in clients.values():
                await c.close()
            await server.close()
            machine.close()

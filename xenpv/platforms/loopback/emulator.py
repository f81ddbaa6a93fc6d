"""A whole emulated Xen machine in this process, in one call: :class:`InProcessEmulator`.

Theory of operation
-------------------
The in-process platform (:class:`~xenpv.platforms.loopback.inprocess.InProcessPlatform`)
emulates grant tables and event channels, but a driver also needs a xenstore: vchan
publishes its keys there, the xenbus drivers negotiate through it.  Putting one together
by hand takes four steps that are easy to get wrong: an embedded xenstored, one socket per
domain (a connection acts as the domain whose socket it came in on), each domain's home
(``/local/domain/N`` with ``domid`` and a writable ``data``; without it a vchan server
cannot learn its own domid and a guest may write nowhere), and a place for the xenstored to
run that does not deadlock the blocking APIs (they make their xenstore requests from a
helper thread and wait for it).

:class:`InProcessEmulator` does all four: one
:class:`~xenpv.platforms.loopback.core.Hypervisor`, the embedded
:class:`~xenpv.xenstore.server.XenstoredServer` serving ``<rundir>/dom<N>.sock`` for every
domain from its own event loop on a background thread, and homes written exactly as
``xenpv loopback up`` writes them (:mod:`xenpv.platforms.loopback.home`).  Platforms it
hands out carry their domain's socket, so ``await platform.xenstore()``, the vchan
endpoints and the xenbus drivers work on them unchanged, from blocking code or from an
asyncio loop in the calling thread.

The platforms themselves are not thread-safe: use each from one thread.  Everything is
released by :meth:`InProcessEmulator.close` (also on ``with`` exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from xenpv.errors import LocalError
from xenpv.platforms.loopback.builder import build_xenstore_ring, ring_holdings
from xenpv.platforms.loopback.core import Hypervisor
from xenpv.platforms.loopback.home import write_domain_home
from xenpv.platforms.loopback.inprocess import InProcessPlatform

__all__ = ["InProcessEmulator"]

T = TypeVar("T")

#: How long a xenstore step of setup or teardown may take (seconds).
SETUP_TIMEOUT = 30.0


class InProcessEmulator:
    """Hypervisor, xenstored and domains ``domains``, all in this process.

    ``domains`` is a number N (domains 1..N) or the domain ids; dom0 always exists.
    ``names`` gives domain names (default ``dom<N>``).  ``max_grants`` / ``max_ports`` are
    the per-domain limits of the emulated hypervisor.  ``rundir`` is where the xenstore
    sockets go (default: a temporary directory removed by :meth:`close`).

    Example::

        with InProcessEmulator(2) as emu:
            dom1, dom2 = emu.platform(1), emu.platform(2)
            xs = emu.xenstore(0)              # a BlockingClient acting as dom0
            print(xs.read("/local/domain/2/name"))
    """

    def __init__(
        self,
        domains: int | Iterable[int] = 1,
        *,
        names: Mapping[int, str] | None = None,
        max_grants: int = 4096,
        max_ports: int = 256,
        rundir: str | os.PathLike[str] | None = None,
    ) -> None:
        from xenpv.xenstore.server import XenstoredServer

        wanted = list(range(1, domains + 1)) if isinstance(domains, int) else list(domains)
        self.hv = Hypervisor(max_grants=max_grants, max_ports=max_ports)
        self._tmp = None if rundir is not None else tempfile.TemporaryDirectory(prefix="xenpv-emu-")
        self.rundir = os.fspath(rundir) if rundir is not None else self._tmp.name  # type: ignore[union-attr]
        # dom0's handles for the xenstored: INTRODUCE maps each guest's xenstore page and
        # binds its port through them (used from the xenstored's thread only)
        self._dom0_platform = InProcessPlatform(self.hv, 0)
        self.xenstored = XenstoredServer(platform=self._dom0_platform)
        self._platforms: list[InProcessPlatform] = []
        self._clients: list[Any] = []
        self._dom0: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="xenpv-emulator-xenstored", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._start())
            for domid in wanted:
                self.create_domain(domid, (names or {}).get(domid))
        except BaseException:
            self.close()
            raise

    # -- domains ---------------------------------------------------------------------
    @property
    def domids(self) -> list[int]:
        """The domains that exist now, dom0 first."""
        return sorted(self.hv.domains)

    def xenstore_path(self, domid: int) -> str:
        """The socket whose connections act as ``domid``."""
        return os.path.join(self.rundir, f"dom{domid}.sock")

    def create_domain(self, domid: int, name: str | None = None) -> None:
        """Create ``domid`` with its home, its xenstore ring (the domain builder's page
        and port, introduced to the xenstored: ``platform(domid).xenstore_over_ring()``)
        and its xenstore socket (``@introduceDomain`` fires)."""
        dom = self.hv.create_domain(domid, name)
        try:
            ring = build_xenstore_ring(self.hv, domid)
            self._call(self._introduce(domid, dom.name, ring.gfn, ring.port))
        except BaseException:
            self.hv.destroy_domain(domid)
            raise

    def destroy_domain(self, domid: int) -> None:
        """Tear ``domid`` down like a dead domain: its handles close, its home goes,
        ``@releaseDomain`` fires."""
        if domid == 0:
            raise LocalError("dom0 cannot be destroyed")
        self.hv.destroy_domain(domid)
        self._call(self._release(domid))

    # -- what callers use ------------------------------------------------------------
    def platform(self, domid: int) -> InProcessPlatform:
        """A new platform acting as ``domid`` (its own grant and event-channel handles),
        with the domain's xenstore socket; closed by :meth:`close` if not before."""
        if domid not in self.hv.domains:
            raise LocalError(f"no domain {domid} (create it with create_domain)")
        p = InProcessPlatform(self.hv, domid, self.xenstore_path(domid))
        self._platforms.append(p)
        return p

    def xenstore(self, domid: int = 0, *, timeout: float | None = 5.0) -> Any:
        """A new :class:`~xenpv.xenstore.blocking.BlockingClient` acting as ``domid``
        (``timeout`` per request); closed by :meth:`close` if not before.  From asyncio
        code use ``await platform.xenstore()`` instead."""
        from xenpv.xenstore.blocking import BlockingClient

        if domid not in self.hv.domains:
            raise LocalError(f"no domain {domid}")
        client = BlockingClient(self.xenstore_path(domid), timeout=timeout)
        self._clients.append(client)
        return client

    def outstanding(self) -> dict[str, int]:
        """Grants, shares, mappings and ports still held (and hypervisor handles), not
        counting the domains' xenstore rings (``builder.ring_holdings``) nor the
        xenstored's own two handles."""
        out = dict(self.hv.outstanding())
        for domid in list(self.hv.domains):
            for key, value in ring_holdings(self.hv, domid).items():
                if key in out:
                    out[key] -= value
        out["handles"] -= 2
        return out

    def assert_released(self) -> None:
        """Raise ``AssertionError`` if a grant, mapping or port is still held."""
        left = {k: v for k, v in self.outstanding().items() if v and k != "handles"}
        if left:
            raise AssertionError(f"loopback emulator still holds {left}")

    def close(self) -> None:
        """Close every platform and client handed out, the xenstored and the hypervisor;
        idempotent."""
        for p in self._platforms:
            with contextlib.suppress(Exception):
                p.close()
        self._platforms.clear()
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        if not self._loop.is_closed():
            if self._loop.is_running():
                with contextlib.suppress(Exception):
                    self._call(self._stop())
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(SETUP_TIMEOUT)
            self._loop.close()
            with contextlib.suppress(Exception):
                self._dom0_platform.close()
            self.hv.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> InProcessEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the xenstored thread --------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the xenstored's loop and wait for it (bounded)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise LocalError("InProcessEmulator methods cannot be called from its xenstored")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(SETUP_TIMEOUT)

    async def _start(self) -> None:
        from xenpv.xenstore.client import connect

        await self.xenstored.listen(self.xenstore_path(0), 0)
        self._dom0 = await connect(self.xenstore_path(0))
        await write_domain_home(self._dom0, 0, self.hv.domains[0].name)

    async def _introduce(self, domid: int, name: str, gfn: int, port: int) -> None:
        # the home exists before @introduceDomain fires
        await write_domain_home(self._dom0, domid, name)
        await self._dom0.introduce(domid, gfn, port)
        await self.xenstored.listen(self.xenstore_path(domid), domid)

    async def _release(self, domid: int) -> None:
        await self.xenstored.unlisten(self.xenstore_path(domid))
        with contextlib.suppress(Exception):
            await self._dom0.rm(f"/local/domain/{domid}")
        self.xenstored.release_domain(domid)

    async def _stop(self) -> None:
        if self._dom0 is not None:
            with contextlib.suppress(Exception):
                await self._dom0.close()
        await self.xenstored.close()

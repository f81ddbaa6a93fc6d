"""The real-Xen platform acting as a domain of the loopback emulator, for tests.

:func:`xen_platform` opens :class:`~xenpv.platforms.xen.XenPlatform` (cffi on Xen's
``libxengnttab``/``libxenevtchn``, here the emulator's replacement libraries) as domain
``domid`` of the emulator whose run directory is ``rundir``, in this process.
:func:`daemon_pair` gives dom0 and a guest of such an emulator, each on that platform or
on a loopback client, with a xenstore client each, for a device pair to run on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from xenpv.platforms.choose import xen_on_loopback
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.env import domain_env
from xenpv.platforms.xen import XenPlatform
from xenpv.xenstore.client import XenstoreClient, connect

D = TypeVar("D")


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the block; the previous values come back after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def xen_platform(rundir: str, domid: int) -> XenPlatform:
    """``XenPlatform`` as domain ``domid`` of the emulator at ``rundir``."""
    # The libraries read $XENPV_LOOPBACK_SOCKET when a handle is opened; the handles keep
    # their connection afterwards, so the variable is only needed while opening.
    with environment(domain_env(rundir, domid)):
        return xen_on_loopback(rundir, domid)


@dataclass
class DaemonPair:
    """dom0 and a guest of a loopback daemon: their platforms and xenstore clients, and
    the drivers run on them (:meth:`closing`)."""

    dom0: Any
    guest: Any
    xs0: XenstoreClient
    xsg: XenstoreClient
    drivers: list[Any] = field(default_factory=list)

    def closing(self, driver: D) -> D:
        """``driver``, to be closed when the pair ends (the last one given first)."""
        self.drivers.append(driver)
        return driver

    async def _close_drivers(self) -> None:
        while self.drivers:
            await self.drivers.pop().close()


@contextlib.asynccontextmanager
async def daemon_pair(rundir: str, guest: int, *,
                      on_xen: Collection[int]) -> AsyncIterator[DaemonPair]:
    """dom0 and domain ``guest`` of the emulator at ``rundir``: those in ``on_xen`` on
    :func:`xen_platform`, the others on :class:`ClientPlatform`, with a xenstore client
    each.  When the block ends the drivers are closed, then the clients, then the
    platforms."""

    def platform(domid: int) -> Any:
        if domid in on_xen:
            return xen_platform(rundir, domid)
        return ClientPlatform.for_domain(rundir, domid)

    async with contextlib.AsyncExitStack() as stack:
        dom0 = platform(0)
        stack.callback(dom0.close)
        guest_platform = platform(guest)
        stack.callback(guest_platform.close)
        xs0 = await connect(str(Path(rundir) / "dom0" / "xenstore"))
        stack.push_async_callback(xs0.close)
        xsg = await connect(str(Path(rundir) / f"dom{guest}" / "xenstore"))
        stack.push_async_callback(xsg.close)
        pair = DaemonPair(dom0, guest_platform, xs0, xsg)
        stack.push_async_callback(pair._close_drivers)
        yield pair

"""Our xenstored serving a guest's ring through the real-Xen platform API.

Dom0's xenstored here is an :class:`~xenpv.xenstore.server.XenstoredServer` in this
process whose dom0 platform is :class:`~xenpv.platforms.xen.XenPlatform` — cffi on
``libxengnttab.so.1`` / ``libxenevtchn.so.1`` — driving the loopback emulator through the
replacement libraries, i.e. the calls it would make on Xen: ``xengnttab_map_grant_ref``
of the guest's ref 1, ``xenevtchn_bind_interdomain`` of its port, ``xenevtchn_notify``.
The guest is a process of the emulator (cross-process platform) that takes its ring
over (``XS_RING``).  The daemon's own xenstored first RELEASEs the domain, so that only
one server serves the page.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.testing.xenmode import xen_platform
from xenpv.xenstore import client as xsclient
from xenpv.xenstore.ring import connect_ring
from xenpv.xenstore.server import XenstoredServer

TIMEOUT = 30


def _xen_dom0(rundir: str) -> Any:
    return xen_platform(rundir, 0)


def test_our_xenstored_serves_a_ring_through_the_real_xen_api(tmp_path: Path) -> None:
    machine = DaemonMachine(rundir=str(tmp_path / "run"))
    try:
        machine.create_domain(2, "guest")
        dom0 = _xen_dom0(machine.rundir)
        guest = ClientPlatform.for_domain(machine.rundir, 2)
        ring = guest.xenstore_ring()

        async def body() -> None:
            async with await xsclient.connect(
                str(Path(machine.rundir) / "dom0" / "xenstore"), timeout=TIMEOUT
            ) as daemon_xs:
                await daemon_xs.release(2)  # the daemon's xenstored lets go of the ring
            server = XenstoredServer(platform=dom0)
            sock = str(tmp_path / "ours.sock")
            await server.listen(sock)
            try:
                async with await xsclient.connect(sock, timeout=TIMEOUT) as x0:
                    await x0.mkdir("/local/domain/2")
                    await x0.set_perms("/local/domain/2", ["n0", "r2"])
                    await x0.write("/local/domain/2/name", "guest")
                    await x0.mkdir("/local/domain/2/data")
                    await x0.set_perms("/local/domain/2/data", ["n2"])
                    await x0.introduce(2, ring.gfn, ring.port)
                    g = await connect_ring(ring.mem, guest.events, ring.port, timeout=TIMEOUT)
                    async with g:
                        assert await g.read("name") == b"guest"
                        async with g.watch("data", "t") as w:
                            assert await w.get(timeout=TIMEOUT) == ("data", "t")
                            await x0.write("/local/domain/2/data/x", "1")
                            assert await w.get(timeout=TIMEOUT) == ("data/x", "t")
                        async with g.transaction() as t:
                            await t.write("data/y", b"v" * 1500)
                        assert await x0.read("/local/domain/2/data/y") == b"v" * 1500
                    async with x0.watch("@releaseDomain") as rel:
                        assert (await rel.get(timeout=TIMEOUT)).path == "@releaseDomain"
                        await x0.release(2)
                        assert (await rel.get(timeout=TIMEOUT)).path == "@releaseDomain"
                    assert not server.rings.rings  # unmapped and unbound
            finally:
                await server.close(save=False)

        asyncio.run(asyncio.wait_for(body(), TIMEOUT * 2))
        ring.release()
        guest.close()
        dom0.close()
        machine.destroy_domain(2)
        machine.assert_released()
    finally:
        machine.release()

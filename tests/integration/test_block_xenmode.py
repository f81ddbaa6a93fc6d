"""The block pair with one end on the real-Xen platform mode of the emulator.

A loopback daemon plays hypervisor and xenstored; the backend (dom0) runs on
:class:`~xenpv.platforms.xen.XenPlatform` — cffi on ``libxengnttab.so.1`` and
``libxenevtchn.so.1``, here the emulator's replacement libraries — so ring pages and data
pages are mapped through ``xengnttab_map_domain_grant_refs`` and ``preadv``/``pwritev``
move data straight into gntdev-style mappings; or the frontend does (its ring and data
pages shared with ``xengntshr_share_pages``).  The other end is a loopback client in this
process.  Data is checked against the image, with and without persistent grants
and indirect requests, and the emulator holds nothing afterwards.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.backends.block import BlockBackendDriver, BlockConfig
from xenpv.frontends.block import BlockFrontend, FrontConfig
from xenpv.testing.vchan import VchanLab
from xenpv.testing.xenmode import daemon_pair
from xenpv.xenbus.toolstack import add_device, remove_device, vbd_keys

GUEST = 9
WAIT = 20.0
MiB = 1 << 20


@pytest.fixture
def lab() -> Iterator[VchanLab]:
    with VchanLab((GUEST,), max_grants=4096, max_ports=64) as lab:
        yield lab


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("on_xen", ["backend", "frontend"])
def test_block_pair_on_the_xen_platform(lab: VchanLab, tmp_path: Path, persistent: bool,
                                        on_xen: str) -> None:
    image = tmp_path / "disk.img"
    data = random.Random(3).randbytes(4 * MiB)
    image.write_bytes(data)

    async def body() -> None:
        async with daemon_pair(lab.rundir, GUEST,
                               on_xen=(0,) if on_xen == "backend" else (GUEST,)) as p:
            devid, fkeys, bkeys = vbd_keys(str(image))
            info = await add_device(p.xs0, "vbd", GUEST, 0, devid, frontend_keys=fkeys,
                                    backend_keys=bkeys)
            be = p.closing(BlockBackendDriver(p.dom0, p.xs0, info.backend_path,
                                              config=BlockConfig(persistent=persistent)))
            fe = p.closing(BlockFrontend(p.guest, p.xsg, info.frontend_path,
                                         config=FrontConfig(max_queues=2, max_ring_order=2,
                                                            persistent_pages=128)))
            await be.start()
            await fe.start()
            await fe.ready(WAIT)
            assert fe.persistent is persistent and fe.max_segments == 256
            assert await fe.read(0, 4 * MiB) == data
            model = bytearray(data)
            rng = random.Random(4)
            jobs = []
            for k in range(12):
                off, n = k * 300 * 1024, rng.choice([4096, 45056, 256 * 1024])
                blob = rng.randbytes(n)
                model[off:off + n] = blob
                jobs.append(fe.write(off, blob))
            await asyncio.gather(*jobs)
            assert await fe.flush()
            assert image.read_bytes() == model
            assert await fe.read(0, 4 * MiB) == model
            await fe.close()
            assert await remove_device(p.xs0, "vbd", GUEST, devid, 0, timeout=WAIT)
            await be.wait_done(WAIT)

    asyncio.run(body())
    lab.machine.assert_released()

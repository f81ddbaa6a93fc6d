"""Our block frontend served by QEMU's qdisk backend (Debian's qemu-system-xen 7.2).

QEMU runs as dom0's device model for the guest on the loopback emulator, through the
replacement libraries.  The toolstack creates ``backend/qdisk/<guest>/<devid>`` (with
``params=aio:IMAGE``, ``mode=w``, ``discard-enable=1``) behind the guest's
``device/vbd/<devid>``; QEMU creates the disk, advertises flush, discard and
``max-ring-page-order=4`` (no indirect, persistent or multi-queue), and our frontend
connects at each ring order 0-4: an image written by another program (``dd``) reads back
byte for byte, our writes land in the file, flush and discard succeed, and no INDIRECT
request is sent since none was offered.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from pathlib import Path

import pytest
from qemu_support import QemuGuest, with_qemu_guest

from xenpv.frontends.block import BlockFrontend, FrontConfig
from xenpv.xenbus.toolstack import add_device, remove_device, vbd_keys

GUEST = 34
WAIT = 20.0
MiB = 1 << 20


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_our_frontend_with_qemus_qdisk_backend(tmp_path: Path, order: int) -> None:
    image = tmp_path / "disk.img"
    subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M", "count=4",
                    "status=none"], check=True, timeout=WAIT)
    original = image.read_bytes()

    async def body(w: QemuGuest) -> None:
        frontend = None
        try:
            devid, fkeys, bkeys = vbd_keys(f"aio:{image}", vdev="xvda")
            bkeys.pop("type")
            info = await add_device(w.xs0, "vbd", GUEST, 0, devid, frontend_keys=fkeys,
                                    backend_keys=bkeys, backend_type="qdisk")
            w.start_qemu()
            frontend = BlockFrontend(w.guest, w.xsg, info.frontend_path,
                                     config=FrontConfig(max_ring_order=order))
            await frontend.start()
            await frontend.ready(WAIT)
            fe = frontend
            assert fe.size == 4 * MiB
            assert fe.info()["ring_pages"] == [1 << order]
            assert fe.max_segments == 11 and not fe.persistent  # nothing offered
            assert await fe.read(0, 4 * MiB) == original
            rng = random.Random(order)
            model = bytearray(original)
            jobs = []
            for k in range(16):
                off, n = k * 256 * 1024, rng.choice([512, 4096, 45056, 128 * 1024])
                blob = rng.randbytes(n)
                model[off:off + n] = blob
                jobs.append(fe.write(off, blob))
            await asyncio.gather(*jobs)
            assert await fe.flush() is True
            assert image.read_bytes() == model
            assert fe.features["discard"]
            await fe.discard(MiB, MiB)
            assert await fe.read(MiB, MiB) == bytes(MiB)
            assert fe.io_stats["indirect"] == 0 and fe.error is None
            await remove_device(w.xs0, "vbd", GUEST, devid, 0, backend_type="qdisk",
                                timeout=5.0)
        finally:
            if frontend is not None:
                await frontend.close()

    with_qemu_guest(GUEST, tmp_path, body)

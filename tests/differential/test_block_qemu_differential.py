"""Differential test of our block backend with QEMU 7.2's qdisk backend as the oracle.

One guest with two disks on the loopback emulator: ``xvda`` served by our backend (dom0,
in this process, offering only what qdisk offers: one queue, no indirect, no persistent
grants, no barrier) and ``xvdb`` served by QEMU's qdisk (dom0's device model, through the
replacement libraries), each over its own image file, each driven by our frontend.
Hypothesis generates request streams — reads, writes, flushes and discards at any
sector alignment and length (discards on the 4 KiB granularity both advertise) — and
each stream runs on both disks from the same starting content: every completed
operation's outcome (read data, status) and the final image bytes must be identical.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpv.backends.block import BlockBackendDriver, BlockConfig
from xenpv.frontends.block import BlockError, BlockFrontend, FrontConfig
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.xenbus.toolstack import add_device, vbd_keys
from xenpv.xenstore.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))

from qemu_support import qemu_command, start_qemu
from shim_peers import LoopbackRun

GUEST = 35
WAIT = 20.0
SIZE = 1 << 20
SECTORS = SIZE // 512

Op = tuple[Any, ...]


@st.composite
def operation(draw: st.DrawFn) -> Op:
    kind = draw(st.sampled_from(["read", "write", "write", "flush", "discard"]))
    if kind == "flush":
        return ("flush",)
    if kind == "discard":
        page = draw(st.integers(0, SIZE // 4096 - 1))
        pages = draw(st.integers(1, min(64, SIZE // 4096 - page)))
        return ("discard", page * 4096, pages * 4096)
    sector = draw(st.integers(0, SECTORS - 1))
    count = draw(st.integers(1, min(300, SECTORS - sector)))
    if kind == "read":
        return ("read", sector * 512, count * 512)
    return ("write", sector * 512, count * 512, draw(st.integers(0, 2**32 - 1)))


@dataclass
class Rig:
    """Both disks, connected, and the loop they live in."""

    loop: asyncio.AbstractEventLoop
    ours: BlockFrontend
    qemu: BlockFrontend
    images: tuple[Path, Path]
    start: bytes


async def run_stream(fe: BlockFrontend, ops: list[Op], start: bytes) -> list[Any]:
    await fe.write(0, start)
    assert await fe.flush()
    out: list[Any] = []
    for op in ops:
        try:
            if op[0] == "read":
                out.append(await fe.read(op[1], op[2]))
            elif op[0] == "write":
                await fe.write(op[1], random.Random(op[3]).randbytes(op[2]))
                out.append("ok")
            elif op[0] == "flush":
                out.append(await fe.flush())
            else:
                await fe.discard(op[1], op[2])
                out.append("ok")
        except BlockError as exc:
            out.append(("error", exc.status))
    assert await fe.flush()
    return out


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("blkdiff")
    images = (tmp / "ours.img", tmp / "qemu.img")
    for img in images:
        img.write_bytes(bytes(SIZE))
    run = LoopbackRun({GUEST: "guest"})
    loop = asyncio.new_event_loop()
    held: list[Any] = []
    try:
        rundir = Path(run.rundir)

        async def setup() -> Rig:
            dom0 = ClientPlatform.for_domain(rundir, 0)
            guest = ClientPlatform.for_domain(rundir, GUEST)
            xs0 = await connect(str(rundir / "dom0" / "xenstore"))
            xsg = await connect(str(rundir / f"dom{GUEST}" / "xenstore"))
            held.extend([dom0, guest, xs0, xsg])
            a, fa, ba = vbd_keys(str(images[0]), vdev="xvda")
            b, fb, bb = vbd_keys(f"aio:{images[1]}", vdev="xvdb")
            bb.pop("type")
            ia = await add_device(xs0, "vbd", GUEST, 0, a, frontend_keys=fa, backend_keys=ba)
            ib = await add_device(xs0, "vbd", GUEST, 0, b, frontend_keys=fb, backend_keys=bb,
                                  backend_type="qdisk")
            start_qemu(run, qemu_command(GUEST), tmp / "qemu.log")
            be = BlockBackendDriver(dom0, xs0, ia.backend_path, config=BlockConfig(
                max_queues=1, max_indirect_segments=0, persistent=False, barrier=False,
                resize_poll=0))
            ours = BlockFrontend(guest, xsg, ia.frontend_path, config=FrontConfig())
            qemu = BlockFrontend(guest, xsg, ib.frontend_path, config=FrontConfig())
            held[:0] = [be, ours, qemu]
            await be.start()
            await ours.start()
            await qemu.start()
            await ours.ready(WAIT)
            await qemu.ready(WAIT)
            assert ours.features["flush"] and qemu.features["flush"]
            assert ours.features["discard"] and qemu.features["discard"]
            assert ours.max_segments == qemu.max_segments == 11
            return Rig(loop, ours, qemu, images, random.Random(0).randbytes(SIZE))

        yield loop.run_until_complete(asyncio.wait_for(setup(), 60))

        async def teardown() -> None:
            for obj in held:
                result = obj.close()
                if asyncio.iscoroutine(result):
                    await result

        loop.run_until_complete(asyncio.wait_for(teardown(), 60))
    finally:
        loop.close()
        run.close()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(ops=st.lists(operation(), min_size=1, max_size=12))
def test_request_streams_match_qemu(rig: Rig, ops: list[Op]) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        a, b = await asyncio.gather(run_stream(rig.ours, ops, rig.start),
                                    run_stream(rig.qemu, ops, rig.start))
        return a, b

    ours, qemu = rig.loop.run_until_complete(asyncio.wait_for(both(), 60))
    assert ours == qemu
    assert rig.images[0].read_bytes() == rig.images[1].read_bytes()

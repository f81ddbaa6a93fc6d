"""The block pair across processes on the loopback daemon, driven by the CLI.

``xenpv block backend --all`` runs as dom0 in its own process; the toolstack step is
``xenpv device add vbd --target IMAGE``; the guest's frontend runs here (a loopback client
acting as the guest).  Writes acknowledged before a FLUSH's acknowledgement are in the
image after the backend is SIGKILLed right after that acknowledgement (many rounds, random
timing), and a restarted backend serves the device again; ``xenpv block info`` shows the
negotiation; the emulator holds nothing afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_support import json_line, xenpv

from xenpv.frontends.block import BlockFrontend, FrontConfig
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.xenbus import remove_device
from xenpv.xenstore.client import connect

GUEST = 5
WAIT = 20.0
MiB = 1 << 20
VDEV = 51712


def start_backend(rundir: str, procs: list[subprocess.Popen[bytes]], *extra: str,
                  engine: str = "auto") -> subprocess.Popen[bytes]:
    be = subprocess.Popen(xenpv("block", "backend", "--all", "--rundir", rundir,
                                "--engine", engine, *extra),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(be)
    ready = json_line(be, WAIT)
    assert ready["event"] == "ready"
    assert ready["engine"] == ("io_uring" if engine == "auto" else engine)
    return be


async def connect_frontend(rundir: str, fe_path: str) -> tuple[BlockFrontend, Any, Any]:
    guest = ClientPlatform.for_domain(rundir, GUEST)
    xs = await connect(str(Path(rundir) / f"dom{GUEST}" / "xenstore"))
    fe = BlockFrontend(guest, xs, fe_path, config=FrontConfig(persistent_pages=64),
                       close_timeout=1.0)
    await fe.start()
    await fe.ready(WAIT)
    return fe, xs, guest


def add_vbd(sock: str, image: Path) -> str:
    out = subprocess.run(xenpv("device", "add", "vbd", "-f", str(GUEST), "-s", sock,
                               "--target", str(image), "--vdev", "xvda"),
                         check=True, capture_output=True, text=True, timeout=WAIT)
    return out.stdout.split()[0]


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
def test_backend_process_serves_vbds_added_later_and_flushes_durably(
        daemon_machine: Callable[..., DaemonMachine], tmp_path: Path,
        procs: list[subprocess.Popen[bytes]], engine: str) -> None:
    """Rounds of: backend process up (each I/O engine), vbd added (after it started),
    writes, FLUSH, SIGKILL of the backend right after the FLUSH answer (random delay):
    every acknowledged byte is in the image.  The last round ends cleanly and the emulator
    holds nothing."""
    machine = daemon_machine(GUEST, max_grants=4096, max_ports=64)
    rundir = machine.rundir
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    sock = str(Path(rundir) / "dom0" / "xenstore")
    rng = random.Random(11)
    model = bytearray(4 * MiB)

    async def body() -> None:
        for rounds in range(5):
            be = start_backend(rundir, procs, engine=engine)
            fe_path = add_vbd(sock, image)  # the backend finds the device added later
            assert fe_path == f"/local/domain/{GUEST}/device/vbd/{VDEV}"
            fe, xs, guest = await connect_frontend(rundir, fe_path)
            try:
                assert await fe.read(0, 4 * MiB) == model  # what earlier rounds left
                if rounds == 0:
                    info = subprocess.run(xenpv("block", "info", str(GUEST), "xvda", "-s",
                                                sock), check=True, capture_output=True,
                                          text=True, timeout=WAIT)
                    shown = json.loads(info.stdout)
                    assert shown["backend_keys"]["sectors"] == str(4 * MiB // 512)
                    assert shown["frontend_keys"]["protocol"] == "x86_64-abi"
                    assert shown["ring_pages"] == 16 and shown["queues"] == 4
                jobs = []
                for k in range(8):
                    off = (rounds * 8 + k) * 65536
                    blob = rng.randbytes(65536)
                    model[off:off + 65536] = blob
                    jobs.append(fe.write(off, blob))
                await asyncio.gather(*jobs)
                assert await fe.flush()
                if rounds < 4:
                    await asyncio.sleep(rng.random() * 0.01)  # random timing of the kill
                    be.send_signal(signal.SIGKILL)
                    be.wait(WAIT)
                    assert image.read_bytes() == model, f"round {rounds}: data lost"
                    await fe.abort()
                    await remove_device(xs_dom0 := await connect(sock), "vbd", GUEST, VDEV, 0,
                                        force=True)
                    await xs_dom0.close()
                else:
                    await fe.close()
                    assert be.stdin is not None
                    be.stdin.close()
                    done = json_line(be, WAIT)
                    assert done["event"] == "done"
                    assert await asyncio.to_thread(be.wait, WAIT) == 0
                    assert image.read_bytes() == model
            finally:
                await fe.abort()
                await xs.close()
                guest.close()

    asyncio.run(body())
    machine.assert_released()


def test_restarted_backend_process_continues_the_same_frontend(
        daemon_machine: Callable[..., DaemonMachine], tmp_path: Path,
        procs: list[subprocess.Popen[bytes]]) -> None:
    """The backend process is SIGKILLed with requests in flight; a new one finds the
    device Connected, maps the same rings where the old one stopped, serves the requests
    that were never answered, and the frontend carries on without reconnecting."""
    machine = daemon_machine(GUEST, max_grants=4096, max_ports=64)
    rundir = machine.rundir
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    sock = str(Path(rundir) / "dom0" / "xenstore")
    rng = random.Random(5)
    model = bytearray(4 * MiB)

    async def body() -> None:
        be = start_backend(rundir, procs)
        fe_path = add_vbd(sock, image)
        fe, xs, guest = await connect_frontend(rundir, fe_path)
        try:
            for rounds in range(3):
                jobs = []
                for k in range(16):
                    off = (rounds * 16 + k) * 65536
                    blob = rng.randbytes(65536)
                    model[off:off + 65536] = blob
                    jobs.append(asyncio.ensure_future(fe.write(off, blob)))
                await asyncio.sleep(rng.random() * 0.005)
                be.send_signal(signal.SIGKILL)  # some writes are answered, some not
                be.wait(WAIT)
                be = start_backend(rundir, procs)
                await asyncio.wait_for(asyncio.gather(*jobs), WAIT)
                assert await fe.flush()
                assert await fe.read(0, 4 * MiB) == model
                assert image.read_bytes() == model
            assert be.stdin is not None
            be.stdin.close()
            assert json_line(be, WAIT)["event"] == "done"
            await fe.close()
            assert await asyncio.to_thread(be.wait, WAIT) == 0
        finally:
            await fe.abort()
            await xs.close()
            guest.close()

    asyncio.run(body())
    machine.assert_released()

"""A toy device pair across processes on the loopback daemon (``xenpv loopback up``).

The daemon plays the hypervisor and xenstored; the backend domain and the frontend
domain each run in their own process (a device watcher with toy drivers, acting as that
domain through its own xenstore endpoint and control socket); this process is dom0's
toolstack.  Homes are the daemon's, as a toolstack leaves them (``device`` read-only to
the guest, ``error`` writable).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.xenbus import XenbusState, add_device, list_devices, remove_device
from xenpv.xenstore.client import XenstoreClient

HERE = Path(__file__).resolve().parent
FE, BE = 3, 2
S = XenbusState


def spawn(role: str, rundir: str, domid: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "test_xenbus_support.py"), role, rundir, str(domid)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parents[1])},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
    return out + err


def test_device_pair_in_two_processes_connects_and_goes_away() -> None:
    machine = DaemonMachine()
    procs: list[subprocess.Popen[str]] = []
    try:
        for domid in (FE, BE):
            machine.create_domain(domid)
        procs = [spawn("backend", machine.rundir, BE), spawn("frontend", machine.rundir, FE)]

        async def main() -> None:
            dom0 = await XenstoreClient.connect(str(Path(machine.rundir) / "dom0" / "xenstore"))
            try:
                for devid in (0, 1):
                    await add_device(dom0, "toy", FE, BE, devid)

                async def all_connected() -> bool:
                    devs = await list_devices(dom0, "toy", backend_domid=BE)
                    return [(d.frontend_state, d.backend_state) for d in devs] == [
                        (S.Connected, S.Connected)
                    ] * 2

                async with asyncio.timeout(30):
                    while not await all_connected():
                        await asyncio.sleep(0.05)
                assert await remove_device(dom0, "toy", FE, 0, BE, timeout=10) is True
                assert len(await list_devices(dom0, "toy", backend_domid=BE)) == 1
            finally:
                await dom0.close()

        asyncio.run(main())
        assert machine.outstanding()["mappings"] == 1  # device 1 still connected
        outputs = [stop(p) for p in procs]
        for out in outputs:
            assert "stopped" in out, out
        backend_log = outputs[0]
        assert f"/local/domain/{BE}/backend/toy/{FE}/0 4" in backend_log
        deadline = time.monotonic() + 10
        while machine.outstanding()["mappings"] and time.monotonic() < deadline:
            time.sleep(0.05)
        held = machine.outstanding()
        assert held["mappings"] == 0 and held["ports"] == 0, held
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
        machine.close()

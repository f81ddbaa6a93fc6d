"""QEMU (Debian's ``qemu-system-xen``) as dom0's device model in the console tests.

* :func:`qemu_command` / :func:`start_qemu` -- QEMU attached to an emulated guest, run
  through the replacement libraries by a :class:`~shim_peers.LoopbackRun` (which kills it
  at ``close``);
* :func:`text_both_ways` -- the check both console tests make once QEMU serves the
  console: what the guest writes appears on QEMU's pty, what is typed there reaches the
  guest.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from shim_peers import LoopbackRun

from xenpv import peers
from xenpv.cli.demo import Pty

#: What the tests type on QEMU's pty.
TYPED = b"typed on qemu's pty\n"


def qemu_command(domid: int, qmp: str | Path | None = None) -> list[str]:
    """QEMU as dom0's device model for ``domid`` (:func:`xenpv.peers.qemu_device_model`);
    raises ``PeerMissing`` at once if the QEMU build was not fetched."""
    return peers.qemu_device_model(domid, qmp)


def start_qemu(run: LoopbackRun, command: list[str], log_path: Path) -> None:
    """Start ``command`` (:func:`qemu_command`) acting as dom0 on ``run``; its output goes
    to ``log_path``."""
    with open(log_path, "wb") as log:
        run.spawn(0, command, stdout=log, stderr=subprocess.STDOUT)


async def text_both_ways(pty: Pty, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, line: bytes, timeout: float) -> None:
    """The guest's ``writer`` sends ``line`` and it appears on QEMU's ``pty``; then
    :data:`TYPED` typed on the pty arrives at the guest's ``reader``."""
    writer.write(line)
    await asyncio.to_thread(pty.read_until, line, timeout)
    pty.write(TYPED)
    got = await asyncio.wait_for(reader.readline(), timeout)
    assert got == TYPED

"""QEMU (Debian's ``qemu-system-xen``) as dom0's device model in the console tests.

* :func:`qemu_command` / :func:`start_qemu` -- QEMU attached to an emulated guest, run
  through the replacement libraries by a :class:`~shim_peers.LoopbackRun` (which kills it
  at ``close``);
* :func:`with_qemu_guest` -- a loopback run with one guest, dom0's and the guest's
  xenstore connections and the guest's platform, handed to a test body that starts QEMU
  when it has written the device; everything is closed afterwards, and a failure carries
  the tail of QEMU's log;
* :func:`text_both_ways` -- the check both console tests make once QEMU serves the
  console: what the guest writes appears on QEMU's pty, what is typed there reaches the
  guest.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from shim_peers import LoopbackRun, run_showing_log

from xenpv import peers
from xenpv.cli.demo import Pty
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.xenstore.client import XenstoreClient, connect

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


@dataclass
class QemuGuest:
    """What a QEMU test body works with: the run, the guest's platform, dom0's (``xs0``) and
    the guest's (``xsg``) xenstore connections, and QEMU's command and log."""

    run: LoopbackRun
    domid: int
    guest: ClientPlatform
    xs0: XenstoreClient
    xsg: XenstoreClient
    command: list[str]
    log: Path

    def start_qemu(self) -> None:
        """Start QEMU as dom0's device model for the guest (once the device is written)."""
        start_qemu(self.run, self.command, self.log)


def with_qemu_guest(domid: int, tmp_path: Path,
                    body: Callable[[QemuGuest], Awaitable[None]],
                    *, qmp: str | Path | None = None, log_name: str = "qemu.log") -> None:
    """Run ``body`` on a fresh loopback run with guest ``domid`` (see :class:`QemuGuest`);
    QEMU's command is built first, so a missing QEMU fails before anything starts."""
    command = qemu_command(domid, qmp)
    log = tmp_path / log_name
    run = LoopbackRun({domid: "guest"})
    try:
        rundir = Path(run.rundir)

        async def main() -> None:
            guest = ClientPlatform.for_domain(rundir, domid)
            try:
                xs0 = await connect(str(rundir / "dom0" / "xenstore"))
                try:
                    xsg = await connect(str(rundir / f"dom{domid}" / "xenstore"))
                    try:
                        await body(QemuGuest(run, domid, guest, xs0, xsg, command, log))
                    finally:
                        await xsg.close()
                finally:
                    await xs0.close()
            finally:
                guest.close()

        run_showing_log(main, log, "QEMU")
    finally:
        run.close()


async def text_both_ways(pty: Pty, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, line: bytes, timeout: float) -> None:
    """The guest's ``writer`` sends ``line`` and it appears on QEMU's ``pty``; then
    :data:`TYPED` typed on the pty arrives at the guest's ``reader``."""
    writer.write(line)
    await asyncio.to_thread(pty.read_until, line, timeout)
    pty.write(TYPED)
    got = await asyncio.wait_for(reader.readline(), timeout)
    assert got == TYPED

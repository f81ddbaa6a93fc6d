"""Our primary console (console 0) served by QEMU 7.2's console backend.

QEMU runs as dom0's device model for the guest (``-machine xenpv -xen-domid N
-xen-attach``) on the loopback emulator, through the replacement libraries.  The toolstack
publishes ``/local/domain/<N>/console`` with ``type = ioemu`` and ``output = pty`` (so
xenconsoled would leave it alone) and creates QEMU's backend directory
``backend/console/<N>/0``.  For console 0 QEMU does not use grants: it maps
``console/ring-ref`` as a guest frame with ``xenforeignmemory_map``, so our frontend
publishes its page as a frame (``PrimaryConsole(frame=True)``).  QEMU binds the port,
makes a pty and writes its path to ``console/tty``; text goes both ways between our
stream pair and that pty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qemu_support import qemu_command, start_qemu, text_both_ways
from shim_peers import LoopbackRun, run_showing_log, wait_xenstore_value

from xenpv.backends.console import publish_primary_console
from xenpv.cli.demo import Pty
from xenpv.frontends.console import PrimaryConsole
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.xenstore.client import connect

GUEST = 47
WAIT = 20.0


async def create_backend_dir(xs0: Any, domid: int) -> str:
    """What libxl writes for a device-model-served console 0 (xen-protocols.md §8.2)."""
    be = f"/local/domain/0/backend/console/{domid}/0"

    async def body(t: Any) -> None:
        for key, value in (("frontend", f"/local/domain/{domid}/console"),
                           ("frontend-id", str(domid)), ("online", "1"), ("state", "1"),
                           ("protocol", "vt100")):
            await t.write(f"{be}/{key}", value.encode())

    await xs0.transact(body)
    return be


def test_qemu_serves_our_primary_console_through_its_guest_frame(tmp_path: Path) -> None:
    qemu = qemu_command(GUEST)
    qemu_log = tmp_path / "qemu.log"
    run = LoopbackRun({GUEST: "guest"})
    try:
        async def body() -> None:
            guest = ClientPlatform.for_domain(run.rundir, GUEST)
            xs0 = await connect(str(run.rundir / "dom0" / "xenstore"))
            console = PrimaryConsole(guest, 0, frame=True)
            pty: Pty | None = None
            try:
                console.setup()
                assert console.ring_ref >= 0x10000  # a guest frame number
                await publish_primary_console(xs0, GUEST, port=console.port,
                                              ring_ref=console.ring_ref, backend_type="ioemu")
                be = await create_backend_dir(xs0, GUEST)
                reader, writer = await console.open()
                start_qemu(run, qemu, qemu_log)
                pty_path = (await wait_xenstore_value(xs0, f"/local/domain/{GUEST}/console/tty")).decode()
                pty = Pty.open(pty_path)
                await text_both_ways(pty, reader, writer, b"console 0 through qemu\n", WAIT)
                assert await wait_xenstore_value(xs0, f"{be}/state") == b"4"  # Connected
                # QEMU reached the page as a frame: dom0 holds a foreign mapping of it
                dom0 = ClientPlatform.for_domain(run.rundir, 0)
                try:
                    assert dom0.grants.stats(0)[2] >= 1
                finally:
                    dom0.close()
            finally:
                if pty is not None:
                    pty.close()
                console.close()
                await xs0.close()
                guest.close()

        run_showing_log(body, qemu_log, "QEMU")
    finally:
        run.close()

"""Our console frontend served by QEMU's console backend (Debian's qemu-system-xen 7.2).

QEMU runs as dom0's device model for the guest (``-machine xenpv -xen-domid N
-xen-attach``) on the loopback emulator, through the replacement libraries.  The
toolstack creates a secondary console ``device/console/1`` with ``type = ioemu`` and
``output = pty`` in the frontend directory (what QEMU's console backend reads); QEMU maps
the ring through the grant ref our frontend publishes, binds its port, makes a pty and
writes its path to ``tty``.  Text goes both ways between our stream pair and the pty.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

from shim_peers import LoopbackRun

from xenpv import peers
from xenpv.cli.demo import Pty
from xenpv.frontends.console import ConsoleFrontend
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.xenbus.states import XenbusState
from xenpv.xenbus.toolstack import add_device, remove_device
from xenpv.xenstore.client import connect

GUEST = 33
WAIT = 20.0


async def wait_value(client: object, path: str) -> bytes:
    deadline = time.monotonic() + WAIT
    while True:
        with contextlib.suppress(Exception):
            value: bytes = await client.read(path)  # type: ignore[attr-defined]
            if value:
                return value
        assert time.monotonic() < deadline, f"{path} never got a value"
        await asyncio.sleep(0.05)


def test_our_frontend_with_qemus_console_backend(tmp_path: Path) -> None:
    qemu = str(peers.find("usr/libexec/xen-qemu-system-i386"))
    qemu_log = tmp_path / "qemu.log"
    run = LoopbackRun({GUEST: "guest"})
    try:
        rundir = Path(run.rundir)

        async def body() -> None:
            guest = ClientPlatform.for_domain(rundir, GUEST)
            xs0 = await connect(str(rundir / "dom0" / "xenstore"))
            xsg = await connect(str(rundir / f"dom{GUEST}" / "xenstore"))
            pty: Pty | None = None
            frontend = None
            try:
                info = await add_device(xs0, "console", GUEST, 0, 1,
                                        frontend_keys={"type": "ioemu", "output": "pty"})
                with open(qemu_log, "wb") as log:
                    run.spawn(0, [qemu, "-machine", "xenpv", "-xen-domid", str(GUEST),
                                  "-xen-attach", "-display", "none", "-nodefaults"],
                              stdout=log, stderr=subprocess.STDOUT)
                frontend = ConsoleFrontend(guest, xsg, info.frontend_path)
                await frontend.start()
                reader, writer = await frontend.streams(WAIT)
                await frontend.wait_state(XenbusState.Connected, timeout=WAIT)
                assert await xs0.read(f"{info.backend_path}/state") == b"4"
                pty_path = (await wait_value(xs0, f"{info.frontend_path}/tty")).decode()
                pty = Pty.open(pty_path)
                writer.write(b"from the guest through qemu\n")
                await asyncio.to_thread(pty.read_until, b"from the guest through qemu\n", WAIT)
                pty.write(b"typed on qemu's pty\n")
                line = await asyncio.wait_for(reader.readline(), WAIT)
                assert line == b"typed on qemu's pty\n"
                await remove_device(xs0, "console", GUEST, 1, 0, timeout=5.0)
            finally:
                if pty is not None:
                    pty.close()
                if frontend is not None:
                    await frontend.close()
                await xsg.close()
                await xs0.close()
                guest.close()

        try:
            asyncio.run(body())
        except Exception as exc:  # show what QEMU said
            raise AssertionError(f"{exc!r}; QEMU said: {qemu_log.read_text()[-2000:]}") from exc
    finally:
        run.close()

"""Our console frontend served by QEMU's console backend (Debian's qemu-system-xen 7.2).

QEMU runs as dom0's device model for the guest (``-machine xenpv -xen-domid N
-xen-attach``) on the loopback emulator, through the replacement libraries.  The
toolstack creates a secondary console ``device/console/1`` with ``type = ioemu`` and
``output = pty`` in the frontend directory (what QEMU's console backend reads); QEMU maps
the ring through the grant ref our frontend publishes, binds its port, makes a pty and
writes its path to ``tty``.  Text goes both ways between our stream pair and the pty.
"""

from __future__ import annotations

from pathlib import Path

from qemu_support import QemuGuest, text_both_ways, with_qemu_guest
from shim_peers import wait_xenstore_value

from xenpv.cli.demo import Pty
from xenpv.frontends.console import ConsoleFrontend
from xenpv.xenbus.states import XenbusState
from xenpv.xenbus.toolstack import add_device, remove_device

GUEST = 33
WAIT = 20.0


def test_our_frontend_with_qemus_console_backend(tmp_path: Path) -> None:
    async def body(w: QemuGuest) -> None:
        pty: Pty | None = None
        frontend = None
        try:
            info = await add_device(w.xs0, "console", GUEST, 0, 1,
                                    frontend_keys={"type": "ioemu", "output": "pty"})
            w.start_qemu()
            frontend = ConsoleFrontend(w.guest, w.xsg, info.frontend_path)
            await frontend.start()
            reader, writer = await frontend.streams(WAIT)
            await frontend.wait_state(XenbusState.Connected, timeout=WAIT)
            assert await w.xs0.read(f"{info.backend_path}/state") == b"4"
            pty_path = await wait_xenstore_value(w.xs0, f"{info.frontend_path}/tty", WAIT)
            pty = Pty.open(pty_path.decode())
            await text_both_ways(pty, reader, writer, b"from the guest through qemu\n", WAIT)
            await remove_device(w.xs0, "console", GUEST, 1, 0, timeout=5.0)
        finally:
            if pty is not None:
                pty.close()
            if frontend is not None:
                await frontend.close()

    with_qemu_guest(GUEST, tmp_path, body)

"""xenconsoled serving a primary console published as a guest frame.

Our console frontend (:class:`PrimaryConsole` with ``frame=True``) allocates its page as
a guest frame of the emulated domain; the toolstack publishes its frame number as
``console/ring-ref``.  Without grant ref 0 (``grant_ref0=False``) xenconsoled's preferred
path (mapping grant ref 0) fails and it must ``xenforeignmemory_map`` the frame through the
replacement library; with grant ref 0 on the same frame it takes the grant.  Either way
Debian's ``xenconsole`` attaches to the pty xenconsoled makes and text goes both ways.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from shim_peers import LoopbackRun, run_showing_log, wait_xenstore_value

from xenpv import peers
from xenpv.backends.console import publish_primary_console
from xenpv.cli.demo import Pty
from xenpv.frontends.console import PrimaryConsole
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.xenstore.client import connect

WAIT = 20.0
# domids of our own: xenconsole locks /var/lock/xenconsole.<domid> machine-wide
GUESTS = {False: 45, True: 46}


@pytest.mark.parametrize("grant_ref0", [False, True], ids=["frame-only", "frame-and-ref0"])
def test_xenconsoled_serves_a_console_published_as_a_guest_frame(
        tmp_path: Path, grant_ref0: bool) -> None:
    consoled = str(peers.find("xenconsoled"))
    xenconsole = str(peers.find("xenconsole"))
    domid = GUESTS[grant_ref0]
    run = LoopbackRun({domid: "guest"})
    terminal: Pty | None = None
    try:
        async def body() -> None:
            nonlocal terminal
            guest = ClientPlatform.for_domain(run.rundir, domid)
            xs0 = await connect(str(run.rundir / "dom0" / "xenstore"))
            console = PrimaryConsole(guest, 0, frame=True, grant_ref0=grant_ref0)
            try:
                console.setup()
                assert console.ring_ref >= 0x10000  # a frame number, not grant ref 0
                stats = guest.grants.stats()
                assert stats[0] == (1 if grant_ref0 else 0)  # grants live: ref 0 or none
                await publish_primary_console(xs0, domid, port=console.port,
                                              ring_ref=console.ring_ref)
                reader, writer = await console.open()
                with open(tmp_path / "xenconsoled.log", "wb") as out:
                    run.spawn(0, [consoled, "-i", "--log=guest", f"--log-dir={tmp_path}"],
                              stdout=out, stderr=subprocess.STDOUT)
                await wait_xenstore_value(xs0, f"/local/domain/{domid}/console/tty")
                master, slave = os.openpty()
                terminal = Pty(master)
                try:
                    run.spawn(0, [xenconsole, "--type", "pv", str(domid)], stdin=slave,
                              stdout=slave, stderr=slave, start_new_session=True)
                finally:
                    os.close(slave)
                writer.write(b"guest says hello\r\n")
                await asyncio.to_thread(terminal.read_until, b"guest says hello", WAIT)
                terminal.write(b"typed in xenconsole\r")  # xenconsole made it raw
                line = await asyncio.wait_for(reader.readuntil(b"\r"), WAIT)
                assert line.endswith(b"typed in xenconsole\r")
                log = tmp_path / "guest-guest.log"
                assert log.exists() and b"guest says hello" in log.read_bytes()
            finally:
                console.close()
                await xs0.close()
                guest.close()

        run_showing_log(body, tmp_path / "xenconsoled.log", "xenconsoled")
    finally:
        if terminal is not None:
            terminal.close()
        run.close()

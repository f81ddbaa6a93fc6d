"""Scenario 27 (hostile guest console), R14: ``xenpv console attach -n N`` never opens a
terminal the guest names.

The guest rewrites ``device/console/N/tty`` in its own frontend directory to point at a
terminal of the host; ``attach`` must still connect to the pty the backend serves (whose
path it takes from the backend's directory), and the host terminal must receive nothing.
"""

from __future__ import annotations

import os
import select
import subprocess

from cli_support import json_line, xenpv

from xenpv.cli.demo import Pty
from xenpv.platforms.loopback.harness import DaemonMachine

GUEST = 12
WAIT = 20.0


def test_scenario_27_attach_ignores_the_tty_the_guest_writes(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    machine = DaemonMachine(max_grants=64, max_ports=32)
    terminal: Pty | None = None
    victim_master, victim_slave = os.openpty()
    try:
        machine.create_domain(GUEST)
        rundir = machine.rundir
        dom0_xs = os.path.join(rundir, "dom0", "xenstore")
        guest_xs = os.path.join(rundir, f"dom{GUEST}", "xenstore")
        subprocess.run(xenpv("device", "add", "console", "--frontend-domid", str(GUEST),
                             "--devid", "1", "-s", dom0_xs), check=True, timeout=WAIT)
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        be = subprocess.Popen(xenpv("console", "backend", "--rundir", rundir),
                              **pipes)  # type: ignore[call-overload]
        procs.append(be)
        assert json_line(be, WAIT)["event"] == "ready"
        fe = subprocess.Popen(xenpv("console", "frontend", "--rundir", rundir, "--domid",
                                    str(GUEST), "--devid", "1", "--shell"),
                              **pipes)  # type: ignore[call-overload]
        procs.append(fe)
        assert json_line(fe, WAIT)["event"] == "ready"
        # the guest names a host terminal in its own (writable) frontend directory
        env = dict(os.environ, XENSTORED_PATH=guest_xs)
        subprocess.run(xenpv("xenstore", "write", "device/console/1/tty",
                             os.ttyname(victim_slave)), check=True, env=env, timeout=WAIT)
        master, slave = os.openpty()
        terminal = Pty(master)
        at = subprocess.Popen(xenpv("console", "attach", str(GUEST), "--num", "1", "--rundir",
                                    rundir),
                              stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        procs.append(at)
        os.close(slave)
        terminal.write(b"echo through the backend's pty\n")
        terminal.read_until(b"through the backend's pty\n", WAIT)
        terminal.write(b"\x1d")
        assert at.wait(WAIT) == 0
        readable, _, _ = select.select([victim_master], [], [], 0.2)
        assert not readable, os.read(victim_master, 4096)
        for p in (be, fe):
            assert p.stdin is not None
            p.stdin.close()
            assert p.wait(WAIT) == 0
    finally:
        os.close(victim_master)
        os.close(victim_slave)
        if terminal is not None:
            terminal.close()
        machine.close()

"""``xenpv console``: backend, frontend, publish and attach as separate processes.

The guest runs ``xenpv console frontend --shell``; the toolstack step is ``xenpv console
publish``; ``xenpv console backend`` serves the console on a pty and ``xenpv console
attach`` (on a terminal of ours) connects to it like ``xenconsole``: typed lines come
back from the guest's shell, and Ctrl-] leaves.
"""

from __future__ import annotations

import os
import subprocess

from cli_support import json_line, xenpv

from xenpv.cli.demo import Pty
from xenpv.platforms.loopback.harness import DaemonMachine

GUEST = 11
WAIT = 20.0


def test_backend_frontend_publish_and_attach(procs: list[subprocess.Popen[bytes]]) -> None:
    machine = DaemonMachine(max_grants=64, max_ports=32)
    terminal: Pty | None = None
    try:
        machine.create_domain(GUEST)
        rundir = machine.rundir
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        fe = subprocess.Popen(xenpv("console", "frontend", "--rundir", rundir, "--domid",
                                    str(GUEST), "--shell"), **pipes)  # type: ignore[call-overload]
        procs.append(fe)
        ready = json_line(fe, WAIT)
        subprocess.run(xenpv("console", "publish", "--rundir", rundir, "--domid", str(GUEST),
                             "--port", str(ready["port"])), check=True, timeout=WAIT)
        be = subprocess.Popen(xenpv("console", "backend", "--rundir", rundir, "--domid",
                                    str(GUEST)), **pipes)  # type: ignore[call-overload]
        procs.append(be)
        assert json_line(be, WAIT)["event"] == "ready"
        master, slave = os.openpty()
        terminal = Pty(master)
        at = subprocess.Popen(xenpv("console", "attach", str(GUEST), "--rundir", rundir),
                              stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        procs.append(at)
        os.close(slave)
        terminal.write(b"echo through attach\n")
        terminal.read_until(b"through attach\n", WAIT)
        terminal.write(b"\x1d")
        assert at.wait(WAIT) == 0
        for p in (be, fe):  # the backend lets go of the page first
            assert p.stdin is not None
            p.stdin.close()
            assert p.wait(WAIT) == 0
        machine.assert_released()
    finally:
        if terminal is not None:
            terminal.close()
        machine.close()

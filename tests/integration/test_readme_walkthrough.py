"""Issue 14 item 11: the README's command walkthrough works as written.

The first block of README.md's "The command line" section is run by bash, unchanged but
for its run directory (a temporary one instead of ``/tmp/xl``), with ``xenpv`` on
``PATH`` running this tree.  Its one interactive step, ``console attach``, gets its
keystrokes on stdin: a line for the guest's shell, then Ctrl-] once the answer is back.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_support import session_members

ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD = 120.0
MARKER = b"hello-from-the-walkthrough"


def walkthrough() -> list[str]:
    """The command lines of the README's walkthrough block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The command line", 1)[1]
    block = re.search(r"\n\n((?:    .*\n)+)", section)
    assert block is not None, "no indented block under 'The command line'"
    return [line[4:] for line in block.group(1).splitlines()]


def _read(fd: int, deadline: float, proc: subprocess.Popen[bytes], out: bytearray) -> bytes:
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        left = session_members(proc.pid)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
        assert proc.stderr is not None
        out += f"\nstill running: {left}".encode()
        raise AssertionError(f"the walkthrough hangs: {bytes(out)!r} {proc.stderr.read()!r}")
    return os.read(fd, 65536)


def test_walkthrough_block_is_the_one_described() -> None:
    lines = walkthrough()
    assert lines[0].startswith("xenpv info")
    assert any(line.startswith("xenpv console attach 1") for line in lines)
    assert all("/tmp/xl" not in line or "--rundir /tmp/xl" in line for line in lines)


def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    rundir = tmp_path / "xl"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "xenpv"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m xenpv "$@"\n')
    shim.chmod(0o755)
    script = "set -ex\n" + "\n".join(line.replace("/tmp/xl", str(rundir))
                                    for line in walkthrough()) + "\n"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XENPV_LOOPBACK_", "XENSTORED_"))}
    env["PATH"] = f"{bindir}:{env['PATH']}"
    proc = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    out = bytearray()
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"echo " + MARKER + b"\n")
        proc.stdin.flush()
        deadline = time.monotonic() + HANG_GUARD
        while out.count(MARKER) < 1:
            assert time.monotonic() < deadline, bytes(out)
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, (bytes(out), proc.wait(10), proc.stderr and proc.stderr.read())
                out += chunk
        proc.stdin.write(b"\x1d")  # Ctrl-]: leave the console
        proc.stdin.flush()
        while chunk := _read(proc.stdout.fileno(), deadline, proc, out):
            out += chunk
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.wait(HANG_GUARD)
        assert proc.returncode == 0, (bytes(out), err)
        text = out.decode(errors="replace")
        assert 'name = "guest"' in text  # xenstore ls
        assert '"devid": 1' in text and '"type": "console"' in text  # device list --json
        assert re.search(r"^1\t", text, re.M)  # loopback stats has dom1's row
        assert b"Traceback" not in err, err
        assert not (rundir / "dom0" / "control").exists()  # the emulator cleaned up
        assert not session_members(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, _ in session_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()

"""Fixtures for interop tests: our embedded xenstored as a real process.

``xs_server`` starts ``python -m xenpv xenstored`` on a fresh socket (plus one socket acting
as domain 5) and stops it afterwards, also when the test fails.  ``xs_env`` is the
environment under which the real Xen programs talk to it (``XENSTORED_PATH`` set,
``LD_LIBRARY_PATH`` pointing at Debian's libraries).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenpv import peers

#: Domain whose own endpoint the fixture also serves.
GUEST_DOMID = 5
_START_TIMEOUT = 30.0


@dataclass
class XsServer:
    """A running embedded xenstored."""

    socket: str
    guest_socket: str
    proc: subprocess.Popen[bytes]
    log: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for real Xen programs (and our CLI) talking to dom0's socket."""
        env = peers.run_env(base=base)
        env["XENSTORED_PATH"] = self.socket
        return env


def start_xenstored(tmp: Path, *extra: str) -> XsServer:
    """Start the daemon in ``tmp``; wait until it listens (raise if it does not)."""
    sock = str(tmp / "xenstored.sock")
    guest = str(tmp / f"dom{GUEST_DOMID}.sock")
    pid_file = tmp / "xenstored.pid"
    log = tmp / "xenstored.log"
    cmd = [
        sys.executable, "-m", "xenpv", "xenstored", "--socket", sock,
        "--domain", f"{GUEST_DOMID}={guest}", "--pid-file", str(pid_file), *extra,
    ]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    server = XsServer(sock, guest, proc, log)
    deadline = time.monotonic() + _START_TIMEOUT
    while not pid_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_xenstored(server)
            raise RuntimeError(f"xenstored did not start: {log.read_text(errors='replace')}")
        time.sleep(0.02)
    return server


def stop_xenstored(server: XsServer) -> None:
    """SIGTERM, then SIGKILL after a grace period; always reaps the process."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture
def xs_server(tmp_path: Path, peer_root: Path) -> Iterator[XsServer]:
    """Our xenstored on a private socket for one test."""
    server = start_xenstored(tmp_path)
    try:
        yield server
    finally:
        stop_xenstored(server)


@pytest.fixture
def xs_env(xs_server: XsServer) -> dict[str, str]:
    """Environment for real programs talking to ``xs_server``."""
    env = xs_server.env()
    env.pop("XENSTORED_RUNDIR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


@pytest.fixture
def xs_server_with(tmp_path: Path, peer_root: Path) -> Iterator[Callable[..., XsServer]]:
    """Start our xenstored with extra command-line arguments (stopped after the test)."""
    started: list[XsServer] = []

    def start(*extra: str) -> XsServer:
        tmp = tmp_path / f"xs{len(started)}"
        tmp.mkdir()
        server = start_xenstored(tmp, *extra)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            stop_xenstored(server)

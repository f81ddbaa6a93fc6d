"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xenpv import peers
from xenpv.platforms.loopback.harness import DaemonMachine, InProcessMachine


@pytest.fixture(scope="session")
def peer_root() -> Path:
    """Root of the unpacked real Xen programs; a missing tree is an error, never a skip."""
    root = peers.peers_root()
    peers.find("usr/bin/xenstore-read", root)  # raises PeerMissing with instructions
    return root


@pytest.fixture(scope="session")
def peer_env(peer_root: Path) -> dict[str, str]:
    """Environment under which the real Xen programs find their libraries."""
    return peers.run_env()


@pytest.fixture
def inprocess_machine() -> Iterator[InProcessMachine]:
    """A fresh in-process loopback emulator, closed after the test."""
    machine = InProcessMachine()
    try:
        yield machine
    finally:
        machine.close()


@pytest.fixture
def daemon_machine() -> Iterator[Callable[..., DaemonMachine]]:
    """``daemon_machine(*domids, **limits)``: a loopback daemon (``DaemonMachine(**limits)``)
    with those domains created; every daemon made is stopped after the test."""
    made: list[DaemonMachine] = []

    def make(*domids: int, **limits: int) -> DaemonMachine:
        machine = DaemonMachine(**limits)
        made.append(machine)
        for domid in domids:
            machine.create_domain(domid)
        return machine

    try:
        yield make
    finally:
        for machine in made:
            machine.close()


def pytest_report_header(config: pytest.Config) -> str:
    return f"xenpv peers: {peers.peers_root()} (CI={os.environ.get('CI', '')})"


@pytest.fixture(params=["selected", "python"])
def direct_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the embedded xenstored's selected direct path (the compiled one when
    built) and again on its pure-Python twin.  Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("direct_path")``; the server must run in the
    test's process (the in-thread harness of the xenstore socket tests)."""
    from xenpv.xenstore import server

    if request.param == "python":
        monkeypatch.setattr(server, "_serve", server._XsConnection._serve_direct)
    return str(request.param)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts (append them): each is killed if still running, then reaped,
    and its pipes closed, whatever the test's outcome; the last started goes first (a
    client before the service it uses)."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            if p.poll() is None:
                p.kill()
            p.wait(10)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()

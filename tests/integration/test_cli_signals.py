"""Issue 14 item 10: commands that start processes end them on SIGTERM, SIGINT and SIGHUP,
and long-running commands stop on those signals.

Each command runs in a session of its own, so "every child is gone" is checked by
looking for any process left in that session.  Timeouts here are hang guards only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_support import json_line, session_members, xenpv

from xenpv.platforms.loopback.harness import DaemonMachine

HANG_GUARD = 60.0
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


def wait_for_member(sid: int, needle: str, timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while not any(needle in cmd for _, cmd in session_members(sid)):
        assert time.monotonic() < deadline, f"no {needle!r} process started"
        time.sleep(0.05)


def wait_session_empty(sid: int, timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while left := session_members(sid):
        assert time.monotonic() < deadline, f"processes left behind: {left}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_demo_ends_its_children_and_removes_its_rundir_on(sig: signal.Signals) -> None:
    demo = subprocess.Popen(xenpv("demo", "--quick"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert demo.stdout is not None
        ready, _, _ = select.select([demo.stdout], [], [], HANG_GUARD)
        assert ready
        first = demo.stdout.readline().decode()
        assert first.startswith("xenpv demo: loopback emulator in "), first
        rundir = first.rsplit(" ", 1)[1].strip()
        # the guest's console frontend is the process that used to be orphaned
        wait_for_member(demo.pid, "console frontend")
        demo.send_signal(sig)
        assert demo.wait(HANG_GUARD) == 128 + sig
        wait_session_empty(demo.pid)
        assert not os.path.exists(rundir)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid, _ in session_members(demo.pid):
            os.kill(pid, signal.SIGKILL)
        for f in (demo.stdout, demo.stderr):
            if f is not None:
                f.close()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_console_pair_stops_on(sig: signal.Signals) -> None:
    """Backend and frontend (a secondary console, connected) stop on each signal, with
    stdin not a pipe (so only the signal can stop them)."""
    machine = DaemonMachine(max_grants=64, max_ports=32)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        machine.create_domain(7)
        rundir = machine.rundir
        subprocess.run(xenpv("device", "add", "console", "--frontend-domid", "7", "--devid",
                             "1", "-s", os.path.join(rundir, "dom0", "xenstore")),
                       check=True, timeout=HANG_GUARD)
        for argv in (("console", "backend", "--rundir", rundir, "--all"),
                     ("console", "frontend", "--rundir", rundir, "--domid", "7",
                      "--devid", "1")):
            p = subprocess.Popen(xenpv(*argv), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE)
            procs.append(p)
            assert json_line(p, HANG_GUARD)["event"] == "ready"
        for p in procs:  # the guest first: the backend then sees it close
            p.send_signal(sig)
            assert p.wait(HANG_GUARD) == 0
        machine.assert_released()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        machine.close()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_vchan_proxy_removes_its_socket_on(sig: signal.Signals, tmp_path: Path) -> None:
    """A listening proxy stops on each signal and removes the socket file it made."""
    from xenpv.platforms.loopback.env import domain_env

    machine = DaemonMachine(max_grants=64, max_ports=32)
    sock = tmp_path / "proxy.sock"
    proc: subprocess.Popen[bytes] | None = None
    try:
        machine.create_domain(1)
        env = dict(os.environ, **domain_env(machine.rundir, 0))
        proc = subprocess.Popen(xenpv("vchan-proxy", "1", "/local/domain/1/data/v", str(sock)),
                                env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + HANG_GUARD
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(HANG_GUARD) == 0
        assert not sock.exists()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        machine.close()


@pytest.mark.parametrize("xenstored", ["ours", "xen-c"])
def test_loopback_up_stops_on_sighup(tmp_path: Path, xenstored: str) -> None:
    """Also with Xen's C xenstored as dom0's: its files (in the run directory) go too."""
    rundir = tmp_path / "run"
    proc = subprocess.Popen(xenpv("loopback", "up", "--rundir", str(rundir), "--domain", "1",
                                  "--xenstored", xenstored),
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], HANG_GUARD)
        assert ready and b"ready" in proc.stdout.readline()
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(HANG_GUARD) == 0
        assert not (rundir / "dom0" / "control").exists()
        assert not rundir.exists()  # it made the run directory, so it removes it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def dom7_watches(rundir: str) -> int:
    out = subprocess.run(xenpv("loopback", "stats", "--rundir", rundir, "--json"),
                         capture_output=True, check=True, timeout=HANG_GUARD).stdout
    return sum(row["watches"] for row in json.loads(out) if row["domid"] == 7)


def test_console_frontend_waiting_for_its_backend_stops_on_sigterm() -> None:
    """No backend serves the console: the frontend, still setting up, obeys SIGTERM
    (it used to wait out its 30 s connect timeout and fail)."""
    machine = DaemonMachine(max_grants=64, max_ports=32)
    fe: subprocess.Popen[bytes] | None = None
    try:
        machine.create_domain(7)
        rundir = machine.rundir
        subprocess.run(xenpv("device", "add", "console", "--frontend-domid", "7", "--devid",
                             "1", "-s", os.path.join(rundir, "dom0", "xenstore")),
                       check=True, timeout=HANG_GUARD)
        fe = subprocess.Popen(xenpv("console", "frontend", "--rundir", rundir, "--domid", "7",
                                    "--devid", "1"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        # its xenstore watch shows it is up and waiting for a backend
        deadline = time.monotonic() + HANG_GUARD
        while not dom7_watches(rundir):
            assert fe.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        fe.send_signal(signal.SIGTERM)
        assert fe.wait(HANG_GUARD) == 0
        assert fe.stdout is not None
        assert b'"done"' in fe.stdout.read()
        machine.assert_released()
    finally:
        if fe is not None:
            if fe.poll() is None:
                fe.kill()
            fe.wait()
            if fe.stdout is not None:
                fe.stdout.close()
        machine.close()


def test_xenstored_stops_on_sighup(tmp_path: Path) -> None:
    sock, pidfile = tmp_path / "xs.sock", tmp_path / "xs.pid"
    proc = subprocess.Popen(xenpv("xenstored", "--socket", str(sock), "--pid-file",
                                  str(pidfile)), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(HANG_GUARD) == 0
        assert not sock.exists() and not pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_console_attach_restores_the_terminal_on(sig: signal.Signals) -> None:
    import termios

    machine = DaemonMachine(max_grants=64, max_ports=32)
    procs: list[subprocess.Popen[bytes]] = []
    master, slave = os.openpty()
    try:
        machine.create_domain(7)
        rundir = machine.rundir
        subprocess.run(xenpv("device", "add", "console", "--frontend-domid", "7", "--devid",
                             "1", "-s", os.path.join(rundir, "dom0", "xenstore")),
                       check=True, timeout=HANG_GUARD)
        for argv in (("console", "backend", "--rundir", rundir),
                     ("console", "frontend", "--rundir", rundir, "--domid", "7",
                      "--devid", "1", "--shell")):
            p = subprocess.Popen(xenpv(*argv), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE)
            procs.append(p)
            assert json_line(p, HANG_GUARD)["event"] == "ready"
        before = termios.tcgetattr(slave)
        at = subprocess.Popen(xenpv("console", "attach", "7", "-n", "1", "--rundir", rundir),
                              stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        procs.append(at)
        deadline = time.monotonic() + HANG_GUARD
        while termios.tcgetattr(slave)[3] & termios.ICANON:  # until attach made it raw
            assert at.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        at.send_signal(sig)
        assert at.wait(HANG_GUARD) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(HANG_GUARD)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        os.close(master)
        os.close(slave)
        machine.close()

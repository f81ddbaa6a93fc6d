"""``docs/real-xen.md``'s commands, run in order on the real-Xen platform mode.

Theory of operation: the runbook marks every ``xenpv`` command it gives in fenced blocks
``sh runbook:dom0`` / ``sh runbook:guest``.  This test extracts them and runs each with
``bash -c`` as a user would, in the environment of that domain of a loopback daemon
(``xenpv loopback env``) with ``XENPV_PLATFORM=xen``: every platform the commands open is
then :class:`~xenpv.platforms.xen.XenPlatform`, cffi on ``libxengnttab.so.1`` and
``libxenevtchn.so.1`` -- here the emulator's replacement libraries -- with the xenstore on
``$XENSTORED_PATH``: the code path of a real host, with the emulator as the hypervisor.

What the runbook assumes of the host is played by stand-ins outside it: the guest kernel's
console 0 is ``xenpv console frontend --shell`` on the emulator's own platform (the domain
builder's page at grant ref 0, which Xen's library API cannot place), published as ``xl``
would with ``xenpv console publish``.

Per line: ``export VAR=$(CMD)`` sets VAR for the later lines of that domain; a line ending
in ``&`` is a service, started and kept until the end (``console backend``/``frontend``
announce readiness with a JSON line, which is awaited); ``xenpv console attach`` runs on
a terminal of ours, asks the guest's shell for text (``send 10``) and leaves with Ctrl-];
every other line must exit 0 and print the text of its ``# -> TEXT`` comment.  A missing
replacement library or peer library fails the test, never skips it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenpv.cli.demo import Pty
from xenpv.platforms.loopback.env import shim_dir
from xenpv.testing.vchan import VchanLab, read_line

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "real-xen.md"
GUEST = 6
WAIT = 20.0

BLOCK = re.compile(r"^```sh runbook:(dom0|guest)\n(.*?)^```", re.M | re.S)
ANY_BLOCK = re.compile(r"^```(.*?)\n(.*?)^```", re.M | re.S)
#: a line that runs the xenpv command (at its start, after a pipe, or in $(...))
INVOKES = re.compile(r"(^|[|;&(]\s*)xenpv\s")
EXPORT = re.compile(r"^export (\w+)=\$\((.*)\)$")
#: services that print a JSON line once they serve
ANNOUNCES = ("xenpv console backend", "xenpv console frontend")
#: commands that open a platform: the replacement libraries must say they were used
PLATFORM_USERS = ("xenpv vchan-proxy", "xenpv console backend", "xenpv console frontend")


@dataclass(frozen=True)
class Step:
    """One runbook line: the domain it runs in, the command, what it must print."""

    domain: str
    command: str
    expect: str | None
    background: bool


def runbook_steps(text: str) -> list[Step]:
    """The marked commands of ``text``, in order."""
    steps: list[Step] = []
    for domain, body in BLOCK.findall(text):
        for raw in body.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            command, _, comment = line.partition("  #")
            comment = comment.strip()
            expect = comment[2:].strip() if comment.startswith("->") else None
            command = command.strip()
            background = command.endswith("&")
            steps.append(Step(domain, command.rstrip("&").strip(), expect, background))
    return steps


def test_runbook_marks_every_xenpv_command_and_only_those() -> None:
    text = RUNBOOK.read_text()
    steps = runbook_steps(text)
    assert {s.domain for s in steps} == {"dom0", "guest"}
    for step in steps:
        assert INVOKES.search(step.command), f"runbook line without xenpv: {step.command!r}"
    for info, body in ANY_BLOCK.findall(text):
        # the rehearsal block sets up what the lab fixture sets up (the daemon, the
        # domains' environments, the console 0 stand-in)
        if info.startswith("sh runbook:") or info == "sh rehearsal":
            continue
        for line in body.splitlines():
            assert not INVOKES.search(line.split("#")[0]), (
                f"xenpv command outside a runbook block (the test would not run it): {line!r}"
            )


# --------------------------------------------------------------------------- running it


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A ``xenpv`` on ``PATH`` that runs this tree with this interpreter."""
    d = tmp_path / "bin"
    d.mkdir()
    script = d / "xenpv"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m xenpv "$@"\n')
    script.chmod(0o755)
    return d


@pytest.fixture
def lab() -> Iterator[VchanLab]:
    """The loopback daemon with the guest; its replacement libraries must exist."""
    for lib in ("libxengnttab.so.1", "libxenevtchn.so.1"):
        assert (shim_dir() / lib).exists(), f"replacement library {lib} not built (setup.py)"
    with VchanLab((GUEST,), max_grants=128, max_ports=64) as lab:
        yield lab


class Runner:
    """Runs runbook steps as the domains of ``lab`` in real-Xen mode."""

    def __init__(self, lab: VchanLab, bin_dir: Path, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.envs = {name: self._env(domid, bin_dir) for name, domid in
                     (("dom0", 0), ("guest", GUEST))}
        self.envs["dom0"]["GUEST"] = str(GUEST)  # the runbook: GUEST=$(xl domid guest1)
        self.services: list[tuple[Step, subprocess.Popen[bytes], Path]] = []

    def _env(self, domid: int, bin_dir: Path) -> dict[str, str]:
        env = self.lab.env(domid)  # loopback env, then Debian's libraries (PeerMissing)
        env["XENPV_PLATFORM"] = "xen"
        env["XENPV_SHIM_DEBUG"] = "1"  # the libraries log "connected as domain N"
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, step: Step) -> None:
        env = self.envs[step.domain]
        export = EXPORT.match(step.command)
        if export:
            out = self._foreground(export.group(2), env, step)
            env[export.group(1)] = out.strip()
        elif step.background:
            self._service(step, env)
        elif re.match(r"xenpv console attach\b", step.command):
            self._attach(step, env)
        else:
            self._foreground(step.command, env, step)
        for service, proc, log in self.services:
            code = proc.poll()
            assert code in (None, 0), (
                f"service {service.command!r} died with {code}:\n{log.read_text()}")

    def check_xen_libraries(self, step: Step, stderr: str) -> None:
        """A command that opens a platform went through Xen's libraries (the shim's)."""
        if any(user in step.command for user in PLATFORM_USERS):
            domid = self.envs[step.domain]["XENPV_LOOPBACK_DOMID"]
            assert f"connected as domain {domid}" in stderr, (
                f"{step.command!r} did not use Xen's libraries:\n{stderr}")

    def _foreground(self, command: str, env: dict[str, str], step: Step) -> str:
        proc = subprocess.run(["bash", "-c", command], env=env, cwd=self.tmp,
                              stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (
            f"{step.domain}$ {command}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        if step.expect is not None:
            assert step.expect in proc.stdout, (
                f"{step.domain}$ {command}\ndid not print {step.expect!r}:\n{proc.stdout}")
        self.check_xen_libraries(step, proc.stderr)
        return proc.stdout

    def _service(self, step: Step, env: dict[str, str]) -> None:
        log = self.tmp / f"service{len(self.services)}.err"
        with open(log, "wb") as err:
            proc = subprocess.Popen(["bash", "-c", step.command], env=env, cwd=self.tmp, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, bufsize=0, start_new_session=True)
        self.services.append((step, proc, log))
        if step.command.startswith(ANNOUNCES):
            line = read_line(proc, WAIT)
            assert '"ready"' in line, f"{step.command!r} said {line!r}"

    def _attach(self, step: Step, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        terminal = Pty(master)
        try:
            proc = subprocess.Popen(["bash", "-c", f"exec {step.command}"], env=env, cwd=self.tmp,
                                    stdin=slave, stdout=slave, stderr=slave,
                                    start_new_session=True)
            os.close(slave)
            try:
                terminal.write(b"send 10\n")  # the guest's shell answers text + <done 10>
                terminal.read_until(b"<done 10>", WAIT)
                terminal.write(b"\x1d")  # Ctrl-] leaves, as in xenconsole
                assert proc.wait(WAIT) == 0, f"{step.command!r} did not leave cleanly"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        finally:
            terminal.close()

    def stop(self) -> None:
        """SIGTERM every service (its whole session); each must end promptly and have
        used Xen's libraries."""
        for step, proc, log in reversed(self.services):
            command = step.command
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                raise AssertionError(f"service {command!r} ignored SIGTERM") from None
            finally:
                for stream in (proc.stdin, proc.stdout):
                    if stream is not None:
                        stream.close()
            self.check_xen_libraries(step, log.read_text())
        self.services.clear()


def start_console0_stand_in(lab: VchanLab) -> subprocess.Popen[bytes]:
    """The guest kernel's console 0 and ``xl``'s publication of it (not runbook steps)."""
    fe = lab.spawn(GUEST, [sys.executable, "-m", "xenpv", "console", "frontend", "--rundir",
                           lab.rundir, "--domid", str(GUEST), "--shell"],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    ready = VchanLab.read_json(fe, WAIT)
    assert ready["event"] == "ready", ready
    subprocess.run([sys.executable, "-m", "xenpv", "console", "publish", "--rundir",
                    lab.rundir, "--domid", str(GUEST), "--port", str(ready["port"])],
                   check=True, timeout=WAIT, env=lab.env(0))
    return fe


def test_runbook_commands_work_on_the_real_xen_platform(lab: VchanLab, bin_dir: Path,
                                                       tmp_path: Path) -> None:
    # every command that opens a platform must report the replacement libraries' use
    # (Runner.check_xen_libraries): the emulator's own client platform does not load them
    steps = runbook_steps(RUNBOOK.read_text())
    runner = Runner(lab, bin_dir, tmp_path)
    console0 = start_console0_stand_in(lab)
    try:
        for step in steps:
            runner.run(step)
        assert runner.envs["guest"]["GUEST"] == str(GUEST)
    finally:
        runner.stop()
    assert console0.stdin is not None
    console0.stdin.close()
    assert console0.wait(WAIT) == 0
    lab.assert_released(WAIT)

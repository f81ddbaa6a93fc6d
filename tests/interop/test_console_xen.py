"""The console pair against Xen's own console programs, on the loopback emulator.

* our frontend (``xenpv console frontend``, the guest) served by Debian's ``xenconsoled``
  (through the replacement libraries), with Debian's ``xenconsole --type pv`` attached to
  the pty xenconsoled creates: text both ways, and xenconsoled's guest log;
* our backend (``xenpv console backend``) with ``xenconsole --type pv`` attached: text
  both ways, for console 0 and for a secondary console (``device/console/1``, xenbus
  handshake with our frontend, ``xenconsole -n 1``).

``xenconsole`` needs a terminal: it runs on a pty of ours.  The guest runs a tiny shell
(``echo``/``send``/``quit``), so what we type in xenconsole comes back through the
guest.  Every process is ended by the fixture, also on failure.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import json_line, xenpv
from shim_peers import LoopbackRun, wait_for

from xenpv import peers
from xenpv.cli.console import text_block
from xenpv.cli.demo import Pty

# domids of our own: xenconsole locks /var/lock/xenconsole.<domid> machine-wide
FE_GUEST = 31
BE_GUEST = 32
WAIT = 20.0


class ConsoleRun:
    """The loopback daemon, a guest running our console frontend (shell), console 0
    published by the toolstack."""

    def __init__(self, domid: int, *, primary: bool = True) -> None:
        self.domid = domid
        self.run = LoopbackRun({domid: "guest"})
        self.rundir = str(self.run.rundir)
        self.terminal: Pty | None = None
        if not primary:
            return
        try:
            self.guest = self.run.spawn(domid, xenpv(
                "console", "frontend", "--rundir", self.rundir, "--domid", str(domid),
                "--shell"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            ready = json_line(self.guest, WAIT)
            assert ready["event"] == "ready" and ready["ring_ref"] == 0
            self.run.spawn(0, xenpv("console", "publish", "--rundir", self.rundir, "--domid",
                                    str(domid), "--port", str(ready["port"]))).wait(WAIT)
        except BaseException:
            self.close()
            raise

    def tty(self) -> str:
        path = f"/local/domain/{self.domid}/console/tty"
        value: str = wait_for("console/tty", lambda: self.run.xenstore_read(path), WAIT)
        return value

    def xenconsole(self, num: int = 0) -> Pty:
        """Start ``xenconsole --type pv -n NUM DOMID`` (dom0) on a fresh terminal; our end
        of it."""
        master, slave = os.openpty()
        self.terminal = Pty(master)
        try:
            self.run.spawn(0, [str(peers.find("xenconsole")), "--type", "pv", "-n", str(num),
                               str(self.domid)],
                           stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        finally:
            os.close(slave)
        return self.terminal

    @staticmethod
    def talk(terminal: Pty) -> None:
        """Text both ways through xenconsole: typed lines come back from the guest."""
        terminal.write(b"echo hello-from-xenconsole\n")  # xenconsole made it raw
        terminal.read_until(b"hello-from-xenconsole\n", WAIT)
        terminal.write(b"send 20000\n")
        out = terminal.read_until(b"<done 20000>\n", WAIT)
        assert out[: -len(b"<done 20000>\n")].endswith(text_block(20000))
        terminal.write(b"\x1d")  # xenconsole's escape character ends it

    def close(self) -> None:
        if self.terminal is not None:
            self.terminal.close()
            self.terminal = None
        self.run.close()


@pytest.fixture
def console_run(request: pytest.FixtureRequest) -> Iterator[ConsoleRun]:
    c = ConsoleRun(request.param)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("console_run", [FE_GUEST], indirect=True)
def test_our_frontend_served_by_xenconsoled_with_xenconsole_attached(
        console_run: ConsoleRun, tmp_path: Path) -> None:
    c = console_run
    logdir = tmp_path / "log"
    logdir.mkdir()
    c.run.spawn(0, [str(peers.find("xenconsoled")), "-i", "--log=guest",
                    f"--log-dir={logdir}"])
    c.tty()  # xenconsoled mapped grant ref 0, bound the port, made a pty
    c.talk(c.xenconsole())
    log = logdir / "guest-guest.log"
    wait_for("xenconsoled's guest log", lambda: log.exists() and
             b"hello-from-xenconsole" in log.read_bytes(), WAIT)


@pytest.mark.parametrize("console_run", [BE_GUEST], indirect=True)
def test_our_backend_with_xenconsole_attached(console_run: ConsoleRun,
                                              tmp_path: Path) -> None:
    c = console_run
    backend = c.run.spawn(0, xenpv("console", "backend", "--rundir", c.rundir, "--domid",
                                   str(c.domid), "--log-dir", str(tmp_path)),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert json_line(backend, WAIT)["event"] == "ready"
    tty_path = c.tty()
    assert tty_path.startswith("/dev/pts/")
    c.talk(c.xenconsole())
    assert backend.stdin is not None
    backend.stdin.close()
    done = json_line(backend, WAIT)
    assert done["event"] == "done"
    stats = done["stats"][str(c.domid)]  # type: ignore[index]
    assert stats["out"] >= 20000 and stats["in"] > 0
    assert backend.wait(WAIT) == 0
    assert b"hello-from-xenconsole" in (tmp_path / f"guest-{c.domid}.log").read_bytes()


SECONDARY_GUEST = 34


def test_our_backend_serves_a_secondary_console_to_xenconsole() -> None:
    """``device/console/1`` through the xenbus handshake; ``xenconsole -n 1`` attaches."""
    from xenpv.xenbus.toolstack import add_device
    from xenpv.xenstore.client import connect

    c = ConsoleRun(SECONDARY_GUEST, primary=False)
    try:
        async def create() -> None:
            xs = await connect(str(Path(c.rundir) / "dom0" / "xenstore"))
            try:
                await add_device(xs, "console", c.domid, 0, 1)
            finally:
                await xs.close()

        asyncio.run(create())
        backend = c.run.spawn(0, xenpv("console", "backend", "--rundir", c.rundir),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert json_line(backend, WAIT)["event"] == "ready"
        guest = c.run.spawn(c.domid, xenpv("console", "frontend", "--rundir", c.rundir,
                                           "--domid", str(c.domid), "--devid", "1", "--shell"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = json_line(guest, WAIT)
        assert ready == {"event": "ready", "path": f"/local/domain/{c.domid}/device/console/1"}
        path = f"/local/domain/{c.domid}/device/console/1/tty"
        wait_for("device/console/1/tty", lambda: c.run.xenstore_read(path), WAIT)
        assert c.run.xenstore_read(f"/local/domain/0/backend/console/{c.domid}/1/state") == "4"
        c.talk(c.xenconsole(1))
    finally:
        c.close()

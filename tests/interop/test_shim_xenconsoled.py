"""Debian's ``xenconsoled`` (the dom0 console backend) on the loopback emulator, through
the replacement libraries: it lists the emulated domains (``xc_domain_getinfo``), maps the
guest's console page at reserved grant ref 0, binds the guest's port, checks it with
``xc_evtchn_status``, logs the guest's output and connects it to a pty both ways."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from shim_peers import LoopbackRun, wait_for

from xenpv import peers

# The guest (domain 1), with the loopback emulator's own Python client: its console page
# at reserved ref 0 granted to dom0, an unbound port for dom0; after "go" on stdin it
# writes a greeting to the out ring, then reports the first line from the in ring.
GUEST = r"""
import struct, sys, time
from xenpv.platforms.loopback.client import ClientPlatform

p = ClientPlatform.for_domain(sys.argv[1], 1)
page = p.grants.grant_reserved(0, 0)
port = p.events.alloc_unbound(0)
print(port, flush=True)
mem = page.mem
sys.stdin.readline()
msg = b"hello from the guest\r\n"
mem[1024 : 1024 + len(msg)] = msg                 # io/console.h: out[] at 1024
struct.pack_into("<I", mem, 3084, len(msg))      # out_prod
p.events.notify(port)
got, deadline = b"", time.monotonic() + 30
while b"\n" not in got and time.monotonic() < deadline:
    if p.events.pending(0.5) is not None:
        p.events.unmask(port)
    cons, prod = struct.unpack_from("<II", mem, 3072)   # in_cons, in_prod
    while cons != prod:
        got += bytes(mem[cons & 1023 : (cons & 1023) + 1])
        cons += 1
    struct.pack_into("<I", mem, 3072, cons)
    p.events.notify(port)
print("input:", got.hex(), flush=True)
p.close()
"""
GREETING = b"hello from the guest"


def _read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    got = b""
    while needle not in got:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no {needle!r} on the console pty (got {got!r})"
        got += os.read(fd, 4096)
    return got


@dataclass
class Console:
    """A guest with its console served by xenconsoled."""

    run: LoopbackRun
    guest: subprocess.Popen[bytes]
    pty: str
    log: Path

    def start_guest_output(self) -> None:
        assert self.guest.stdin is not None
        self.guest.stdin.write(b"go\n")
        self.guest.stdin.flush()

    def guest_input(self) -> bytes:
        assert self.guest.stdout is not None
        words = self.guest.stdout.readline().split()
        assert words[:1] == [b"input:"], words
        return bytes.fromhex(words[1].decode()) if len(words) > 1 else b""


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    """Domain 1 running the console guest, xenconsoled in dom0 serving it."""
    consoled = str(peers.find("xenconsoled"))
    run = LoopbackRun({1: "guest"})
    try:
        guest = run.spawn(1, [sys.executable, "-c", GUEST, str(run.rundir)], stdin=-1, stdout=-1)
        assert guest.stdout is not None
        port = int(guest.stdout.readline())
        path = "/local/domain/1/console"
        # what the toolstack writes for a guest's primary console (ring-ref is a frame
        # number there; xenconsoled maps grant ref 0 first)
        keys = {"ring-ref": "0", "port": str(port), "type": "xenconsoled", "limit": "1048576"}
        for key, value in keys.items():
            run.xenstore_write(f"{path}/{key}", value)
        run.xenstore_write(f"{path}/tty", "")
        logdir = tmp_path / "log"
        logdir.mkdir()
        run.spawn(0, [consoled, "-i", "--log=guest", f"--log-dir={logdir}"])
        pty = wait_for("the console pty", lambda: run.xenstore_read(f"{path}/tty"))
        yield Console(run, guest, pty, logdir / "guest-guest.log")
    finally:
        run.close()


def test_xenconsoled_serves_a_guest_console_both_ways(console: Console) -> None:
    fd = os.open(console.pty, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        console.start_guest_output()
        _read_until(fd, GREETING)
        os.write(fd, b"ping\n")
        assert console.guest_input() == b"ping\n"
    finally:
        os.close(fd)
    wait_for("the guest log", lambda: console.log.exists() and GREETING in console.log.read_bytes())


def test_xenconsole_attaches_to_the_guest_console(console: Console) -> None:
    # xenconsole (libxenctrl from the shim) on a terminal of ours, attached to domain 1
    master, slave = os.openpty()
    try:
        proc = console.run.spawn(
            0,
            [str(peers.find("xenconsole")), "--type", "pv", "1"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        slave = -1
        console.start_guest_output()
        _read_until(master, GREETING)
        os.write(master, b"pong\n")  # xenconsole put the terminal in raw mode
        assert console.guest_input() == b"pong\n"
        assert proc.poll() is None
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)

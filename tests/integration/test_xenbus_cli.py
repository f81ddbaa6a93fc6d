"""``xenpv device`` as a real process against ``xenpv xenstored`` as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.xenbus.diagram import render_dot, render_mermaid
from xenpv.xenstore.client import BlockingClient, Perm

FE, BE = 3, 2


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[str]:
    """``xenpv xenstored`` with dom0's socket; homes of FE and BE created as a toolstack would."""
    sock = tmp_path / "dom0.sock"
    pid_file = tmp_path / "xenstored.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenpv", "xenstored", "--socket", str(sock),
         "--pid-file", str(pid_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "xenstored did not start"
            time.sleep(0.02)
        with BlockingClient(str(sock), timeout=5) as c:
            for domid in (FE, BE):
                c.mkdir(f"/local/domain/{domid}")
                c.set_perms(f"/local/domain/{domid}", [Perm("n", domid)])
        yield str(sock)
    finally:
        proc.kill()
        proc.communicate(timeout=20)


def xenpv(*args: str, socket: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("XENSTORED_PATH", None)
    if socket is not None:
        env["XENSTORED_PATH"] = socket  # found the way xenstore-utils find it
    return subprocess.run(
        [sys.executable, "-m", "xenpv", "device", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_add_list_remove(xenstored: str) -> None:
    ids = ["-f", str(FE), "-b", str(BE), "-s", xenstored]
    r = xenpv("add", "vbd", *ids, "--devid", "51712", "--key", "virtual-device=51712",
              "--key", "device-type=disk", "--backend-key", "params=/tmp/x.img")  # fmt: skip
    assert r.returncode == 0, r.stderr
    fe = f"/local/domain/{FE}/device/vbd/51712"
    be = f"/local/domain/{BE}/backend/vbd/{FE}/51712"
    assert r.stdout.split() == [fe, be]
    r2 = xenpv("add", "vbd", *ids)  # next free devid
    assert r2.returncode == 0 and r2.stdout.split()[0] == f"/local/domain/{FE}/device/vbd/0"
    with BlockingClient(xenstored, timeout=5) as c:
        assert c.read(f"{fe}/virtual-device") == b"51712"
        assert c.read(f"{be}/params") == b"/tmp/x.img"
        assert c.get_perms(fe) == [Perm("n", FE), Perm("r", BE)]
        assert c.get_perms(be) == [Perm("n", BE), Perm("r", FE)]
        c.write(f"{be}/state", b"4")
    dup = xenpv("add", "vbd", *ids, "--devid", "51712")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    listed = xenpv("list", "vbd", "-b", str(BE), socket=xenstored)
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "TYPE",
        "DEVID",
        "FRONTEND",
        "BACKEND",
        "FE-STATE",
        "BE-STATE",
        "ONLINE",
    ]
    assert [ln.split() for ln in lines[1:]] == [
        ["vbd", "0", str(FE), str(BE), "1", "Initialising", "1", "Initialising", "1"],
        ["vbd", "51712", str(FE), str(BE), "1", "Initialising", "4", "Connected", "1"],
    ]
    # nobody serves the backend: the removal handshake times out and removes by force
    r = xenpv("remove", "vbd", *ids, "--devid", "51712", "--timeout", "0.3")
    assert r.returncode == 0 and "removed by force" in r.stderr
    assert xenpv("remove", "vbd", *ids, "--devid", "0", "--force").returncode == 0
    with BlockingClient(xenstored, timeout=5) as c:
        assert not c.exists(fe) and not c.exists(be)
    gone = xenpv("remove", "vbd", *ids, "--devid", "0")
    assert gone.returncode == 1 and "no device" in gone.stderr
    assert xenpv("list", "vbd", "-b", str(BE), "-s", xenstored).stdout.splitlines()[1:] == []


def test_unreachable_xenstore_fails_cleanly(tmp_path: Path) -> None:
    r = xenpv("list", "vbd", "-s", str(tmp_path / "nothing.sock"))
    assert r.returncode == 1 and "cannot connect" in r.stderr


def test_diagram_prints_the_rendered_tables() -> None:
    assert xenpv("diagram", "frontend").stdout == render_mermaid("frontend")
    assert xenpv("diagram", "backend", "--format", "dot").stdout == render_dot("backend")

"""``xenpv loopback`` end to end: the daemon, its CLI, domain homes and teardown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv import peers
from xenpv.platforms.base import EvtchnState, PlatformGone, UnmapNotify
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.env import domain_env
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.platforms.loopback.remote import RemotePlatform
from xenpv.xenstore import wire
from xenpv.xenstore.client import XenstoreError, connect
from xenpv.xenstore.wire import XsType as T

CLI = [sys.executable, "-m", "xenpv", "loopback"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(params=["auto", "asyncio"])
def rundir(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A daemon on the default loop (uvloop when installed) and on asyncio's own."""
    d = tmp_path / "run"
    proc = start_daemon(d, domains=(1,), max_grants=64, max_ports=16, loop=request.param)
    try:
        yield d
    finally:
        assert stop_daemon(proc) == 0


def _end(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``loopback up``: it must exit with status 0 (killed if it hangs)."""
    proc.send_signal(sig)
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_creates_endpoints_and_a_signal_removes_them(tmp_path: Path, sig: int) -> None:
    d = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "up", "--rundir", str(d), "--domain", "1:guest"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "ready" in proc.stdout.readline()
        for n in (0, 1):
            assert (d / f"dom{n}" / "control").is_socket()
            assert (d / f"dom{n}" / "xenstore").is_socket()
    finally:
        _end(proc, sig)
    assert not list(d.glob("dom*")) and not (d / "daemon.pid").exists()


def test_domain_create_list_destroy_through_the_cli(rundir: Path) -> None:
    assert _cli("domain", "create", "--rundir", str(rundir), "--domid", "3", "--name", "three").returncode == 0
    listing = _cli("domain", "list", "--rundir", str(rundir)).stdout.split("\n")
    assert listing[0].startswith("0\tprivileged") and any(x.startswith("3\t") for x in listing)
    assert (rundir / "dom3" / "control").is_socket()
    again = _cli("domain", "create", "--rundir", str(rundir), "--domid", "3")
    assert again.returncode == 1 and "exists" in again.stderr.lower()
    assert _cli("domain", "destroy", "--rundir", str(rundir), "--domid", "3").returncode == 0
    assert not (rundir / "dom3").exists()
    assert not any(x.startswith("3\t") for x in _cli("domain", "list", "--rundir", str(rundir)).stdout.split("\n"))


def test_stats_lists_what_each_domain_holds(rundir: Path) -> None:
    p = ClientPlatform.for_domain(rundir, 1)
    try:
        p.grants.grant(0, 3)
        p.events.alloc_unbound(0)
        lines = _cli("stats", "--rundir", str(rundir)).stdout.strip().split("\n")
        assert lines[0].split("\t")[:5] == ["domid", "grants", "revoking", "mappings", "ports"]
        row = dict(line.split("\t", 1) for line in lines[1:])
        assert row["1"].split("\t")[:4] == ["3", "0", "0", "1"]
    finally:
        p.close()


def test_env_prints_the_domain_environment(rundir: Path) -> None:
    out = _cli("env", "--rundir", str(rundir), "--domid", "1").stdout
    assert f"export XENSTORED_PATH={rundir.resolve()}/dom1/xenstore" in out
    assert f"export XENPV_LOOPBACK_SOCKET={rundir.resolve()}/dom1/control" in out
    assert "platforms/loopback/shim" in out.split("LD_LIBRARY_PATH=")[1].split(":")[0]


def test_new_domain_gets_its_home_and_introduce_release_fire(rundir: Path) -> None:
    async def scenario() -> None:
        dom0 = await connect(str(rundir / "dom0" / "xenstore"))
        try:
            async with dom0.watch("@introduceDomain") as intro, dom0.watch("@releaseDomain") as rel:
                await asyncio.wait_for(anext(aiter(intro)), 5)  # the initial firing
                await asyncio.wait_for(anext(aiter(rel)), 5)
                create = await asyncio.create_subprocess_exec(
                    *CLI, "domain", "create", "--rundir", str(rundir), "--domid", "4", "--name", "four"
                )
                assert await asyncio.wait_for(create.wait(), 30) == 0
                await asyncio.wait_for(anext(aiter(intro)), 5)
                assert await dom0.read("/local/domain/4/name") == b"four"
                guest = await connect(str(rundir / "dom4" / "xenstore"))
                try:
                    assert await guest.read("domid") == b"4"
                    await guest.write("data/note", "hi")  # data/ is the guest's
                    with pytest.raises(XenstoreError):
                        await guest.write("device/evil", "1")  # device/ is not
                finally:
                    await guest.close()
                destroy = await asyncio.create_subprocess_exec(
                    *CLI, "domain", "destroy", "--rundir", str(rundir), "--domid", "4"
                )
                assert await asyncio.wait_for(destroy.wait(), 30) == 0
                await asyncio.wait_for(anext(aiter(rel)), 5)
                assert not await dom0.exists("/local/domain/4")
        finally:
            await dom0.close()

    asyncio.run(scenario())


def test_destroying_a_domain_tears_it_down_like_a_dead_one(rundir: Path) -> None:
    a = ClientPlatform.for_domain(rundir, 0)
    b = RemotePlatform.spawn(rundir, 1, env=domain_env(rundir, 1))
    try:
        pa = a.events.alloc_unbound(1)
        pb = b.events.bind_interdomain(0, pa)
        assert a.events.pending(0) is None
        page = a.grants.grant(1, 1)
        page.mem[0:1] = b"\x01"
        b.grants.map(0, page.refs, notify=UnmapNotify(0, clear_byte=True, port=pb))
        assert _cli("domain", "destroy", "--rundir", str(rundir), "--domid", "1").returncode == 0
        assert a.events.pending(10) == pa
        assert bytes(page.mem[0:1]) == b"\x00"
        assert a.events.status(0, pa)[0] == EvtchnState.unbound
        with pytest.raises(PlatformGone):
            b.events.alloc_unbound(0)  # its connections died with it
        a.grants.end_access(page)  # nothing maps it any more
    finally:
        b.close()
        a.close()


def test_real_xenstore_read_runs_as_the_domain(rundir: Path, peer_root: Path) -> None:
    env = dict(os.environ)
    env.update(domain_env(rundir, 1))
    env = peers.run_env(base=env)
    prog = str(peers.find("usr/bin/xenstore-read", peer_root))
    out = subprocess.run([prog, "domid"], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_platform_xenstore_accessor_acts_as_the_domain(rundir: Path) -> None:
    p = ClientPlatform.for_domain(rundir, 1)

    async def scenario() -> None:
        xs = await p.xenstore()
        try:
            assert await xs.read("domid") == b"1"
            assert await xs.get_domain_path(1) == "/local/domain/1"
        finally:
            await xs.close()

    try:
        assert p.xenstore_path == str(rundir / "dom1" / "xenstore")
        asyncio.run(scenario())
    finally:
        p.close()


def test_second_up_on_a_live_rundir_refuses_and_leaves_it_alone(tmp_path: Path) -> None:
    """``loopback up`` on the rundir of a live daemon exits with status 1 and one line
    naming the live daemon's pid, without printing "ready" or touching its sockets
    (issue 14 item 7; before, it took the rundir over and deleted the sockets on exit)."""
    d = tmp_path / "run"
    proc = start_daemon(d, domains=(1,), max_grants=64, max_ports=16)
    try:
        second = _cli("up", "--rundir", str(d), "--domain", "2")
        assert second.returncode == 1, second
        assert "ready" not in second.stdout
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"running process {proc.pid}" in lines[0], lines
        assert (d / "daemon.pid").read_text() == f"{proc.pid}\n"
        for n in (0, 1):
            assert (d / f"dom{n}" / "control").is_socket()
            assert (d / f"dom{n}" / "xenstore").is_socket()
        assert not (d / "dom2").exists()
        listing = _cli("domain", "list", "--rundir", str(d))
        assert listing.returncode == 0 and listing.stdout.startswith("0\tprivileged")
        read = subprocess.run(
            [sys.executable, "-m", "xenpv", "xenstore", "read", "domid"],
            env={**os.environ, **domain_env(d, 1)}, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert read.returncode == 0 and read.stdout.strip() == "1", read
    finally:
        assert stop_daemon(proc) == 0
    assert not list(d.glob("dom*")) and not (d / "daemon.pid").exists()
    assert not (d / "daemon.lock").exists()


def test_up_replaces_the_sockets_of_a_killed_daemon(tmp_path: Path) -> None:
    """A rundir left by a daemon that was killed has no live owner: ``up`` takes it."""
    d = tmp_path / "run"
    proc = start_daemon(d, domains=(1,), max_grants=64, max_ports=16)
    proc.kill()
    proc.wait(20)
    assert (d / "dom0" / "control").is_socket() and (d / "daemon.lock").exists()
    (d / "daemon.pid").unlink()  # (start_daemon waits for a fresh one)
    proc = start_daemon(d, domains=(1,), max_grants=64, max_ports=16)
    try:
        assert (d / "daemon.pid").read_text() == f"{proc.pid}\n"
        listing = _cli("domain", "list", "--rundir", str(d))
        assert listing.returncode == 0 and "1\t" in listing.stdout
    finally:
        assert stop_daemon(proc) == 0


def test_up_xenstore_quota_option_limits_a_guests_connections(tmp_path: Path) -> None:
    """``--xenstore-quota connections=N``: a guest's connection beyond N is refused while
    dom0 is still answered (issue 14 item 4)."""
    d = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "up", "--rundir", str(d), "--domain", "1", "--xenstore-quota", "connections=2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        assert "ready" in proc.stdout.readline()
        answered = 0
        for _ in range(5):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(5.0)
            held.append(c)
            c.connect(str(d / "dom1" / "xenstore"))
            try:
                c.sendall(wire.HEADER.pack(T.GET_DOMAIN_PATH, 1, 0, 2) + b"1\0")
                answered += bool(c.recv(4096))
            except OSError:
                pass
        assert answered == 2
        listing = _cli("domain", "list", "--rundir", str(d))
        assert listing.returncode == 0 and "1\t" in listing.stdout
    finally:
        for c in held:
            c.close()
        _end(proc)

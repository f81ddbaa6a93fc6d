"""Xen's C xenstored and oxenstored as dom0's xenstore server on the loopback emulator
(``xenpv loopback up --xenstored xen-c|oxenstored``).

Each runs unmodified over the replacement libraries: every import of the binary resolves
against them, Xen's ``test-xenstore`` passes against it, it serves guests over the rings
the domain builder made and introduced to it, and it notices a destroyed or shut-down
guest through VIRQ_DOM_EXC and ``xc_domain_getinfo`` (``@releaseDomain``; the daemon
sends it no RELEASE); so does oxenstored, which also maps the guests' rings by frame.  A
destroy fires ``@releaseDomain`` from the embedded server too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from shim_peers import LoopbackRun, run_showing_log
from test_shim_libraries import _dynsyms
from test_xenstore_peers import TESTS

from xenpv import peers
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ClientPlatform, ControlConnection
from xenpv.platforms.loopback.env import shim_dir
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.platforms.loopback.xenstoreds import OXENSTORED, XEN_C_XENSTORED, xen_c_binary
from xenpv.xenstore.client import Watch, XenstoreClient, connect
from xenpv.xenstore.paths import SPECIAL_RELEASE
from xenpv.xenstore.wire import XenstoreError

#: Xen's servers as dom0's xenstored: C xenstored, and oxenstored (``XenOxenstored``).
SERVERS = {"xen-c": "xen-c/xenstored.log", "oxenstored": "xen-oxenstored/oxenstored.out"}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def run(request: pytest.FixtureRequest) -> Iterator[LoopbackRun]:
    r = LoopbackRun({}, xenstored=request.param)
    try:
        yield r
    finally:
        r.close()


def _dom0_socket(run: LoopbackRun) -> str:
    return str(run.rundir / "dom0" / "xenstore")


def _log(run: LoopbackRun) -> Path:
    """The output of the run's Xen xenstored."""
    logs = [run.rundir / rel for rel in SERVERS.values() if (run.rundir / rel).exists()]
    assert len(logs) == 1, logs
    return logs[0]


def test_every_import_of_c_xenstored_resolves_against_the_replacement_libraries() -> None:
    binary = xen_c_binary()
    assert binary == peers.find(XEN_C_XENSTORED)
    env = peers.run_env([str(shim_dir())])
    out = subprocess.run(["ldd", "-r", str(binary)], env=env, capture_output=True, text=True)
    report = out.stdout + out.stderr
    assert "undefined symbol" not in report and "not found" not in report, report
    ours: set[tuple[str, str]] = set()
    for lib in ("libxenctrl.so.4.17", "libxenevtchn.so.1", "libxengnttab.so.1"):
        assert f"{lib} => {shim_dir()}" in report, report  # the replacement, not Debian's
        ours |= _dynsyms(shim_dir() / lib)["defined"]
    wanted = {s for s in _dynsyms(binary)["undefined"] if s[0].startswith("VERS_")}
    assert ("VERS_1.0", "xenevtchn_bind_virq") in wanted
    assert wanted <= ours, wanted - ours


def test_test_xenstore_passes_against_c_xenstored(run: LoopbackRun) -> None:
    # dom0's environment (`loopback env --domid 0`) names C xenstored's socket
    exe = str(peers.find("test-xenstore"))
    result = subprocess.run([exe], env=run.env(0), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0].strip() for line in result.stdout.splitlines()] == TESTS


async def _next_release(watch: Watch, timeout: float = 20.0) -> str:
    ev = await watch.get(timeout)
    return ev.path


async def _release_fires_on(run: LoopbackRun, xs: XenstoreClient, domid: int,
                            end: str) -> None:
    """@releaseDomain fires once the emulator ends ``domid`` with ``end``."""
    async with xs.watch(SPECIAL_RELEASE, "rel") as watch:
        assert await _next_release(watch) == SPECIAL_RELEASE  # the initial event
        await asyncio.to_thread(run.domain_op, end, domid)
        assert await _next_release(watch) == SPECIAL_RELEASE


def test_c_xenstored_serves_guests_over_their_rings_and_releases_them_on_destroy_and_shutdown(
    run: LoopbackRun
) -> None:
    for domid in (11, 12):
        run.domain_op("create", domid)
    guests = [ClientPlatform.for_domain(run.rundir, domid) for domid in (11, 12)]

    async def main() -> None:
        xs = await connect(_dom0_socket(run))
        try:
            for domid, guest in zip((11, 12), guests, strict=True):
                assert await xs.is_domain_introduced(domid)
                ring = await guest.xenstore_over_ring(timeout=20)
                try:
                    home = f"/local/domain/{domid}"
                    assert await ring.read("domid") == str(domid).encode()  # relative
                    await ring.write("data/x", b"from the ring")
                    assert await xs.read(f"{home}/data/x") == b"from the ring"
                    other = f"/local/domain/{23 - domid}/data"
                    with pytest.raises(XenstoreError) as denied:
                        await ring.read(other)
                    assert denied.value.errno_name == "EACCES"
                finally:
                    await ring.close()
            # destroy: the domain is gone from xc_domain_getinfo
            await _release_fires_on(run, xs, 11, "destroy")
            assert not await xs.is_domain_introduced(11)
            # shutdown: still listed, with the shutdown flag (nobody sends RELEASE here)
            await _release_fires_on(run, xs, 12, "shutdown")
            assert await xs.is_domain_introduced(12)  # released only once it dies
            await _release_fires_on(run, xs, 12, "destroy")
            assert not await xs.is_domain_introduced(12)
        finally:
            await xs.close()

    try:
        run_showing_log(main, _log(run), "Xen's xenstored")
    finally:
        for g in guests:
            g.close()


def test_embedded_xenstored_fires_release_domain_on_destroy() -> None:
    ours = LoopbackRun({21: "guest"})

    async def main() -> None:
        xs = await connect(_dom0_socket(ours))
        try:
            assert await xs.is_domain_introduced(21)
            await _release_fires_on(ours, xs, 21, "destroy")
            assert not await xs.is_domain_introduced(21)
        finally:
            await xs.close()

    try:
        asyncio.run(main())
    finally:
        ours.close()


def test_domain_info_reports_shutdown_and_distinct_uuids(run: LoopbackRun) -> None:
    run.domain_op("create", 31)
    run.domain_op("create", 32)
    ctl = ControlConnection(run.rundir / "dom0" / "control")
    try:
        run.domain_op("shutdown", 32, reason=3)
        out, _ = ctl.call(proto.Op.DOMAIN_INFO)
        (count,) = proto.U32.unpack_from(out)
        info = {
            e[0]: e[1:]
            for e in (proto.DOMAIN_INFO_ENTRY.unpack_from(out, 4 + i * proto.DOMAIN_INFO_ENTRY.size)
                      for i in range(count))
        }
        assert info[0][2] == bytes(16)  # dom0's handle is all zeroes
        assert info[31][2] != info[32][2] and bytes(16) not in (info[31][2], info[32][2])
        assert info[31][0] & proto.DOMFLAG_SHUTDOWN == 0
        assert info[32][0] & proto.DOMFLAG_SHUTDOWN and info[32][1] == 3
    finally:
        ctl.close()
        run.domain_op("destroy", 31)
        run.domain_op("destroy", 32)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_xen_xenstored_dies_with_a_sigkilled_loopback_daemon(tmp_path: Path, name: str) -> None:
    rundir = tmp_path / "r"
    daemon = start_daemon(rundir, xenstored=name)
    binary = os.path.realpath(xen_c_binary() if name == "xen-c" else peers.find(OXENSTORED))
    servers = [p for p in _children(daemon.pid)
               if os.path.realpath(f"/proc/{p}/exe") == binary]
    try:
        assert len(servers) == 1, servers
        daemon.kill()  # no chance to stop its xenstored
        daemon.wait(10)
        deadline = time.monotonic() + 10
        while _running(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _running(servers[0]), f"{name} outlived its loopback daemon"
    finally:
        stop_daemon(daemon)
        for pid in servers:  # only if it survived: the process we found, by its pid
            if _running(pid):
                os.kill(pid, signal.SIGKILL)

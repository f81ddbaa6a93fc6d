"""The net pair across processes on the loopback daemon, driven by the CLI.

``xenpv net backend --all`` runs as dom0 in its own process; the toolstack step is
``xenpv device add vif`` (after the backend started: it finds devices added later);
the two guests' frontends run here (loopback clients acting as the guests) and exchange
frames through the backend's userspace switch; ``xenpv net info`` shows the negotiation;
the backend's ``done`` line carries the switch's counters; the emulator holds nothing
afterwards.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from cli_support import json_line, xenpv

from xenpv.frontends.net import NetFrontConfig, NetFrontend
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.protocols.ethernet import NetFrame
from xenpv.xenstore.client import connect

GUESTS = (5, 6)
WAIT = 20.0


def test_backend_process_switches_frames_between_two_guests(
        daemon_machine: Callable[..., DaemonMachine],
        procs: list[subprocess.Popen[bytes]]) -> None:
    machine = daemon_machine(*GUESTS, max_grants=4096, max_ports=64)
    rundir = machine.rundir
    sock = str(Path(rundir) / "dom0" / "xenstore")
    be = subprocess.Popen(xenpv("net", "backend", "--all", "--rundir", rundir, "--max-queues",
                                "2"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(be)
    assert json_line(be, WAIT)["event"] == "ready"
    macs = {5: "02:00:00:00:00:05", 6: "02:00:00:00:00:06"}
    paths = {}
    for g in GUESTS:
        out = subprocess.run(xenpv("device", "add", "vif", "-f", str(g), "-s", sock, "--mac",
                                   macs[g], "--switch", "lab"),
                             check=True, capture_output=True, text=True, timeout=WAIT)
        paths[g] = out.stdout.split()[0]
        assert paths[g] == f"/local/domain/{g}/device/vif/0"

    async def body() -> None:
        ends = []
        try:
            for g in GUESTS:
                plat = ClientPlatform.for_domain(rundir, g)
                xs = await connect(str(Path(rundir) / f"dom{g}" / "xenstore"))
                fe = NetFrontend(plat, xs, paths[g], config=NetFrontConfig(
                    tx_pages=32, rx_pages=32), close_timeout=2.0)
                ends.append((fe, xs, plat))
                await fe.start()
            a, b = ends[0][0], ends[1][0]
            await a.ready(WAIT)
            await b.ready(WAIT)
            assert a.mac == bytes.fromhex("020000000005")
            hello = b"\xff" * 6 + a.mac + b"\x88\xb5" + b"hello".ljust(46, b".")
            await a.send(NetFrame(hello))
            assert (await b.recv(WAIT)).data == hello
            reply = a.mac + b.mac + b"\x88\xb5" + bytes(range(256)) * 30  # 7694 bytes
            await b.send(NetFrame(reply))
            assert (await a.recv(WAIT)).data == reply
            info = json.loads(subprocess.run(
                xenpv("net", "info", "5", "0", "-s", sock), check=True, capture_output=True,
                text=True, timeout=WAIT).stdout)
            assert info["mac"] == macs[5] and info["queues"] == 2
            assert info["split_event_channels"] is True
            assert info["features"]["feature-sg"] == {"backend": True, "frontend": True}
            assert info["backend_keys"]["bridge"] == "lab"
            assert be.stdin is not None
            be.stdin.close()  # the backend ends while the guests are still connected
            done = await asyncio.to_thread(json_line, be, WAIT)
            assert done["event"] == "done"
            ports = done["switches"]["lab"]["ports"]  # type: ignore[index]
            assert sorted(p["name"] for p in ports) == ["vif5.0", "vif6.0"]
            assert [(p["rx_packets"], p["tx_packets"]) for p in ports] == [(1, 1), (1, 1)]
            devices = done["devices"]
            assert isinstance(devices, dict) and len(devices) == 2
            assert all(d["queues"] == 2 for d in devices.values())
            assert await asyncio.to_thread(be.wait, WAIT) == 0
        finally:
            for fe, xs, plat in ends:
                await fe.close()
                await xs.close()
                plat.close()

    asyncio.run(body())
    machine.assert_released()


def test_cli_frontend_and_backend_carry_tcp_between_namespaces(
        daemon_machine: Callable[..., DaemonMachine],
        procs: list[subprocess.Popen[bytes]]) -> None:
    """``xenpv net backend --all --tap`` (TAP in a dom0 namespace) and ``xenpv net
    frontend --tap`` (as the guest, TAP in a guest namespace), each its own process: a
    TCP transfer both ways between the two kernel stacks."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_net_kernel import Namespaces, transfer

    machine = daemon_machine(GUESTS[0], max_grants=4096, max_ports=64)
    rundir = machine.rundir
    sock = str(Path(rundir) / "dom0" / "xenstore")
    with Namespaces() as nets:
        be = subprocess.Popen(xenpv("net", "backend", "--all", "--rundir", rundir, "--tap",
                                    nets.dtap, "--netns", nets.dom0),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(be)
        assert json_line(be, WAIT)["event"] == "ready"
        subprocess.run(xenpv("device", "add", "vif", "-f", str(GUESTS[0]), "-s", sock),
                       check=True, capture_output=True, timeout=WAIT)
        fe = subprocess.Popen(xenpv("net", "frontend", "0", "--rundir", rundir, "--domid",
                                    str(GUESTS[0]), "--tap", nets.gtap, "--netns", nets.guest),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(fe)
        ready = json_line(fe, WAIT)
        assert ready["event"] == "ready" and ready["queues"] == 4
        nets.configure(nets.guest, nets.gtap, "198.18.0.2/24", "fe80::2/64")
        nets.configure(nets.dom0, nets.dtap, "198.18.0.1/24", "fe80::1/64")
        asyncio.run(transfer(nets, "198.18.0.1", "0"))
        for p in (fe, be):
            assert p.stdin is not None
            p.stdin.close()
            done = json_line(p, WAIT)
            assert done["event"] == "done"
            tap = done["tap"]
            assert isinstance(tap, dict) and tap["rx_frames"] > 0 and tap["tx_frames"] > 0
            if p is fe:  # TSO frames of both kernels crossed the rings as GSO
                assert tap["queues"] == 4  # one TAP queue per vif queue
                stats = done["vif"]["stats"]  # type: ignore[index]
                assert stats["rx_gso"] > 0 and stats["tx_gso"] > 0
            assert p.wait(WAIT) == 0
    machine.assert_released()

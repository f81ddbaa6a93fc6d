"""Kernel TCP stacks on both ends of the net pair.

The test creates two network namespaces of its own (and removes them): a "guest" one
whose TAP device sits on our frontend (:class:`~xenpv.frontends.net.TapBridge`) and a
"dom0" one whose TAP device is a port of our backend's userspace switch
(:class:`~xenpv.backends.netswitch.TapUplink`).  Addresses are from 198.18.0.0/15 and
IPv6 link-local.  With the TAPs' checksum/TSO offload on and off and one or two queues:
Debian's ``ping`` (v4, and v6 to link-local addresses) both ways, ``iperf3`` TCP both
directions (``xenpv peers fetch`` brings both), and Python processes in each namespace
moving data over TCP both ways, checked by SHA-256 digests (256 MiB from the guest in
one configuration); GSO frames and blank checksums cross the rings when offload is on.
Every process is ended by pid; the emulator holds nothing afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_net_support import GUESTS, NOTHING, net_world, run, start_vif

from xenpv import peers
from xenpv.backends.net import NetConfig
from xenpv.backends.netswitch import TapUplink
from xenpv.drivers.tap import TapDevice
from xenpv.frontends.net import NetFrontConfig, TapBridge

MiB = 1 << 20
SIZE = 8 * MiB
SERVER = """
import hashlib, random, socket, sys
fam, addr = (socket.AF_INET6, sys.argv[1]) if ":" in sys.argv[1] else (socket.AF_INET, sys.argv[1])
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, 5001, 0, int(sys.argv[3])) if fam == socket.AF_INET6 else (addr, 5001))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
h = hashlib.sha256()
while chunk := c.recv(1 << 16):
    h.update(chunk)
c.sendall(h.hexdigest().encode())
c.close()
c, _ = s.accept()
c.sendall(random.Random(2).randbytes(int(sys.argv[4])))
c.close()
"""
CLIENT = """
import hashlib, random, socket, sys
addr, size, down = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
target = (addr, 5001, 0, int(sys.argv[3])) if ":" in addr else (addr, 5001)
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
c = socket.socket(fam, socket.SOCK_STREAM); c.settimeout(60); c.connect(target)
rng, sent, left = random.Random(1), hashlib.sha256(), size
while left:  # in 16 MiB pieces: one 256 MiB randbytes is beyond its limit
    piece = rng.randbytes(min(left, 1 << 24)); sent.update(piece); c.sendall(piece)
    left -= len(piece)
c.shutdown(socket.SHUT_WR)
got = c.recv(100).decode()
assert got == sent.hexdigest(), "guest -> dom0 digest differs"
c.close()
c = socket.socket(fam, socket.SOCK_STREAM); c.settimeout(60); c.connect(target)
h = hashlib.sha256(); n = 0
while chunk := c.recv(1 << 16):
    h.update(chunk); n += len(chunk)
assert n == down and h.digest() == hashlib.sha256(random.Random(2).randbytes(down)).digest()
print("ok", flush=True)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Namespaces:
    """Two namespaces made (and removed) by the test, with a TAP each."""

    def __init__(self) -> None:
        tag = f"xpv{os.getpid() % 100000}"
        self.guest, self.dom0 = f"{tag}g", f"{tag}d"
        self.gtap, self.dtap = f"{tag}gt", f"{tag}dt"

    def __enter__(self) -> Namespaces:
        for ns in (self.guest, self.dom0):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        return self

    def configure(self, ns: str, tap: str, v4: str, v6: str) -> None:
        ip("-n", ns, "addr", "add", v4, "dev", tap)
        ip("-n", ns, "addr", "add", v6, "dev", tap, "nodad")
        ip("-n", ns, "link", "set", tap, "up")

    def __exit__(self, *exc: object) -> None:
        for ns in (self.guest, self.dom0):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


async def run_in(ns: str, code: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", code, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def transfer(nets: Namespaces, server_addr: str, scope: str, *, up: int = SIZE,
                   down: int = SIZE, client_scope: str | None = None) -> None:
    """``up`` bytes guest -> dom0, then ``down`` bytes back, each checked by digest
    (``scope``/``client_scope``: the ifindex a link-local address is bound/sent on)."""
    server = await run_in(nets.dom0, SERVER, server_addr, "0", scope, str(down))
    client = None
    try:
        assert server.stdout is not None
        assert (await asyncio.wait_for(server.stdout.readline(), 20)).strip() == b"listening"
        client = await run_in(nets.guest, CLIENT, server_addr, str(up),
                              client_scope or scope, str(down))
        out, err = await asyncio.wait_for(client.communicate(), 120)
        assert client.returncode == 0 and out.strip() == b"ok", err.decode()[-2000:]
        assert await asyncio.wait_for(server.wait(), 20) == 0
    finally:
        await end(client, server)


async def end(*procs: asyncio.subprocess.Process | None) -> None:
    """Kill what still runs (``ip netns exec`` exec'd its program: the same pid)."""
    for p in procs:
        if p is not None and p.returncode is None:
            p.kill()
            await p.wait()


async def tool(ns: str, *argv: str, timeout: float = 30.0) -> str:
    """Run a peers-tree program in ``ns``; its stdout (AssertionError unless status 0)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *argv, env=peers.run_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await end(proc)
    assert proc.returncode == 0, f"{argv}: {out.decode()[-1500:]} {err.decode()[-1500:]}"
    return out.decode()


async def pings(nets: Namespaces) -> None:
    """Debian's ping, v4 and v6 (link-local), from each namespace to the other."""
    ping = str(peers.find("bin/ping"))
    for ns, dest in ((nets.guest, "198.18.0.1"), (nets.dom0, "198.18.0.2"),
                     (nets.guest, f"fe80::1%{nets.gtap}"), (nets.dom0, f"fe80::2%{nets.dtap}")):
        out = await tool(ns, ping, "-c", "3", "-i", "0.05", "-W", "5", "-w", "15", dest)
        # three answers at least: while the first round trips take longer than the
        # interval (a loaded machine), ping sends and receives a few more before it stops
        got = re.search(r"(\d+) received", out)
        assert got is not None and int(got.group(1)) >= 3, out


async def iperf3_both_ways(nets: Namespaces, size: int) -> None:
    """``iperf3`` TCP guest -> dom0 and dom0 -> guest (``-R``), ``size`` bytes each."""
    iperf3 = str(peers.find("iperf3"))
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", nets.dom0, iperf3, "-s", "-p", "5201", "--forceflush",
        env=peers.run_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert server.stdout is not None
        for reverse in ([], ["-R"]):
            # it opens its socket anew for each test, and says so once it listens
            while b"Server listening" not in await asyncio.wait_for(server.stdout.readline(),
                                                                     20):
                pass
            out = json.loads(await tool(nets.guest, iperf3, "-c", "198.18.0.1", "-p", "5201",
                                        "-n", str(size), "-J", "--connect-timeout", "5000",
                                        *reverse, timeout=60))
            end_ = out["end"]  # (the receiver's count stops when the sender is done)
            assert end_["sum_sent"]["bytes"] >= size and end_["sum_received"]["bytes"] > 0
            assert out["start"]["test_start"]["reverse"] == len(reverse), out
    finally:
        await end(server)


def ifindex(ns: str, dev: str) -> str:
    index = subprocess.run(["ip", "-n", ns, "-o", "link", "show", dev], check=True,
                           capture_output=True, text=True, timeout=20).stdout.split(":")[0]
    assert index.isdigit()
    return index


#: offload on with 4 queues runs in tests/integration/test_net_processes.py (CLI processes);
#: the 256 MiB transfer runs in one configuration only (CI time)
@pytest.mark.parametrize(("offload", "queues", "up"), [(True, 2, 256 * MiB), (False, 1, SIZE)])
def test_kernel_stacks_through_the_net_pair(offload: bool, queues: int, up: int) -> None:
    peers.find("iperf3")  # the real tools, fetched by `xenpv peers fetch`: fail loudly
    peers.find("bin/ping")

    async def body() -> None:
        with Namespaces() as nets:
            async with net_world() as w:
                vif = await start_vif(w, GUESTS[0], front=NetFrontConfig(max_queues=queues),
                                      back=NetConfig(max_queues=queues))
                gtap = TapDevice.open(nets.gtap, netns=nets.guest, offload=offload,
                                      queues=queues)  # IFF_MULTI_QUEUE with 2
                bridge = TapBridge(vif.frontend, gtap)
                uplink = TapUplink(w.switch, TapDevice.open(nets.dtap, netns=nets.dom0,
                                                            offload=offload, queues=queues))
                try:
                    nets.configure(nets.guest, nets.gtap, "198.18.0.2/24", "fe80::2/64")
                    nets.configure(nets.dom0, nets.dtap, "198.18.0.1/24", "fe80::1/64")
                    bridge.start()
                    uplink.start()
                    gindex, dindex = ifindex(nets.guest, nets.gtap), ifindex(nets.dom0, nets.dtap)
                    await pings(nets)
                    await transfer(nets, "198.18.0.1", "0", up=up)
                    await transfer(nets, "fe80::1", dindex, up=2 * MiB, down=2 * MiB,
                                   client_scope=gindex)
                    await iperf3_both_ways(nets, 4 * MiB)
                    info = vif.backend.info()
                    tx_gso = sum(q["tx"]["gso"] for q in info["per_queue"])
                    rx_gso = vif.frontend.net_stats["rx_gso"]
                    assert info["queues"] == queues
                    if offload:
                        assert tx_gso > 0 and rx_gso > 0  # 64 KiB frames crossed the rings
                        assert vif.frontend.net_stats["rx_csum_blank"] > 0
                    else:
                        assert tx_gso == 0 and rx_gso == 0
                    assert gtap.stats["tx_frames"] > 0 and uplink.tap.stats["rx_frames"] > 0
                    assert vif.frontend.net_stats["tx_bytes"] > up  # the big one crossed
                    assert gtap.info()["queues"] == queues
                finally:
                    await bridge.close()
                    await uplink.close()
                    await vif.close()
                assert w.held() == NOTHING

    run(body(), timeout=300)

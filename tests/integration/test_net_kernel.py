"""Kernel TCP stacks on both ends of the net pair.

The test creates two network namespaces of its own (and removes them): a "guest" one
whose TAP device sits on our frontend (:class:`~xenpv.frontends.net.TapBridge`) and a
"dom0" one whose TAP device is a port of our backend's userspace switch
(:class:`~xenpv.backends.netswitch.TapUplink`).  Addresses are from 198.18.0.0/15 and
IPv6 link-local.  Python processes started in each namespace move data over TCP both
ways, checked by SHA-256 digests, with the TAPs' checksum/TSO offload on and off and one
or two queues; GSO frames and blank checksums cross the rings when offload is on.
Every process is ended by pid; the emulator holds nothing afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_net_support import GUESTS, NOTHING, net_world, run, start_vif

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
c.sendall(random.Random(2).randbytes(int(sys.argv[2])))
c.close()
"""
CLIENT = """
import hashlib, random, socket, sys
addr, size = sys.argv[1], int(sys.argv[2])
target = (addr, 5001, 0, int(sys.argv[3])) if ":" in addr else (addr, 5001)
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
data = random.Random(1).randbytes(size)
c = socket.create_connection(target, timeout=60) if fam == socket.AF_INET else None
if c is None:
    c = socket.socket(fam, socket.SOCK_STREAM); c.settimeout(60); c.connect(target)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
got = c.recv(100).decode()
assert got == hashlib.sha256(data).hexdigest(), "guest -> dom0 digest differs"
c.close()
c = socket.socket(fam, socket.SOCK_STREAM); c.settimeout(60); c.connect(target)
h = hashlib.sha256(); n = 0
while chunk := c.recv(1 << 16):
    h.update(chunk); n += len(chunk)
assert n == size and h.digest() == hashlib.sha256(random.Random(2).randbytes(size)).digest()
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


async def transfer(nets: Namespaces, server_addr: str, scope: str) -> None:
    server = await run_in(nets.dom0, SERVER, server_addr, str(SIZE), scope)
    client = None
    try:
        assert server.stdout is not None
        assert (await asyncio.wait_for(server.stdout.readline(), 20)).strip() == b"listening"
        client = await run_in(nets.guest, CLIENT, server_addr, str(SIZE), scope)
        out, err = await asyncio.wait_for(client.communicate(), 90)
        assert client.returncode == 0 and out.strip() == b"ok", err.decode()[-2000:]
        assert await asyncio.wait_for(server.wait(), 20) == 0
    finally:
        for p in (client, server):
            if p is not None and p.returncode is None:
                p.kill()  # ends `ip netns exec`, which exec'd python: the same pid
                await p.wait()


#: offload on with 4 queues runs in tests/integration/test_net_processes.py (CLI processes)
@pytest.mark.parametrize(("offload", "queues"), [(True, 2), (False, 1)])
def test_tcp_between_kernel_stacks_through_the_net_pair(offload: bool, queues: int) -> None:
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
                    await transfer(nets, "198.18.0.1", "0")
                    ifindex = subprocess.run(
                        ["ip", "-n", nets.dom0, "-o", "link", "show", nets.dtap],
                        check=True, capture_output=True, text=True, timeout=20
                    ).stdout.split(":")[0]
                    gindex = subprocess.run(
                        ["ip", "-n", nets.guest, "-o", "link", "show", nets.gtap],
                        check=True, capture_output=True, text=True, timeout=20
                    ).stdout.split(":")[0]
                    assert ifindex.isdigit() and gindex.isdigit()
                    server = await run_in(nets.dom0, SERVER, "fe80::1", str(2 * MiB), ifindex)
                    try:
                        assert server.stdout is not None
                        await asyncio.wait_for(server.stdout.readline(), 20)
                        client = await run_in(nets.guest, CLIENT, "fe80::1", str(2 * MiB),
                                              gindex)
                        out, err = await asyncio.wait_for(client.communicate(), 90)
                        assert client.returncode == 0 and out.strip() == b"ok", \
                            err.decode()[-2000:]
                        assert await asyncio.wait_for(server.wait(), 20) == 0
                    finally:
                        if server.returncode is None:
                            server.kill()
                            await server.wait()
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
                    assert gtap.info()["queues"] == queues
                finally:
                    await bridge.close()
                    await uplink.close()
                    await vif.close()
                assert w.held() == NOTHING

    run(body(), timeout=240)

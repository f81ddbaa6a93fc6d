"""Our net frontend with QEMU's net backends (Debian's qemu-system-xen 7.2 and 10.0).

QEMU runs as dom0's device model for the guest on the loopback emulator, through the
replacement libraries.

* **7.2** (``qnic``): the toolstack creates ``backend/qnic/<guest>/<devid>`` behind the
  guest's ``device/vif/<devid>``.  Its backend offers ``feature-rx-copy`` only and creates
  no netdev peer, so what can be shown is the handshake and the TX side: our frontend
  negotiates down to one queue, one event channel, no scatter-gather and no offloads (GSO
  frames are segmented and checksums completed before they leave), and every frame it
  sends is answered ``NETIF_RSP_OKAY`` by QEMU; frames larger than a page are refused
  locally, since QEMU did not offer ``feature-sg``.
* **10.0** (bookworm-backports, ``-device xen-net-device`` over a TAP netdev,
  :func:`xenpv.testing.qemunet.qemu_vif`): QEMU writes both directories itself and
  connects only once the frontend says Connected.  A kernel stack in a network namespace
  behind QEMU's TAP and another on top of our frontend (its TAP in a second namespace,
  checksum/TSO offload on, so the kernel's 64 KiB frames are segmented by our frontend)
  answer Debian's ``ping`` both ways (IPv4, and IPv6 to link-local addresses) and move
  8 MiB each way over TCP, checked by SHA-256 digests; afterwards the emulator holds nothing (QEMU unmapped every
  page, our grants and ports ended).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from qemu_support import QemuGuest, with_qemu_guest
from shim_peers import run_showing_log

from xenpv.frontends.net import NetFrontConfig, NetFrontend
from xenpv.protocols.ethernet import GSO_TCPV4, NetFrame
from xenpv.testing.qemunet import qemu_vif, read_dir
from xenpv.testing.vchan import VchanLab
from xenpv.xenbus import XenbusState
from xenpv.xenbus.toolstack import add_device, remove_device, vif_keys

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_net_kernel import Namespaces, pings, transfer
from test_net_support import blank_checksum, tcp_frame

GUEST = 35
WAIT = 20.0


def test_our_frontend_with_qemus_net_backend(tmp_path: Path) -> None:
    async def body(w: QemuGuest) -> None:
        frontend = None
        try:
            fkeys, bkeys = vif_keys(0, mac="00:16:3e:00:00:23")
            bkeys.pop("type")
            info = await add_device(w.xs0, "vif", GUEST, 0, 0, frontend_keys=fkeys,
                                    backend_keys=bkeys, backend_type="qnic")
            w.start_qemu()
            frontend = NetFrontend(w.guest, w.xsg, info.frontend_path,
                                   config=NetFrontConfig(tx_pages=32, rx_pages=32))
            await frontend.start()
            await frontend.ready(WAIT)
            fe = frontend
            offered = {k for k, v in fe.backend_features.items() if v}
            assert offered == set(), offered  # rx-copy only, required and present
            bdir = await read_dir(w.xs0, info.backend_path)
            assert {k: v for k, v in bdir.items() if k.startswith("feature-")} \
                == {"feature-rx-copy": "1", "feature-rx-flip": "0"}
            assert len(fe.queues) == 1 and not fe.queues[0].split
            peer = bytes.fromhex("00163e0000ff")
            assert fe.mac is not None
            for n in (60, 590, 1514, 4096):
                await fe.send(NetFrame(peer + fe.mac + b"\x88\xb5" + bytes(n - 14)))
            big = blank_checksum(tcp_frame(peer, fe.mac, bytes(range(256)) * 40))
            await fe.send(NetFrame(big, csum_blank=True, gso_type=GSO_TCPV4,
                                   gso_size=1448))
            with pytest.raises(Exception, match="feature-sg"):
                await fe.send(NetFrame(peer + fe.mac + b"\x88\xb5" + bytes(5000)))
            stats = fe.net_stats
            assert stats["tx_segmented"] == 1
            sent = stats["tx_packets"]
            assert sent == 4 + 8  # 10240 bytes of TCP payload in 1448-byte segments
            async with asyncio.timeout(WAIT):  # every slot answered, all OKAY
                while fe.info()["rings"][0]["tx_inflight"]:
                    await asyncio.sleep(0.01)
            assert stats["tx_errors"] == 0 and fe.error is None
            assert await fe.wait_state(XenbusState.Connected, timeout=WAIT) \
                == XenbusState.Connected
            await remove_device(w.xs0, "vif", GUEST, 0, 0, backend_type="qnic",
                                timeout=5.0)
        finally:
            if frontend is not None:
                await frontend.close()

    with_qemu_guest(GUEST, tmp_path, body)


def test_our_frontend_with_qemu10s_net_backend_and_kernel_stacks(tmp_path: Path) -> None:
    qemu_log = tmp_path / "qemu10.log"
    with Namespaces() as nets, VchanLab(domains=(GUEST,), max_grants=1024) as lab:
        # guest namespace: on our frontend; dom0 namespace: behind QEMU's TAP
        async def body() -> None:
            with open(qemu_log, "wb") as log:
                async with qemu_vif(lab, GUEST, qemu_netns=nets.dom0, qemu_tap=nets.dtap,
                                    guest_netns=nets.guest, guest_tap=nets.gtap,
                                    log=log, timeout=WAIT) as vif:
                    fe = vif.frontend
                    offered = {k: v for k, v in vif.backend_keys.items()
                               if k.startswith("feature-")}
                    assert offered == {"feature-rx-copy": "1", "feature-rx-flip": "0"}
                    assert vif.frontend_keys["mac"] == "00:16:3e:00:00:23"
                    assert vif.frontend_keys["state"] == vif.backend_keys["state"] == "4"
                    assert len(fe.queues) == 1 and not fe.queues[0].split
                    nets.configure(nets.guest, nets.gtap, "198.18.0.2/24", "fe80::2/64")
                    nets.configure(nets.dom0, nets.dtap, "198.18.0.1/24", "fe80::1/64")
                    await pings(nets)  # Debian's ping, v4 and v6 link-local, both ways
                    await transfer(nets, "198.18.0.1", "0")
                    stats = fe.net_stats
                    assert stats["tx_segmented"] > 0  # the kernel's GSO frames, cut by us
                    assert stats["tx_errors"] == 0 and stats["rx_errors"] == 0
                    assert stats["rx_bytes"] > 8 << 20 and stats["tx_bytes"] > 8 << 20
                    assert fe.error is None
                assert vif.qemu.returncode is not None  # ended by pid

        run_showing_log(body, qemu_log, "QEMU 10")
        lab.assert_released()  # QEMU unmapped everything, our grants and ports ended

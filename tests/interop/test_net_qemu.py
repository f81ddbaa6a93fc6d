"""Our net frontend with QEMU's net backend (Debian's qemu-system-xen 7.2, ``qnic``).

QEMU runs as dom0's device model for the guest on the loopback emulator, through the
replacement libraries.  The toolstack creates ``backend/qnic/<guest>/<devid>`` behind the
guest's ``device/vif/<devid>``.  QEMU 7.2's backend offers ``feature-rx-copy`` only and
creates no netdev peer, so what can be shown is the handshake and the TX side: our
frontend negotiates down to one queue, one event channel, no scatter-gather and no
offloads (GSO frames are segmented and checksums completed before they leave), and every
frame it sends is answered ``NETIF_RSP_OKAY`` by QEMU; frames larger than a page are
refused locally, since QEMU did not offer ``feature-sg``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from qemu_support import qemu_command, start_qemu
from shim_peers import LoopbackRun, run_showing_log

from xenpv.frontends.net import NetFrontConfig, NetFrontend
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.protocols.ethernet import GSO_TCPV4, NetFrame
from xenpv.xenbus import XenbusState
from xenpv.xenbus.toolstack import add_device, remove_device, vif_keys
from xenpv.xenstore.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_net_support import blank_checksum, tcp_frame

GUEST = 35
WAIT = 20.0


def test_our_frontend_with_qemus_net_backend(tmp_path: Path) -> None:
    qemu = qemu_command(GUEST)
    qemu_log = tmp_path / "qemu.log"
    run = LoopbackRun({GUEST: "guest"})
    try:
        rundir = Path(run.rundir)

        async def body() -> None:
            guest = ClientPlatform.for_domain(rundir, GUEST)
            xs0 = await connect(str(rundir / "dom0" / "xenstore"))
            xsg = await connect(str(rundir / f"dom{GUEST}" / "xenstore"))
            frontend = None
            try:
                fkeys, bkeys = vif_keys(0, mac="00:16:3e:00:00:23")
                bkeys.pop("type")
                info = await add_device(xs0, "vif", GUEST, 0, 0, frontend_keys=fkeys,
                                        backend_keys=bkeys, backend_type="qnic")
                start_qemu(run, qemu, qemu_log)
                frontend = NetFrontend(guest, xsg, info.frontend_path,
                                       config=NetFrontConfig(tx_pages=32, rx_pages=32))
                await frontend.start()
                await frontend.ready(WAIT)
                fe = frontend
                offered = {k for k, v in fe.backend_features.items() if v}
                assert offered == set(), offered  # rx-copy only, required and present
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
                await remove_device(xs0, "vif", GUEST, 0, 0, backend_type="qnic",
                                    timeout=5.0)
            finally:
                if frontend is not None:
                    await frontend.close()
                await xsg.close()
                await xs0.close()
                guest.close()

        run_showing_log(body, qemu_log, "QEMU")
    finally:
        run.close()

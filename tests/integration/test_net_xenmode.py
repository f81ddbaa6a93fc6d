"""The net pair with one end on the real-Xen platform mode of the emulator.

A loopback daemon plays hypervisor and xenstored; the backend (dom0) runs on
:class:`~xenpv.platforms.xen.XenPlatform` — cffi on ``libxengnttab.so.1`` and
``libxenevtchn.so.1``, here the emulator's replacement libraries — so its grant copies go
through ``xengnttab_grant_copy``; or the frontend does (its ring, TX and RX pages shared
with ``xengntshr_share_pages``).  The other end is a loopback client in this process.
The backend's switch has an echo port that sends every frame back with its MACs swapped:
frames of every size, with GSO and checksum metadata, come back intact, over split and
shared event channels; the emulator holds nothing afterwards.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from xenpv.backends.net import NetBackendDriver, NetConfig
from xenpv.backends.netswitch import NetSwitch, SwitchPort
from xenpv.frontends.net import NetFrontConfig, NetFrontend
from xenpv.protocols.ethernet import GSO_TCPV4, NetFrame
from xenpv.testing.vchan import VchanLab
from xenpv.testing.xenmode import daemon_pair
from xenpv.xenbus.toolstack import add_device, remove_device, vif_keys

GUEST = 9
WAIT = 20.0
ECHO_MAC = bytes.fromhex("020000000099")


@pytest.fixture
def lab() -> Iterator[VchanLab]:
    with VchanLab((GUEST,), max_grants=4096, max_ports=64) as lab:
        yield lab


def echo_switch() -> NetSwitch:
    """A switch whose port ``echo`` answers every frame to its sender."""
    sw = NetSwitch("echo")
    holder: list[SwitchPort] = []

    def deliver(f: NetFrame) -> None:
        holder[0].send(NetFrame(f.src + ECHO_MAC + f.data[12:], csum_blank=f.csum_blank,
                                data_validated=f.data_validated, gso_type=f.gso_type,
                                gso_size=f.gso_size))

    holder.append(sw.attach("echo", deliver))
    return sw


@pytest.mark.parametrize(("on_xen", "split"), [("backend", True), ("frontend", False)])
def test_net_pair_on_the_xen_platform(lab: VchanLab, on_xen: str, split: bool) -> None:
    async def body() -> None:
        async with daemon_pair(lab.rundir, GUEST,
                               on_xen=(0,) if on_xen == "backend" else (GUEST,)) as p:
            fkeys, bkeys = vif_keys(0, mac="02:00:00:00:00:09")
            info = await add_device(p.xs0, "vif", GUEST, 0, 0, frontend_keys=fkeys,
                                    backend_keys=bkeys)
            be = p.closing(NetBackendDriver(p.dom0, p.xs0, info.backend_path,
                                            switch=echo_switch(),
                                            config=NetConfig(max_queues=2)))
            fe = p.closing(NetFrontend(p.guest, p.xsg, info.frontend_path, config=NetFrontConfig(
                max_queues=2, split_events=split, tx_pages=64, rx_pages=64)))
            await be.start()
            await fe.start()
            await fe.ready(WAIT)
            assert fe.mac is not None and len(fe.queues) == 2
            rng = random.Random(9)
            for n in (60, 1514, 4096, 9000, 65535):
                body_ = rng.randbytes(n - 14)
                await fe.send(NetFrame(ECHO_MAC + fe.mac + b"\x88\xb5" + body_))
                got = await fe.recv(WAIT)
                assert got.data == fe.mac + ECHO_MAC + b"\x88\xb5" + body_
            tcp = ECHO_MAC + fe.mac + b"\x08\x00" + bytes([0x45]) + bytes(8) + b"\x06" + \
                bytes(10) + bytes([0x50]) + bytes(19) + bytes(30000)
            await fe.send(NetFrame(tcp, csum_blank=True, gso_type=GSO_TCPV4, gso_size=1448))
            got = await fe.recv(WAIT)
            assert (got.gso_type, got.gso_size, got.csum_blank) == (GSO_TCPV4, 1448, True)
            await fe.close()
            assert await remove_device(p.xs0, "vif", GUEST, 0, 0, timeout=WAIT)
            await be.wait_done(WAIT)

    asyncio.run(body())
    lab.machine.assert_released()

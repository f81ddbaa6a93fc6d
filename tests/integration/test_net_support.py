"""Shared pieces of the net pair tests (no tests here).

:func:`net_world` is an embedded xenstored on temporary Unix sockets (one client per
domain: dom0 the toolstack, guests ``GUESTS`` and the backend domain ``BE``) and an
in-process emulator (:func:`xenpv.testing.world.domain_world`); :func:`start_vif` adds a
vif as the toolstack does and runs our frontend (as the guest) and our backend (as
``BE``, joined to a shared :class:`~xenpv.backends.netswitch.NetSwitch`).  Frames are
built by :func:`eth`, :func:`tcp4` and :func:`tcp6`.  The caller checks the emulator's
accounting (``World.held``).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from xenpv.backends.net import NetBackendDriver, NetConfig
from xenpv.backends.netswitch import NetSwitch
from xenpv.frontends.net import NetFrontConfig, NetFrontend
from xenpv.protocols.ethernet import mac_text
from xenpv.testing.world import DomainWorld, domain_world
from xenpv.xenbus import XenbusState, add_device

BE = 2
GUESTS = (3, 4)
S = XenbusState
T = TypeVar("T")
NOTHING = {"grants": 0, "mappings": 0, "ports": 0}
BROADCAST = b"\xff" * 6


def run(coro: Awaitable[T], timeout: float = 120.0) -> T:
    """Run ``coro`` in a fresh event loop with an overall timeout."""

    async def main() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(main())


def guest_mac(domid: int, devid: int = 0) -> bytes:
    """A locally administered MAC for a guest's vif."""
    return bytes([0x02, 0x16, 0x3E, 0, domid, devid])


@dataclass
class World(DomainWorld):
    """The xenstored, one client per domain, the emulator and the backend's switch."""

    switch: NetSwitch = field(default_factory=NetSwitch)


def net_world(max_grants: int = 8192) -> contextlib.AbstractAsyncContextManager[World]:
    """See the module docstring."""
    return domain_world((BE, *GUESTS), World, max_grants=max_grants, max_ports=64,
                        prefix="xenpv-net-")


@dataclass
class Vif:
    """A vif with our frontend (in a guest) and our backend (in ``BE``)."""

    world: World
    domid: int
    mac: bytes
    frontend: NetFrontend
    backend: NetBackendDriver
    fe_path: str
    be_path: str

    async def close(self) -> None:
        """Close both ends (frontend first, as a guest unplug)."""
        await self.frontend.close()
        await self.backend.close()


async def start_vif(world: World, domid: int, *, devid: int = 0,
                    front: NetFrontConfig | None = None, back: NetConfig | None = None,
                    wait: bool = True, backend_keys: dict[str, str] | None = None,
                    **driver_kw: Any) -> Vif:
    """Add the vif as the toolstack does, start both ends, wait until connected."""
    mac = guest_mac(domid, devid)
    keys = {"mac": mac_text(mac), "handle": devid, "mtu": 1500}
    info = await add_device(world.dom0, "vif", domid, BE, devid, frontend_keys=keys,
                            backend_keys={**keys, "type": "vif", "bridge": "xenpv0",
                                          "script": "vif-bridge", **(backend_keys or {})})
    be = NetBackendDriver(world.machine.domain(BE), world.clients[BE], info.backend_path,
                          config=back or NetConfig(), switch=world.switch, **driver_kw)
    fe = NetFrontend(world.machine.domain(domid), world.clients[domid], info.frontend_path,
                     config=front or NetFrontConfig(tx_pages=64, rx_pages=64), **driver_kw)
    await be.start()
    await fe.start()
    if wait:
        await fe.ready(15.0)
        await be.wait_state(S.Connected, timeout=15.0)
    return Vif(world, domid, mac, fe, be, info.frontend_path, info.backend_path)


# -- frames -----------------------------------------------------------------------------

def eth(dst: bytes, src: bytes, etype: int, payload: bytes) -> bytes:
    """An Ethernet frame."""
    return dst + src + struct.pack("!H", etype) + payload


def arp_request(src: bytes, ip_src: bytes, ip_dst: bytes) -> bytes:
    """A broadcast ARP who-has (IPv4 over Ethernet)."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src, ip_src, bytes(6), ip_dst)
    return eth(BROADCAST, src, 0x0806, body)


def _sum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_checksum_ok(frame: bytes) -> bool:
    """The TCP checksum of an IPv4 or IPv6 frame (no options beyond TCP's) is right."""
    etype = struct.unpack_from("!H", frame, 12)[0]
    if etype == 0x0800:
        ihl = (frame[14] & 0xF) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        seg = frame[14 + ihl:14 + total]
        pseudo = frame[26:34] + struct.pack("!xBH", 6, len(seg))
        ip_ok = _sum(frame[14:14 + ihl]) == 0xFFFF
    else:
        plen = struct.unpack_from("!H", frame, 18)[0]
        seg = frame[54:54 + plen]
        pseudo = frame[22:54] + struct.pack("!I3xB", len(seg), 6)
        ip_ok = True
    return ip_ok and _sum(pseudo + seg) == 0xFFFF


def tcp_frame(dst: bytes, src: bytes, payload: bytes, *, v6: bool = False, seq: int = 1000,
              flags: int = 0x18) -> bytes:
    """A TCP segment from 198.18.0.1:40000 to 198.18.0.2:5001 (or between IPv6
    link-local addresses) with a correct checksum."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 1, 5 << 4, flags, 65535, 0, 0)
    if v6:
        a, b = bytes.fromhex("fe80" + "00" * 13 + "01"), bytes.fromhex("fe80" + "00" * 13 + "02")
        ip = struct.pack("!IHBB", 6 << 28, len(tcp) + len(payload), 6, 64) + a + b
        pseudo = a + b + struct.pack("!I3xB", len(tcp) + len(payload), 6)
    else:
        a, b = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 7, 0x4000,
                          64, 6, 0, a, b)
        ip = hdr[:10] + struct.pack("!H", 0xFFFF - _sum(hdr)) + hdr[12:]
        pseudo = a + b + struct.pack("!xBH", 6, len(tcp) + len(payload))
    csum = 0xFFFF - _sum(pseudo + tcp + payload)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    return eth(dst, src, 0x86DD if v6 else 0x0800, ip + tcp + payload)


def blank_checksum(frame: bytes, v6: bool = False) -> bytes:
    """``frame`` with its TCP checksum field zeroed (as a sender offloading it)."""
    off = (54 if v6 else 34) + 16
    return frame[:off] + b"\0\0" + frame[off + 2:]

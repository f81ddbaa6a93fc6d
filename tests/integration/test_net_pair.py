"""The net pair end to end: two guests' frontends through our backend's userspace switch
(in-process emulator, embedded xenstored) — broadcast and learnt unicast, large frames over
slot chains, GSO and checksum metadata carried or adapted, over a lean feature matrix;
nothing left held afterwards."""

from __future__ import annotations

import asyncio
import random
import select
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_net_support import (
    BE,
    BROADCAST,
    GUESTS,
    NOTHING,
    Vif,
    World,
    arp_request,
    blank_checksum,
    eth,
    net_world,
    run,
    start_vif,
    tcp_checksum_ok,
    tcp_frame,
)

from xenpv.backends.net import NetConfig
from xenpv.drivers.tap import TapDevice
from xenpv.frontends.net import NetFrontConfig, NetFrontend, TapBridge
from xenpv.platforms.base import GrantCopy, LocalPtr
from xenpv.protocols.ethernet import GSO_NONE, GSO_TCPV4, GSO_TCPV6, NetFrame
from xenpv.protocols.layout import XEN_PAGE_SIZE
from xenpv.xenbus import XenbusState, add_device

A, B = GUESTS


async def two_vifs(w: World, front: NetFrontConfig | None = None,
                   back: NetConfig | None = None,
                   front_b: NetFrontConfig | None = None) -> tuple[Vif, Vif]:
    a = await start_vif(w, A, front=front, back=back)
    b = await start_vif(w, B, front=front_b or front, back=back)
    return a, b


async def close_bridge(bridge: TapBridge, peer: socket.socket, ours: socket.socket) -> None:
    """Close a bridge over a fake TAP fd (``ours``, closed by the bridge) and its peer."""
    await bridge.close()
    peer.close()
    ours.detach()  # the bridge closed its fd


async def close_all(w: World, *vifs: Vif) -> None:
    for v in vifs:
        await v.close()
    assert w.held() == NOTHING


def test_broadcast_learning_unicast_and_large_frames() -> None:
    """ARP-like broadcast reaches the other guest; after learning, unicast goes only to
    its port; frames up to 64 KiB cross over slot chains intact; counters agree."""
    async def body() -> None:
        async with net_world() as w:
            a, b = await two_vifs(w)
            c = await start_vif(w, A, devid=1)  # a third port: must not see unicast
            try:
                arp = arp_request(a.mac, bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
                await a.frontend.send(NetFrame(arp))
                got = await b.frontend.recv(5.0)
                assert got.data == arp and not got.csum_blank and got.gso_type == GSO_NONE
                assert (await c.frontend.recv(5.0)).data == arp  # flooded
                reply = eth(a.mac, b.mac, 0x0806, b"reply".ljust(46, b"\0"))
                await b.frontend.send(NetFrame(reply))  # a is learnt: to a only
                assert (await a.frontend.recv(5.0)).data == reply
                rng = random.Random(5)
                sizes = [60, 1514, 4096, 4097, 9000, 20000, 65535]
                sent = []
                for n in sizes:
                    frame = eth(b.mac, a.mac, 0x88B5, rng.randbytes(n - 14))
                    sent.append(frame)
                    await a.frontend.send(NetFrame(frame))
                for frame in sent:
                    assert (await b.frontend.recv(5.0)).data == frame
                assert c.frontend.pending_frames() == 0  # learnt unicast never flooded
                pa = a.backend.info()["port"]
                pb = b.backend.info()["port"]
                assert pa["rx_packets"] == 1 + len(sizes) and pa["tx_packets"] == 1
                assert pb["tx_packets"] == 1 + len(sizes) and pb["rx_packets"] == 1
                assert pa["flooded"] == 1 and pb["flooded"] == 0
                assert pa["macs"] == [":".join(f"{x:02x}" for x in a.mac)]
                fa = a.frontend.info()["stats"]
                assert fa["tx_packets"] == 1 + len(sizes) and fa["tx_errors"] == 0
                q = b.backend.info()["per_queue"]
                assert sum(x["rx"]["packets"] for x in q) == 1 + len(sizes)
            finally:
                await close_all(w, a, b, c)

    run(body())


def test_gso_and_checksum_metadata_carried() -> None:
    """A GSO TCP frame with a blank checksum reaches a guest that takes GSO unchanged,
    metadata included, for IPv4 and IPv6."""
    async def body() -> None:
        async with net_world() as w:
            a, b = await two_vifs(w)
            try:
                for v6, kind in ((False, GSO_TCPV4), (True, GSO_TCPV6)):
                    big = blank_checksum(tcp_frame(b.mac, a.mac, bytes(range(256)) * 200,
                                                   v6=v6), v6)
                    await a.frontend.send(NetFrame(big, csum_blank=True, gso_type=kind,
                                                   gso_size=1448))
                    got = await b.frontend.recv(5.0)
                    assert got.data == big
                    assert (got.gso_type, got.gso_size, got.csum_blank) == (kind, 1448, True)
                assert sum(q["tx"]["gso"] for q in a.backend.info()["per_queue"]) == 2
            finally:
                await close_all(w, a, b)

    run(body())


@pytest.mark.parametrize(("split", "queues", "offload"), [
    (True, 1, True), (False, 1, False), (True, 2, False), (False, 2, True)])
def test_feature_matrix(split: bool, queues: int, offload: bool) -> None:
    """Split or shared event channels, 1 or 2 queues, sg/GSO/checksum offload on or off
    at the receiving guest: frames arrive, adapted where the guest cannot take them
    (GSO segmented, checksums completed, all correct)."""
    async def body() -> None:
        async with net_world() as w:
            front = NetFrontConfig(split_events=split, max_queues=queues, tx_pages=64,
                                   rx_pages=64)
            front_b = NetFrontConfig(split_events=split, max_queues=queues, tx_pages=64,
                                     rx_pages=64, sg=offload, gso_tcpv4=offload,
                                     gso_tcpv6=offload, csum=offload, ipv6_csum=offload)
            a, b = await two_vifs(w, front, NetConfig(max_queues=2), front_b)
            try:
                info = b.backend.info()
                assert info["queues"] == queues
                assert info["split_event_channels"] is split
                assert info["frontend_features"]["sg"] is offload
                payload = bytes(random.Random(queues).randbytes(30000))
                for v6, kind in ((False, GSO_TCPV4), (True, GSO_TCPV6)):
                    big = blank_checksum(tcp_frame(b.mac, a.mac, payload, v6=v6), v6)
                    await a.frontend.send(NetFrame(big, csum_blank=True, gso_type=kind,
                                                   gso_size=1400))
                    if offload:
                        got = await b.frontend.recv(5.0)
                        assert got.data == big and got.gso_type == kind
                        continue
                    body_len = 0
                    seqs = []
                    while body_len < len(payload):
                        seg = await b.frontend.recv(5.0)
                        assert seg.gso_type == GSO_NONE and not seg.csum_blank
                        assert len(seg.data) <= 14 + (40 if v6 else 20) + 20 + 1400
                        assert tcp_checksum_ok(seg.data)
                        hdr = 14 + (40 if v6 else 20)
                        seqs.append(int.from_bytes(seg.data[hdr + 4:hdr + 8], "big"))
                        assert seg.data[hdr + 20:] == payload[body_len:body_len + 1400]
                        body_len += len(seg.data) - hdr - 20
                    assert seqs == [1000 + 1400 * k for k in range(len(seqs))]
                small = blank_checksum(tcp_frame(b.mac, a.mac, b"hello" * 20))
                await a.frontend.send(NetFrame(small, csum_blank=True))
                got = await b.frontend.recv(5.0)
                assert got.csum_blank is offload
                assert tcp_checksum_ok(got.data) is not offload
                # many frames over every queue of the vif, in order per flow
                frames = [eth(b.mac, a.mac, 0x88B5, k.to_bytes(4, "big") * 100)
                          for k in range(300)]
                for f in frames:
                    await a.frontend.send(NetFrame(f))
                for f in frames:
                    assert (await b.frontend.recv(5.0)).data == f
            finally:
                await close_all(w, a, b)

    run(body())


def test_backend_refusing_offloads_makes_the_frontend_adapt() -> None:
    """A backend without sg, GSO or IPv6 checksum offload: the frontend segments and
    completes checksums itself and never sends what was not offered."""
    async def body() -> None:
        async with net_world() as w:
            back = NetConfig(sg=False, gso_tcpv4=False, gso_tcpv6=False, ipv6_csum=False,
                             split_events=False, max_queues=1)
            a, b = await two_vifs(w, back=back)
            try:
                payload = bytes(range(200)) * 50
                big = blank_checksum(tcp_frame(b.mac, a.mac, payload, v6=True), True)
                await a.frontend.send(NetFrame(big, csum_blank=True, gso_type=GSO_TCPV6,
                                               gso_size=1000))
                n = 0
                while n < len(payload):
                    seg = await b.frontend.recv(5.0)
                    assert tcp_checksum_ok(seg.data) and seg.gso_type == GSO_NONE
                    n += len(seg.data) - 74
                assert a.frontend.info()["stats"]["tx_segmented"] == 1
                with pytest.raises(Exception, match="feature-sg"):
                    await a.frontend.send(NetFrame(eth(BROADCAST, a.mac, 0x88B5,
                                                       bytes(5000))))
                tx = a.backend.info()["per_queue"][0]["tx"]
                assert tx["dropped"] == 0 and tx["gso"] == 0
            finally:
                await close_all(w, a, b)

    run(body())


MS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da3"
                       "8030f20c6a42b73bbeac01fa")
#: (source, source port, destination, destination port, Toeplitz hash of the TCP 4-tuple)
#: from the published RSS verification examples.
RSS_V4 = [("66.9.149.187", 2794, "161.142.100.80", 1766, 0x51CCC178),
          ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xC626B0EA),
          ("24.19.198.95", 12898, "12.22.207.184", 38024, 0x5C2B394A),
          ("38.27.205.30", 48228, "209.142.163.6", 2217, 0xAFC7327F),
          ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x10E828A2)]


def flow_frame(dst_mac: bytes, src_mac: bytes, src: str, sport: int, dst: str,
               dport: int) -> bytes:
    import socket
    import struct

    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x10, 1000, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    return eth(dst_mac, src_mac, 0x0800, ip + tcp)


def test_control_ring_toeplitz_picks_the_rx_queue() -> None:
    """A frontend with the control ring sets the Toeplitz key, the IPv4+TCP hash type and
    a mapping table: each flow of the published RSS examples arrives on the queue the
    table gives for its hash, with that hash in a HASH extra-info slot (after the GSO
    one for a GSO frame).  Requests out of range get their statuses."""
    from xenpv.frontends.net import NetCtrlError
    from xenpv.protocols import netif

    async def body() -> None:
        async with net_world() as w:
            a = await start_vif(w, A, front=NetFrontConfig(max_queues=1, tx_pages=32,
                                                           rx_pages=32))
            b = await start_vif(w, B, front=NetFrontConfig(max_queues=4, ctrl_ring=True,
                                                           tx_pages=32, rx_pages=32))
            try:
                fe = b.frontend
                mapping = [3, 1, 2, 0, 2, 2, 1, 3]
                await fe.set_toeplitz(MS_KEY, netif.XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP,
                                      mapping)
                for src, sport, dst, dport, h in RSS_V4:
                    before = [r["rx_frames"] for r in fe.info()["rings"]]
                    await a.frontend.send(NetFrame(flow_frame(b.mac, a.mac, src, sport, dst,
                                                              dport)))
                    got_frame = await fe.recv(5.0)
                    # the hash also comes with the frame, in a HASH extra-info slot
                    assert (got_frame.rss_type, got_frame.rss_hash) == (2, h)
                    after = [r["rx_frames"] for r in fe.info()["rings"]]
                    got = [k for k in range(4) if after[k] != before[k]]
                    assert got == [mapping[h % len(mapping)]], (src, got)
                src, sport, dst, dport, h = RSS_V4[0]  # GSO + HASH extras, chained
                big = flow_frame(b.mac, a.mac, src, sport, dst, dport)
                big = big[:16] + (40 + 20000).to_bytes(2, "big") + big[18:] + bytes(20000)
                await a.frontend.send(NetFrame(big, gso_type=GSO_TCPV4, gso_size=1000))
                got_big = await fe.recv(5.0)
                assert got_big.data == big and got_big.gso_type == GSO_TCPV4
                assert (got_big.rss_type, got_big.rss_hash) == (2, h)
                assert b.backend.info()["ctrl"]["hashed"] == len(RSS_V4) + 1
                assert await fe.ctrl(netif.XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS) == 0xF
                assert await fe.ctrl(netif.XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE) == 128
                bad = [(netif.XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE, 0, 0, 0, 2),
                       (netif.XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE, 129, 0, 0, 2),
                       (netif.XEN_NETIF_CTRL_TYPE_SET_HASH_KEY, 0, 41, 0, 3),
                       (netif.XEN_NETIF_CTRL_TYPE_SET_HASH_KEY, 0xFFFFFF, 40, 0, 2),
                       (netif.XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM, 7, 0, 0, 2),
                       (netif.XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS, 0x10, 0, 0, 2),
                       (netif.XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING, 0, 6, 4, 2),
                       (netif.XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE, 0, 0, 0, 1),
                       (99, 0, 0, 0, 1)]
                for typ, d0, d1, d2, status in bad:
                    with pytest.raises(NetCtrlError) as err:
                        await fe.ctrl(typ, d0, d1, d2)
                    assert err.value.status == status, typ
                with pytest.raises(NetCtrlError):  # a queue that does not exist
                    await fe.set_toeplitz(MS_KEY, 2, [0, 4])
                with pytest.raises(Exception, match="control ring"):
                    await a.frontend.ctrl(netif.XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS)
            finally:
                await close_all(w, a, b)

    run(body())


def test_rate_node_limits_tx_credit_and_keeps_order() -> None:
    """A vif whose backend directory has ``rate`` = 20000 bytes per 2 s: of 40 frames of
    1000 bytes sent at once, the first window serves 20 and holds the rest (answered
    later, by the credit timer); all 40 arrive, in order."""
    async def body() -> None:
        async with net_world() as w:
            a = await start_vif(w, A, front=NetFrontConfig(max_queues=1, tx_pages=64,
                                                           rx_pages=64),
                                backend_keys={"rate": "20000,2000000"})
            b = await start_vif(w, B)
            try:
                assert a.backend.info()["rate"] == [20000, 2000000]
                frames = [eth(b.mac, a.mac, 0x88B5, k.to_bytes(2, "big") * 493)
                          for k in range(40)]
                for f in frames:
                    await a.frontend.send(NetFrame(f))
                q = a.backend.queues[0]
                async with asyncio.timeout(10):
                    while q.tx.stats["packets"] + q.tx.held < 40:
                        await asyncio.sleep(0.005)
                assert q.tx.stats["rate_limited"] >= 1
                assert q.tx.stats["packets"] == 20 and q.tx.held == 20
                for f in frames:
                    assert (await b.frontend.recv(10.0)).data == f
                assert a.frontend.info()["rings"][0]["tx_inflight"] == 0
            finally:
                await close_all(w, a, b)

    run(body())


def test_multicast_control_filters_and_follows_the_frontend() -> None:
    """A guest with multicast control gets multicast frames only for the groups it
    added (broadcast always); turning the request off later (dynamic control) lets every
    group through; a guest without it gets them all."""
    async def body() -> None:
        async with net_world() as w:
            cfg = NetFrontConfig(max_queues=1, tx_pages=32, rx_pages=32)
            a = await start_vif(w, A, front=cfg)
            b = await start_vif(w, B, front=NetFrontConfig(max_queues=1, tx_pages=32,
                                                           rx_pages=32,
                                                           multicast_control=True))
            c = await start_vif(w, A, devid=1, front=cfg)
            group = bytes.fromhex("01005e0000fb")
            other = bytes.fromhex("01005e000001")
            try:
                async def blast(dst: bytes, tag: int) -> bytes:
                    frame = eth(dst, a.mac, 0x88B5, bytes([tag]) * 50)
                    await a.frontend.send(NetFrame(frame))
                    assert (await c.frontend.recv(5.0)).data == frame  # no filter on c
                    return frame

                filtered = b.backend.queues[0].rx.stats
                await blast(group, 1)
                assert filtered["mcast_filtered"] == 1
                await b.frontend.multicast_add(group)
                f2 = await blast(group, 2)
                assert (await b.frontend.recv(5.0)).data == f2
                await blast(other, 3)
                bcast = await blast(BROADCAST, 4)
                assert (await b.frontend.recv(5.0)).data == bcast  # broadcast passes
                assert filtered["mcast_filtered"] == 2
                assert b.backend.info()["multicast_filter"]["macs"] == ["01:00:5e:00:00:fb"]
                await b.frontend.multicast_del(group)
                await blast(group, 5)
                assert filtered["mcast_filtered"] == 3
                with pytest.raises(Exception, match="group MAC"):
                    await b.frontend.multicast_add(a.mac)
                await b.frontend.set_multicast_control(False)
                async with asyncio.timeout(5):
                    while b.backend.mcast is not None and b.backend.mcast.enabled:
                        await asyncio.sleep(0.01)
                f6 = await blast(other, 6)
                assert (await b.frontend.recv(5.0)).data == f6
                assert b.frontend.pending_frames() == 0
            finally:
                await close_all(w, a, b, c)

    run(body())


def test_frontend_goes_connected_for_a_backend_that_waits_for_it() -> None:
    """Linux netback and QEMU 10's xen-net-device connect only when the frontend says
    Connected (they ignore Initialised): our frontend writes its keys and goes
    Connected on the backend's InitWait, and ready() waits for the backend's Connected."""

    async def body() -> None:
        async with net_world() as w:
            be = w.clients[BE]
            info = await add_device(w.dom0, "vif", A, BE, 0,
                                    frontend_keys={"mac": "02:16:3e:00:03:00"})
            fe = NetFrontend(w.machine.domain(A), w.clients[A], info.frontend_path,
                             config=NetFrontConfig(tx_pages=32, rx_pages=32), close_timeout=0.3)
            await be.write(f"{info.backend_path}/feature-rx-copy", "1")
            await be.write(f"{info.backend_path}/state", str(int(XenbusState.InitWait)))
            await fe.start()
            try:
                async with asyncio.timeout(5.0):  # the backend waits for Connected only
                    while await be.read(f"{info.frontend_path}/state") != b"4":
                        await asyncio.sleep(0.01)
                assert await be.read(f"{info.frontend_path}/tx-ring-ref")
                with pytest.raises(TimeoutError):  # the backend has not connected yet
                    await fe.ready(0.2)
                await be.write(f"{info.backend_path}/state", str(int(XenbusState.Connected)))
                await fe.ready(5.0)
            finally:
                await fe.close()
            await be.write(f"{info.backend_path}/state", str(int(XenbusState.Closed)))
            assert w.held() == NOTHING

    run(body(), timeout=30)


class CountingGrants:
    """A grant table that counts its copy calls (and passes everything on)."""

    def __init__(self, inner: object) -> None:
        self.inner, self.calls = inner, 0

    def copy(self, segments: list[object]) -> list[int]:
        self.calls += 1
        return self.inner.copy(segments)  # type: ignore[attr-defined,no-any-return]


def test_a_burst_of_small_frames_is_copied_in_few_grant_copies() -> None:
    """40 small frames pushed in one burst cross the backend with a handful of grant-copy
    calls on TX and on RX (packets of a ring pass are copied together, as many as the
    staging area holds, up to 120 KiB counted without staged bytes),
    intact and in order; one failed copy in a batch drops only its own frame."""
    async def body() -> None:
        async with net_world() as w:
            a, b = await two_vifs(w, back=NetConfig(max_queues=1))
            try:
                learn = eth(BROADCAST, b.mac, 0x88B5, b"learn".ljust(46, b"."))
                await b.frontend.send(NetFrame(learn))  # b's MAC is learnt: unicast to b
                assert (await a.frontend.recv(5.0)).data == learn
                tx, rx = CountingGrants(a.backend.queues[0].tx.grants), \
                    CountingGrants(b.backend.queues[0].rx.grants)
                a.backend.queues[0].tx.grants = tx  # type: ignore[assignment]
                b.backend.queues[0].rx.grants = rx  # type: ignore[assignment]
                frames = [eth(b.mac, a.mac, 0x88B5, bytes([k]) * 100) for k in range(40)]
                for f in frames:
                    await a.frontend.send(NetFrame(f))  # no wait: one burst on the ring
                for f in frames:
                    assert (await b.frontend.recv(5.0)).data == f
                assert 1 <= tx.calls <= 4 and 1 <= rx.calls <= 4, (tx.calls, rx.calls)
                big = [eth(b.mac, a.mac, 0x88B5, bytes([k]) * 45000) for k in range(3)]
                tx.calls = rx.calls = 0
                # staged in the backend's own frames, the three of 45 KB go in one call
                # each way (their bytes do not count against COPY_BATCH: they do not
                # travel)
                for f in big:
                    await a.frontend.send(NetFrame(f))
                for f in big:
                    assert (await b.frontend.recv(5.0)).data == f
                assert tx.calls == 1 and rx.calls == 1, (tx.calls, rx.calls)
                # a copy that fails for one frame of a batch drops that frame only
                real = tx.inner

                class FailSecond:
                    def copy(self, segments: list[object]) -> list[int]:
                        status = real.copy(segments)  # type: ignore[attr-defined]
                        return [-1 if i == 1 else s for i, s in enumerate(status)]

                a.backend.queues[0].tx.grants = FailSecond()  # type: ignore[assignment]
                for f in frames[:3]:
                    await a.frontend.send(NetFrame(f))
                assert (await b.frontend.recv(5.0)).data == frames[0]
                assert (await b.frontend.recv(5.0)).data == frames[2]
                assert a.backend.queues[0].tx.stats["copy_errors"] == 1
                # the same towards the guest, single-page frames and a chain in one
                # batch: a frame whose copy failed is answered ERROR (the guest counts
                # it), the others arrive in order
                a.backend.queues[0].tx.grants = real
                rx_real = rx.inner
                odd = eth(b.mac, a.mac, 0x88B5, bytes([9]) * 77)  # 91 bytes
                last = len(big[0]) % XEN_PAGE_SIZE  # the length of the chain's last piece

                class FailSome:
                    def copy(self, segments: list[GrantCopy]) -> list[int]:
                        status = rx_real.copy(segments)  # type: ignore[attr-defined]
                        return [-1 if seg.length in (len(odd), last) else s
                                for seg, s in zip(segments, status, strict=True)]

                b.backend.queues[0].rx.grants = FailSome()  # type: ignore[assignment]
                errors = b.frontend.net_stats["rx_errors"]
                await a.frontend.send_many([NetFrame(f) for f in
                                            (frames[5], odd, frames[6], big[1], frames[7])])
                for f in (frames[5], frames[6], frames[7]):
                    assert (await b.frontend.recv(5.0)).data == f
                assert b.backend.queues[0].rx.stats["copy_errors"] == 2
                assert b.frontend.net_stats["rx_errors"] == errors + 2
                b.backend.queues[0].rx.grants = rx_real
            finally:
                await close_all(w, a, b)

    run(body())


def test_a_tap_read_pass_goes_out_with_one_ring_push() -> None:
    """The frames a TAP has ready (here a SOCK_SEQPACKET pair standing in for its fd)
    are read in one pass and sent with one TX ring push (at most one notification), all
    arriving intact and in order; ``send_many`` skips and counts a frame that cannot be
    sent and sends the rest; frames to the guest reach the TAP with their header."""
    async def body() -> None:
        async with net_world() as w:
            a, b = await two_vifs(w, back=NetConfig(max_queues=1))
            ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            bridge = TapBridge(a.frontend, TapDevice([ours.fileno()], "fake", None, True))
            try:
                learn = eth(BROADCAST, b.mac, 0x88B5, b"learn".ljust(46, b"."))
                await b.frontend.send(NetFrame(learn))  # b's MAC is learnt: unicast to b
                assert (await a.frontend.recv(5.0)).data == learn
                client = a.frontend.queues[0].tx_client
                assert client is not None
                submits, real_submit = [], client.submit_slots

                def counting(slots: Any, n: int) -> int:
                    submits.append(n)
                    return real_submit(slots, n)

                client.submit_slots = counting  # type: ignore[method-assign]
                notified = client.stats["notifications_sent"]
                frames = [eth(b.mac, a.mac, 0x88B5, bytes([k]) * (60 + k)) for k in range(40)]
                frames[7] = eth(b.mac, a.mac, 0x88B5, bytes(range(256)) * 30)  # 2 slots
                for f in frames:
                    peer.send(bytes(10) + f)
                bridge.start()
                for f in frames:
                    assert (await b.frontend.recv(5.0)).data == f
                assert submits == [41], submits
                assert client.stats["notifications_sent"] - notified <= 1
                huge = NetFrame(eth(b.mac, a.mac, 0x88B5, bytes(70000)))
                assert await a.frontend.send_many([NetFrame(frames[0]), huge,
                                                   NetFrame(frames[1])]) == 1
                assert (await b.frontend.recv(5.0)).data == frames[0]
                assert (await b.frontend.recv(5.0)).data == frames[1]
                assert a.frontend.info()["stats"]["tx_refused"] == 1
                reply = eth(a.mac, b.mac, 0x88B5, b"reply".ljust(46, b"."))
                await b.frontend.send(NetFrame(reply))
                async with asyncio.timeout(5.0):
                    while not select.select([peer], [], [], 0)[0]:
                        await asyncio.sleep(0.01)
                assert peer.recv(70000) == bytes(10) + reply
            finally:
                await close_bridge(bridge, peer, ours)
                await close_all(w, a, b)

    run(body())


def test_a_tap_is_read_straight_into_the_tx_pages_of_the_queue_each_flow_hashes_to() -> None:
    """With two queues, frames of several flows read from one TAP fd (a SOCK_SEQPACKET
    pair standing in for it) go straight into TX pages, each on the queue its flow
    hashes to (one read into the queue of the fd's last frame, copied when its flow
    hashes elsewhere): every frame arrives intact, each flow in order, both queues
    carry some, and no frame is read as a ``bytes``.  A backend without one of the
    offloads (here IPv6 checksums) gets the frames through the general path."""
    import struct

    async def body() -> None:
        async with net_world() as w:
            a, b = await two_vifs(w, front=NetFrontConfig(max_queues=2, tx_pages=64,
                                                          rx_pages=64))
            ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            tap = TapDevice([ours.fileno()], "fake", None, True)
            bridge = TapBridge(a.frontend, tap)

            def frame_bytes(batch: int) -> list[NetFrame]:
                raise AssertionError("a frame read as bytes on the direct path")

            try:
                learn = eth(BROADCAST, b.mac, 0x88B5, b"learn".ljust(46, b"."))
                await b.frontend.send(NetFrame(learn))  # b's MAC is learnt: unicast to b
                assert (await a.frontend.recv(5.0)).data == learn

                def udp(flow: int, k: int, size: int) -> bytes:
                    body = bytes([flow, k]) * (size // 2)
                    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(body), k, 0x4000, 64,
                                     17, 0, bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
                    return eth(b.mac, a.mac, 0x0800,
                               ip + struct.pack("!HHHH", 1000 + flow, 7, 8 + len(body), 0) + body)

                sent = [udp(k % 6, k, [60, 3000, 9000][k % 3]) for k in range(36)]
                tap.read_fd = frame_bytes  # type: ignore[method-assign]
                peer.setblocking(False)
                loop = asyncio.get_running_loop()
                bridge.start()
                for f in sent:  # the socket queues a few: sent as the bridge reads
                    await loop.sock_sendall(peer, bytes(10) + f)
                got = [(await b.frontend.recv(5.0)).data for _ in sent]
                assert sorted(got) == sorted(sent)
                for flow in range(6):  # the flow's port, in the UDP header
                    assert [f for f in got if f[14 + 21] == 0xE8 + flow] == \
                        [f for f in sent if f[14 + 21] == 0xE8 + flow]
                assert all(q.tx.stats["packets"] > 0 for q in a.backend.queues)
                assert tap.stats["rx_frames"] == len(sent)
                del tap.read_fd  # the general path again
                a.frontend.backend_features["ipv6-csum-offload"] = False
                for f in sent[:6]:
                    await loop.sock_sendall(peer, bytes(10) + f)
                got = [(await b.frontend.recv(5.0)).data for _ in range(6)]
                assert sorted(got) == sorted(sent[:6])
                assert a.frontend.info()["stats"]["tx_packets"] == len(sent) + 6
            finally:
                await close_bridge(bridge, peer, ours)
                await close_all(w, a, b)

    run(body())


def test_send_waits_for_ring_room_and_gives_up_after_send_timeout() -> None:
    """A backend that stops answering: the frontend's sends take its 18 TX pages, the
    next one waits for room and raises TimeoutError after ``send_timeout``; once answers
    come again, waiting sends go out in order (the waiting sender asked for the
    notification).  With room, no TX answer is signalled: the frontend takes them when
    it sends (and when asked for its counters)."""
    async def body() -> None:
        async with net_world() as w:
            a, b = await two_vifs(w, front=NetFrontConfig(tx_pages=18, rx_pages=32,
                                                          send_timeout=0.3, max_queues=1),
                                  back=NetConfig(max_queues=1))
            tx = a.backend.queues[0].tx
            serve, held = tx.handle, []

            def hold(batch: memoryview, count: int) -> list[bytes]:
                held.append(bytes(batch[:count * 12]))
                return []

            try:
                frames = [eth(b.mac, a.mac, 0x88B5, bytes([k]) * 100) for k in range(19)]
                tx.handle = hold  # type: ignore[method-assign]
                for f in frames[:18]:
                    await a.frontend.send(NetFrame(f))  # room for these: no wait
                with pytest.raises(TimeoutError):
                    await a.frontend.send(NetFrame(frames[18]))
                late = asyncio.create_task(a.frontend.send(NetFrame(frames[18])))
                await asyncio.sleep(0.05)
                assert not late.done()  # still waiting for room
                tx.handle = serve  # type: ignore[method-assign]
                out = serve(memoryview(b"".join(held)), sum(len(h) for h in held) // 12)
                a.backend.queues[0].tx_service.respond(out)
                await late
                for f in frames:
                    assert (await b.frontend.recv(5.0)).data == f
                # with room, the answers are taken when sending: none is signalled
                signalled = a.backend.queues[0].tx_service.stats["notifications_sent"]
                for f in frames[:12]:
                    await a.frontend.send(NetFrame(f))
                    assert (await b.frontend.recv(5.0)).data == f
                assert a.backend.queues[0].tx_service.stats["notifications_sent"] == signalled
                assert a.frontend.info()["rings"][0]["tx_inflight"] == 0  # info takes them
            finally:
                await close_all(w, a, b)

    run(body())


def test_backend_stages_batched_copies_in_its_own_frames() -> None:
    """Where the platform gives the backend frames of its own, every batched grant copy
    (TX pulls and RX pushes) has its local side in them (on the loopback daemon such a
    side carries no bytes over the socket); a small staging area cuts batches early and
    frames of every size still cross intact both ways; closing gives the frames back.
    Without staging (``staging_pages=0``) the private buffers carry the same frames."""
    async def body(pages: int) -> None:
        async with net_world() as w:
            a, b = await two_vifs(w, back=NetConfig(staging_pages=pages))
            locals_seen: list[object] = []
            staged = []
            for v in (a, b):
                assert v.backend.vif is not None
                for q in v.backend.vif.queues:
                    staged += [s for s in (q.tx._stage, q.rx._stage) if s is not None]
                grants = v.backend.platform.grants
                real = grants.copy

                def copy(segs: Any, real: Any = real) -> list[int]:
                    locals_seen.extend(p.buffer for s in segs for p in (s.source, s.dest)
                                       if isinstance(p, LocalPtr))
                    return real(segs)

                grants.copy = copy
            assert len(staged) == (4 * len(a.backend.vif.queues) if pages else 0)
            assert w.machine.outstanding()["frames"] == 0  # taken at the first copy
            try:
                rng = random.Random(pages)
                sent = [eth(b.mac, a.mac, 0x88B5, rng.randbytes(n - 14))
                        for n in [60, 1514, 65535, 4097, 20000, 65535, 9000, 61, 1514] * 2]
                for frame in sent:
                    await a.frontend.send(NetFrame(frame))
                for frame in sent:
                    assert (await b.frontend.recv(5.0)).data == frame
                back = eth(a.mac, b.mac, 0x88B5, b"pong".ljust(46, b"\0"))
                await b.frontend.send(NetFrame(back))
                assert (await a.frontend.recv(5.0)).data == back
                assert locals_seen
                used = [s for s in staged if s.frames is not None]
                assert w.machine.outstanding()["frames"] == pages * len(used)
                mems = [s.mem for s in used]
                assert all(any(buf is m for m in mems) for buf in locals_seen) == bool(pages)
                assert pages == 0 or len(used) >= 4  # TX and RX, both vifs
                txs = [q.tx.stats for q in a.backend.vif.queues]  # type: ignore[union-attr]
                copies, packets = (sum(t[k] for t in txs) for k in ("copies", "packets"))
                assert 1 <= copies <= packets  # one copy call serves a batch
            finally:
                await close_all(w, a, b)
            assert w.machine.outstanding()["frames"] == 0

    run(body(18))  # 18 pages: one largest frame; batches are cut by the staging area
    run(body(0))

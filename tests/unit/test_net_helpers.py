"""Frame helpers, the switch's table and the toolstack's vif keys, checked against
independent computations (the test's own checksum code) rather than against themselves."""

from __future__ import annotations

import asyncio
import random
import select
import socket
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_net_support import blank_checksum, tcp_checksum_ok, tcp_frame

from xenpv.backends.netswitch import NetSwitch
from xenpv.drivers.tap import TapDevice, from_vnet, to_vnet
from xenpv.errors import LocalError
from xenpv.protocols.ethernet import (
    GSO_TCPV4,
    GSO_TCPV6,
    NetFrame,
    complete_checksum,
    flow_hash,
    l4_info,
    segment_tcp,
    toeplitz,
    toeplitz_input,
)
from xenpv.xenbus.toolstack import vif_keys

A, B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


@pytest.mark.parametrize("v6", [False, True])
def test_complete_checksum_matches_an_independent_sum(v6: bool) -> None:
    for n in (0, 1, 7, 1000, 1461):
        good = tcp_frame(B, A, random.Random(n).randbytes(n), v6=v6)
        blank = NetFrame(blank_checksum(good, v6), csum_blank=True)
        done = complete_checksum(blank)
        assert done is not None and done.data == good and not done.csum_blank
    assert complete_checksum(NetFrame(bytes(60))) is None  # not IP: reported


@pytest.mark.parametrize(("v6", "kind"), [(False, GSO_TCPV4), (True, GSO_TCPV6)])
def test_segmentation_cuts_a_gso_frame_into_valid_segments(v6: bool, kind: int) -> None:
    payload = random.Random(1).randbytes(10_000)
    big = tcp_frame(B, A, payload, v6=v6, seq=0xFFFFF000, flags=0x19)  # FIN|PSH|ACK
    segs = segment_tcp(NetFrame(blank_checksum(big, v6), csum_blank=True, gso_type=kind,
                                gso_size=1448))
    hdr = 14 + (40 if v6 else 20)
    assert len(segs) == 7
    got = b""
    for k, s in enumerate(segs):
        assert tcp_checksum_ok(s.data) and s.gso_type == 0 and not s.csum_blank
        seq = struct.unpack_from("!I", s.data, hdr + 4)[0]
        assert seq == (0xFFFFF000 + 1448 * k) & 0xFFFFFFFF  # wraps past 2^32
        flags = s.data[hdr + 13]
        assert flags == (0x19 if k == 6 else 0x10)  # FIN/PSH on the last only
        if not v6:
            assert struct.unpack_from("!H", s.data, 18)[0] == 7 + k  # IPv4 ids go up
        got += s.data[hdr + 20:]
    assert got == payload


def test_segmentation_refuses_what_it_cannot_parse() -> None:
    with pytest.raises(LocalError):
        segment_tcp(NetFrame(bytes(100), gso_type=GSO_TCPV4, gso_size=100))
    v4 = tcp_frame(B, A, bytes(3000))
    with pytest.raises(LocalError):  # the type says IPv6, the frame is IPv4
        segment_tcp(NetFrame(v4, gso_type=GSO_TCPV6, gso_size=1000))
    with pytest.raises(LocalError):
        segment_tcp(NetFrame(v4, gso_type=GSO_TCPV4, gso_size=0))
    assert l4_info(v4[:40]) is None  # truncated
    assert flow_hash(v4) == flow_hash(tcp_frame(B, A, bytes(10)))  # same flow, same queue


def test_switch_table_is_bounded_and_ports_forget_their_macs() -> None:
    sw = NetSwitch("t", max_macs=4)
    got: dict[str, list[bytes]] = {"p": [], "q": []}
    p = sw.attach("p", lambda f: got["p"].append(f.data))
    q = sw.attach("q", lambda f: got["q"].append(f.data))
    for k in range(10):
        src = bytes([2, 0, 0, 0, 0, k])
        p.send(NetFrame(b"\xff" * 6 + src + b"\x88\xb5" + bytes(46)))
    assert len(sw.table) == 4 and len(got["q"]) == 10
    frame = bytes([2, 0, 0, 0, 0, 9]) + B + b"\x88\xb5" + bytes(46)
    assert q.send(NetFrame(frame)) == 1 and got["p"] == [frame]  # learnt: to p only
    assert q.send(NetFrame(bytes([2, 0, 0, 0, 0, 0]) + B + b"\x88\xb5" + bytes(46))) == 1
    assert p.send(NetFrame(bytes(10))) == 0 and p.stats["runts"] == 1
    p.detach()
    assert all(port is q for port in sw.table.values())


def test_vif_keys_are_libxl_shaped_and_checked() -> None:
    front, back = vif_keys(2, mac="02:AA:00:00:00:01", bridge="lab", mtu=9000, rate="1000,50")
    assert front == {"mac": "02:aa:00:00:00:01", "handle": 2, "mtu": 9000}
    assert back["bridge"] == "lab" and back["type"] == "vif" and back["rate"] == "1000,50"
    assert vif_keys(0)[0]["mac"].startswith("00:16:3e:")  # type: ignore[union-attr]
    for bad in ({"mac": "01:00:00:00:00:01"}, {"mac": "zz"}, {"mtu": 20},
                {"bridge": "a/b"}, {"rate": "fast"}):
        with pytest.raises(LocalError):
            vif_keys(0, **bad)  # type: ignore[arg-type]


RSS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da3"
                        "8030f20c6a42b73bbeac01fa")


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "ip_hash", "tcp_hash"), [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
    ("3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, "fe80::200:f8ff:fe21:67cf", 38024,
     0x4B61E985, 0x02D1FEEF),
])
def test_toeplitz_matches_the_published_rss_vectors(src: str, sport: int, dst: str,
                                                     dport: int, ip_hash: int,
                                                     tcp_hash: int) -> None:
    import socket

    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    addrs = socket.inet_pton(fam, src) + socket.inet_pton(fam, dst)
    ports = struct.pack("!HH", sport, dport)
    assert toeplitz(RSS_KEY, addrs) == ip_hash
    assert toeplitz(RSS_KEY, addrs + ports) == tcp_hash
    if fam == socket.AF_INET:  # the same input taken from a frame
        tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x10, 1000, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
        frame = B + A + b"\x08\x00" + ip + tcp
        assert toeplitz_input(frame, 2) == (2, addrs + ports)
        assert toeplitz_input(frame, 1) == (1, addrs)
        assert toeplitz_input(frame, 4 | 8) is None


def test_zero_size_is_legal_only_for_a_multicast_filter_request() -> None:
    from xenpv.protocols import netif

    mac = bytes.fromhex("01005e0000fb")
    req = netif.TxRequest(5, 0, netif.NETTXF_extra_info, 1, 0).pack()
    add = netif.McastExtra(netif.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, mac).pack().ljust(12, b"\0")
    pkt = netif.parse_tx_packet(req + add, 2)
    assert pkt is not None and pkt.size == 0 and pkt.slots == 2
    gso = netif.GsoExtra(netif.XEN_NETIF_EXTRA_TYPE_GSO, 0, 1448, 1, 0).pack().ljust(12, b"\0")
    with pytest.raises(netif.NetifPacketError, match="0 bytes"):
        netif.parse_tx_packet(req + gso, 2)


def test_hot_path_structs_give_the_layouts_bytes() -> None:
    from xenpv.protocols import netif

    assert netif.pack_tx_request(7, 100, 5, 9, 1514) == netif.TxRequest(7, 100, 5, 9, 1514).pack()
    assert netif.TX_RESPONSE_STRUCT.pack(3, -1) == netif.TxResponse(3, -1).pack()
    assert netif.RX_REQUEST_STRUCT.pack(4, 88) == netif.RxRequest(4, 0, 88).pack()
    assert netif.RX_RESPONSE_STRUCT.pack(4, 10, 6, 1500) == netif.RxResponse(4, 10, 6, 1500).pack()
    assert netif.CTRL_REQUEST_STRUCT.pack(1, 3, 7, 40, 0) == \
        netif.CtrlRequest(1, 3, (7, 40, 0)).pack()
    assert netif.CTRL_RESPONSE_STRUCT.pack(1, 3, 2, 9) == netif.CtrlResponse(1, 3, 2, 9).pack()


def _seqpacket_tap(queues: int) -> tuple[TapDevice, list[socket.socket], list[socket.socket]]:
    """A TapDevice over SOCK_SEQPACKET pairs (one per queue): each read or write is one
    message, as on a TAP fd, so the device's own logic runs without root."""
    ours, peers = [], []
    for _ in range(queues):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        ours.append(a)
        peers.append(b)
    return TapDevice([s.fileno() for s in ours], "fake", None, True), ours, peers


def test_tap_reads_every_ready_frame_per_pass_and_writes_one_buffer() -> None:
    """read_ready drains each queue's fd in order up to its bound (a runt or an unknown
    GSO type skipped and counted), picks up where the bound cut it, and recv_many waits
    for the first frame; write puts the kernel's partial checksum (the pseudo-header
    sum, completed here by the test's own sum) and the GSO fields in the header, each
    flow on one queue."""
    tap, ours, peers = _seqpacket_tap(2)
    hdr = struct.Struct("<BBHHHH")
    try:
        frames = [tcp_frame(B, A, bytes([k]) * (10 + k), seq=k) for k in range(6)]
        for f in frames[:4]:
            peers[0].send(hdr.pack(0, 0, 0, 0, 0, 0) + f)
        peers[0].send(b"runt")
        peers[0].send(hdr.pack(0, 3, 0, 0, 0, 0) + frames[0])  # UDP fragmentation offload
        for f in frames[4:]:
            peers[1].send(hdr.pack(2, 0, 0, 0, 0, 0) + f)
        first = tap.read_ready(3)
        assert [fr.data for fr in first] == frames[:3]
        rest = tap.read_ready()
        assert [fr.data for fr in rest] == frames[3:]
        assert [fr.data_validated for fr in rest] == [False, True, True]
        assert tap.stats["rx_frames"] == 6 and tap.stats["rx_refused"] == 2
        assert tap.read_ready() == []

        async def late() -> list[NetFrame]:
            asyncio.get_running_loop().call_later(0.05, peers[1].send,
                                                  hdr.pack(0, 0, 0, 0, 0, 0) + frames[5])
            return await tap.recv_many()
        assert [fr.data for fr in asyncio.run(late())] == [frames[5]]

        for v6, kind in ((False, GSO_TCPV4), (True, GSO_TCPV6)):
            good = tcp_frame(B, A, bytes(range(200)) * 20, v6=v6)
            frame = NetFrame(blank_checksum(good, v6), csum_blank=True, gso_type=kind,
                             gso_size=1448)
            seen = set()
            for _ in range(3):  # one flow: always the same queue
                assert tap.write(frame)
                got = [p for p, s in enumerate(peers) if select_ready(s)]
                assert len(got) == 1
                seen.add(got[0])
                buf = peers[got[0]].recv(70000)
            assert len(seen) == 1
            flags, gso, hdr_len, gso_size, start, offset = hdr.unpack_from(buf)
            l4 = 54 if v6 else 34
            assert (flags, gso, hdr_len, gso_size, start, offset) == \
                (1, 1 if kind == GSO_TCPV4 else 4, l4 + 20, 1448, l4, 16)
            data = bytearray(buf[hdr.size:])
            seg_sum = sum(struct.unpack(f"!{(len(data) - l4) // 2}H", data[l4:]))
            while seg_sum >> 16:
                seg_sum = (seg_sum & 0xFFFF) + (seg_sum >> 16)
            data[l4 + 16:l4 + 18] = struct.pack("!H", 0xFFFF - seg_sum)
            assert bytes(data) == good and tcp_checksum_ok(bytes(data))
            back = from_vnet(buf)
            assert back is not None and back.gso_type == kind and back.csum_blank
        plain = NetFrame(frames[0], data_validated=True)
        assert tap.write(plain)
        buf = next(s for s in peers if select_ready(s)).recv(70000)
        assert buf == hdr.pack(2, 0, 0, 0, 0, 0) + frames[0]
        assert to_vnet(NetFrame(b"\x01" * 60, csum_blank=True)) is None  # not TCP/UDP
        assert tap.stats["tx_frames"] == 7
    finally:
        for s in ours + peers:
            s.close()


def test_tap_pump_forwards_each_fd_s_frames_and_reads_nothing_while_forward_waits() -> None:
    """The pump reads each queue's fd from its own reader callback and forwards its
    frames in order; a forward that answers with an awaitable stops every read until it
    completes (frames sent meanwhile stay in the fds), reading resumes after; a forward
    answering False ends the pump, and close closes the TAP."""
    from xenpv.drivers.tap import TapPump

    tap, ours, peers = _seqpacket_tap(2)
    hdr = bytes(10)
    frames = [tcp_frame(B, A, bytes([k]) * (20 + k), seq=k) for k in range(8)]
    got: list[list[bytes]] = []
    gate: asyncio.Future[bool] | None = None

    def forward(batch: list[NetFrame]) -> bool | asyncio.Future[bool]:
        got.append([f.data for f in batch])
        if gate is not None and len(got) == 2:
            return gate
        return len(got) < 4

    async def body() -> None:
        nonlocal gate
        gate = asyncio.get_running_loop().create_future()
        pump = TapPump(tap, forward)
        pump.start()
        for f in frames[:3]:
            peers[0].send(hdr + f)
        async with asyncio.timeout(5):
            while not got:
                await asyncio.sleep(0.001)
        assert got == [frames[:3]]
        peers[1].send(hdr + frames[3])
        async with asyncio.timeout(5):
            while len(got) < 2:
                await asyncio.sleep(0.001)
        assert got[1] == [frames[3]]
        peers[0].send(hdr + frames[4])  # forward has not finished: nothing is read
        await asyncio.sleep(0.05)
        assert len(got) == 2 and tap.stats["rx_frames"] == 4
        gate.set_result(True)
        async with asyncio.timeout(5):
            while len(got) < 3:
                await asyncio.sleep(0.001)
        assert got[2] == [frames[4]]
        peers[1].send(hdr + frames[5])  # the fourth pass: forward says stop
        async with asyncio.timeout(5):
            while len(got) < 4:
                await asyncio.sleep(0.001)
        peers[0].send(hdr + frames[6])
        await asyncio.sleep(0.05)
        assert len(got) == 4 and tap.stats["rx_frames"] == 6
        await pump.close()
        assert tap.closed

    try:
        asyncio.run(body())
    finally:
        for s in peers:
            s.close()
        for s in ours:
            s.detach()  # the pump closed their fds


def select_ready(s: socket.socket) -> bool:
    """Whether ``s`` has a message to read now."""
    return bool(select.select([s], [], [], 0)[0])

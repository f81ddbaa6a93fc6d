"""xenpv.protocols.ethernet against an independent reading of the headers.

Every check here builds frames field by field and judges the module's answers with its own
one's-complement sum and header parser (written from the IP/TCP/UDP header formats, not
from the module), at both edges of every length and flag the module tests: a frame one
byte short of a header and one that just holds it, a fragment bit set and the bits next
to it, a segment count at the limit and one past it.
"""

from __future__ import annotations

import random
import struct
from dataclasses import FrozenInstanceError, replace

import pytest

from xenpv.errors import LocalError
from xenpv.protocols.ethernet import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    L4Info,
    NetFrame,
    complete_checksum,
    flow_hash,
    flow_hash_of,
    is_multicast,
    l4_info,
    mac_bytes,
    mac_text,
    partial_checksum,
    partial_checksum_field,
    segment_tcp,
    toeplitz,
    toeplitz_input,
)

DST, SRC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
V4_A, V4_B = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
V6_A = bytes.fromhex("fe80" + "00" * 12 + "1234")
V6_B = bytes.fromhex("fe80" + "00" * 12 + "5678")
TCP, UDP = 6, 17


def ones_sum(data: bytes) -> int:
    """The one's-complement sum of big-endian 16-bit words (odd length: zero-padded)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def l4_header(proto: int, payload_len: int, *, sport: int = 40000, dport: int = 5001,
              seq: int = 1000, flags: int = 0x18, doff: int = 5) -> bytes:
    """A TCP (``doff`` words, options zero) or UDP header with a zero checksum."""
    if proto == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, seq, 1, doff << 4, flags, 65535, 0,
                           0) + bytes(4 * doff - 20)
    return struct.pack("!HHHH", sport, dport, 8 + payload_len, 0)


def frame(proto: int = TCP, payload: bytes = b"", *, v6: bool = False, vlan: bool = False,
          ihl: int = 5, ip_len: int | None = None, frag: int = 0x4000, ipid: int = 7,
          pad: bytes = b"", ttl: int = 64, **tcp: int) -> bytes:
    """An Ethernet frame carrying TCP or UDP over IPv4 or IPv6, its L4 checksum zero;
    ``ip_len`` overrides the IPv4 total / IPv6 payload length, ``pad`` follows the packet."""
    l4 = l4_header(proto, len(payload), **tcp) + payload
    if v6:
        plen = len(l4) if ip_len is None else ip_len
        ip = struct.pack("!IHBB", 6 << 28, plen, proto, ttl) + V6_A + V6_B
        etype = b"\x86\xdd"
    else:
        total = 4 * ihl + len(l4) if ip_len is None else ip_len
        hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, ipid, frag, ttl, proto, 0,
                          V4_A, V4_B) + bytes(4 * ihl - 20)
        csum = 0xFFFF - ones_sum(hdr)
        ip = hdr[:10] + struct.pack("!H", csum) + hdr[12:]
        etype = b"\x08\x00"
    tag = b"\x81\x00\x00\x05" if vlan else b""
    return DST + SRC + tag + etype + ip + l4 + pad


def parse(data: bytes) -> tuple[int, int, int, int, int]:
    """(IP version, IP header offset, L4 offset, protocol, end of the IP packet) of a
    frame built by :func:`frame`, read independently of the module."""
    l3 = 18 if data[12:14] == b"\x81\x00" else 14
    if data[l3] >> 4 == 4:
        l4 = l3 + (data[l3] & 0xF) * 4
        return 4, l3, l4, data[l3 + 9], l3 + struct.unpack_from("!H", data, l3 + 2)[0]
    return 6, l3, l3 + 40, data[l3 + 6], l3 + 40 + struct.unpack_from("!H", data, l3 + 4)[0]


def l4_sum_ok(data: bytes) -> bool:
    """The TCP/UDP checksum of ``data`` verifies (the sum over pseudo header and
    segment is all ones), and so does the IPv4 header checksum."""
    version, l3, l4, proto, end = parse(data)
    seg = data[l4:end]
    if version == 4:
        pseudo = data[l3 + 12:l3 + 20] + struct.pack("!BBH", 0, proto, len(seg))
        if ones_sum(data[l3:l4]) != 0xFFFF:
            return False
    else:
        pseudo = data[l3 + 8:l3 + 40] + struct.pack("!IBBBB", len(seg), 0, 0, 0, proto)
    return ones_sum(pseudo + seg) == 0xFFFF


def csum_at(data: bytes) -> int:
    _, _, l4, proto, _ = parse(data)
    return int(struct.unpack_from("!H", data, l4 + (16 if proto == TCP else 6))[0])


def test_macs_frames_and_group_addresses() -> None:
    assert mac_bytes(" 02:AA:0b:00:ff:01\n") == bytes.fromhex("02aa0b00ff01")
    assert mac_text(bytes.fromhex("020a0b00ff01")) == "02:0a:0b:00:ff:01"
    for bad in ("02:aa:0b:00:ff", "02:aa:0b:00:ff:01:02", "02:aa:0b:00:ff:1",
                "02:aa:0b:00:ff:001", "02:aa:0b:00:ff:zz", "", "02-aa-0b-00-ff-01"):
        with pytest.raises(LocalError, match="not a MAC address") as err:
            mac_bytes(bad)
        assert repr(bad) in str(err.value)  # the operator sees what was given
    for first, group in ((0x01, True), (0xFF, True), (0x03, True), (0x00, False),
                         (0x02, False), (0xFE, False)):
        assert is_multicast(bytes([first, 0, 0, 0, 0, 0])) is group
    f = NetFrame(DST + SRC + b"\x88\xb5" + bytes(46))
    assert (f.dst, f.src, len(f)) == (DST, SRC, 60)
    assert (f.csum_blank, f.data_validated, f.gso_type, f.gso_size, f.rss_hash,
            f.rss_type) == (False, False, GSO_NONE, 0, None, 0)
    # every field from its own argument, by keyword and by position; still frozen
    g = NetFrame(b"ab", csum_blank=True, data_validated=True, gso_type=GSO_TCPV6,
                 gso_size=1400, rss_hash=0xDEAD, rss_type=4)
    assert g == NetFrame(b"ab", True, True, GSO_TCPV6, 1400, 0xDEAD, 4)
    assert (g.data, g.csum_blank, g.data_validated, g.gso_type, g.gso_size, g.rss_hash,
            g.rss_type) == (b"ab", True, True, GSO_TCPV6, 1400, 0xDEAD, 4)
    assert replace(g, gso_size=9).gso_size == 9 and g.gso_size == 1400
    with pytest.raises(FrozenInstanceError):
        g.gso_size = 1  # type: ignore[misc]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [False, True])
@pytest.mark.parametrize("proto", [TCP, UDP])
def test_l4_info_needs_exactly_the_headers_it_reads(v6: bool, vlan: bool, proto: int) -> None:
    for ihl in ((5,) if v6 else (5, 6, 15)):
        whole = frame(proto, b"xy", v6=v6, vlan=vlan, ihl=ihl)
        l3 = 18 if vlan else 14
        l4 = l3 + (40 if v6 else 4 * ihl)
        need = l4 + (20 if proto == TCP else 8)
        expect = L4Info(6 if v6 else 4, l3, l4, proto)
        for n in range(len(whole) + 1):  # every cut: None up to the last header byte
            assert l4_info(whole[:n]) == (expect if n >= need else None), n
        assert l4_info(memoryview(whole)) == expect


def test_l4_info_refuses_what_it_does_not_carry() -> None:
    v4 = frame(TCP, b"")
    assert l4_info(v4) == L4Info(4, 14, 34, TCP)
    # one VLAN tag only; another ethertype; a tag and nothing after it
    assert l4_info(v4[:12] + b"\x81\x00\x00\x05\x81\x00\x00\x05" + v4[12:]) is None
    assert l4_info(v4[:12] + b"\x08\x06" + v4[14:]) is None
    assert l4_info(v4[:12] + b"\x81\x00\x00\x05") is None
    assert l4_info(v4[:12] + b"\x81\x00\x00\x05\x08") is None
    # the IP version nibble must match the ethertype
    assert l4_info(v4[:14] + bytes([0x65]) + v4[15:]) is None
    v6 = frame(UDP, b"", v6=True)
    assert l4_info(v6[:14] + bytes([0x40 | v6[14] & 0xF]) + v6[15:]) is None
    assert l4_info(v6[:12] + b"\x08\x00" + v6[14:]) is None  # IPv6 bytes as IPv4
    # a header length below 20 bytes
    for ihl in (0, 4):
        assert l4_info(v4[:14] + bytes([0x40 | ihl]) + v4[15:]) is None
    # fragments (offset or more-fragments) are not parsed; DF and the reserved bit are fine
    for flag_bits, ok in ((0x0000, True), (0x4000, True), (0x8000, True), (0x2000, False),
                          (0x0001, False), (0x1FFF, False), (0x3FFF, False)):
        got = l4_info(frame(TCP, b"abc", frag=flag_bits))
        assert (got is not None) is ok, hex(flag_bits)
    # other protocols (ICMP, ICMPv6, a hop-by-hop extension header, ...)
    for v6, at in ((False, 14 + 9), (True, 14 + 6)):
        for proto in (0, 1, 5, 7, 16, 18, 58, 255):
            other = bytearray(frame(TCP, bytes(40), v6=v6))
            other[at] = proto
            assert l4_info(bytes(other)) is None, (v6, proto)


def checksum_cases() -> list[tuple[int, bool, bool, int]]:
    return [(proto, v6, vlan, n) for proto in (TCP, UDP) for v6 in (False, True)
            for vlan in (False, True) for n in (0, 1, 2, 59, 60, 61, 300, 1461)]


@pytest.mark.parametrize(("proto", "v6", "vlan", "n"), checksum_cases())
def test_complete_checksum_verifies_independently(proto: int, v6: bool, vlan: bool,
                                                  n: int) -> None:
    payload = random.Random(n * 7 + proto).randbytes(n)
    blank = NetFrame(frame(proto, payload, v6=v6, vlan=vlan), csum_blank=True, gso_size=5,
                     rss_hash=9, rss_type=2)
    done = complete_checksum(blank)
    assert done is not None and l4_sum_ok(done.data)
    assert done.csum_blank is False and done.data_validated is True
    assert (done.gso_size, done.rss_hash, done.rss_type) == (5, 9, 2)  # the rest kept
    # only the checksum field changed
    at = parse(done.data)[2] + (16 if proto == TCP else 6)
    assert done.data[:at] == blank.data[:at] and done.data[at + 2:] == blank.data[at + 2:]
    # a garbage value in the field is not part of the sum
    dirty = bytearray(blank.data)
    dirty[at:at + 2] = b"\xa5\x5a"
    again = complete_checksum(replace(blank, data=bytes(dirty)))
    assert again is not None and again.data == done.data
    # Ethernet padding after the IP packet is neither summed nor touched
    padded = complete_checksum(replace(blank, data=blank.data + b"\xee" * 9))
    assert padded is not None and padded.data == done.data + b"\xee" * 9


def test_complete_checksum_edges() -> None:
    assert complete_checksum(NetFrame(bytes(60))) is None  # not IP
    # a GSO-sized frame (IP length above 32767) whose receiver takes GSO but not a
    # blank checksum
    for proto in (TCP, UDP):
        for v6 in (False, True):
            big = complete_checksum(NetFrame(frame(proto, bytes(40000), v6=v6)))
            assert big is not None and l4_sum_ok(big.data)
    # UDP sends a computed checksum of 0 as 0xFFFF (0 means "none"); TCP keeps 0
    for proto, expect in ((UDP, 0xFFFF), (TCP, 0)):
        base = frame(proto, b"\0\0" + bytes(10))
        first = complete_checksum(NetFrame(base))
        assert first is not None
        # make the payload's first word cancel the sum: the checksum becomes 0
        word = csum_at(first.data)
        data = bytearray(base)
        at = parse(base)[2] + (20 if proto == TCP else 8)
        data[at:at + 2] = word.to_bytes(2, "big")
        zero = complete_checksum(NetFrame(bytes(data)))
        assert zero is not None and csum_at(zero.data) == expect and l4_sum_ok(zero.data)
    # an IP length that ends the packet before the L4 checksum field: not completed
    for proto, field_end in ((TCP, 18), (UDP, 8)):
        for v6 in (False, True):
            hdr = 40 if v6 else 20
            for cut, ok in ((field_end - 1, False), (field_end, True), (0, False)):
                data = frame(proto, b"", v6=v6, ip_len=cut + (0 if v6 else hdr))
                got = complete_checksum(NetFrame(data))
                assert (got is not None) is ok, (proto, v6, cut)
                info = l4_info(data)
                assert info is not None
                assert (partial_checksum_field(data, info) is not None) is ok
    # an IP length beyond the frame: the frame's end bounds the sum
    for v6 in (False, True):
        long = frame(UDP, b"abcdef", v6=v6, ip_len=1000)
        got = complete_checksum(NetFrame(long))
        assert got is not None
        version, l3, l4, proto, _ = parse(long)
        seg = got.data[l4:]
        pseudo = (got.data[l3 + 12:l3 + 20] + struct.pack("!BBH", 0, proto, len(seg))
                  if version == 4 else
                  got.data[l3 + 8:l3 + 40] + struct.pack("!IBBBB", len(seg), 0, 0, 0, proto))
        assert ones_sum(pseudo + seg) == 0xFFFF
    # an IPv4 total length shorter than the header: the frame's end is used
    short = frame(UDP, b"abcdef", ip_len=12)
    got = complete_checksum(NetFrame(short))
    assert got is not None
    seg = got.data[34:]
    assert ones_sum(got.data[26:34] + struct.pack("!BBH", 0, UDP, len(seg)) + seg) == 0xFFFF


@pytest.mark.parametrize(("proto", "v6", "vlan", "n"), checksum_cases()[::3])
def test_partial_checksum_is_the_pseudo_header_sum(proto: int, v6: bool, vlan: bool,
                                                   n: int) -> None:
    data = frame(proto, random.Random(n).randbytes(n), v6=v6, vlan=vlan, pad=b"\x11" * 3)
    version, l3, l4, _, end = parse(data)
    length = end - l4
    pseudo = (data[l3 + 12:l3 + 20] + struct.pack("!BBH", 0, proto, length) if version == 4
              else data[l3 + 8:l3 + 40] + struct.pack("!IBBBB", length, 0, 0, 0, proto))
    field = l4 + (16 if proto == TCP else 6)
    info = l4_info(data)
    assert info is not None
    assert partial_checksum_field(data, info) == (field, ones_sum(pseudo).to_bytes(2, "big"))
    part = partial_checksum(NetFrame(data, csum_blank=True, gso_type=GSO_TCPV4, gso_size=9))
    assert part is not None and part.csum_blank and (part.gso_type, part.gso_size) == (1, 9)
    assert part.data == data[:field] + ones_sum(pseudo).to_bytes(2, "big") + data[field + 2:]
    # a kernel completes it by summing the segment over the field's value
    done = complete_checksum(NetFrame(data))
    assert done is not None
    kernel = 0xFFFF - ones_sum(part.data[l4:end])
    assert csum_at(done.data) == (0xFFFF if kernel == 0 and proto == UDP else kernel)
    assert partial_checksum(NetFrame(bytes(60))) is None
    assert partial_checksum(NetFrame(frame(proto, b"", v6=v6, ip_len=3 + (0 if v6 else 20)))) \
        is None


def split_check(big: bytes, segs: list[NetFrame], mss: int) -> None:
    """Each segment: a valid TCP/IP packet, the original headers but for sequence number,
    flags, lengths, IPv4 id and checksums; together the payload in order."""
    version, l3, l4, _, end = parse(big)
    hlen = l4 + (big[l4 + 12] >> 4) * 4
    payload = big[hlen:end]
    seq0 = struct.unpack_from("!I", big, l4 + 4)[0]
    flags0 = big[l4 + 13]
    ipid0 = struct.unpack_from("!H", big, l3 + 4)[0]
    assert len(segs) == max(1, -(-len(payload) // mss))
    got = b""
    for k, s in enumerate(segs):
        d = s.data
        last = k == len(segs) - 1
        assert (s.gso_type, s.gso_size, s.csum_blank, s.data_validated) == (0, 0, False, True)
        assert l4_sum_ok(d)
        part = d[hlen:]
        assert len(part) == (mss if not last else len(payload) - mss * k)
        got += part
        assert struct.unpack_from("!I", d, l4 + 4)[0] == (seq0 + k * mss) % 2 ** 32
        want = flags0
        if not last:
            want &= ~0x09
        if k:
            want &= ~0x80
        assert d[l4 + 13] == want
        if version == 4:
            assert struct.unpack_from("!H", d, l3 + 2)[0] == len(d) - l3
            assert struct.unpack_from("!H", d, l3 + 4)[0] == (ipid0 + k) % 2 ** 16
            same = [(l3, l3 + 2), (l3 + 6, l3 + 10), (l3 + 12, l4)]
        else:
            assert struct.unpack_from("!H", d, l3 + 4)[0] == len(d) - l4
            same = [(l3, l3 + 4), (l3 + 6, l4)]
        same += [(0, l3), (l4, l4 + 4), (l4 + 8, l4 + 13), (l4 + 14, l4 + 16),
                 (l4 + 18, hlen)]
        for a, b in same:
            assert d[a:b] == big[a:b], (k, a, b)
    assert got == payload


@pytest.mark.parametrize(("v6", "vlan"), [(False, False), (True, False), (False, True),
                                          (True, True)])
def test_segment_tcp_at_every_count_edge(v6: bool, vlan: bool) -> None:
    kind = GSO_TCPV6 if v6 else GSO_TCPV4
    rng = random.Random(5)
    for n, mss, flags, doff in ((0, 100, 0x19, 5), (1, 100, 0x99, 5), (99, 100, 0x18, 6),
                                (100, 100, 0x99, 5), (101, 100, 0x99, 8), (300, 100, 0x11, 5),
                                (301, 1, 0x99, 5), (2500, 1448, 0xD9, 15)):
        big = frame(TCP, rng.randbytes(n), v6=v6, vlan=vlan, seq=0xFFFFFF80, ipid=0xFFFE,
                    flags=flags, doff=doff, pad=b"\xee" * 5)
        segs = segment_tcp(NetFrame(big, csum_blank=True, gso_type=kind, gso_size=mss),
                           max_segments=400)
        split_check(big, segs, mss)
    # an IPv4 header whose words sum to between 2^16 and 2^17 before folding (low
    # addresses, TTL 255): its checksum still folds to 16 bits
    if not v6:
        low = bytearray(frame(TCP, rng.randbytes(3000), vlan=vlan, ttl=255))
        l3 = 18 if vlan else 14
        low[l3 + 12:l3 + 20] = bytes([0, 0, 0, 1, 0, 0, 0, 2])
        low[l3 + 10:l3 + 12] = b"\0\0"  # (recomputed for every segment)
        assert 0x10000 <= sum(struct.unpack("!10H", low[l3:l3 + 20])) < 0x20000
        segs = segment_tcp(NetFrame(bytes(low), gso_type=kind, gso_size=1000))
        split_check(bytes(low), segs, 1000)
    # the limit on the count: at it, and one past it
    big = frame(TCP, bytes(1000), v6=v6, vlan=vlan)
    assert len(segment_tcp(NetFrame(big, gso_type=kind, gso_size=10), max_segments=100)) == 100
    with pytest.raises(LocalError, match="would make 100 segments"):
        segment_tcp(NetFrame(big, gso_type=kind, gso_size=10), max_segments=99)
    # the default limit: 1024
    at_limit = NetFrame(frame(TCP, bytes(1024), v6=v6), gso_type=kind, gso_size=1)
    assert len(segment_tcp(at_limit)) == 1024
    with pytest.raises(LocalError, match="would make 1025 segments"):
        segment_tcp(replace(at_limit, data=frame(TCP, bytes(1025), v6=v6)))


def test_segment_tcp_refuses_what_it_cannot_cut() -> None:
    plain = NetFrame(frame(UDP, b"x"))
    assert segment_tcp(plain) == [plain] and segment_tcp(plain)[0] is plain
    v4, v6 = frame(TCP, bytes(50)), frame(TCP, bytes(50), v6=True)
    msg = "not TCP over the IP version its type says"
    for data, kind in ((v4, GSO_TCPV6), (v6, GSO_TCPV4), (frame(UDP, bytes(50)), GSO_TCPV4),
                       (frame(UDP, bytes(50), v6=True), GSO_TCPV6), (bytes(100), GSO_TCPV4)):
        with pytest.raises(LocalError, match=msg):
            segment_tcp(NetFrame(data, gso_type=kind, gso_size=10))
    assert len(segment_tcp(NetFrame(v4, gso_type=GSO_TCPV4, gso_size=10))) == 5
    for mss in (0, -1):
        with pytest.raises(LocalError, match="segment size 0"):
            segment_tcp(NetFrame(v4, gso_type=GSO_TCPV4, gso_size=mss))
    # a TCP header length below 20 bytes, or past the IP packet's end
    for doff in (0, 4):
        bad = bytearray(v4)
        bad[34 + 12] = doff << 4
        with pytest.raises(LocalError, match="bad TCP header"):
            segment_tcp(NetFrame(bytes(bad), gso_type=GSO_TCPV4, gso_size=10))
    # header exactly to the packet's end (no payload): one segment; one byte more: refused
    exact = frame(TCP, b"", doff=6)
    assert len(segment_tcp(NetFrame(exact, gso_type=GSO_TCPV4, gso_size=10))) == 1
    cut = frame(TCP, b"", doff=6, ip_len=20 + 23, pad=b"\0")
    with pytest.raises(LocalError, match="bad TCP header"):
        segment_tcp(NetFrame(cut, gso_type=GSO_TCPV4, gso_size=10))


def test_flow_hash_follows_the_flow_and_nothing_else() -> None:
    for v6 in (False, True):
        base = frame(TCP, b"one", v6=v6, seq=1)
        h = flow_hash(base)
        assert flow_hash_of(base, l4_info(base)) == h == flow_hash(memoryview(base))
        # other segments of the same flow: payload, sequence, flags, TTL, ids, checksums
        same = [frame(TCP, b"another", v6=v6, seq=99, flags=0x10, ttl=3, ipid=99),
                frame(TCP, b"one", v6=v6, seq=1, vlan=True)]
        done = complete_checksum(NetFrame(base))
        assert done is not None
        same.append(done.data)
        other_macs = bytes(6) + bytes(6) + base[12:]
        same.append(other_macs)
        for s in same:
            assert flow_hash(s) == h
        # every header byte beside addresses, protocol and ports may differ: sequence
        # numbers in all four bytes, UDP lengths, IPv4 options
        assert flow_hash(frame(TCP, b"one", v6=v6, seq=0x12345678)) == h
        udp = flow_hash(frame(UDP, b"", v6=v6))
        assert flow_hash(frame(UDP, bytes(300), v6=v6)) == udp
        if not v6:
            opts = [bytearray(frame(TCP, b"o", ihl=6)) for _ in range(2)]
            opts[1][34] = 0x94  # an option byte right after the fixed header
            assert flow_hash(bytes(opts[0])) == flow_hash(bytes(opts[1]))
        # every byte of the addresses and ports counts, and the protocol
        v = 6 if v6 else 4
        _, l3, l4, _, _ = parse(base)
        spans = list(range(l3 + 8, l3 + 40)) if v == 6 else list(range(l3 + 12, l3 + 20))
        for at in spans + list(range(l4, l4 + 4)):
            changed = bytearray(base)
            changed[at] ^= 0x01
            assert flow_hash(bytes(changed)) != h, at
        assert flow_hash(frame(UDP, b"one", v6=v6)) != flow_hash(frame(TCP, b"one", v6=v6))
    # not IP: the MACs decide; the ethertype and the rest do not
    arp = DST + SRC + b"\x08\x06" + bytes(28)
    assert flow_hash(arp) == flow_hash(DST + SRC + b"\x88\xb5" + b"\x01" * 46)
    assert flow_hash(SRC + DST + b"\x08\x06" + bytes(28)) != flow_hash(arp)
    for at in range(12):
        changed = bytearray(arp)
        changed[at] ^= 0x80
        assert flow_hash(bytes(changed)) != flow_hash(arp)


def test_toeplitz_short_keys_and_hash_input_choice() -> None:
    rng = random.Random(3)
    for n in (1, 4, 12, 36):
        data = rng.randbytes(n)
        key = rng.randbytes(n + 4)
        # bits past the key's end are zero: a shorter key is the longer one cut
        for short in (n + 3, n, 1, 0):
            assert toeplitz(key[:short], data) == toeplitz(key[:short] + bytes(8), data)
        assert toeplitz(key, data) == toeplitz(key + bytes(4), data)
        # against the definition, bit by bit
        k = int.from_bytes(key, "big")
        want = 0
        for bit in range(n * 8):
            if data[bit // 8] >> (7 - bit % 8) & 1:
                want ^= (k >> (len(key) * 8 - 32 - bit)) & 0xFFFFFFFF
        assert toeplitz(key, data) == want
    assert toeplitz(b"\xff" * 8, b"\x00\x00") == 0
    for v6, tcp_type, ip_type in ((False, 2, 1), (True, 8, 4)):
        t = frame(TCP, b"p", v6=v6, sport=0x1234, dport=0x5678)
        u = frame(UDP, b"p", v6=v6, sport=0x1234, dport=0x5678)
        addrs = V6_A + V6_B if v6 else V4_A + V4_B
        ports = bytes.fromhex("12345678")
        assert toeplitz_input(t, 15) == (tcp_type, addrs + ports)
        assert toeplitz_input(t, tcp_type) == (tcp_type, addrs + ports)
        assert toeplitz_input(t, ip_type) == (ip_type, addrs)
        assert toeplitz_input(u, 15) == (ip_type, addrs)  # UDP: addresses only
        assert toeplitz_input(u, tcp_type) is None
        assert toeplitz_input(t, 15 & ~(tcp_type | ip_type)) is None  # the other version's
        assert toeplitz_input(t, 0) is None
    assert toeplitz_input(DST + SRC + b"\x08\x06" + bytes(28), 15) is None

"""The compiled TAP write header builder (cython/vnethdr.pyx) against its readable twin."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.drivers import tap
from xenpv.protocols.ethernet import flow_hash

_ETYPES = [0x0800, 0x0800, 0x86DD, 0x86DD, 0x8100, 0x0806]


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    """Ethernet frames that are mostly TCP/UDP over IPv4/IPv6 (optionally VLAN-tagged),
    with every header field that the header builder reads drawn from its edge values,
    cut or padded anywhere; sometimes plain random bytes."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=200))
    head = draw(st.binary(min_size=12, max_size=12))
    etype = draw(st.sampled_from(_ETYPES))
    if etype == 0x8100:
        head += struct.pack("!HH", etype, draw(st.integers(0, 0xFFFF)))
        etype = draw(st.sampled_from(_ETYPES))
    head += struct.pack("!H", etype)
    proto = draw(st.sampled_from([6, 6, 6, 17, 17, 1]))
    l4 = draw(st.binary(min_size=draw(st.sampled_from([20, 20, 8, 0])), max_size=60))
    payload = draw(st.binary(max_size=300))
    if etype == 0x0800 or (etype != 0x86DD and draw(st.booleans())):  # IPv4
        ihl = draw(st.sampled_from([5, 5, 5, 5, 6, 4, 15]))
        total = draw(st.one_of(st.just(ihl * 4 + len(l4) + len(payload)),
                               st.integers(0, 0xFFFF)))
        frag = draw(st.sampled_from([0, 0, 0x4000, 0x4000, 0x2000, 1]))
        ver = draw(st.sampled_from([4, 4, 4, 4, 4, 6]))
        ip = struct.pack("!BBHHHBBH", ver << 4 | ihl, 0, total, 7, frag, 64, proto, 0) + \
            draw(st.binary(min_size=8, max_size=8)) + bytes(max(ihl * 4 - 20, 0))
    else:
        plen = draw(st.one_of(st.just(len(l4) + len(payload)), st.integers(0, 0xFFFF)))
        ver = draw(st.sampled_from([6, 6, 6, 6, 6, 4]))
        ip = struct.pack("!IHBB", ver << 28, plen, proto, 64) + \
            draw(st.binary(min_size=32, max_size=32))
    frame = head + ip + l4 + payload
    cut = draw(st.sampled_from([len(frame)] * 3 + [draw(st.integers(0, len(frame)))]))
    return frame[:cut] + draw(st.sampled_from([b"", b"", bytes(6), b"\xff" * 40]))


def _outcome(fn: object, *args: object) -> object:
    try:
        buf, hashed = fn(*args)  # type: ignore[operator]
    except struct.error:
        return "struct.error"
    return (None if buf is None else bytes(buf)), hashed


@settings(max_examples=600, deadline=None)
@given(_frames(), st.booleans(), st.booleans(), st.sampled_from([0, 0, 1, 1, 2, 2, 3]),
       st.sampled_from([1448, 1448, 1, 0, -1, 0xFFFF, 0x10000]), st.booleans(),
       st.sampled_from([bytes, memoryview]))
def test_compiled_vnet_header_matches_its_twin(data: bytes, blank: bool, valid: bool,
                                               gso_type: int, gso_size: int, want_hash: bool,
                                               kind: type) -> None:
    """For any frame and metadata the compiled builder gives the twin's bytes (header,
    pseudo-header sum in a blank checksum's field), the same refusals and the same flow
    hash (alone: as ``ethernet.flow_hash`` gives it); from bytes and from a memoryview
    alike."""
    from xenpv.drivers import _vnethdr  # built by setup.py: missing is a failure

    args = (blank, valid, gso_type, gso_size, want_hash)
    twin = _outcome(tap.vnet_frame_reference, data, *args)
    assert _outcome(_vnethdr.vnet_frame, kind(data), *args) == twin
    assert _vnethdr.flow_hash(kind(data)) == flow_hash(data)


def test_vnet_header_of_known_frames_and_the_pure_python_switch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A blank TCP/IPv4 GSO frame gets NEEDS_CSUM, TCPv4, its header length and MSS, the
    checksum start and offset and the pseudo-header sum; a plain frame only its flag; a
    GSO frame that is UDP is refused.  XENPV_PURE_PYTHON=1 selects the twin."""
    from xenpv.drivers import _vnethdr  # built by setup.py: missing is a failure

    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20 + 100, 7, 0x4000, 64, 6, 0,
                     bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
    tcp_hdr = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    frame = bytes(12) + b"\x08\x00" + ip + tcp_hdr + bytes(100)
    for fn in (_vnethdr.vnet_frame, tap.vnet_frame_reference):
        buf, _ = fn(frame, True, False, 1, 1448, False)
        assert buf is not None
        assert tap.VNET_HDR.unpack_from(buf) == (tap.NEEDS_CSUM, 1, 54, 1448, 34, 16)
        pseudo = (198 << 8 | 18) + 1 + (198 << 8 | 18) + 2 + 6 + 120  # addresses, TCP, length
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        assert buf[10 + 34 + 16:10 + 34 + 18] == pseudo.to_bytes(2, "big")
        assert buf[10:10 + 50] == frame[:50]
        assert fn(frame, False, True, 0, 0, False)[0] == tap._HDR_VALID + frame
        udp = frame[:23] + b"\x11" + frame[24:]
        assert fn(udp, True, False, 1, 1448, True)[0] is None
    monkeypatch.setenv("XENPV_PURE_PYTHON", "1")
    assert tap._compiled_vnet() is tap.vnet_frame_reference
    assert tap._compiled_flow_hash() is flow_hash
    monkeypatch.setenv("XENPV_PURE_PYTHON", "0")
    assert tap._compiled_vnet() is _vnethdr.vnet_frame
    assert tap._compiled_flow_hash() is _vnethdr.flow_hash

"""Unit tests of the xenstore wire codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError, PeerError
from xenpv.xenstore import wire
from xenpv.xenstore.wire import Decoder, Message, WireError, XsType


def test_type_values_follow_xs_wire_h() -> None:
    assert XsType.CONTROL == XsType.DEBUG == 0
    assert XsType.DIRECTORY_PART == 22
    assert XsType.WATCH_EVENT == 15 and XsType.ERROR == 16
    assert XsType.SET_QUOTA == 26 and XsType.INVALID == 0xFFFF
    assert wire.XS_TYPE_COUNT_417 == 23


def test_error_table_order_and_errnos() -> None:
    assert wire.ERRORS[0] == "EINVAL" and wire.ERRORS[4] == "ENOENT"
    assert wire.ERRORS[12] == "EAGAIN" and wire.ERRORS[14] == "E2BIG"
    assert len(wire.ERRORS) == 16 and set(wire.ERRORS) == set(wire.ERRNO)
    assert wire.errno_of("ENOENT") == 2 and wire.errno_of("EAGAIN") == 11
    assert wire.errno_of("EISCONN") == 106 and wire.errno_of("bogus") == 22


def test_encode_is_little_endian_header_plus_payload() -> None:
    data = wire.encode(XsType.READ, 7, 3, b"/a\0")
    assert data == struct.pack("<IIII", 2, 7, 3, 3) + b"/a\0"
    assert wire.HEADER_SIZE == wire.HEADER.size == 16


def test_encode_rejects_oversized_payload_as_local_error() -> None:
    wire.encode(XsType.WRITE, 1, 0, b"x" * wire.PAYLOAD_MAX)
    with pytest.raises(LocalError):
        wire.encode(XsType.WRITE, 1, 0, b"x" * (wire.PAYLOAD_MAX + 1))
    with pytest.raises(LocalError):
        wire.encode(XsType.WRITE, 1 << 32, 0, b"")


def test_decoder_waits_for_whole_message() -> None:
    data = wire.encode(XsType.WRITE, 5, 0, b"/a\0value")
    dec = Decoder()
    for i, byte in enumerate(data):
        assert dec.next_message() is None or i == len(data)
        dec.feed(bytes([byte]))
    assert dec.next_message() == Message(11, 5, 0, b"/a\0value")
    assert dec.next_message() is None and dec.buffered == 0


def test_decoder_yields_several_messages_from_one_chunk() -> None:
    msgs = [Message(XsType.READ, i, 0, b"/k%d\0" % i) for i in range(5)]
    dec = Decoder()
    dec.feed(b"".join(m.encode() for m in msgs) + b"\x02\x00")
    assert list(dec) == msgs
    assert dec.buffered == 2


def test_decoder_oversized_length_is_peer_error_and_sticky() -> None:
    dec = Decoder()
    dec.feed(struct.pack("<IIII", 2, 1, 0, wire.PAYLOAD_MAX + 1))
    with pytest.raises(WireError):
        dec.next_message()
    assert issubclass(WireError, PeerError)
    dec.feed(wire.encode(XsType.READ, 1, 0, b""))
    with pytest.raises(WireError):
        dec.next_message()


def test_decoder_custom_limit() -> None:
    dec = Decoder(max_payload=8)
    dec.feed(wire.encode(XsType.READ, 1, 0, b"123456789"))
    with pytest.raises(WireError):
        list(dec)


def test_fields_and_join() -> None:
    assert wire.fields(b"") == []
    assert wire.fields(b"a\0b\0") == [b"a", b"b"]
    assert wire.fields(b"a\0\0") == [b"a", b""]
    assert wire.fields(b"a\0tail") == [b"a", b"tail"]
    assert wire.join("a", b"b", "") == b"a\0b\0\0"
    assert wire.join() == b""


def test_error_payloads() -> None:
    assert wire.error_reply_payload("ENOENT") == b"ENOENT\0"
    assert wire.parse_error(b"EAGAIN\0") == "EAGAIN"
    assert wire.parse_error(b"EWHATEVER\0") == "EINVAL"
    assert wire.parse_error(b"\xff\xfe") == "EINVAL"
    assert wire.parse_error(b"") == "EINVAL"
    err = wire.XenstoreError("EACCES")
    assert err.errno == 13 and err.errno_name == "EACCES"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=300),
        ),
        max_size=8,
    ),
    st.lists(st.integers(1, 64), min_size=1, max_size=20),
)
def test_decoder_roundtrip_any_chunking(
    msgs: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(wire.encode(*m) for m in msgs)
    dec = Decoder()
    out: list[Message] = []
    pos = 0
    i = 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        dec.feed(stream[pos : pos + n])
        pos += n
        i += 1
        out.extend(dec)
    assert [(m.type, m.req_id, m.tx_id, m.payload) for m in out] == msgs


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_hostile_bytes_only_peer_error(data: bytes) -> None:
    dec = Decoder()
    dec.feed(data)
    try:
        for msg in dec:
            assert len(msg.payload) <= wire.PAYLOAD_MAX
    except PeerError:
        pass


def test_the_compiled_xenstored_path_is_chosen_when_built() -> None:
    """The daemon's direct path is the compiled one unless XENPV_PURE_PYTHON=1."""
    import os

    from xenpv.xenstore import server

    want = "python" if os.environ.get("XENPV_PURE_PYTHON") == "1" else "cython"
    assert server.SERVE_IMPL == want

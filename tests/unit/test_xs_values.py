"""The one strict parser for numbers peers write in xenstore, and its three users."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from xenpv.errors import PeerError
from xenpv.protocols import ProtocolError
from xenpv.protocols.blkif import parse_virtual_device
from xenpv.vchan.endpoint import parse_number
from xenpv.vchan.errors import VchanPeerError
from xenpv.xenbus.keys import parse_uint
from xenpv.xenbus.states import BadKeyError
from xenpv.xenstore.values import U32_MAX, parse_xs_number

#: Hostile inputs every user must refuse (scenario 18): signs, spaces, other bases,
#: separators, non-ASCII digits, leading zeros, NULs, overlong text.
NOT_NUMBERS = ["", "abc", "-1", "+1", " 8", "8 ", "0x8", "1_0", "1e3", "\uff18", "\u0661",
               "007", "08", "8\0", "\0", "1" * 11, "9" * 100_000]


@pytest.mark.parametrize("raw", NOT_NUMBERS)
def test_anything_but_canonical_decimal_is_einval(raw: str) -> None:
    with pytest.raises(PeerError) as info:
        parse_xs_number(raw, "ring-ref")
    assert "not a decimal number" in str(info.value)
    with pytest.raises(BadKeyError) as bad:
        parse_uint(raw.encode(), "ring-ref")
    assert bad.value.errno == errno.EINVAL


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, str])
def test_every_buffer_kind_parses_the_same(kind: Callable[[bytes], object]) -> None:
    raw = kind(b"4294967295") if kind is not str else "4294967295"
    assert parse_xs_number(raw, "k") == U32_MAX  # type: ignore[arg-type]
    assert parse_xs_number(b"0", "k") == 0


def test_bounds_and_errnos() -> None:
    def collect(message: str, code: int) -> PeerError:
        return ProtocolError(message, code)

    with pytest.raises(ProtocolError) as info:
        parse_xs_number(None, "port", error=collect)
    assert info.value.errno == errno.ENOENT and "missing" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        parse_xs_number(b"7", "ring-ref", lo=8, error=collect)
    assert info.value.errno == errno.ERANGE and "not in 8..4294967295" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        parse_xs_number(b"131072", "port", lo=1, hi=(1 << 17) - 1, error=collect)
    assert info.value.errno == errno.ERANGE
    # more digits than the upper bound has cannot be a value of that key
    with pytest.raises(ProtocolError) as info:
        parse_xs_number(b"1000000", "port", lo=1, hi=(1 << 17) - 1, error=collect)
    assert info.value.errno == errno.EINVAL
    # never more than 20 digits, whatever the bound
    assert parse_xs_number("9" * 20, "k", hi=1 << 80) == 10**20 - 1
    with pytest.raises(PeerError):
        parse_xs_number("1" * 21, "k", hi=1 << 80)


@pytest.mark.parametrize("raw", [b"007", b"5\0", b"08"])
def test_the_three_users_agree(raw: bytes) -> None:
    """xenbus keys, vchan and the protocol modules used to differ on these (leading zeros
    were accepted by two of them, a trailing NUL by vchan); one rule set now."""
    with pytest.raises(BadKeyError):
        parse_uint(raw, "ring-ref")
    with pytest.raises(VchanPeerError):
        parse_number(raw, "ring-ref")
    with pytest.raises(ProtocolError):
        parse_virtual_device(raw)


def test_each_user_keeps_its_peer_error() -> None:
    assert parse_uint(b"8", "ring-ref", 8) == 8
    assert parse_number(b"8", "ring-ref") == 8
    assert parse_virtual_device(b"51712") == 51712
    with pytest.raises(VchanPeerError, match="vchan ring-ref"):
        parse_number(b"0", "ring-ref")
    with pytest.raises(BadKeyError) as info:
        parse_uint(b"4294967296", "ring-ref")
    assert info.value.errno == errno.ERANGE

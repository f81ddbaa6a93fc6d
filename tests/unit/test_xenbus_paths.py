"""Xenbus states, device paths, the error node and the strict key parsers (R5, scenario 18)."""

from __future__ import annotations

import errno

import pytest

from xenpv.errors import LocalError, PeerError
from xenpv.xenbus import keys
from xenpv.xenbus.paths import (
    BackendPath,
    DevicePathError,
    FrontendPath,
    backend_path,
    error_path,
    error_value,
    frontend_path,
    parse_backend_path,
    parse_frontend_path,
)
from xenpv.xenbus.states import BadKeyError, InvalidStateError, XenbusState, parse_state

NAMES = [
    "Unknown", "Initialising", "InitWait", "Initialised", "Connected",
    "Closing", "Closed", "Reconfiguring", "Reconfigured",
]  # fmt: skip


def test_states_have_xens_values_and_names() -> None:
    assert [s.name for s in XenbusState] == NAMES
    assert [int(s) for s in XenbusState] == list(range(9))
    assert XenbusState.Connected.encode() == b"4"


@pytest.mark.parametrize("value", range(9))
def test_parse_state_accepts_exactly_the_nine_values(value: int) -> None:
    assert parse_state(str(value).encode()) is XenbusState(value)
    assert parse_state(str(value)) is XenbusState(value)


@pytest.mark.parametrize(
    "raw",
    [b"", b"9", b"99", b"-1", b"+1", b" 1", b"1 ", b"01", b"1\0", b"0x4", b"4.0",
     b"1" * 100, str(2**64).encode(), b"\xff", "\u0664", "abc"],
)  # fmt: skip
def test_parse_state_rejects_everything_else_as_a_peer_error(raw: bytes | str) -> None:
    with pytest.raises(InvalidStateError) as info:
        parse_state(raw)
    assert isinstance(info.value, PeerError)
    assert info.value.errno == errno.EINVAL


def test_missing_state_node_reads_unknown() -> None:
    assert parse_state(None) is XenbusState.Unknown


def test_device_paths() -> None:
    assert frontend_path(5, "vbd", 51712) == "/local/domain/5/device/vbd/51712"
    assert backend_path(0, "qdisk", 5, 51712) == "/local/domain/0/backend/qdisk/5/51712"
    assert parse_frontend_path(b"/local/domain/5/device/vbd/51712") == FrontendPath(5, "vbd", 51712)
    assert parse_backend_path("/local/domain/0/backend/vif/7/0") == BackendPath(0, "vif", 7, 0)
    assert str(BackendPath(0, "vif", 7, 0)) == "/local/domain/0/backend/vif/7/0"


@pytest.mark.parametrize(
    "bad",
    ["/local/domain/5/device/vbd", "/local/domain/05/device/vbd/1", "/local/domain/5/device/vbd/-1",
     "/local/domain/5/device/../1", "/local/domain/5/device/VBD/1", "/local/domain/99999/device/vbd/1",
     "/local/domain/5/device/vbd/1/", "local/domain/5/device/vbd/1", "/local/domain/5/backend/vbd/1",
     "/local/domain/5/device/vbd/99999999999", b"/local/domain/5/device/vbd/\xff1"],
)  # fmt: skip
def test_malformed_frontend_paths_are_peer_errors(bad: str | bytes) -> None:
    with pytest.raises(DevicePathError):
        parse_frontend_path(bad)


@pytest.mark.parametrize(
    "bad",
    ["/local/domain/0/backend/vbd/5", "/local/domain/0/backend/vbd/5/1/2",
     "/local/domain/0/backend/vbd/x/1", "/local/domain/32752/backend/vbd/5/1"],
)  # fmt: skip
def test_malformed_backend_paths_are_peer_errors(bad: str) -> None:
    with pytest.raises(DevicePathError):
        parse_backend_path(bad)


@pytest.mark.parametrize(
    ("args"), [(-1, "vbd", 0), (5, "v/bd", 0), (5, "vbd", -3), (70000, "vbd", 0)]
)
def test_building_a_path_from_bad_arguments_is_a_local_error(args: tuple[int, str, int]) -> None:
    with pytest.raises(LocalError):
        frontend_path(*args)


def test_error_node_path_and_value() -> None:
    assert (
        error_path("/local/domain/5/device/vbd/51712")
        == "/local/domain/5/error/device/vbd/51712/error"
    )
    assert (
        error_path("/local/domain/0/backend/vbd/5/51712")
        == "/local/domain/0/error/backend/vbd/5/51712/error"
    )
    assert error_value(-22, "bad ring-ref") == b"22 bad ring-ref"
    assert len(error_value(5, "x" * 100000)) <= 1024
    with pytest.raises(LocalError):
        error_path("/tool/xenpv")


@pytest.mark.parametrize(
    ("raw", "err"),
    [(None, errno.ENOENT), (b"abc", errno.EINVAL), (b"-1", errno.EINVAL), (b"", errno.EINVAL),
     (str(2**40).encode(), errno.EINVAL), (b"4294967296", errno.ERANGE), (b"7", errno.ERANGE),
     (b"0", errno.ERANGE), (b" 8", errno.EINVAL), (b"008", errno.EINVAL), (b"1e3", errno.EINVAL),
     ("\u0661\u0662".encode(), errno.EINVAL)],
)  # fmt: skip
def test_grant_ref_parser_rejects_hostile_values(raw: bytes | None, err: int) -> None:
    with pytest.raises(BadKeyError) as info:
        keys.parse_grant_ref(raw)
    assert info.value.errno == err


def test_grant_ref_parser_accepts_the_valid_range() -> None:
    assert keys.parse_grant_ref(b"8") == 8
    assert keys.parse_grant_ref(b"4294967295") == 2**32 - 1


@pytest.mark.parametrize("raw", [b"0", b"131072", b"-5", b"65536x", b"abc"])
def test_port_parser_rejects_out_of_range_and_garbage(raw: bytes) -> None:
    with pytest.raises(BadKeyError):
        keys.parse_port(raw)


def test_port_parser_bounds() -> None:
    assert keys.parse_port(b"1") == 1
    assert keys.parse_port(b"131071") == 131071


def test_ring_page_order_and_queues() -> None:
    assert keys.parse_ring_page_order(None, 4) == 0
    assert keys.parse_ring_page_order(b"4", 4) == 4
    with pytest.raises(BadKeyError):
        keys.parse_ring_page_order(b"5", 4)
    with pytest.raises(BadKeyError):
        keys.parse_ring_page_order(b"4096", 4)
    assert keys.parse_num_queues(None, 4) == 1
    assert keys.parse_num_queues(b"4", 4) == 4
    for bad in (b"0", b"5", b"-1", b"x"):
        with pytest.raises(BadKeyError):
            keys.parse_num_queues(bad, 4)


@pytest.mark.parametrize("raw", [b"2", b"yes", b"true", b"", b" 1", b"01", b"1\n"])
def test_feature_flags_are_zero_or_one(raw: bytes) -> None:
    with pytest.raises(BadKeyError):
        keys.parse_bool(raw, "feature-x")


def test_feature_flag_values() -> None:
    assert keys.parse_bool(b"1", "feature-x") is True
    assert keys.parse_bool(b"0", "feature-x") is False
    assert keys.parse_bool(None, "feature-x") is False
    assert keys.parse_bool(None, "feature-x", default=True) is True


def test_protocol_names() -> None:
    assert keys.parse_protocol(None) == "x86_64-abi"
    for name in ("x86_32-abi", "x86_64-abi", "arm-abi"):
        assert keys.parse_protocol(name.encode()) == name
    for bad in (b"x86_16-abi", b"", b"\xff" * 10, b"x86_64-abi\0"):
        with pytest.raises(BadKeyError):
            keys.parse_protocol(bad)


def test_key_errors_name_the_key_show_the_value_and_carry_the_errno() -> None:
    """What goes into the ``error`` node: every refusal names the key (each parser's
    default name when the caller gives none), shows the value (cut at 32 bytes, marked
    with an ellipsis only when cut) and carries ENOENT, ERANGE or EINVAL."""
    refusals = [
        (lambda: keys.parse_grant_ref(b"7"), "'ring-ref'", errno.ERANGE),
        (lambda: keys.parse_grant_ref(b"x"), "'ring-ref'", errno.EINVAL),
        (lambda: keys.parse_port(b"0"), "'event-channel'", errno.ERANGE),
        (lambda: keys.parse_port(b"x"), "'event-channel'", errno.EINVAL),
        (lambda: keys.parse_ring_page_order(b"5", 4), "'ring-page-order'", errno.ERANGE),
        (lambda: keys.parse_ring_page_order(b"x", 4), "'ring-page-order'", errno.EINVAL),
        (lambda: keys.parse_num_queues(b"5", 4), "'multi-queue-num-queues'", errno.ERANGE),
        (lambda: keys.parse_num_queues(b"x", 4), "'multi-queue-num-queues'", errno.EINVAL),
        (lambda: keys.parse_uint(b"x", "ring-ref3"), "'ring-ref3'", errno.EINVAL),
        (lambda: keys.parse_bool(b"2", "feature-persistent"), "'feature-persistent'", errno.EINVAL),
        (lambda: keys.parse_protocol(b"x86_16-abi"), "b'x86_16-abi'", errno.EINVAL),
    ]
    for refuse, shown, err in refusals:
        with pytest.raises(BadKeyError) as info:
            refuse()
        assert shown in str(info.value) and info.value.errno == err, (shown, str(info.value))
    absent = keys.missing("ring-ref")
    assert isinstance(absent, BadKeyError)
    assert absent.errno == errno.ENOENT and "'ring-ref'" in str(absent)
    # the value shown: 32 bytes are shown whole, a 33rd is cut off and marked
    for length in (31, 32, 33, 200):
        raw = bytes(range(40, 40 + length))
        for parse in (lambda r: keys.parse_bool(r, "feature-x"), keys.parse_protocol):
            with pytest.raises(BadKeyError) as info:
                parse(raw)
            text = str(info.value)
            assert text.endswith(repr(raw[:32]) + ("…" if length > 32 else "")), text


def test_parse_uint_defaults_to_the_whole_u32_range() -> None:
    assert keys.parse_uint(b"0", "k") == 0
    assert keys.parse_uint(b"4294967295", "k") == keys.U32_MAX == 2**32 - 1
    with pytest.raises(BadKeyError) as info:
        keys.parse_uint(b"4294967296", "k")
    assert info.value.errno == errno.ERANGE

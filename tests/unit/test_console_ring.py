"""Console ring page, event budget and capped log: the sans-IO parts of the console pair."""

from __future__ import annotations

import struct

import pytest

from xenpv.backends.console import ConsoleConfig, ConsoleLog
from xenpv.drivers import ConsoleRing, EventRateLimiter
from xenpv.errors import LocalError
from xenpv.protocols.console import (
    XENCONS_IN_CONS_OFFSET,
    XENCONS_IN_PROD_OFFSET,
    XENCONS_OUT_CONS_OFFSET,
    XENCONS_OUT_OFFSET,
    XENCONS_OUT_PROD_OFFSET,
    ConsoleIndexes,
)


def _pair() -> tuple[bytearray, ConsoleRing, ConsoleRing]:
    page = bytearray(4096)
    return page, ConsoleRing(page, backend=False), ConsoleRing(page, backend=True)


def _index(page: bytearray, offset: int) -> int:
    return int(struct.unpack_from("<I", page, offset)[0])


def test_guest_output_reaches_the_backend_through_the_out_ring() -> None:
    page, guest, back = _pair()
    assert guest.write(b"hello") == 5
    # io/console.h: the guest's bytes sit in out[] at 1024, out_prod advanced
    assert page[XENCONS_OUT_OFFSET : XENCONS_OUT_OFFSET + 5] == b"hello"
    assert _index(page, XENCONS_OUT_PROD_OFFSET) == 5
    assert back.readable() == 5
    assert back.read() == b"hello"
    assert _index(page, XENCONS_OUT_CONS_OFFSET) == 5


def test_backend_input_reaches_the_guest_through_the_in_ring() -> None:
    page, guest, back = _pair()
    assert back.write(b"keys") == 4
    assert page[:4] == b"keys"
    assert _index(page, XENCONS_IN_PROD_OFFSET) == 4
    assert guest.read() == b"keys"
    assert _index(page, XENCONS_IN_CONS_OFFSET) == 4


def test_rings_hold_exactly_their_sizes() -> None:
    _page, guest, back = _pair()
    assert guest.write(b"x" * 5000) == 2048  # sizeof(out)
    assert guest.writable() == 0
    assert back.write(b"y" * 5000) == 1024  # sizeof(in)
    assert back.writable() == 0
    assert len(back.read()) == 2048
    assert len(guest.read()) == 1024


@pytest.mark.parametrize("start", [0, 2**31 - 3, 2**32 - 5])
def test_indexes_wrap_modulo_2_32(start: int) -> None:
    page, guest, back = _pair()
    for off in (XENCONS_OUT_CONS_OFFSET, XENCONS_OUT_PROD_OFFSET):
        struct.pack_into("<I", page, off, start)
    data = bytes(range(256)) * 7
    sent = guest.write(data)
    assert back.read() == data[:sent]
    assert _index(page, XENCONS_OUT_CONS_OFFSET) == (start + sent) & 0xFFFFFFFF
    idx = ConsoleIndexes.from_page(page)
    assert idx.out_pending() == 0


def test_corrupt_out_indexes_read_as_empty_and_are_counted() -> None:
    page, _guest, back = _pair()
    struct.pack_into("<I", page, XENCONS_OUT_PROD_OFFSET, 2049)  # prod - cons > 2048
    assert back.readable() == 0
    assert back.read() == b""
    assert back.insane >= 1
    # the consumer index is left alone
    assert _index(page, XENCONS_OUT_CONS_OFFSET) == 0


def test_rate_limiter_admits_the_allowance_then_waits_for_the_next_period() -> None:
    now = [100.0]
    lim = EventRateLimiter(3, 0.2, clock=lambda: now[0])
    assert [lim.admit() for _ in range(5)] == [True, True, True, False, False]
    assert lim.limited_periods == 1
    assert lim.period_end() == pytest.approx(100.2)
    now[0] = 100.25
    assert lim.admit()
    assert lim.events == 6


def test_rate_limiter_rejects_nonsense_configuration() -> None:
    with pytest.raises(LocalError):
        EventRateLimiter(0, 0.2)
    with pytest.raises(LocalError):
        ConsoleConfig(policy="keep-everything")


def test_log_is_capped_and_rotated_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = ConsoleLog(tmp_path / "guest.log", 100)
    for i in range(50):
        log.write(b"%02d-456789\n" % i)  # 10 bytes each, 500 in total
    log.write(b"z" * 1000)  # larger than the cap: only its tail is kept
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["guest.log", "guest.log.1"]
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 200
    assert (tmp_path / "guest.log").read_bytes() == b"z" * 100
    assert log.rotations >= 5


def test_bench_console_mbps_smoke() -> None:
    from xenpv.bench.console import bench_console_mbps

    result = bench_console_mbps(64 << 10)
    assert set(result) == {"console_mbps", "bytes", "seconds"}
    assert result["bytes"] == 64 << 10
    assert result["console_mbps"] > 0

"""Instrumented shared memory: access log, racing reads, and the reference ring's hook."""

from __future__ import annotations

import pytest

from xenpv.fuzz.memory import AccessBudgetExceeded, InstrumentedMemory
from xenpv.rings import _reference as ref


def test_reference_ring_runs_on_instrumented_memory_and_fetches_each_request_once() -> None:
    mem = InstrumentedMemory(4096)
    front = ref.FrontRing(mem, 112)
    back = ref.BackRing(mem, 112)
    front.submit_requests(bytes(range(112)) * 3)
    mark = mem.mark()
    got = back.take_requests()
    assert got == bytes(range(112)) * 3
    assert mem.fetches_over(64, 3 * 112, mark) == 1
    assert mem.read_count(0, 4, mark) == 1  # req_prod loaded once for the batch
    assert mem.peek(64, 112) == bytes(range(112))


def test_double_read_is_visible_in_the_log() -> None:
    mem = InstrumentedMemory(64)
    raw, words = mem.shared_views()
    mark = mem.mark()
    raw[8:12]
    words[2]
    assert mem.fetches_over(8, 4, mark) == 2
    assert mem.byte_read_counts(6, 8, mark) == [0, 0, 2, 2, 2, 2, 0, 0]


def test_racing_range_serves_a_new_value_on_every_read() -> None:
    mem = InstrumentedMemory(64)
    mem.race_cycle(0, [b"\x01\x00\x00\x00", b"\x02\x00\x00\x00", b"\x03\x00\x00\x00"])
    _raw, words = mem.shared_views()
    assert [words[0] for _ in range(4)] == [1, 2, 3, 1]
    mem.clear_races()
    assert words[0] == 1


def test_access_outside_the_memory_is_an_index_error() -> None:
    mem = InstrumentedMemory(64)
    raw, words = mem.shared_views()
    with pytest.raises(IndexError):
        words[16]
    with pytest.raises(IndexError):
        raw[70]
    with pytest.raises(IndexError):
        raw[60:80]  # stricter than memoryview: no silently shortened reads
    assert raw[60:64] == bytes(4)


def test_access_budget_stops_a_runaway_driver() -> None:
    mem = InstrumentedMemory(64)
    _raw, words = mem.shared_views()
    mem.limit(3)
    for _ in range(3):
        words[0]
    with pytest.raises(AccessBudgetExceeded):
        words[0]
    mem.limit(None)
    words[0]


def test_peer_writes_are_not_logged() -> None:
    mem = InstrumentedMemory(64)
    mem.poke(4, b"abcd")
    mem.poke_u32(0, 7)
    assert mem.log == []
    assert mem.peek_u32(0) == 7

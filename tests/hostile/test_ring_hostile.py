"""Hostile peers at the ring layer: hostile-inputs.md scenarios 1, 2, 10 and 26.

The ring under attack sits in the middle of a larger buffer filled with canary bytes, so an
access outside the ring memory would show up as a changed canary (writes) or is ruled out
by construction (reads: slot addresses are always masked into the ring).  Work per call is
bounded by the ring size: a call either returns at most N entries or raises the peer error.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import time
from types import SimpleNamespace

import pytest
from rings_conftest import MASK32, PAGE, pattern, rings_fixture  # noqa: F401

from xenpv.errors import PeerError, RingOverflowError
from xenpv.fuzz.memory import InstrumentedMemory
from xenpv.rings import implementation

CANARY = b"\xc5"
SLOT = 112
N = 32


def guarded(pages: int = 1) -> tuple[bytearray, memoryview]:
    """A ring of ``pages`` pages in the middle of canary-filled memory."""
    big = bytearray(CANARY * ((pages + 2) * PAGE))
    return big, memoryview(big)[PAGE : (pages + 1) * PAGE]


def assert_canaries(big: bytearray, pages: int = 1) -> None:
    assert big[:PAGE] == CANARY * PAGE, "write before the ring memory"
    assert big[(pages + 1) * PAGE :] == CANARY * PAGE, "write after the ring memory"


def live_ring(
    rings: SimpleNamespace, mem: memoryview, start: int, queued: int
) -> tuple[object, object]:
    front = rings.FrontRing(mem, SLOT, start)
    back = rings.BackRing(mem, SLOT, start)
    front.put_requests(pattern(1, queued * SLOT))
    front.push_requests()
    return front, back


@pytest.mark.parametrize("start", [0, MASK32 - 40, 1 << 31])
@pytest.mark.parametrize("claim", ["N+1", "N+1000", "+2^31", "-2^31", "0xFFFFFFFF", "behind"])
def test_scenario_01_req_prod_beyond_ring(rings: SimpleNamespace, start: int, claim: str) -> None:
    """A frontend sets req_prod past any possible request: RING_REQUEST_PROD_OVERFLOW is
    detected, nothing is consumed, the ring is marked broken, no access outside it."""
    big, mem = guarded()
    _front, back = live_ring(rings, mem, start, 5)
    assert back.take_requests(2) == pattern(1, 5 * SLOT)[: 2 * SLOT]  # a legit start
    cons = back.req_cons
    bogus = {
        "N+1": cons - 2 + N + 1,
        "N+1000": cons + N + 1000,
        "+2^31": cons + (1 << 31),
        "-2^31": cons - (1 << 31),
        "0xFFFFFFFF": 0xFFFFFFFF,
        "behind": cons - 1,
    }[claim] & MASK32
    struct.pack_into("<I", mem, 0, bogus)
    before = bytes(big)
    with pytest.raises(RingOverflowError) as err:
        back.take_requests()
    assert isinstance(err.value, PeerError)
    assert back.broken and back.req_cons == cons
    assert bytes(big) == before  # nothing written anywhere, the ring included
    # it stays failed: every later call raises the same peer error, even for a sane prod
    struct.pack_into("<I", mem, 0, cons)
    for call in (
        back.unconsumed_requests,
        back.final_check_for_requests,
        lambda: back.take_requests_into(bytearray(N * SLOT)),
        lambda: back.poll_requests_into(bytearray(N * SLOT)),
        back.push_responses_and_check_notify,
    ):
        with pytest.raises(RingOverflowError):
            call()
    assert_canaries(big)


def test_scenario_01_consumes_at_most_ring_size_per_call(rings: SimpleNamespace) -> None:
    """The largest legal claim (exactly N outstanding) yields at most N entries per call."""
    big, mem = guarded(pages=2)
    front = rings.FrontRing(mem, SLOT, MASK32 - 10)
    back = rings.BackRing(mem, SLOT, MASK32 - 10)
    n = front.nr_ents
    struct.pack_into("<I", mem, 0, (MASK32 - 10 + n) & MASK32)  # peer claims N requests
    dst = bytearray(10 * n * SLOT)
    assert back.take_requests_into(dst) == n
    assert back.take_requests_into(dst) == 0  # nothing more until responses free slots
    assert back.unconsumed_requests() == 0
    assert not back.broken
    assert_canaries(big, pages=2)


def test_scenario_02_req_prod_moves_backwards(rings: SimpleNamespace) -> None:
    """req_prod falling behind requests already consumed is a protocol violation."""
    big, mem = guarded()
    _front, back = live_ring(rings, mem, 100, 6)
    assert len(back.take_requests()) == 6 * SLOT
    struct.pack_into("<I", mem, 0, 103)  # prod 106 -> 103 while req_cons is 106
    with pytest.raises(RingOverflowError):
        back.unconsumed_requests()
    assert back.broken
    assert_canaries(big)


def test_scenario_02_oscillating_prod_is_read_once_per_pass() -> None:
    """The reference ring on instrumented memory whose req_prod changes on every read:
    each call loads it exactly once and copies each slot byte exactly once (R1)."""
    rings = implementation("reference")
    mem = InstrumentedMemory(PAGE)
    front = rings.FrontRing(mem, SLOT, 0)
    back = rings.BackRing(mem, SLOT, 0)
    front.put_requests(pattern(2, N * SLOT))
    values = [struct.pack("<I", v) for v in (3, 30, 7, 1000, 0, 12)]
    mem.race_cycle(0, values)
    seen = []
    for _ in range(4):
        mark = mem.mark()
        try:
            got = back.take_requests()
        except RingOverflowError:
            seen.append("overflow")
            assert mem.read_count(0, 4, since=mark) == 1
            break
        seen.append(len(got) // SLOT)
        assert mem.read_count(0, 4, since=mark) == 1, "req_prod read more than once"
        assert mem.fetches_over(64, N * SLOT, since=mark) <= 1, "a slot byte read twice"
        assert len(got) <= N * SLOT
    # prod served 3, then 30, then 7 (behind req_cons 30: violation)
    assert seen == [3, 27, "overflow"]
    assert back.broken


def _flip_prod(path: str, stop_at: float) -> None:  # pragma: no cover - runs in a child
    """Peer process: rewrite req_prod as fast as possible with sane and insane values."""
    fd = os.open(path, os.O_RDWR)
    mem = mmap.mmap(fd, PAGE)
    words = memoryview(mem).cast("I")
    values = [5, 0, N, N + 1, 0xFFFFFFFF, 1 << 31, 3, N - 1]  # first a non-zero: "started"
    i = 0
    while time.monotonic() < stop_at:
        words[0] = values[i % len(values)]
        i += 1
    words.release()
    mem.close()
    os.close(fd)


def test_scenario_02_racing_peer_process(rings: SimpleNamespace, tmp_path) -> None:
    """A real second process rewrites req_prod continuously while we consume: every call
    returns at most N entries or raises the peer error; the memory outside the slots we may
    write is never touched."""
    path = tmp_path / "ring"
    path.write_bytes(CANARY * PAGE)
    fd = os.open(path, os.O_RDWR)
    mem = mmap.mmap(fd, PAGE)
    pid = -1
    try:
        rings.FrontRing(mem, SLOT, 0).release()
        before_tail = bytes(mem[64 + N * SLOT :])
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _flip_prod(str(path), time.monotonic() + 10.0)
            finally:
                os._exit(0)
        started = time.monotonic()
        while memoryview(mem).cast("I")[0] == 0:  # until the peer process runs
            assert time.monotonic() - started < 30, "the racing peer never started"
            time.sleep(0.001)
        outcomes = {"ok": 0, "overflow": 0}
        deadline = time.monotonic() + 0.8
        dst = bytearray(4 * N * SLOT)
        while time.monotonic() < deadline:
            back = rings.BackRing(mem, SLOT, 0)
            try:
                for _ in range(50):
                    n = back.take_requests_into(dst)
                    assert n <= N
                    back.put_responses(dst, n)
                    back.push_responses()
                    outcomes["ok"] += 1
            except RingOverflowError:
                outcomes["overflow"] += 1
                assert back.broken
            back.release()
        assert outcomes["overflow"] > 0
        assert bytes(mem[64 + N * SLOT :]) == before_tail
    finally:
        if pid > 0:
            os.kill(pid, signal.SIGKILL)  # our own racing child, done with
            os.waitpid(pid, 0)
        mem.close()
        os.close(fd)


@pytest.mark.parametrize("claim", ["N+1", "outstanding+1", "+2^31", "0xFFFFFFFF", "behind"])
def test_scenario_10_rsp_prod_beyond_ring(rings: SimpleNamespace, claim: str) -> None:
    """A backend claims more responses than can exist: RING_RESPONSE_PROD_OVERFLOW (tightened
    to the requests outstanding); no completion is processed; the front is broken."""
    big, mem = guarded()
    front, back = live_ring(rings, mem, MASK32 - 40, 4)
    back.take_requests()
    back.submit_responses(pattern(3, 4 * SLOT))
    assert front.take_responses(1) == pattern(3, SLOT)
    cons = front.rsp_cons
    bogus = {
        "N+1": cons + N + 1,
        "outstanding+1": cons + 4,
        "+2^31": cons + (1 << 31),
        "0xFFFFFFFF": 0xFFFFFFFF,
        "behind": cons - 1,
    }[claim] & MASK32
    struct.pack_into("<I", mem, 8, bogus)
    before = bytes(big)
    dst = bytearray(b"\x00" * (N * SLOT))
    with pytest.raises(RingOverflowError):
        front.take_responses_into(dst)
    assert dst == bytes(N * SLOT)  # no completion handed out
    assert front.broken and front.rsp_cons == cons
    assert bytes(big) == before
    for call in (
        front.unconsumed_responses,
        front.final_check_for_responses,
        lambda: front.submit_requests(bytes(SLOT)),
    ):
        with pytest.raises(RingOverflowError):
            call()
    assert_canaries(big)


@pytest.mark.parametrize("order", [10, 11, 12, 16])
def test_scenario_26_vchan_indexes_set_arbitrarily(rings: SimpleNamespace, order: int) -> None:
    """A vchan peer sets prod/cons to arbitrary values mid-stream: reads and writes never
    move more than the ring size nor touch memory outside the ring; insane state reads as
    0 available and is reported."""
    size = 1 << order
    big = bytearray(CANARY * (size + 2 * PAGE))
    mem = memoryview(big)[PAGE : PAGE + size]
    control = bytearray(64)
    ring = rings.ByteRing(
        control,
        data_buffer=mem,
        data_offset=0,
        size=size,
        cons_offset=0,
        prod_offset=4,
        on_insane="zero",
    )
    assert ring.write(pattern(4, 300)) == 300
    assert ring.read(100) == pattern(4, 300)[:100]
    values = [0, 1, size - 1, size, size + 1, 1 << 31, MASK32, 12345678]
    for prod in values:
        for cons in values:
            struct.pack_into("<II", control, 0, cons, prod)
            used = (prod - cons) & MASK32
            sane = used <= size
            insane_before = ring.insane_count
            assert ring.available() == (used if sane else 0)
            got = ring.read(size * 4)
            assert len(got) == (used if sane else 0) and len(got) <= size
            struct.pack_into("<II", control, 0, cons, prod)
            wrote = ring.write(b"w" * (size * 4))
            assert wrote == (size - used if sane else 0) and wrote <= size
            if not sane:
                assert ring.insane_count == insane_before + 3  # every call reports it
                assert struct.unpack_from("<II", control, 0) == (cons, prod)  # untouched
    assert big[:PAGE] == CANARY * PAGE and big[PAGE + size :] == CANARY * PAGE
    assert not ring.broken  # vchan locks up and reports, it does not raise

"""Both sides of a console page against a model: random writes and reads, any start index.

A guest and a backend :class:`ConsoleRing` share one page; every step is checked against
two plain byte queues bounded by the ring sizes (1024 in, 2048 out), including index
start values near 2^31 and 2^32 (guests "must not assume that producer or consumer
pointers start at zero").  Runs on the implementation in use and on the reference twin.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.drivers import consolering as fc
from xenpv.protocols.console import (
    XENCONS_IN_CONS_OFFSET,
    XENCONS_IN_SIZE,
    XENCONS_OUT_CONS_OFFSET,
    XENCONS_OUT_SIZE,
)
from xenpv.rings import _reference

starts = st.sampled_from([0, 1, 1023, 2**31 - 7, 2**32 - 3000, 2**32 - 1]) | st.integers(
    0, 2**32 - 1)
ops = st.lists(
    st.tuples(st.sampled_from(["guest-write", "backend-read", "backend-write", "guest-read"]),
              st.integers(0, 3000)),
    max_size=40,
)


def _run(in_start: int, out_start: int, steps: list[tuple[str, int]]) -> None:
    page = bytearray(4096)
    struct.pack_into("<II", page, XENCONS_IN_CONS_OFFSET, in_start, in_start)
    struct.pack_into("<II", page, XENCONS_OUT_CONS_OFFSET, out_start, out_start)
    guest, back = fc.ConsoleRing(page, backend=False), fc.ConsoleRing(page, backend=True)
    out_q, in_q = bytearray(), bytearray()
    counter = 0
    for op, n in steps:
        if op.endswith("write"):
            data = bytes((counter + i) & 0xFF for i in range(n))
            counter += n
            ring, q, size = (guest, out_q, XENCONS_OUT_SIZE) if op == "guest-write" else (
                back, in_q, XENCONS_IN_SIZE)
            wrote = ring.write(data)
            assert wrote == min(n, size - len(q))
            q += data[:wrote]
        else:
            ring, q = (back, out_q) if op == "backend-read" else (guest, in_q)
            got = ring.read(n)
            assert got == bytes(q[: len(got)]) and len(got) == min(n, len(q))
            del q[: len(got)]
        assert back.readable() == len(out_q) and guest.readable() == len(in_q)
        assert guest.writable() == XENCONS_OUT_SIZE - len(out_q)
        assert back.writable() == XENCONS_IN_SIZE - len(in_q)
    # io/console.h: in_cons, in_prod, out_cons, out_prod follow each other
    in_cons, in_prod, out_cons, out_prod = struct.unpack_from("<IIII", page,
                                                              XENCONS_IN_CONS_OFFSET)
    assert (in_prod - in_cons) & 0xFFFFFFFF == len(in_q)
    assert (out_prod - out_cons) & 0xFFFFFFFF == len(out_q)
    assert guest.insane == back.insane == 0


@settings(max_examples=150, deadline=None)
@given(starts, starts, ops)
def test_console_page_matches_the_model(in_start: int, out_start: int,
                                        steps: list[tuple[str, int]]) -> None:
    _run(in_start, out_start, steps)


@settings(max_examples=60, deadline=None)
@given(starts, starts, ops)
def test_console_page_matches_the_model_on_the_reference_rings(
        in_start: int, out_start: int, steps: list[tuple[str, int]]) -> None:
    saved = fc.ByteRing
    fc.ByteRing = _reference.ByteRing  # type: ignore[misc]
    try:
        _run(in_start, out_start, steps)
    finally:
        fc.ByteRing = saved  # type: ignore[misc]


@settings(max_examples=200, deadline=None)
@given(starts, starts, starts, starts, st.binary(min_size=1, max_size=64))
def test_any_index_values_a_guest_writes_are_handled_safely(
        out_cons: int, out_prod: int, in_cons: int, in_prod: int, garbage: bytes) -> None:
    """Scenario 27 as a property: whatever the page holds, the backend reads at most what
    a sane ring can hold, moves its index only over sane data, and never raises."""
    page = bytearray((garbage * (4096 // len(garbage) + 1))[:4096])
    struct.pack_into("<IIII", page, XENCONS_IN_CONS_OFFSET, in_cons, in_prod, out_cons,
                     out_prod)
    back = fc.ConsoleRing(page, backend=True)
    pending = (out_prod - out_cons) & 0xFFFFFFFF
    space = XENCONS_IN_SIZE - ((in_prod - in_cons) & 0xFFFFFFFF)
    got = back.read()
    wrote = back.write(b"k" * 2000)
    after = struct.unpack_from("<IIII", page, XENCONS_IN_CONS_OFFSET)
    if pending <= XENCONS_OUT_SIZE:
        assert len(got) == pending and after[2] == out_prod
    else:
        assert got == b"" and after[2] == out_cons and back.insane > 0
    if 0 <= space <= XENCONS_IN_SIZE:
        assert wrote == min(2000, space)
        assert after[1] == (in_prod + wrote) & 0xFFFFFFFF
    else:
        assert wrote == 0 and after[1] == in_prod
    assert after[0] == in_cons and after[3] == out_prod  # the guest's indexes untouched
    back.release()

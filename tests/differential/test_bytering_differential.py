"""Differential test of the byte rings: Cython against the reference, step by step.

Layouts: xenstore, console, vchan (orders 10 to 16, anywhere in a buffer), kbdif (modulo 51
and 25, 40-byte events).  Indexes start anywhere, often near 2^31 or 2^32; a peer may write
either index at any time.  After every step both copies of the memory and every answer
(units moved, bytes read, counts, insane-state handling) must be identical.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rings_conftest import MASK32, PAGE, pattern

from xenpv.errors import RingOverflowError
from xenpv.rings import implementation

LAYOUTS = [
    {"data_offset": 0, "size": 1024, "cons_offset": 2048, "prod_offset": 2052},  # xenstore req
    {"data_offset": 1024, "size": 2048, "cons_offset": 3080, "prod_offset": 3084},  # console out
    {"data_offset": 1024, "size": 51, "slot": 40, "cons_offset": 0, "prod_offset": 4},  # kbd in
    {"data_offset": 3072, "size": 25, "slot": 40, "cons_offset": 8, "prod_offset": 12},  # kbd out
]


@st.composite
def layouts(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A layout and the buffer size it lives in (vchan rings at a random offset)."""
    if draw(st.booleans()):
        return draw(st.sampled_from(LAYOUTS)), PAGE
    order = draw(st.integers(10, 16))
    offset = draw(st.integers(0, 64)) * 8 + 16
    return ({"data_offset": offset, "size": 1 << order, "cons_offset": 0, "prod_offset": 4},
            offset + (1 << order) + draw(st.sampled_from([0, 8, 100])))


starts = st.one_of(st.just(0), st.integers(MASK32 - 3000, MASK32),
                   st.integers((1 << 31) - 100, (1 << 31) + 100), st.integers(0, MASK32))
amounts = st.one_of(st.integers(0, 64), st.integers(0, 3000), st.integers(0, 70000))
operations = st.one_of(
    st.tuples(st.sampled_from(["write", "read", "read_into", "available", "free"]), amounts),
    st.tuples(st.sampled_from(["poke_prod", "poke_cons"]),
              st.one_of(st.integers(-5, 5), st.integers(-(1 << 31), 1 << 31))),
)


def apply(ring: Any, mem: bytearray, layout: dict[str, Any], step: int,
          op: tuple[str, int]) -> Any:
    """One operation on one implementation; peer errors become a marker."""
    name, arg = op
    try:
        if name == "write":
            return ring.write(pattern(step, arg))
        if name == "read":
            return ring.read(arg if arg % 3 else -1)
        if name == "read_into":
            dst = bytearray(arg)
            n = ring.read_into(dst, -1 if arg % 2 else arg // 2)
            return n, bytes(dst)
        if name in ("available", "free"):
            return getattr(ring, name)()
        # a peer moves an index relative to the other one
        key, other = (("prod_offset", "cons_offset") if name == "poke_prod"
                      else ("cons_offset", "prod_offset"))
        base = int(memoryview(mem).cast("I")[layout[other] // 4])
        memoryview(mem).cast("I")[layout[key] // 4] = (base + arg) & MASK32
        return None
    except RingOverflowError:
        return "overflow"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=layouts(), policy=st.sampled_from(["error", "zero"]), start=starts,
       seed=st.integers(0, 255), ops=st.lists(operations, min_size=1, max_size=30))
def test_byte_rings_match(geometry: tuple[dict[str, Any], int], policy: str, start: int,
                          seed: int, ops: list[tuple[str, int]]) -> None:
    """Reference and Cython byte rings agree on every byte and every answer."""
    layout, nbytes = geometry
    init = bytearray(pattern(seed, nbytes))
    words = memoryview(init).cast("I")
    words[layout["prod_offset"] // 4] = words[layout["cons_offset"] // 4] = start
    mems = [bytearray(init), bytearray(init)]
    rings = [implementation(name).ByteRing(mem, on_insane=policy, **layout)
             for name, mem in zip(("reference", "cython"), mems, strict=True)]
    try:
        for step, op in enumerate(ops):
            got = [apply(r, m, layout, step, op) for r, m in zip(rings, mems, strict=True)]
            assert got[0] == got[1], f"step {step} {op}"
            assert mems[0] == mems[1], f"memory differs after step {step} {op}"
            assert rings[0].insane_count == rings[1].insane_count
            assert rings[0].broken == rings[1].broken
    finally:
        for r in rings:
            r.release()

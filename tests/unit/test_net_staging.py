"""The net backend's staging area: where a batch's copied pieces go."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.backends.net import _gathered, _Staging, _TxCopy
from xenpv.platforms.base import GrantCopy, GrantPtr, LocalPtr

PAGE = 4096


class _Frames:
    """Own frames handed out as one buffer (the part of GuestFrames staging uses)."""

    def alloc_frames(self, count: int) -> Any:
        return SimpleNamespace(mem=memoryview(bytearray(count * PAGE)))


def _staging(pages: int) -> _Staging:
    return _Staging(cast(Any, _Frames()), pages)


_PIECES = st.lists(st.tuples(st.sampled_from([PAGE, PAGE, PAGE, 1, 60, 1514, 4095, 3000]),
                             st.one_of(st.none(), st.integers(0, 600))),
                   min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.lists(st.one_of(st.just("reset"), _PIECES), max_size=12))
def test_staging_places_pieces_apart_within_pages_and_keyed_pages_recur(
        pages: int, steps: list[Any]) -> None:
    """Pieces of one batch never overlap, never cross a page and stay inside the area;
    ``fits`` says exactly whether ``place`` succeeds, and a failed place takes nothing; a
    whole page with a key goes to ``key`` modulo the pages when that page is free, in
    any batch."""
    stage = _staging(pages)
    taken: set[int] = set()
    for step in steps:
        if step == "reset":
            stage.reset()
            taken = set()
            continue
        lengths = [n for n, _k in step]
        keys = [k for _n, k in step]
        fits = stage.fits(lengths, keys)
        before = (stage._page, stage._fill, stage._next, bytes(stage._used))
        at = stage.place(lengths, keys)
        assert (at is not None) == fits
        if at is None:
            assert before == (stage._page, stage._fill, stage._next, bytes(stage._used))
            continue
        for (n, key), a in zip(step, at, strict=True):
            assert 0 <= a and a + n <= pages * PAGE
            assert a // PAGE == (a + n - 1) // PAGE
            if key is not None and n == PAGE and (key % pages) * PAGE not in taken and \
                    not any(t // PAGE == key % pages for t in taken):
                assert a == (key % pages) * PAGE
            span = set(range(a, a + n))
            assert not span & taken
            taken |= span


def test_gathered_takes_one_slice_only_for_pieces_in_order_without_gaps() -> None:
    """A staged packet whose pieces lie in order one after the other is taken out with
    one slice; pieces in other pages or out of order are joined in their order, even when
    the first and the last bound exactly the packet's size (fails before this change:
    that was taken as one slice, the middle pages swapped)."""
    mem = memoryview(bytearray(4 * PAGE))
    for k in range(4):
        mem[k * PAGE:(k + 1) * PAGE] = bytes([k + 1]) * PAGE

    def gathered(places: list[int], lengths: list[int]) -> bytes:
        """The packet's bytes, found from its copies and from its recorded places."""
        segs = [GrantCopy(GrantPtr(1, 10 + i, 0), LocalPtr(mem, a), n)
                for i, (a, n) in enumerate(zip(places, lengths, strict=True))]
        plain = _TxCopy(0, sum(lengths), (), 0, memoryview(b""), (0, 0), None, segs)
        recorded = plain._replace(staging=mem, places=list(zip(places, lengths, strict=True)))
        out = _gathered(plain)
        assert _gathered(recorded) == out
        return out

    assert gathered([0, PAGE, 2 * PAGE], [PAGE, PAGE, 10]) == \
        b"\1" * PAGE + b"\2" * PAGE + b"\3" * 10
    assert gathered([0, 2 * PAGE, PAGE, 3 * PAGE], [PAGE, PAGE, PAGE, 10]) == \
        b"\1" * PAGE + b"\3" * PAGE + b"\2" * PAGE + b"\4" * 10
    assert gathered([3 * PAGE, PAGE], [PAGE, 20]) == b"\4" * PAGE + b"\2" * 20
    assert gathered([PAGE + 100], [50]) == b"\2" * 50

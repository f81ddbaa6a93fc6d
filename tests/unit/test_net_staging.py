"""Where the net drivers put a frame's pieces: the backend's staging area (a batch's
copies), the frontend's TX pages and slots."""

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
        before = stage.state()
        at = stage.place(lengths, keys)
        assert (at is not None) == fits
        if at is None:
            assert before == stage.state()
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


def test_frontend_fills_a_frame_s_tx_pages_and_slots_in_order() -> None:
    """Frames of every size around page bounds (with and without GSO) take their pages
    as a stack gives them, copied in whole, with one slot per page (the first with the
    size, the flags, the GSO record after it) and more-data on all but the last."""
    import collections

    from xenpv.frontends.net import _TX_TABLE, NetFrontend
    from xenpv.protocols.ethernet import NetFrame
    from xenpv.protocols.netif import (
        XEN_NETIF_EXTRA_TYPE_GSO,
        GsoExtra,
        NETTXF_csum_blank,
        NETTXF_extra_info,
        NETTXF_more_data,
        TxRequest,
    )

    fe = SimpleNamespace(net_stats=collections.Counter())
    for size in (1, 60, 4095, 4096, 4097, 8192, 8193, 20000, 65535):
        for gso in (0, 1):
            mem = memoryview(bytearray(20 * PAGE))
            free = list(range(19, -1, -1))
            q = SimpleNamespace(tx=_TX_TABLE(mem, list(range(500, 520)), 32))
            data = bytes((i * 7 + size) & 0xFF for i in range(size))
            NetFrontend._fill_tx(cast(Any, fe), cast(Any, q), NetFrame(
                data, csum_blank=True, gso_type=gso, gso_size=1448 if gso else 0))
            reqs = [bytes(q.tx.out[k * 12:(k + 1) * 12]) for k in range(q.tx.staged)]
            pages = -(-size // PAGE)
            idxs = [free.pop() for _ in range(pages)]
            assert q.tx.free == free and q.tx.out_ids == set(idxs)
            want = []
            for k, idx in enumerate(idxs):
                more = NETTXF_more_data if k < pages - 1 else 0
                n = size if k == 0 else min(PAGE, size - k * PAGE)
                flags = NETTXF_csum_blank | (NETTXF_extra_info if gso else 0) if k == 0 else 0
                want.append(TxRequest(500 + idx, 0, flags | more, idx, n).pack())
                if k == 0 and gso:
                    want.append(GsoExtra(XEN_NETIF_EXTRA_TYPE_GSO, 0, 1448, 1, 0).pack()
                                .ljust(12, b"\0"))  # a whole slot
                piece = data[k * PAGE:(k + 1) * PAGE]
                assert bytes(mem[idx * PAGE:idx * PAGE + len(piece)]) == piece
            assert reqs == want, size

"""The net backend's TX copy group (``cython/nettx.pyx``) and the loopback client's
piece encoding (``encode_pieces`` in ``cython/gntcopy.pyx``) agree with their readable
twins (``xenpv.backends.nettx.TxGroupReference``, ``gntcopy.encode_pieces_reference``).

The same arbitrary sequence of steps goes to a compiled group and to its twin: layouts
(committed or not, keyed or not), chains added (well formed, or hostile: pieces longer
than a page, sizes that do not match their pieces, more ids than slots), copies finished
with arbitrary statuses (short lists included) over staging memory of any size (shorter
than the area included), resets.  Every result or exception type, the layout's state,
the pieces and the answers must be the same after each step."""

from __future__ import annotations

import array
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.backends import _nettx  # built by setup.py
from xenpv.backends.nettx import TxGroupReference, tx_group
from xenpv.platforms.base import COPY_PIECE
from xenpv.platforms.loopback import _gntcopy
from xenpv.platforms.loopback.gntcopy import encode_pieces_reference

PAGE = 4096

_LENGTH = st.one_of(st.sampled_from([PAGE, PAGE, PAGE, 1, 14, 60, 1514, 4095, 3000]),
                    st.integers(0, PAGE), st.integers(0, 0xFFFF))
_FRAG = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([0, 0, 0, 1, 100, 4095]),
                  _LENGTH)
_CHAIN = st.builds(
    lambda flags, frags, extra, size_delta, gso: (
        flags, sum(f[2] for f in frags) + size_delta, len(frags) + extra,
        tuple(range(7, 7 + len(frags))), tuple(frags), gso),
    st.integers(0, 0xFFFF), st.lists(_FRAG, min_size=1, max_size=20), st.integers(0, 1),
    st.sampled_from([0] * 8 + [1, -1]), st.sampled_from([(0, 0), (1, 1448), (2, 1440)]))
_STEP = st.one_of(
    st.tuples(st.just("add"), _CHAIN),
    st.tuples(st.just("layout"), st.lists(_LENGTH, max_size=12),
              st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(0, 999)),
                                            min_size=12, max_size=12)),
              st.booleans()),
    st.tuples(st.just("finish"), st.integers(0, 2**32), st.sampled_from([0, 1, 2, 3]),
              st.sampled_from([0, 0, 0, -1, 1])),
    st.tuples(st.just("reset")),
)


def _run(group: Any, step: tuple[Any, ...]) -> Any:
    """One step on one group: its result, or the exception's type."""
    try:
        if step[0] == "add":
            return group.add(step[1])
        if step[0] == "layout":
            return group.layout(step[1], step[2], step[3])
        if step[0] == "finish":
            _k, seed, short_mem, short_status = step
            rnd = random.Random(seed)
            size = group.pages * PAGE - (rnd.randrange(PAGE) if short_mem == 3 else 0)
            mem = bytearray(rnd.randbytes(max(size, 0)))
            statuses = array.array("i", (rnd.choice([0] * 12 + [-1, -3])
                                         for _ in range(group.count)))
            if short_status and len(statuses):
                del statuses[-1]
            return group.finish(mem, statuses)
        group.reset()
        return None
    except ValueError:
        return ValueError


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 24), st.lists(_STEP, max_size=14))
def test_compiled_tx_group_matches_its_twin(pages: int, steps: list[tuple[Any, ...]]) -> None:
    """Each step gives the same result (or the same refusal) on both, and leaves the same
    layout, pieces and chains."""
    compiled, twin = _nettx.TxGroup(pages), TxGroupReference(pages)
    for step in steps:
        assert _run(compiled, step) == _run(twin, step), step
        assert compiled.state() == twin.state()
        assert (compiled.count, compiled.chains) == (twin.count, twin.chains)
        assert bytes(compiled.pieces) == bytes(twin.pieces)


def test_tx_group_answers_and_bytes_on_a_named_case() -> None:
    """A GSO chain of three pieces (two whole pages keyed by grant reference) and a
    one-slot chain: the pieces, the frames' bytes, and the answers as whole slots (OKAY,
    NULL for the extra-info slot, ERROR for every slot of a chain whose copy failed)."""
    for group in (_nettx.TxGroup(8), TxGroupReference(8)):
        assert group.add((0xD, 2 * PAGE + 100, 4, (1, 2, 3),
                          ((17, 0, PAGE), (18, 0, PAGE), (19, 0, 100)), (1, 1448)))
        assert group.add((0, 60, 1, (4,), ((20, 200, 60),), (0, 0)))
        assert bytes(group.pieces) == b"".join([
            COPY_PIECE.pack(17, 0, PAGE, 1 * PAGE), COPY_PIECE.pack(18, 0, PAGE, 2 * PAGE),
            COPY_PIECE.pack(19, 0, 100, 0), COPY_PIECE.pack(20, 200, 60, 100)])
        mem = bytearray(random.Random(3).randbytes(8 * PAGE))
        frames, answers = group.finish(mem, array.array("i", [0, 0, 0, -1]))
        assert frames == [(bytes(mem[PAGE:3 * PAGE] + mem[0:100]), 0xD, 1, 1448),
                          (None, 0, 0, 0)]
        slot = [answers[k:k + 12] for k in range(0, len(answers), 12)]
        assert slot == [b"\x01\x00\x00\x00" + bytes(8), b"\x00\x00\x01\x00" + bytes(8),
                        b"\x02\x00\x00\x00" + bytes(8), b"\x03\x00\x00\x00" + bytes(8),
                        b"\x04\x00\xff\xff" + bytes(8)]
        assert (group.count, group.chains) == (0, 0)
        assert group.state() == (-1, PAGE, 0, bytes(8))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF),
                          st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)), max_size=12),
       st.integers(-1, 14), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
       st.integers(-1, 2**24), st.integers(-1, 2**20), st.booleans(),
       st.sampled_from([0, 0, 4095, 4096]))
def test_compiled_piece_encoding_matches_its_twin(
        raw: list[tuple[int, int, int, int]], count: int, domid: int, handle: int, base: int,
        size: int, per_page: bool, small: int) -> None:
    """The loopback client's GNT_COPY request for pieces: the same bytes, the same None
    (a piece that cannot be named), the same refusal (bounds, a bad count)."""
    if small:  # mostly pieces that fit: short ones inside the buffer
        raw = [(r, o % small, ln % 300, p % 8000) for r, o, ln, p in raw]
    pieces = b"".join(COPY_PIECE.pack(*p) for p in raw)

    def run(fn: Any) -> Any:
        try:
            return fn(pieces, count, domid, handle, base, size, per_page)
        except ValueError:
            return ValueError
        except OverflowError:
            return ValueError

    assert run(_gntcopy.encode_pieces) == run(encode_pieces_reference)


def test_pure_python_switch_turns_the_tx_group_to_its_twin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """XENPV_PURE_PYTHON=1 makes the backend use the readable TX group; otherwise the
    built extension serves."""
    monkeypatch.setenv("XENPV_PURE_PYTHON", "1")
    assert type(tx_group(4)) is TxGroupReference
    monkeypatch.setenv("XENPV_PURE_PYTHON", "0")
    assert type(tx_group(4)) is _nettx.TxGroup

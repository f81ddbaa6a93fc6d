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
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.backends import _nettx  # built by setup.py
from xenpv.backends.net import NetConfig, NetTx
from xenpv.backends.nettx import TxGroupReference, tx_group
from xenpv.platforms.base import COPY_PIECE
from xenpv.platforms.loopback import _gntcopy
from xenpv.platforms.loopback.gntcopy import encode_pieces_reference
from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.protocols.ethernet import NetFrame
from xenpv.protocols.netif import (
    NETTXF_csum_blank,
    NETTXF_extra_info,
    NETTXF_more_data,
    pack_tx_request,
)

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


def _tx_slots(refs: list[int], reqs: list[tuple[int, int, int, int, int]]) -> bytes:
    """TX ring slots: (page index, offset, flags, id, size) each, or an extra (-1, ...)."""
    out = []
    for page, offset, flags, rid, size in reqs:
        if page < 0:  # a GSO extra-info slot: TCPv4, size 1448
            out.append(struct.pack("<BBHBBH4x", 1, 0, 1448, 1, 0, 0))
        else:
            out.append(pack_tx_request(refs[page], offset, flags, rid, size))
    return b"".join(out)


@pytest.mark.parametrize("staging", [128, 2])
def test_tx_answers_every_slot_in_order_and_drops_only_what_failed(staging: int) -> None:
    """One ring pass of a GSO chain, a chain with an empty fragment (bad), a one-slot
    frame and a frame whose grant is not the backend's: the good frames reach the port
    intact; the answers are whole slots given once to ``respond_slots``, in slot order
    (OKAY, NULL for the extra-info slot, ERROR for every slot of the bad chain and of the
    one whose copy failed); the bad chain and the failed copy are counted.  With a
    staging area of 2 pages the GSO chain (3 pages) cannot be staged and is copied alone
    into a private buffer, with the same outcome."""
    machine = InProcessMachine(max_grants=256, max_ports=8)
    try:
        dom0, dom1, dom2 = machine.domain(0), machine.domain(1), machine.domain(2)
        pages = dom1.grants.grant(0, 8)
        foreign = dom1.grants.grant(2, 1)  # not granted to the backend: its copy fails
        del dom2
        pages.mem[:] = random.Random(5).randbytes(8 * PAGE)
        got: list[NetFrame] = []
        tx = NetTx(dom0, 1, NetConfig(staging_pages=staging), got.append)
        answered: list[bytes] = []
        tx.respond_slots = lambda buf, n: answered.append(bytes(buf[:n * 12]))
        size = 2 * PAGE + 700
        refs = list(pages.refs) + list(foreign.refs)
        batch = _tx_slots(refs, [
            (0, 0, NETTXF_extra_info | NETTXF_more_data | NETTXF_csum_blank, 10, size),
            (-1, 0, 0, 0, 0),
            (1, 0, NETTXF_more_data, 11, PAGE),
            (2, 0, 0, 12, 700),
            (3, 0, NETTXF_more_data, 20, 100),  # bad: an empty second fragment
            (4, 0, 0, 21, 0),
            (5, 64, 0, 30, 60),
            (8, 0, 0, 40, 60),  # the foreign page
        ])
        assert tx.handle(memoryview(batch), len(batch) // 12) == []
        assert len(answered) == 1
        slots = [answered[0][k:k + 12] for k in range(0, len(answered[0]), 12)]
        assert [struct.unpack_from("<Hh", s) for s in slots] == [
            (10, 0), (0, 1), (11, 0), (12, 0), (20, -1), (21, -1), (30, 0), (40, -1)]
        assert all(s[4:] == bytes(8) for s in slots)
        mem = bytes(pages.mem)
        assert [f.data for f in got] == [mem[0:PAGE] + mem[PAGE:2 * PAGE] +
                                         mem[2 * PAGE:2 * PAGE + 700],
                                         mem[5 * PAGE + 64:5 * PAGE + 124]]
        assert (got[0].gso_type, got[0].gso_size, got[0].csum_blank) == (1, 1448, True)
        assert (tx.stats["dropped"], tx.stats["copy_errors"], tx.stats["packets"]) == (2, 1, 2)
        tx.respond_slots = None  # without the ring service: returned, in the same order
        assert [struct.unpack("<Hh", r) for r in tx.handle(memoryview(batch), 8)] == [
            struct.unpack_from("<Hh", s) for s in slots]
        tx.close()
        dom1.grants.end_access(pages)
        dom1.grants.end_access(foreign)
    finally:
        machine.close()

"""The loopback daemon's two GNT_COPY engines agree (``xenpv.platforms.loopback.gntcopy``):
the readable one (the request as a ``CopyPlan``) and the compiled one
(``cython/gntcopy.pyx``, which keeps the pages it was given until a grant table changes).

Two hypervisors are built alike (a copying handle of dom1; dom2's grants to it, writable,
read-only, one ended, one to another domain; dom1's own share and frames); the same
sequence of requests, with grant-table changes in between, goes to each through one
engine.  Every reply (or the error), and every live page afterwards, must be the same.
The requests are arbitrary: segments of every side kind (a grant, an own page, bytes in
the request or the reply, both flags), good and bad refs, domains, handle ids, offsets
and lengths, overlapping windows, short or padded source data, replies too large.  Each
goes either as a payload (``run``) or as a whole request message (``answer``, the
daemon's framing), framed right or not; the compiled engine may be given a small bound
on the pages it keeps, so its table starts again in the middle of a request.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import PlatformError
from xenpv.platforms.base import DOMID_SELF, PAGE_SIZE, GntSt
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.core import Handle, Hypervisor, Segment, Share, SharePtr
from xenpv.platforms.loopback.gntcopy import CopyEngineLike, copy_engine

SRC_GREF, DST_GREF = proto.GNTCOPY_source_gref, proto.GNTCOPY_dest_gref
SRC_OWN, DST_OWN = proto.GNTCOPY_source_own, proto.GNTCOPY_dest_own


class Machine:
    """One hypervisor in the shape every example starts from."""

    def __init__(self, seed: int) -> None:
        self.hv = Hypervisor(max_grants=64, max_ports=8)
        hv = self.hv
        hv.create_domain(1)
        hv.create_domain(2)
        self.h = hv.open_handle(1)
        self.h2 = hv.open_handle(2)
        self.shares: list[Share] = [
            hv.share(self.h2, 1, 3, writable=True),
            hv.share(self.h2, 1, 2, writable=False),
            hv.share(self.h2, 0, 1, writable=True),  # granted to dom0, not the copier
            hv.share(self.h2, 1, 1, writable=True),  # ended below: its ref is revoked
            hv.share(self.h, 2, 3, writable=True),  # the copier's own pages
            hv.alloc_frames(self.h, 2),  # the copier's own frames (a memfd each)
        ]
        hv.end_access(self.h2, self.shares[3].refs)
        rnd = random.Random(seed)
        for seg in self.segments():
            seg.mm[:] = rnd.randbytes(seg.npages * PAGE_SIZE)

    def segments(self) -> list[Segment]:
        """The live segments, in a fixed order."""
        out: list[Segment] = []
        for share in self.shares:
            for seg in share.segments():
                if seg.fd >= 0 and seg not in out:
                    out.append(seg)
        return out

    def memory(self) -> list[bytes]:
        """Every live page."""
        return [bytes(seg.mm) for seg in self.segments()]

    def change(self, what: int) -> None:
        """A grant-table change between requests."""
        dom2_live = not self.h2.closed
        if what == 1 and dom2_live:  # dom2 ends its writable share
            if self.shares[0].entries[0].segment.fd >= 0:
                self.hv.end_access(self.h2, self.shares[0].refs)
        elif what == 2 and dom2_live:  # dom2 grants a new page (a fresh ref)
            self.shares.append(self.hv.share(self.h2, 1, 1, writable=True))
        elif what == 3 and dom2_live:  # the copier gets a new share of its own (to dom2)
            self.shares.append(self.hv.share(self.h, 2, 2, writable=True))
        elif what == 4:  # the copier ends its own share
            own = self.shares[4]
            if not own.entries[0].freed:
                self.hv.end_access(self.h, own.refs)
        elif what == 5 and dom2_live:  # the copier maps a grant, which dom2 then revokes
            e = self.shares[1].entries[0]
            if not (e.revoking or e.freed):
                self.hv.map(self.h, [(2, e.ref)], writable=False)
                self.hv.end_access(self.h2, [e.ref], defer=True)
        elif what == 6 and dom2_live:  # dom2 dies (its grants end with it)
            self.hv.destroy_domain(2)
        elif what == 7 and not dom2_live:  # a new dom2 grants a page again
            self.hv.create_domain(2)
            self.h2 = self.hv.open_handle(2)
            self.shares.append(self.hv.share(self.h2, 1, 2, writable=True))


def engine(m: Machine, compiled: bool, max_kept: int | None = None) -> CopyEngineLike:
    if compiled and max_kept is not None:
        from xenpv.platforms.loopback import _gntcopy

        return _gntcopy.CopyEngine(m.hv, m.h, SharePtr, max_kept)
    return copy_engine(m.hv, m.h, compiled=compiled)


def refs_of(m: Machine) -> list[int]:
    return [r for s in m.shares[:4] for r in s.refs]


sides = st.sampled_from(["gref", "own", "local", "both"])
lengths = st.one_of(st.sampled_from([0, 1, 7, 100, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1,
                                     0xFFFF]), st.integers(0, PAGE_SIZE))
offsets = st.one_of(st.sampled_from([0, 1, 100, PAGE_SIZE - 1, PAGE_SIZE, 0xFFFF]),
                    st.integers(0, PAGE_SIZE))


@st.composite
def side(draw: Any) -> tuple[str, int, int, int]:
    """(kind, ref, domid, offset) as the wire carries them."""
    kind = draw(sides)
    if kind == "own":  # ref: the share's handle id, domid: the page in it
        return kind, draw(st.sampled_from([1, 1, 2, 2, 3, 0, 9])), draw(st.integers(0, 3)), \
            draw(offsets)
    ref = draw(st.one_of(st.integers(0, 20), st.sampled_from([0xFFFFFFFF, 1 << 20])))
    domid = draw(st.sampled_from([2, 2, 2, DOMID_SELF, 1, 0, 99, 0xFFFF]))
    return kind, ref, domid, draw(offsets)


@st.composite
def request(draw: Any) -> bytes:
    count = draw(st.integers(0, 16))
    segs, src_data = [], 0
    rnd = random.Random(draw(st.integers(0, 1 << 16)))
    last: tuple[Any, ...] | None = None
    for _ in range(count):
        if last is not None and draw(st.integers(0, 2)) == 0:
            # the run goes on where the last segment ended, on both sides (the engines
            # merge such segments into one copy: overlapping ones show how)
            sref, sdom, soff, dref, ddom, doff, length, flags = last
            soff, doff = soff + length, doff + length
            length = draw(st.integers(0, 200))
        else:
            (sk, sref, sdom, soff), (dk, dref, ddom, doff) = draw(side()), draw(side())
            if draw(st.integers(0, 3)) == 0:  # both sides in one page: overlaps
                dk, dref, ddom = sk, sref, sdom
            length = draw(lengths)
            flags = draw(st.sampled_from([0, 0, 0, 0x4000]))  # unknown bits change nothing
            flags |= {"gref": SRC_GREF, "own": SRC_OWN, "both": SRC_GREF | SRC_OWN}.get(sk, 0)
            flags |= {"gref": DST_GREF, "own": DST_OWN, "both": DST_GREF | DST_OWN}.get(dk, 0)
        if not flags & (SRC_GREF | SRC_OWN):
            src_data += length
        soff, doff = soff & 0xFFFF, doff & 0xFFFF
        last = (sref, sdom, soff, dref, ddom, doff, length, flags)
        segs.append(proto.COPY_SEG.pack(*last, 0))
    extra = draw(st.sampled_from([0, 0, 0, -1, 5]))  # source bytes short or padded
    data = rnd.randbytes(max(src_data + extra, 0))
    body = proto.U32x2.pack(count, 0) + b"".join(segs) + data
    cut = draw(st.sampled_from([None, None, None, None, 3, 9]))  # a truncated request
    return body[:cut] if cut is not None else body


def answer(e: CopyEngineLike, payload: bytes, framing: int = 0) -> tuple[Any, ...]:
    """What ``e`` answers to ``payload``: as a payload (framing 0), or in a request
    message (1: framed right, behind stale bytes in a larger buffer as the daemon's
    receive buffer has them; 2: another operation; 3: a length field that disagrees;
    4: a message shorter than its header)."""
    if framing == 0:
        try:
            return ("reply", bytes(e.run(payload)))
        except PlatformError as exc:
            return ("error", exc.errno, str(exc))
    op = proto.Op.GNT_COPY if framing != 2 else proto.Op.STATS
    length = len(payload) + (1 if framing == 3 else 0)
    msg = proto.REQUEST.pack(op, 0xABCD1234, length) + payload
    n = len(msg) if framing != 4 else 7
    out = e.answer(bytearray(msg) + b"stale bytes", n)
    return ("message", None if out is None else bytes(out))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(request(), st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5, 6, 7]),
                          st.sampled_from([0, 0, 1, 1, 2, 3, 4])), min_size=1, max_size=5),
       st.integers(0, 1000), st.sampled_from([None, None, 1, 2, 5]))
def test_compiled_copy_engine_matches_its_twin(steps: list[tuple[bytes, int, int]],
                                               seed: int, max_kept: int | None) -> None:
    py, cy = Machine(seed), Machine(seed)
    ep, ec = engine(py, False), engine(cy, True, max_kept)
    try:
        for payload, change, framing in steps:
            assert answer(ep, payload, framing) == answer(ec, payload, framing)
            assert py.memory() == cy.memory()
            assert ec.kept <= (max_kept or 8192)
            py.change(change)
            cy.change(change)
        assert refs_of(py) == refs_of(cy)
    finally:
        ep.release()
        ec.release()
        py.hv.close()
        cy.hv.close()


def seg(sref: int, sdom: int, soff: int, dref: int, ddom: int, doff: int, length: int,
        flags: int) -> bytes:
    return proto.COPY_SEG.pack(sref, sdom, soff, dref, ddom, doff, length, flags, 0)


def statuses(reply: bytearray) -> list[int]:
    count = proto.U32x2.unpack_from(reply)[0]
    return [proto.STATUS_I32.unpack_from(reply, 8 + 4 * i)[0] for i in range(count)]


@pytest.mark.parametrize("compiled", [False, True])
def test_copy_engines_on_named_cases(compiled: bool) -> None:
    """What each engine answers for cases worth naming: a grant copied into the reply
    and kept while nothing changes; an own window at the very end of its share (no page:
    bad_copy_arg, where the readable path once raised IndexError); an ended grant after
    a change; a closed handle."""
    m = Machine(1)
    e = engine(m, compiled)
    try:
        ref = m.shares[0].refs[1]
        page = bytes(m.shares[0].entries[1].segment.mm[PAGE_SIZE:2 * PAGE_SIZE])
        own = m.shares[4]
        req = proto.U32x2.pack(3, 0) + seg(ref, 2, 10, 0, 0, 0, 20, SRC_GREF) \
            + seg(own.handle_id, 3, 0, 0, 0, 0, 0, SRC_OWN) \
            + seg(own.handle_id, 2, PAGE_SIZE - 4, 0, 0, 0, 4, SRC_OWN)
        for _ in range(2):
            reply = e.run(req)
            assert statuses(reply) == [0, GntSt.bad_copy_arg, 0]
            tail = bytes(own.entries[2].segment.mm[3 * PAGE_SIZE - 4:3 * PAGE_SIZE])
            assert bytes(reply[20:]) == page[10:30] + tail
            # the readable engine keeps only fully successful plans, the compiled one the
            # pages it was given (the grant's, the own window's)
            assert e.kept == (2 if compiled else 0)
        # two segments contiguous on both sides within one own page, overlapping: one
        # copy of 200 bytes (memmove), not two of 100
        mem = own.entries[0].segment.mm
        before = bytes(mem[:PAGE_SIZE])
        hid = own.handle_id
        run = proto.U32x2.pack(2, 0) + seg(hid, 0, 0, hid, 0, 50, 100, SRC_OWN | DST_OWN) \
            + seg(hid, 0, 100, hid, 0, 150, 100, SRC_OWN | DST_OWN)
        assert statuses(e.run(run)) == [0, 0]
        assert bytes(mem[:PAGE_SIZE]) == before[:50] + before[:200] + before[250:]
        # a grant window ends in its page: up to the last byte, not one past it
        edge = proto.U32x2.pack(2, 0) + seg(ref, 2, PAGE_SIZE - 8, 0, 0, 0, 8, SRC_GREF) \
            + seg(ref, 2, PAGE_SIZE - 8, 0, 0, 0, 9, SRC_GREF)
        reply = e.run(edge)
        assert statuses(reply) == [0, GntSt.bad_copy_arg]
        assert bytes(reply[16:24]) == page[-8:] and bytes(reply[24:]) == bytes(9)
        m.hv.end_access(m.h2, m.shares[0].refs)
        assert statuses(e.run(req)) == [GntSt.bad_gntref, GntSt.bad_copy_arg, 0]
        m.hv.close_handle(m.h)
        with pytest.raises(PlatformError, match="handle is closed"):
            e.run(req)
    finally:
        e.release()
        m.hv.close()


def test_pure_python_switch_turns_the_copy_engine_to_its_twin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """XENPV_PURE_PYTHON=1 makes the daemon's GNT_COPY use its readable twin; otherwise
    the built extension serves."""
    from xenpv.platforms.loopback import _gntcopy, gntcopy  # built by setup.py

    monkeypatch.setenv("XENPV_PURE_PYTHON", "1")
    assert gntcopy._compiled() is None
    monkeypatch.setenv("XENPV_PURE_PYTHON", "0")
    assert gntcopy._compiled() is _gntcopy.CopyEngine
    # the choice is made at import: this run may have imported under either setting
    monkeypatch.setattr(gntcopy, "_COMPILED", gntcopy._compiled())
    hv = Hypervisor()
    try:
        h: Handle = hv.open_handle(0)
        assert isinstance(copy_engine(hv, h), _gntcopy.CopyEngine)
    finally:
        hv.close()

"""Hypothesis rule-based state machines: ring indexes against a model, both ends, both cores.

:class:`RingIndexMachine` runs a frontend and a backend of every available ring
implementation (the pure-Python reference and the compiled core, each on its own page)
through the same random steps, next to a four-integer model of ``io/ring.h``
(``req_prod_pvt``, ``req_cons``, ``rsp_prod_pvt``, ``rsp_cons``, all u32).  Start indexes
are drawn near 0, 2^31 and 2^32 so every step may wrap.  Besides the benign steps a
hostile peer may store any ``req_prod`` (attacking the backend) or ``rsp_prod`` (attacking
the frontend); the model says whether the consumer must refuse it
(``RING_REQUEST_PROD_OVERFLOW`` / ``RING_RESPONSE_PROD_OVERFLOW``, tightened as the cores
do) and, if it accepts, exactly how many entries it may see.  After a refusal the rings
are re-attached at the model's indexes (a reconnect).  After every step all pages must be
byte-identical and every private index must match the model.

Use it from a test module::

    TestRingIndexes = RingIndexMachine.TestCase
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from xenpv.errors import PeerError
from xenpv.rings import implementation

__all__ = ["RingIndexMachine"]

MASK32 = 0xFFFFFFFF
PAGE = 4096
OFF_REQ_PROD, OFF_RSP_PROD = 0, 8

START = st.one_of(st.just(0), st.integers(MASK32 - 40, MASK32), st.integers((1 << 31) - 40, (1 << 31) + 40),
                  st.integers(0, MASK32))


def _impls() -> list[Any]:
    out = [implementation("reference")]
    try:
        out.append(implementation("cython"))
    except ImportError:
        pass
    return out


class RingIndexMachine(RuleBasedStateMachine):
    """Front and back ring of each implementation against an io/ring.h index model."""

    def __init__(self) -> None:
        super().__init__()
        self.impls = _impls()
        self.slot = 16
        self.pages: list[bytearray] = []
        self.fronts: list[Any] = []
        self.backs: list[Any] = []
        self.n = 0
        self.req_prod_pvt = self.req_cons = self.rsp_prod_pvt = self.rsp_cons = 0
        self.counter = 0

    # -- set-up ---------------------------------------------------------------------------
    @initialize(slot=st.sampled_from([8, 12, 16, 112]), start=START)
    def attach(self, slot: int, start: int) -> None:
        """Fresh rings at ``start`` (the frontend initialises the page)."""
        self.slot = slot
        self.pages = [bytearray(PAGE) for _ in self.impls]
        self.fronts = [impl.FrontRing(p, slot, start) for impl, p in zip(self.impls, self.pages, strict=True)]
        self.backs = [impl.BackRing(p, slot, start) for impl, p in zip(self.impls, self.pages, strict=True)]
        self.n = self.fronts[0].nr_ents
        self.req_prod_pvt = self.req_cons = self.rsp_prod_pvt = self.rsp_cons = start

    def _reattach(self) -> None:
        """A reconnect after a refusal: both ends re-attach at the model's indexes."""
        for page in self.pages:
            page[OFF_REQ_PROD : OFF_REQ_PROD + 4] = self.req_prod_pvt.to_bytes(4, "little")
        self.req_cons = self.rsp_prod_pvt = self.rsp_cons = self.req_prod_pvt
        self.fronts = [impl.FrontRing(p, self.slot, self.req_prod_pvt, init=False)
                       for impl, p in zip(self.impls, self.pages, strict=True)]
        self.backs = [impl.BackRing(p, self.slot, self.req_prod_pvt)
                      for impl, p in zip(self.impls, self.pages, strict=True)]
        for page in self.pages:
            page[OFF_RSP_PROD : OFF_RSP_PROD + 4] = self.req_prod_pvt.to_bytes(4, "little")

    def _entry(self) -> bytes:
        self.counter += 1
        return self.counter.to_bytes(4, "little") * (self.slot // 4)

    # -- benign steps ---------------------------------------------------------------------
    @rule(k=st.integers(0, 40))
    def produce(self, k: int) -> None:
        """The frontend queues and pushes up to ``k`` requests."""
        free = self.n - ((self.req_prod_pvt - self.rsp_cons) & MASK32)
        k = min(k, free)
        data = b"".join(self._entry() for _ in range(k))
        for front in self.fronts:
            front.submit_requests(data)
        self.req_prod_pvt = (self.req_prod_pvt + k) & MASK32

    @rule(k=st.integers(0, 40))
    def consume(self, k: int) -> None:
        """The backend takes up to ``k`` requests."""
        avail = (self.req_prod_pvt - self.req_cons) & MASK32
        want = min(k, avail)
        got = [back.take_requests(k) for back in self.backs]
        assert all(len(g) == want * self.slot for g in got), (want, [len(g) for g in got])
        assert len(set(got)) == 1
        self.req_cons = (self.req_cons + want) & MASK32

    @rule(k=st.integers(0, 40))
    def respond(self, k: int) -> None:
        """The backend answers up to ``k`` consumed requests."""
        k = min(k, (self.req_cons - self.rsp_prod_pvt) & MASK32)
        data = b"".join(self._entry() for _ in range(k))
        for back in self.backs:
            back.submit_responses(data)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + k) & MASK32

    @rule(k=st.integers(0, 40))
    def complete(self, k: int) -> None:
        """The frontend takes up to ``k`` responses."""
        want = min(k, (self.rsp_prod_pvt - self.rsp_cons) & MASK32)
        got = [front.take_responses(k) for front in self.fronts]
        assert all(len(g) == want * self.slot for g in got)
        self.rsp_cons = (self.rsp_cons + want) & MASK32

    # -- hostile steps --------------------------------------------------------------------
    @rule(pick=st.integers(0, 6), extra=st.integers(0, 600))
    def hostile_req_prod(self, pick: int, extra: int) -> None:
        """A hostile frontend stores any req_prod: at and around the limits, or anywhere."""
        consumed_now = (self.req_cons - self.rsp_prod_pvt) & MASK32
        d = (self.n, self.n + 1, consumed_now - 1, consumed_now, extra, 1 << 31, MASK32)[pick]
        value = (self.rsp_prod_pvt + d) & MASK32
        ahead = (value - self.rsp_prod_pvt) & MASK32
        consumed = (self.req_cons - self.rsp_prod_pvt) & MASK32
        refuse = ahead > self.n or ahead < consumed
        outcomes = []
        for page, back in zip(self.pages, self.backs, strict=True):
            page[OFF_REQ_PROD : OFF_REQ_PROD + 4] = value.to_bytes(4, "little")
            try:
                outcomes.append(back.unconsumed_requests())
            except PeerError:
                outcomes.append(None)
        if refuse:
            assert outcomes == [None] * len(outcomes), (value, outcomes)
            self._reattach()
        else:
            assert outcomes == [ahead - consumed] * len(outcomes), (value, outcomes)
            for page in self.pages:  # the frontend "repents": put its own index back
                page[OFF_REQ_PROD : OFF_REQ_PROD + 4] = self.req_prod_pvt.to_bytes(4, "little")

    @rule(back=st.integers(1, 40))
    def hostile_req_prod_behind(self, back: int) -> None:
        """A hostile frontend moves req_prod behind requests already consumed (scenario 2)."""
        self.produce(back)
        self.consume(back)
        consumed_now = (self.req_cons - self.rsp_prod_pvt) & MASK32
        if consumed_now:
            self.hostile_req_prod(2, 0)

    @rule(pick=st.integers(0, 5), extra=st.integers(0, 600))
    def hostile_rsp_prod(self, pick: int, extra: int) -> None:
        """A hostile backend stores any rsp_prod: at and around the limits, or anywhere."""
        outstanding = (self.req_prod_pvt - self.rsp_cons) & MASK32
        d = (outstanding, outstanding + 1, self.n + 1, extra, 1 << 31, MASK32)[pick]
        value = (self.rsp_cons + d) & MASK32
        n = (value - self.rsp_cons) & MASK32
        refuse = n > outstanding
        outcomes = []
        for page, front in zip(self.pages, self.fronts, strict=True):
            page[OFF_RSP_PROD : OFF_RSP_PROD + 4] = value.to_bytes(4, "little")
            try:
                outcomes.append(front.unconsumed_responses())
            except PeerError:
                outcomes.append(None)
        if refuse:
            assert outcomes == [None] * len(outcomes), (value, outcomes)
            self._reattach()
        else:
            assert outcomes == [n] * len(outcomes), (value, outcomes)
            for page in self.pages:
                page[OFF_RSP_PROD : OFF_RSP_PROD + 4] = self.rsp_prod_pvt.to_bytes(4, "little")

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def same_pages_and_indexes(self) -> None:
        """Every implementation wrote the same bytes and agrees with the model."""
        if not self.pages:
            return
        assert all(p == self.pages[0] for p in self.pages[1:])
        for front, back in zip(self.fronts, self.backs, strict=True):
            assert (front.req_prod_pvt, front.rsp_cons) == (self.req_prod_pvt, self.rsp_cons)
            assert (back.req_cons, back.rsp_prod_pvt) == (self.req_cons, self.rsp_prod_pvt)

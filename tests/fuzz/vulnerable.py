"""A deliberately vulnerable ring backend: the fuzz harness must catch each of its bugs.

It speaks the same :class:`~xenpv.fuzz.victims.Victim` interface as xenpv's own
``RingBackend`` and reuses the protocol's ``serve``, but each factory below switches on one
classic backend bug:

* ``double_fetch``: after copying a request out of the ring it reads the request's first
  bytes from shared memory *again* to decide what to do (XSA-155 style);
* ``unchecked_index``: it trusts the frontend's ``req_prod`` and walks the slots from its
  consumer index up to it without masking or an overflow check (XSA-39 style), so a large
  producer index walks off the end of the ring memory;
* ``unbounded_queue``: it queues every request and answers only one per notification, with
  no bound on the queue (XSA-392 style).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from xenpv.errors import PeerError
from xenpv.fuzz.ringspecs import RingSpec

MASK32 = 0xFFFFFFFF
HEADER = 64


class VulnerableBackend:
    """A ring backend with the bugs named in ``bugs``."""

    def __init__(self, memory: Any, spec: RingSpec, start: int, impl: SimpleNamespace,
                 bugs: frozenset[str]) -> None:
        self.spec = spec
        self.bugs = bugs
        self.raw, self.words = memory.shared_views()
        self.nr_ents = impl.BackRing(memory, spec.slot_size, start).nr_ents
        self.start = start & MASK32
        self.req_cons = start & MASK32
        self.rsp_prod = start & MASK32
        self.queue: list[bytes] = []
        self.misbehaving = False
        self.queue_bound = self.nr_ents

    def _slot(self, idx: int) -> int:
        if "unchecked_index" in self.bugs:
            # Bug: the index is taken relative to the start and never masked.
            return HEADER + ((idx - self.start) & MASK32) * self.spec.slot_size
        return HEADER + (idx & (self.nr_ents - 1)) * self.spec.slot_size

    def service(self) -> int:
        """Consume requests (the buggy way) and answer them."""
        if self.misbehaving:
            return 0
        prod = self.words[0]
        avail = (prod - self.req_cons) & MASK32
        if "unchecked_index" not in self.bugs and avail > self.nr_ents:
            self.misbehaving = True
            raise PeerError(f"req_prod {prod} beyond the ring")
        size = self.spec.slot_size
        taken = 0
        while self.req_cons != prod and taken < (avail if "unchecked_index" in self.bugs else self.nr_ents):
            at = self._slot(self.req_cons)
            slot = self.raw[at : at + size]
            if "double_fetch" in self.bugs:
                # Bug: look at the operation again in shared memory instead of the copy.
                slot = self.raw[at : at + 1] + slot[1:]
            self.queue.append(slot)
            self.req_cons = (self.req_cons + 1) & MASK32
            taken += 1
        answer = self.queue[:1] if "unbounded_queue" in self.bugs else self.queue
        result = self.spec.serve(answer)
        del self.queue[: len(answer) - result.pending]
        for rsp in result.responses:
            at = HEADER + (self.rsp_prod & (self.nr_ents - 1)) * size
            self.raw[at : at + size] = rsp + bytes(size - len(rsp))
            self.rsp_prod = (self.rsp_prod + 1) & MASK32
        self.words[2] = self.rsp_prod
        return min(taken, self.nr_ents)

    def queued(self) -> int:
        """Requests held."""
        return len(self.queue)

    def close(self) -> None:
        """Nothing to release."""


def double_fetch(memory: Any, spec: RingSpec, start: int, impl: SimpleNamespace) -> VulnerableBackend:
    """A backend that re-reads each request's operation from shared memory."""
    return VulnerableBackend(memory, spec, start, impl, frozenset({"double_fetch"}))


def unchecked_index(memory: Any, spec: RingSpec, start: int, impl: SimpleNamespace) -> VulnerableBackend:
    """A backend that trusts req_prod and does not mask slot indexes."""
    return VulnerableBackend(memory, spec, start, impl, frozenset({"unchecked_index"}))


def unbounded_queue(memory: Any, spec: RingSpec, start: int, impl: SimpleNamespace) -> VulnerableBackend:
    """A backend whose request queue grows without bound."""
    return VulnerableBackend(memory, spec, start, impl, frozenset({"unbounded_queue"}))


def all_bugs(memory: Any, spec: RingSpec, start: int, impl: SimpleNamespace) -> VulnerableBackend:
    """All three bugs at once."""
    return VulnerableBackend(memory, spec, start, impl,
                             frozenset({"double_fetch", "unchecked_index", "unbounded_queue"}))


class DoubleFetchFrontend:
    """A frontend that checks a response's id in its copy, then uses the id it re-reads
    from shared memory (the XSA-155 bug on the frontend side, scenario 12)."""

    def __init__(self, memory: Any, spec: RingSpec, start: int, impl: SimpleNamespace) -> None:
        from xenpv.fuzz.victims import RingFrontend

        self.inner = RingFrontend(memory, spec, start, impl)
        self.raw, _words = memory.shared_views()
        self.queue_bound = self.inner.queue_bound

    @property
    def misbehaving(self) -> bool:
        """The wrapped frontend's verdict."""
        return self.inner.misbehaving

    def submit(self, count: int, src: Any) -> int:
        """Issue requests as the honest frontend does."""
        return self.inner.submit(count, src)

    def service(self) -> int:
        """Consume responses, re-reading each id from its slot (the bug)."""
        ring = self.inner.ring
        first = ring.rsp_cons
        n = self.inner.service()
        size = self.inner.spec.slot_size
        for k in range(n):
            at = HEADER + ((first + k) & (self.inner.nr_ents - 1)) * size
            self.raw[at : at + self.inner.spec.id_bytes]  # Bug: a second fetch of the id
        return n

    def queued(self) -> int:
        """Requests outstanding."""
        return self.inner.queued()

    def close(self) -> None:
        """Let go of the ring."""
        self.inner.close()


def double_fetch_frontend(memory: Any, spec: RingSpec, start: int,
                          impl: SimpleNamespace) -> DoubleFetchFrontend:
    """A frontend that re-reads response ids from shared memory."""
    return DoubleFetchFrontend(memory, spec, start, impl)

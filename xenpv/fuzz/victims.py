"""Sans-IO ring drivers the hostile peers attack by default (any object with this API will do).

Theory of operation
-------------------
A fuzz target never hard-codes what it attacks: it takes a *victim factory*, a callable
``factory(memory, spec, start, impl) -> victim``.  The victims here are the smallest
honest drivers that can be built from ``xenpv.rings`` and ``xenpv.protocols``:

* :class:`RingBackend` consumes requests (``BackRing.take_requests``: each slot is copied
  out once, R1), answers each with :attr:`RingSpec.serve`, bounds its work to one ring's
  worth of requests per :meth:`~RingBackend.service` call (R3) and, after the first
  :class:`~xenpv.errors.PeerError`, stays failed without touching the ring again (R4).
* :class:`RingFrontend` issues valid requests with ids unique among the outstanding ones,
  and accepts a response only for an outstanding id, exactly once (R6, scenario 11).

Any other driver (a vulnerable example in the tests, a future blkback) plugs in through
the same small interface (:class:`Victim`): ``service()``, ``misbehaving``, ``queued()``,
``queue_bound``, ``close()``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

from xenpv.errors import PeerError
from xenpv.fuzz.ringspecs import RingSpec
from xenpv.fuzz.source import ByteSource
from xenpv.protocols import ProtocolError

__all__ = ["RingBackend", "RingFrontend", "Victim", "VictimFactory"]


@runtime_checkable
class Victim(Protocol):
    """What a hostile ring peer needs from the driver it attacks."""

    misbehaving: bool
    queue_bound: int

    def service(self) -> int:
        """Handle what the peer published (one notification's worth); returns items handled."""
        ...

    def queued(self) -> int:
        """Items the victim holds on behalf of the peer (must stay <= ``queue_bound``)."""
        ...

    def close(self) -> None:
        """Tear down (idempotent)."""
        ...


VictimFactory = Callable[[Any, RingSpec, int, SimpleNamespace], Any]


class RingBackend:
    """A backend serving one ring of ``spec`` in ``memory`` (attached at index ``start``)."""

    def __init__(self, memory: Any, spec: RingSpec, start: int, impl: SimpleNamespace) -> None:
        self.spec = spec
        self.ring = impl.BackRing(memory, spec.slot_size, start)
        self.nr_ents: int = self.ring.nr_ents
        self.pending: list[bytes] = []
        self.misbehaving = False
        self.error: str | None = None
        self.handled = 0
        self.queue_bound = spec.max_pending
        self.notifications = 0

    def service(self) -> int:
        """Consume at most one ring's worth of requests and answer them; returns requests."""
        if self.misbehaving:
            return 0  # R4: fail closed and stay failed
        try:
            return self._service()
        except PeerError as e:
            self.misbehaving = True
            self.error = str(e)
            self.pending.clear()  # nothing more is answered: drop what the peer queued
            raise

    def _service(self) -> int:
        ring = self.ring
        free = self.nr_ents - len(self.pending)
        batch = ring.take_requests(free)  # one load of req_prod, each slot copied once
        size = self.spec.slot_size
        slots = [batch[k : k + size] for k in range(0, len(batch), size)]
        self.pending.extend(slots)
        result = self.spec.serve(self.pending)
        if result.pending > self.queue_bound:
            raise ProtocolError(f"{result.pending} request slots pending (bound {self.queue_bound})")
        answered = len(self.pending) - result.pending
        self.pending = self.pending[answered:]
        if result.responses:
            ring.put_responses(b"".join(result.responses))
            if ring.push_responses_and_check_notify():
                self.notifications += 1
        self.handled += len(slots)
        return len(slots)

    def queued(self) -> int:
        """Request slots taken but not answered yet."""
        return len(self.pending)

    def close(self) -> None:
        """Let go of the ring."""
        self.ring.release()


class RingFrontend:
    """A frontend issuing requests on one ring of ``spec`` and checking the responses."""

    def __init__(self, memory: Any, spec: RingSpec, start: int, impl: SimpleNamespace) -> None:
        self.spec = spec
        self.ring = impl.FrontRing(memory, spec.slot_size, start)
        self.nr_ents: int = self.ring.nr_ents
        self.outstanding: dict[int, bytes] = {}
        self.misbehaving = False
        self.error: str | None = None
        self.completed = 0
        self.queue_bound = self.nr_ents
        self._next_id = 0
        self._id_mask = (1 << (8 * spec.id_bytes)) - 1

    def submit(self, count: int, src: ByteSource) -> int:
        """Queue and push up to ``count`` valid requests with fresh ids; returns how many."""
        if self.misbehaving:
            return 0
        done = 0
        while done < count and self.ring.free_requests() > 0:
            rid = self._next_id
            while rid in self.outstanding:
                rid = (rid + 1) & self._id_mask
            self._next_id = (rid + 1) & self._id_mask
            req = self.spec.build_request(rid, src)
            self.ring.put_request(req)
            self.outstanding[rid] = req
            done += 1
        if done:
            self.ring.push_requests_and_check_notify()
        return done

    def service(self) -> int:
        """Consume the responses the backend published; returns responses handled."""
        if self.misbehaving:
            return 0
        try:
            return self._service()
        except PeerError as e:
            self.misbehaving = True
            self.error = str(e)
            raise

    def _service(self) -> int:
        batch = self.ring.take_responses()  # one load of rsp_prod, each slot copied once
        size = self.spec.slot_size
        n = 0
        for k in range(0, len(batch), size):
            rsp = batch[k : k + size]
            rid = self.spec.response_id(rsp)
            req = self.outstanding.pop(rid, None)
            if req is None:
                raise ProtocolError(f"{self.spec.name}: response id {rid} is not outstanding")
            self.spec.check_response(rsp, req)
            n += 1
        self.completed += n
        return n

    def queued(self) -> int:
        """Requests outstanding."""
        return len(self.outstanding)

    def close(self) -> None:
        """Let go of the ring."""
        self.ring.release()

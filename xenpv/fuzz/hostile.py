"""Hostile ring peers: a frontend and a backend that do everything the protocol forbids.

Theory of operation
-------------------
A hostile peer shares one :class:`~xenpv.fuzz.memory.InstrumentedMemory` with its victim
and writes it directly (``poke``): slots, indexes, event fields, padding.  It reads a fuzz
input as a list of operations (:class:`~xenpv.fuzz.source.ByteSource`): valid requests
built with ``xenpv.protocols``, valid-but-nasty ones, random slot bytes, replays of an
earlier slot, producer indexes beyond the ring (``cons + N + k``, ``±2^31``,
``0xFFFFFFFF``), backwards indexes, racing indexes and racing slot fields (a new value on
every read), byte flips anywhere, notification storms, and "service" steps where the victim
handles what it was given.

After every service step :meth:`HostilePeer.service` checks the invariant of
hostile-inputs.md (R1, R3, R4, R11) mechanically:

* only a :class:`~xenpv.errors.PeerError` may escape the victim (anything else, including
  an ``IndexError`` from an access outside the shared memory, is a violation);
* no byte of the slot area was read more than once in one service call (single fetch),
  and the peer's producer index at most twice (one snapshot plus the re-arm check);
* at most one ring's worth of entries handled, and a bounded number of accesses;
* the victim's queues stay within their bound;
* once misbehaving, the victim does not read the slots again (fail closed).

A violation raises :class:`InvariantViolation`, the one failure the fuzz runner records.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from xenpv.errors import PeerError
from xenpv.fuzz.memory import InstrumentedMemory
from xenpv.fuzz.ringspecs import RingSpec
from xenpv.fuzz.source import ByteSource
from xenpv.rings import _reference

__all__ = ["HostileBackend", "HostileFrontend", "HostilePeer", "InvariantViolation", "finish"]

MASK32 = 0xFFFFFFFF
HEADER = 64
OFF_REQ_PROD, OFF_REQ_EVENT, OFF_RSP_PROD, OFF_RSP_EVENT = 0, 4, 8, 12
#: Operations per input (bounds the work of one fuzz run).
MAX_OPS = 96

REFERENCE = SimpleNamespace(
    name="reference", FrontRing=_reference.FrontRing, BackRing=_reference.BackRing,
    ByteRing=_reference.ByteRing)


class InvariantViolation(AssertionError):
    """Hostile input made the victim do something other than raise a PeerError."""


def violation(what: str, exc: BaseException | None = None) -> InvariantViolation:
    """An :class:`InvariantViolation` describing ``what`` (with the traceback of ``exc``)."""
    if exc is not None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
        return InvariantViolation(f"{what}: {type(exc).__name__}: {exc}\n{tb}")
    return InvariantViolation(what)


def finish(mem: InstrumentedMemory, service: Callable[[], None], victim: Any) -> None:
    """End a run: stop the races, one last service pass, then close the victim twice (R13)."""
    mem.clear_races()
    service()
    try:
        victim.close()
        victim.close()
    except Exception as e:
        raise violation("teardown failed", e) from None
    mem.clear_log()


def start_index(src: ByteSource) -> int:
    """A ring start index: 0, near 2^31, near 2^32 or anything (peers need not start at 0)."""
    kind = src.below(5)
    if kind == 0:
        return 0
    if kind == 1:
        return (1 << 31) - 1 - src.below(64)
    if kind == 2:
        return MASK32 - src.below(64)
    if kind == 3:
        return (1 << 32) - 2
    return src.u32()


def nasty_index(src: ByteSource, cons: int, n: int) -> int:
    """A producer index chosen to break a consumer (scenarios 1, 2, 10), as a u32."""
    return _nasty_index(src, cons, n) & MASK32


def _nasty_index(src: ByteSource, cons: int, n: int) -> int:
    kind = src.below(8)
    if kind == 0:
        return cons + n + 1 + src.below(64)  # RING_*_PROD_OVERFLOW
    if kind == 1:
        return cons + (1 << 31)
    if kind == 2:
        return cons - (1 << 31)
    if kind == 3:
        return MASK32
    if kind == 4:
        return cons - 1 - src.below(n)  # backwards
    if kind == 5:
        return cons + n  # exactly full
    if kind == 6:
        return cons + src.below(n + 1)
    return src.u32()


class HostilePeer:
    """Common part of both hostile peers: memory, geometry, victim, invariant checks."""

    #: Offset of the index the hostile peer produces, and of the one the victim produces.
    PEER_PROD = OFF_REQ_PROD
    VICTIM_PROD = OFF_RSP_PROD

    def __init__(self, spec: RingSpec, factory: Any, src: ByteSource,
                 impl: SimpleNamespace = REFERENCE) -> None:
        self.spec = spec
        self.src = src
        pages = 2 if spec.slot_size > 64 and src.boolean() else 1
        self.start = start_index(src)
        self.mem = InstrumentedMemory(pages * 4096)
        self.nr_ents = _reference.ring_size(pages * 4096, spec.slot_size)
        self.slot_bytes = self.nr_ents * spec.slot_size
        self.init_header()
        try:
            self.victim = factory(self.mem, spec, self.start, impl)
        except Exception as e:
            raise violation("the victim failed to attach", e) from None
        self.prod = self.start  # the hostile peer's private producer index
        self.written: list[bytes] = []
        self.peer_errors = 0
        #: Peer actions so far: operations played plus entries written (the benchmark's unit).
        self.ops = 0

    def init_header(self) -> None:
        """Set up the shared header as the frontend would (indexes at ``start``)."""
        for off in (OFF_REQ_PROD, OFF_RSP_PROD):
            self.mem.poke_u32(off, self.start)
        for off in (OFF_REQ_EVENT, OFF_RSP_EVENT):
            self.mem.poke_u32(off, self.start + 1)

    def slot_offset(self, idx: int) -> int:
        """Byte offset of the slot of ring index ``idx``."""
        return HEADER + (idx & (self.nr_ents - 1)) * self.spec.slot_size

    def put(self, data: bytes) -> None:
        """Write one entry into the next slot (not published yet)."""
        entry = data[: self.spec.slot_size]
        self.mem.poke(self.slot_offset(self.prod), entry + bytes(self.spec.slot_size - len(entry)))
        self.written.append(entry)
        self.ops += 1
        if len(self.written) > 64:
            del self.written[:32]
        self.prod = (self.prod + 1) & MASK32

    def publish(self, value: int | None = None) -> None:
        """Store the producer index (the private one, or any value)."""
        self.mem.poke_u32(self.PEER_PROD, self.prod if value is None else value)

    # -- the invariant -------------------------------------------------------------------
    def service(self) -> None:
        """Let the victim handle what was published, then check the invariant."""
        mem, victim = self.mem, self.victim
        was_bad = bool(victim.misbehaving)
        mark = mem.mark()
        mem.limit(16 + 4 * self.nr_ents)
        try:
            handled = victim.service()
        except PeerError:
            self.peer_errors += 1
            handled = 0
            if not victim.misbehaving:
                raise violation("the victim raised a PeerError but did not mark the peer bad") from None
        except Exception as e:
            raise violation("the victim raised something other than a PeerError", e) from None
        finally:
            mem.limit(None)
        self.check(mark, handled, was_bad)

    def check(self, mark: int, handled: int, was_bad: bool) -> None:
        """The mechanical invariant checks over the accesses since ``mark``."""
        mem, n = self.mem, self.nr_ents
        if not isinstance(handled, int) or handled > n:
            raise violation(f"one service call handled {handled} entries of a {n}-slot ring (R3)")
        fetches = mem.fetches_over(HEADER, self.slot_bytes, mark)
        if fetches > 1:
            raise violation(f"a slot byte was read {fetches} times in one service call (R1 double fetch)")
        prod_reads = mem.read_count(self.PEER_PROD, 4, mark)
        if prod_reads > 2:
            raise violation(f"the peer's producer index was read {prod_reads} times in one pass (R1)")
        accesses = len(mem.log) - mark
        if accesses > 16 + 4 * n:
            raise violation(f"{accesses} shared-memory accesses in one service call (R3)")
        if was_bad and mem.read_count(HEADER, self.slot_bytes, mark):
            raise violation("the victim read the slots again after marking the peer bad (R4)")
        queued, bound = self.victim.queued(), self.victim.queue_bound
        if queued > bound:
            raise violation(f"the victim holds {queued} items for the peer (bound {bound}, R11)")

    def finish(self) -> None:
        """Stop every race, give the victim a last pass, and tear it down twice (R13)."""
        finish(self.mem, self.service, self.victim)

    def flip(self) -> None:
        """Overwrite one byte anywhere in the ring memory."""
        off = self.src.below(min(len(self.mem), HEADER + self.slot_bytes + 8))
        self.mem.poke(off, bytes((self.src.u8(),)))

    def race_index(self, offset: int) -> None:
        """Make a shared index take a new value on every read (scenario 2)."""
        values = [nasty_index(self.src, self.prod, self.nr_ents) & MASK32 for _ in range(3)]
        values.append(self.prod)
        encoded = [v.to_bytes(4, "little") for v in values]
        self.mem.race_cycle(offset, encoded)

    def race_slot(self, idx: int) -> None:
        """Make the bytes of the slot of ``idx`` change on every read (scenarios 3, 12)."""
        size = self.spec.slot_size
        base = self.mem.peek(self.slot_offset(idx), size)
        alts = [base]
        for _ in range(2):
            noise = bytearray(base)
            for _ in range(1 + self.src.below(8)):
                noise[self.src.below(size)] = self.src.u8()
            alts.append(bytes(noise))
        self.mem.race_cycle(self.slot_offset(idx), alts)


class HostileFrontend(HostilePeer):
    """A frontend attacking a backend victim (scenarios 1-4, 9)."""

    PEER_PROD = OFF_REQ_PROD
    VICTIM_PROD = OFF_RSP_PROD

    def run(self) -> None:
        """Play the operation list of the input, then finish."""
        src, spec, n = self.src, self.spec, self.nr_ents
        ids = 0
        for _ in range(MAX_OPS):
            if src.remaining <= 0:
                break
            self.ops += 1
            op = src.below(11)
            if op == 0:  # valid requests
                for _ in range(1 + src.below(n)):
                    self.put(spec.build_request(ids, src))
                    ids += 1
                self.publish()
            elif op == 1:  # valid-but-nasty request
                self.put(spec.build_nasty(src.u16(), src))
                self.publish()
            elif op == 2:  # random slot bytes
                self.put(src.take(spec.slot_size))
                self.publish()
            elif op == 3:  # insane producer index
                self.publish(nasty_index(src, self.victim_cons(), n) & MASK32)
            elif op == 4:
                self.race_index(OFF_REQ_PROD)
            elif op == 5:
                self.race_slot(self.victim_cons() + src.below(2))
            elif op == 6 and self.written:  # replay an earlier request (same id)
                self.put(src.choice(self.written))
                self.publish()
            elif op == 7:
                self.flip()
            elif op == 9:  # storm: waves of a full ring's worth, each kicked (scenario 8)
                for _ in range(2 + src.below(3)):
                    for _ in range(n):
                        self.put(spec.build_request(ids, src))
                        ids += 1
                    self.publish()
                    self.service()
            elif op == 10:  # garbage in the backend's header fields and the padding
                self.mem.poke_u32(src.choice((OFF_REQ_EVENT, OFF_RSP_PROD, OFF_RSP_EVENT, 16, 60)),
                                  src.u32())
            else:
                self.service()
        self.finish()

    def victim_cons(self) -> int:
        """Best guess of the victim's consumer index: what it answered (rsp_prod)."""
        return self.mem.peek_u32(OFF_RSP_PROD)


class HostileBackend(HostilePeer):
    """A backend attacking a frontend victim (scenarios 10-12)."""

    PEER_PROD = OFF_RSP_PROD
    VICTIM_PROD = OFF_REQ_PROD

    def init_header(self) -> None:
        """The frontend victim initialises the header itself."""

    def run(self) -> None:
        """Play the operation list of the input, then finish."""
        src, spec, n = self.src, self.spec, self.nr_ents
        submit = getattr(self.victim, "submit", None)
        req_cons = self.start
        for _ in range(MAX_OPS):
            if src.remaining <= 0:
                break
            self.ops += 1
            op = src.below(10)
            if op == 0 and submit is not None:  # the victim issues requests
                submit(1 + src.below(n), src)
            elif op == 1:  # benign answers to every published request
                req_prod = self.mem.peek_u32(OFF_REQ_PROD)
                while (req_prod - req_cons) & MASK32 and ((req_prod - req_cons) & MASK32) <= n:
                    req = self.mem.peek(self.slot_offset(req_cons), spec.slot_size)
                    req_cons = (req_cons + 1) & MASK32
                    self.put(spec.build_response(req, src))
                self.publish()
            elif op == 2 and self.written:  # duplicate / replayed response
                self.put(src.choice(self.written))
                self.publish()
            elif op == 3:  # random response bytes (unknown id, bad status)
                self.put(src.take(spec.slot_size))
                self.publish()
            elif op == 4:
                self.publish(nasty_index(src, self.prod, n) & MASK32)
            elif op == 5:
                self.race_index(OFF_RSP_PROD)
            elif op == 6:
                self.race_slot(self.prod - 1 - src.below(2))
            elif op == 7:
                self.flip()
            else:
                self.service()
        self.finish()

"""Hostile producers on byte rings: console, xenstore ring, vchan, keyboard events.

Theory of operation
-------------------
A :class:`ByteRingSpec` places one direction of a byte (or fixed-unit) ring in a shared
page exactly as its protocol does (``io/console.h``, ``io/xs_wire.h`` ring page, vchan's
in-page ring of order 10, the kbdif in-ring of 51 40-byte events) and names what the
consuming driver does with the bytes: the console keeps a bounded log, the xenstore server
decodes messages and dispatches them to the embedded store (as an unprivileged domain),
vchan keeps a bounded receive buffer, the keyboard frontend decodes and validates events.

:class:`ByteRingVictim` is that consumer on ``xenpv.rings.ByteRing``;
:class:`HostileProducer` writes the ring: valid units, random units, insane producer
indexes, racing indexes and data, byte flips.  The invariant checks are those of
:class:`~xenpv.fuzz.hostile.HostilePeer` (single fetch over the data area, bounded work,
bounded buffers, only PeerError).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from xenpv.errors import PeerError
from xenpv.fuzz.hostile import (
    MASK32,
    MAX_OPS,
    REFERENCE,
    InvariantViolation,
    finish,
    nasty_index,
    start_index,
    violation,
)
from xenpv.fuzz.memory import InstrumentedMemory
from xenpv.fuzz.source import ByteSource
from xenpv.protocols import ProtocolError, console, kbdif, vchan, xsring
from xenpv.xenstore import wire
from xenpv.xenstore.store import Store

__all__ = ["BYTE_RING_SPECS", "ByteRingSpec", "ByteRingVictim", "HostileProducer"]


class _Sink:
    """What a consumer does with the bytes it read (a per-protocol driver core)."""

    bound = 0

    def feed(self, data: bytes) -> None:
        """Consume bytes; PeerError on a protocol violation."""

    def held(self) -> int:
        """Bytes or items held (must stay within :attr:`bound`)."""
        return 0


class _BoundedLog(_Sink):
    """Console/vchan receiver: keeps at most ``bound`` bytes, discards the oldest (R11)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.buf = bytearray()
        self.discarded = 0

    def feed(self, data: bytes) -> None:
        self.buf += data
        extra = len(self.buf) - self.bound
        if extra > 0:
            del self.buf[:extra]
            self.discarded += extra

    def held(self) -> int:
        return len(self.buf)


class _XenstoreServerSink(_Sink):
    """The embedded xenstored reading a guest's request ring (domain 5)."""

    bound = 2 * (wire.HEADER_SIZE + wire.PAYLOAD_MAX)

    def __init__(self) -> None:
        self.store = Store()
        self.store.introduce_domain(5)
        self.conn = self.store.connect(5)
        self.decoder = wire.Decoder()
        self.replies = 0

    def feed(self, data: bytes) -> None:
        self.decoder.feed(data)
        for msg in self.decoder:  # WireError (a PeerError) on a bad header
            reply = self.store.handle(self.conn, msg.type, msg.req_id, msg.tx_id, msg.payload)
            if len(reply) > wire.HEADER_SIZE + wire.PAYLOAD_MAX:
                raise InvariantViolation(f"xenstore reply of {len(reply)} bytes")
            self.replies += 1
            self.conn.events.clear()
        problems = self.store.check()
        if problems:
            raise InvariantViolation(f"xenstore accounting broken: {problems[:3]}")

    def held(self) -> int:
        return self.decoder.buffered


class _XenstoreClientSink(_Sink):
    """A guest's xenstore client reading replies and watch events from the response ring."""

    bound = 2 * (wire.HEADER_SIZE + wire.PAYLOAD_MAX)

    def __init__(self) -> None:
        self.decoder = wire.Decoder()
        self.messages = 0

    def feed(self, data: bytes) -> None:
        self.decoder.feed(data)
        for _msg in self.decoder:  # WireError (a PeerError) on a length beyond 4096
            self.messages += 1

    def held(self) -> int:
        return self.decoder.buffered


class _KbdSink(_Sink):
    """The keyboard frontend: decode each 40-byte event once, drop invalid ones."""

    bound = 0

    def __init__(self) -> None:
        self.events = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        size = kbdif.XENKBD_IN_EVENT_SIZE
        for k in range(0, len(data) - size + 1, size):
            ev = kbdif.parse_in_event(data, k)
            try:
                kbdif.validate_in_event(ev)
                self.events += 1
            except ProtocolError:
                self.dropped += 1  # scenario 28: clamp or drop, never act on it


@dataclass(frozen=True)
class ByteRingSpec:
    """One byte-ring direction as laid out by its protocol, and its consumer."""

    name: str
    description: str
    data_offset: int
    size: int
    prod_offset: int
    cons_offset: int
    slot: int
    on_insane: str
    sink: Callable[[], _Sink]
    #: Valid units a benign producer writes (the source picks them).
    valid: Callable[[ByteSource], bytes]
    page_size: int = 4096


def _xs_valid(src: ByteSource) -> bytes:
    path = b"/local/domain/5/" + bytes(0x61 + src.below(4) for _ in range(1 + src.below(6)))
    kind = src.below(4)
    if kind == 0:
        return wire.encode(wire.XsType.WRITE, src.u8(), 0, path + b"\0" + src.take(src.below(16)))
    if kind == 1:
        return wire.encode(wire.XsType.READ, src.u8(), 0, path + b"\0")
    if kind == 2:
        return wire.encode(wire.XsType.WATCH, src.u8(), 0, path + b"\0tok\0")
    return wire.encode(src.below(30), src.u32(), src.below(3), src.take(src.below(24)))


def _kbd_valid(src: ByteSource) -> bytes:
    kind = src.below(3)
    if kind == 0:
        return kbdif.Key(kbdif.XENKBD_TYPE_KEY, src.below(2), src.below(256)).pack()
    if kind == 1:
        return kbdif.Position(kbdif.XENKBD_TYPE_POS, src.below(900), src.below(700), 0).pack()
    return kbdif.Motion(kbdif.XENKBD_TYPE_MOTION, src.u8() - 128, src.u8() - 128, 0).pack()


_VCHAN_LEFT = vchan.VCHAN_IN_PAGE_OFFSETS[10]

BYTE_RING_SPECS: dict[str, ByteRingSpec] = {
    s.name: s
    for s in (
        ByteRingSpec("console", "guest console output ring (io/console.h) into a bounded log",
                     console.XENCONS_OUT_OFFSET, console.XENCONS_OUT_SIZE,
                     console.XENCONS_OUT_PROD_OFFSET, console.XENCONS_OUT_CONS_OFFSET, 1, "zero",
                     lambda: _BoundedLog(8192), lambda src: src.take(1 + src.below(300))),
        ByteRingSpec("xenstore", "xenstore request ring (io/xs_wire.h) into the embedded server",
                     xsring.XS_REQ_OFFSET, xsring.XENSTORE_RING_SIZE, xsring.XS_REQ_PROD_OFFSET,
                     xsring.XS_REQ_CONS_OFFSET, 1, "error", _XenstoreServerSink, _xs_valid),
        ByteRingSpec("console-in", "guest console input ring (io/console.h) written by a hostile backend",
                     console.XENCONS_IN_OFFSET, console.XENCONS_IN_SIZE,
                     console.XENCONS_IN_PROD_OFFSET, console.XENCONS_IN_CONS_OFFSET, 1, "zero",
                     lambda: _BoundedLog(4096), lambda src: src.take(1 + src.below(200))),
        ByteRingSpec("xenstore-rsp", "xenstore response ring (io/xs_wire.h) read by a guest's client",
                     xsring.XS_RSP_OFFSET, xsring.XENSTORE_RING_SIZE, xsring.XS_RSP_PROD_OFFSET,
                     xsring.XS_RSP_CONS_OFFSET, 1, "error", _XenstoreClientSink, _xs_valid),
        ByteRingSpec("vchan", "vchan in-page ring of order 10 (libxenvchan) into a bounded buffer",
                     _VCHAN_LEFT, 1 << 10, vchan.VCHAN_LEFT_PROD_OFFSET,
                     vchan.VCHAN_LEFT_CONS_OFFSET, 1, "zero",
                     lambda: _BoundedLog(1 << 16), lambda src: src.take(1 + src.below(600))),
        ByteRingSpec("kbd", "keyboard/pointer in-ring of 51 events (io/kbdif.h)",
                     kbdif.XENKBD_IN_RING_OFFS, kbdif.XENKBD_IN_RING_LEN, 4, 0,
                     kbdif.XENKBD_IN_EVENT_SIZE, "zero", _KbdSink, _kbd_valid),
    )
}


class ByteRingVictim:
    """The consumer of one byte ring: reads what is available and feeds its sink."""

    def __init__(self, memory: Any, spec: ByteRingSpec, impl: SimpleNamespace) -> None:
        self.spec = spec
        self.ring = impl.ByteRing(memory, data_offset=spec.data_offset, size=spec.size,
                                  prod_offset=spec.prod_offset, cons_offset=spec.cons_offset,
                                  slot=spec.slot, on_insane=spec.on_insane)
        self.sink = spec.sink()
        self.queue_bound = self.sink.bound
        self.misbehaving = False

    def service(self) -> int:
        """Read one ring's worth at most; returns units read."""
        if self.misbehaving:
            return 0
        try:
            data = self.ring.read()
            self.sink.feed(data)
        except PeerError:
            self.misbehaving = True
            raise
        return len(data) // self.spec.slot

    def queued(self) -> int:
        """What the sink holds."""
        return self.sink.held()

    def close(self) -> None:
        """Let go of the ring."""
        self.ring.release()


class HostileProducer:
    """A peer producing into a byte ring everything the protocol forbids."""

    def __init__(self, spec: ByteRingSpec, factory: Callable[..., Any], src: ByteSource,
                 impl: SimpleNamespace = REFERENCE) -> None:
        self.spec = spec
        self.src = src
        self.mem = InstrumentedMemory(spec.page_size)
        self.prod = start_index(src)
        self.mem.poke_u32(spec.prod_offset, self.prod)
        self.mem.poke_u32(spec.cons_offset, self.prod)
        try:
            self.victim = factory(self.mem, spec, impl)
        except Exception as e:
            raise violation("the victim failed to attach", e) from None
        self.data_bytes = spec.size * spec.slot
        #: Peer actions so far: operations played (the benchmark's unit).
        self.ops = 0

    def cons(self) -> int:
        """The consumer's shared index (as the peer sees it)."""
        return self.mem.peek_u32(self.spec.cons_offset)

    def write(self, data: bytes) -> None:
        """Produce whole units (as many as fit), then publish the producer index."""
        spec = self.spec
        free = spec.size - ((self.prod - self.cons()) & MASK32)
        units = min(max(free, 0), len(data) // spec.slot)
        for k in range(units):
            at = spec.data_offset + ((self.prod & MASK32) % spec.size) * spec.slot
            self.mem.poke(at, data[k * spec.slot : (k + 1) * spec.slot])
            self.prod = (self.prod + 1) & MASK32
        self.mem.poke_u32(spec.prod_offset, self.prod)

    def service(self) -> None:
        """Let the consumer run once and check the invariant."""
        mem, victim, spec = self.mem, self.victim, self.spec
        was_bad = victim.misbehaving
        cons_before = self.cons()
        mark = mem.mark()
        mem.limit(16 + 2 * spec.size)
        try:
            units = victim.service()
        except PeerError:
            units = 0
            if not victim.misbehaving:
                raise violation("a PeerError without marking the peer bad") from None
        except InvariantViolation:
            raise
        except Exception as e:
            raise violation("the consumer raised something other than a PeerError", e) from None
        finally:
            mem.limit(None)
        if units > spec.size:
            raise violation(f"{units} units read from a ring of {spec.size} (R3)")
        fetches = mem.fetches_over(spec.data_offset, self.data_bytes, mark)
        # io/kbdif.h indexes a 51-slot ring with u32 % 51, which is discontinuous at the
        # 2^32 wrap (2^32 % 51 == 1): a read across it legitimately visits slot 0 twice.
        wraps_modulo = spec.size & (spec.size - 1) and cons_before + units > MASK32
        if fetches > (2 if wraps_modulo else 1):
            raise violation(f"ring data read {fetches} times in one pass (R1 double fetch)")
        if mem.read_count(spec.prod_offset, 4, mark) > 2:
            raise violation("the producer index was read more than twice in one pass (R1)")
        if was_bad and mem.read_count(spec.data_offset, self.data_bytes, mark):
            raise violation("the consumer read the ring again after marking the peer bad (R4)")
        if victim.queued() > victim.queue_bound:
            raise violation(f"the consumer holds {victim.queued()} > {victim.queue_bound} (R11)")

    def run(self) -> None:
        """Play the operation list of the input, then finish."""
        src, spec = self.src, self.spec
        for _ in range(MAX_OPS):
            if src.remaining <= 0:
                break
            self.ops += 1
            op = src.below(8)
            if op == 0:
                self.write(spec.valid(src))
            elif op == 1:
                self.write(src.take(spec.slot * (1 + src.below(spec.size))))
            elif op == 2:
                self.mem.poke_u32(spec.prod_offset, nasty_index(src, self.cons(), spec.size))
            elif op == 3:
                vals = [nasty_index(src, self.prod, spec.size).to_bytes(4, "little") for _ in range(2)]
                self.mem.race_cycle(spec.prod_offset, [*vals, self.prod.to_bytes(4, "little")])
            elif op == 4:
                at = spec.data_offset + src.below(self.data_bytes)
                self.mem.race_cycle(at, [src.take(4), src.take(4)])
            elif op == 5:
                self.mem.poke(src.below(spec.page_size), bytes((src.u8(),)))
            elif op == 6:  # the peer moves the consumer's index too
                self.mem.poke_u32(spec.cons_offset, nasty_index(src, self.prod, spec.size))
            else:
                self.service()
        finish(self.mem, self.service, self.victim)

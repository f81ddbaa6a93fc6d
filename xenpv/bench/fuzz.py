"""``xenpv bench fuzz``: hostile operations per second against benign throughput, per target.

For each instrumented in-process ring target the same driver (xenpv's sans-IO
``RingBackend`` / ``RingFrontend`` / byte-ring consumer on instrumented memory with the
reference ring) is measured twice in the same run:

* benign: a well-behaved peer keeps the ring busy with valid requests (or bytes) and the
  driver serves them;
* hostile: the hostile peer plays random operation lists (each input a fresh run, set-up
  included, with every invariant check on).

Both count *peer actions* per second: an entry written, an index published, a race or
byte flip installed, a service pass of the driver (a byte-ring write of any size is one
action).

The anchor is the benign figure; the ratio named after the target is hostile / benign
(the goal is >= 0.1).  Figures are ``hostile_ops_per_s.<target>`` and
``benign_ops_per_s.<target>``, medians of ``--rounds`` interleaved rounds (every target's
pair of measurements in turn, the pairs' order rotating between rounds).
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from collections.abc import Callable
from typing import Any

from xenpv.bench.report import Ratio, Rounds, add_rounds_option, rounds_of
from xenpv.fuzz.byterings import BYTE_RING_SPECS, ByteRingVictim, HostileProducer
from xenpv.fuzz.hostile import REFERENCE, HostileBackend, HostileFrontend
from xenpv.fuzz.memory import InstrumentedMemory
from xenpv.fuzz.ringspecs import RING_SPECS
from xenpv.fuzz.source import ByteSource
from xenpv.fuzz.victims import RingBackend, RingFrontend


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument("--quick", action="store_true", help="a very short run (smoke test)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time per measurement, over all rounds (default 1)")
    add_rounds_option(parser, 5)


def _rate(fn: Any, seconds: float) -> float:
    """Units per second of ``fn()`` (returns units done per call) over ``seconds``."""
    done = 0
    start = time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def _benign_backend(name: str) -> Any:
    spec = RING_SPECS[name]
    mem = InstrumentedMemory(4096)
    front = RingFrontend(mem, spec, 0, REFERENCE)
    back = RingBackend(mem, spec, 0, REFERENCE)
    src = ByteSource(random.Random(1).randbytes(1 << 16))

    def step() -> int:
        written = front.submit(front.ring.free_requests(), src)
        back.service()
        front.service()
        mem.clear_log()
        return written + 2  # entries written, the push, the service pass

    return step


def _benign_bytes(name: str) -> Any:
    spec = BYTE_RING_SPECS[name]
    mem = InstrumentedMemory(spec.page_size)
    victim = ByteRingVictim(mem, spec, REFERENCE)
    producer = REFERENCE.ByteRing(mem, data_offset=spec.data_offset, size=spec.size,
                                  prod_offset=spec.prod_offset, cons_offset=spec.cons_offset,
                                  slot=spec.slot, on_insane=spec.on_insane)
    src = ByteSource(random.Random(1).randbytes(1 << 16))
    data = b"".join(spec.valid(src) for _ in range(8))

    def step() -> int:
        producer.write(data)
        victim.service()
        mem.clear_log()
        return 2  # the write, the service pass

    return step


def _hostile(make: Any) -> Any:
    rng = random.Random(2)

    def step() -> int:
        peer = make(ByteSource(rng.randbytes(256)))
        peer.run()
        return int(peer.ops)

    return step


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every ring target in interleaved rounds; the ratio per target is hostile /
    benign (paired per round)."""
    rounds = rounds_of(args, 5)
    seconds = 0.05 if args.quick else args.seconds / rounds
    pairs: dict[str, tuple[Any, Any]] = {}
    for name, spec in RING_SPECS.items():
        benign = _benign_backend(name)
        for target, cls, victim in ((f"ring-backend:{name}", HostileFrontend, RingBackend),
                                    (f"ring-frontend:{name}", HostileBackend, RingFrontend)):
            pairs[target] = (benign, _hostile(lambda s, c=cls, v=victim, sp=spec: c(sp, v, s)))
    for name, bspec in BYTE_RING_SPECS.items():
        pairs[f"bytering:{name}"] = (
            _benign_bytes(name),
            _hostile(lambda s, sp=bspec: HostileProducer(sp, ByteRingVictim, s)))
    rec = Rounds("fuzz")

    def measure(target: str) -> float:
        benign, hostile = pairs[target]
        rec.add(f"benign_ops_per_s.{target}", _rate(benign, seconds))
        return _rate(hostile, seconds)

    measures: dict[str, Callable[[], float]] = {
        f"hostile_ops_per_s.{t}": functools.partial(measure, t) for t in pairs}
    rec.interleave(rounds, measures)
    ratios = {t: Ratio(f"hostile_ops_per_s.{t}", f"benign_ops_per_s.{t}", ">= 0.1")
              for t in pairs}
    units = {k: "ops/s" for k in rec.samples}
    return rec.result(units=units, ratios=ratios, placement="unpinned, one process",
                      noisy_keys=set(ratios),
                      extra={"seconds_per_measurement": seconds})

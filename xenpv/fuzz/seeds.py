"""Regression seeds for the hostile scenarios, written as scripts (the XTF one-test-per-XSA habit).

Each :class:`Seed` is a hand-written operation list for one target that plays one numbered
scenario of hostile-inputs.md, together with what the victim must have done afterwards
(``expect``: marked the peer misbehaving or not, entries handled, insane index states
counted, events dropped).  :func:`check_seed` runs the real sequence against xenpv's own
victims and asserts those results; :func:`write_seeds` serialises every seed as a
reproducer file into the corpus (``tests/fuzz/seeds/``), where CI replays it and the fuzz
engines start from it.  Regenerate with ``python -m xenpv.fuzz.seeds tests/fuzz/seeds``.

The scripts are built with :class:`Script`, which writes exactly the bytes
:class:`~xenpv.fuzz.source.ByteSource` will read back: one byte per choice among at most
256 options, four for larger ranges, zeros for "the first option".
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenpv.fuzz.byterings import BYTE_RING_SPECS, ByteRingVictim, HostileProducer
from xenpv.fuzz.hostile import HostileBackend, HostileFrontend
from xenpv.fuzz.ringspecs import RING_SPECS
from xenpv.fuzz.runner import read_reproducer, write_reproducer
from xenpv.fuzz.source import ByteSource
from xenpv.fuzz.targets import get_target
from xenpv.fuzz.victims import RingBackend, RingFrontend

__all__ = ["SEEDS", "Script", "Seed", "check_seed", "seed_path", "write_seeds"]

#: A zero-filled valid blkif request as ``_blk_request`` reads it (one segment, sector 0).
BLK_REQ = bytes(9)


class Script:
    """Builds fuzz input byte by byte."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def b(self, *values: int) -> Script:
        """One byte per value (a choice, a count, an operation code)."""
        self.buf += bytes(v & 0xFF for v in values)
        return self

    def u16(self, value: int) -> Script:
        """Two bytes, little-endian."""
        self.buf += struct.pack("<H", value & 0xFFFF)
        return self

    def u32(self, value: int) -> Script:
        """Four bytes, little-endian (also a choice among more than 256 options)."""
        self.buf += struct.pack("<I", value & 0xFFFFFFFF)
        return self

    def raw(self, data: bytes) -> Script:
        """Bytes as they are."""
        self.buf += data
        return self

    def done(self) -> bytes:
        """The input."""
        return bytes(self.buf)


@dataclass(frozen=True)
class Seed:
    """One scenario's input for one target, and what the victim must have done."""

    scenario: int
    slug: str
    target: str
    data: bytes
    expect: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """The reproducer file name in the corpus."""
        safe = self.target.replace(":", "_")
        return f"{safe}-scenario-{self.scenario:02d}-{self.slug}.repro"


def _front(*ops: int | bytes, start: tuple[int, ...] = (0,), pages: tuple[int, ...] = (0,)) -> bytes:
    s = Script().b(*pages).b(*start)
    for op in ops:
        if isinstance(op, bytes):
            s.raw(op)
        else:
            s.b(op)
    return s.done()


#: Three TX slots of 0 bytes chained by more_data (gref 8, offset 0, ids 0..2).
_ZERO_TX_CHAIN = b"".join(struct.pack("<IHHHH", 8, 0, 4 if k < 2 else 0, k, 0) for k in range(3))
_XS_BAD_LEN = struct.pack("<IIII", 2, 1, 0, 4097)
_XS_RESTRICT = struct.pack("<IIII", 20, 2, 0, 1) + b"\0"

SEEDS: list[Seed] = [
    Seed(1, "req-prod-beyond-ring", "ring-backend:blkif", _front(3, 0, 0, 8),
         {"misbehaving": True}),
    Seed(1, "req-prod-plus-2-31", "ring-backend:blkif", _front(3, 1, 8), {"misbehaving": True}),
    Seed(1, "req-prod-all-ones", "ring-backend:blkif", _front(3, 3, 8), {"misbehaving": True}),
    Seed(1, "req-prod-plus-2-31-near-wrap", "ring-backend:blkif",
         _front(3, 1, 8, start=(2, 5)), {"misbehaving": True}),
    Seed(1, "all-ones-is-fine-just-below-wrap", "ring-backend:blkif",
         _front(3, 3, 8, start=(2, 5)), {"misbehaving": False, "handled": 5}),
    Seed(2, "req-prod-backwards", "ring-backend:blkif",
         _front(0, 3, BLK_REQ * 4, 8, 3, 4, 0, 8), {"misbehaving": True, "handled": 4}),
    Seed(2, "req-prod-racing", "ring-backend:blkif",
         _front(0, 3, BLK_REQ * 4, 4, 6, 1, 6, 2, 6, 3, 8), {"misbehaving": False}),
    Seed(3, "fields-flip-after-first-read", "ring-backend:blkif",
         _front(0, 0, BLK_REQ, 5, 0, 0, 0, 5, 0, 1, 200, 8),
         {"misbehaving": False, "handled": 1, "statuses": [0]}),
    Seed(4, "nasty-block-requests", "ring-backend:blkif",
         _front(1, 7, 0, 0, 1, 1, 8, 0, 1, 0, 1, 9, 0, 2, 0, 1, 10, 0, 3, 0, 8),
         {"misbehaving": False, "handled": 4, "statuses": [-1, -1, -1, -2]}),
    Seed(6, "tx-chain-beyond-fatal-slots", "ring-backend:netif-tx",
         Script().b(0).raw(bytes([1, 7, 0, 1, 0, 4]) * 25).b(8).done(), {"misbehaving": True}),
    Seed(8, "request-storm", "ring-backend:blkif", _front(9, 0),
         {"misbehaving": False, "handled": 64}),
    Seed(9, "replayed-request-id", "ring-backend:blkif", _front(0, 0, BLK_REQ, 6, 8),
         {"misbehaving": False, "handled": 2}),
    Seed(10, "rsp-prod-beyond-ring", "ring-frontend:blkif", _front(0, 3, BLK_REQ * 4, 4, 0, 0, 8),
         {"misbehaving": True}),
    Seed(11, "duplicate-response", "ring-frontend:blkif", _front(0, 0, BLK_REQ, 1, 8, 2, 8),
         {"misbehaving": True, "completed": 1}),
    Seed(12, "response-rewritten-after-first-read", "ring-frontend:blkif",
         _front(0, 0, BLK_REQ, 1, 6, 0, 0, 8, 7, 0, 10, 0x80, 8),
         {"misbehaving": False, "completed": 1}),
    Seed(25, "length-4097-on-the-ring", "bytering:xenstore",
         Script().b(0, 1).u32(len(_XS_BAD_LEN) - 1).raw(_XS_BAD_LEN).b(7).done(),
         {"misbehaving": True}),
    Seed(25, "removed-message-type", "bytering:xenstore",
         Script().b(0, 1).u32(len(_XS_RESTRICT) - 1).raw(_XS_RESTRICT).b(7).done(),
         {"misbehaving": False, "replies": 1}),
    Seed(26, "vchan-prod-insane", "bytering:vchan", Script().b(0, 2, 1, 7).done(),
         {"misbehaving": False, "insane": True}),
    Seed(27, "console-out-prod-beyond-ring", "bytering:console", Script().b(0, 2, 0, 0, 7).done(),
         {"misbehaving": False, "insane": True}),
    Seed(28, "kbd-in-prod-beyond-ring", "bytering:kbd", Script().b(0, 2, 3, 7).done(),
         {"misbehaving": False, "insane": True}),
    Seed(28, "kbd-position-outside-screen", "bytering:kbd",
         Script().b(0, 0, 1).u32(850).u32(10).b(7).done(), {"misbehaving": False, "dropped": 1}),
    Seed(25, "wire-length-all-ones", "xenstore:wire",
         Script().b(0, 0, 15).raw(struct.pack("<IIII", 2, 1, 0, 0xFFFFFFFF)).done()),
    Seed(19, "state-99", "xenbus:machine", Script().b(1, 1, 2, 9, 1, 2, 4).done()),
    # found by `xenpv fuzz --all` with the acceptance oracles: a chain of 0-byte fragments
    Seed(6, "zero-length-packet", "parse:netif",
         Script().b(2).raw(_ZERO_TX_CHAIN).b(17).done()),
    Seed(18, "ring-ref-garbage", "xenbus:keys",
         Script().b(1, 3).raw(b"abc").b(0, 1, 2).raw(b"-1").b(0, 1, 13).raw(b"1099511627776").b(0).done()),
    # loopback:exhaustion plans: 1 = a flood (0 shares, 1 frames, 2 ports), 3 = a grant copy
    Seed(21, "descriptor-floods", "loopback:exhaustion",
         Script().b(1, 0).u32(4999).b(0, 0).b(1, 1).u32(4999).u32(0).b(1, 2).u32(1100).done()),
    Seed(5, "copy-huge-lengths", "loopback:exhaustion",
         Script().b(3).u32(5000).u16(0xFFFF).b(1, 0, 0).u16(0).b(0).done()),
]


def seed_path(directory: str | Path, seed: Seed) -> Path:
    """Where ``seed`` lives in the corpus directory."""
    return Path(directory) / seed.filename


def write_seeds(directory: str | Path) -> list[Path]:
    """Serialise every seed as a reproducer file named after its scenario."""
    out = []
    for seed in SEEDS:
        tmp = write_reproducer(directory, seed.target, seed.data)
        path = seed_path(directory, seed)
        tmp.replace(path)
        out.append(path)
    return out


def _run_peer(seed: Seed) -> Any:
    family, _, name = seed.target.partition(":")
    src = ByteSource(seed.data)
    peer: Any
    if family == "ring-backend":
        peer = HostileFrontend(RING_SPECS[name], RingBackend, src)
    elif family == "ring-frontend":
        peer = HostileBackend(RING_SPECS[name], RingFrontend, src)
    else:
        peer = HostileProducer(BYTE_RING_SPECS[name], ByteRingVictim, src)
    peer.run()
    return peer


def check_seed(seed: Seed) -> None:
    """Run the seed's real sequence and assert what the victim must have done."""
    get_target(seed.target)(seed.data)  # the invariant holds
    if not seed.expect:
        return
    peer = _run_peer(seed)
    victim, exp = peer.victim, seed.expect
    assert victim.misbehaving is exp["misbehaving"], (seed.filename, victim.misbehaving)
    if "handled" in exp:
        assert victim.handled == exp["handled"], (seed.filename, victim.handled)
    if "completed" in exp:
        assert victim.completed == exp["completed"], (seed.filename, victim.completed)
    if "statuses" in exp:
        size = peer.spec.slot_size
        got = [struct.unpack_from("<h", peer.mem.peek(64 + k * size, size), 10)[0]
               for k in range(len(exp["statuses"]))]
        assert got == exp["statuses"], (seed.filename, got)
    if exp.get("insane"):
        assert victim.ring.insane_count > 0, seed.filename
    if "dropped" in exp:
        assert victim.sink.dropped == exp["dropped"], (seed.filename, victim.sink.dropped)
    if "replies" in exp:
        assert victim.sink.replies == exp["replies"], (seed.filename, victim.sink.replies)


def main(argv: list[str]) -> int:
    """``python -m xenpv.fuzz.seeds DIR``: write the seed corpus."""
    if len(argv) != 1:
        print("usage: python -m xenpv.fuzz.seeds DIR", file=sys.stderr)
        return 2
    for path in write_seeds(argv[0]):
        target, _ = read_reproducer(path)
        print(f"{target:<24} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

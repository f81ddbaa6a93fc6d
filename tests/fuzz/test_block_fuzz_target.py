"""The ``blkback:driver`` fuzz target: it runs the real block backend under hostile
inputs without a breach, and it does catch a backend that writes outside its image."""

from __future__ import annotations

import random
import struct

import pytest

from xenpv.backends.block import BlockImage
from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.targets import TARGETS, get_target


def write_across_the_end() -> bytes:
    """An input whose one step is a WRITE of sectors 508-515 of the 512-sector image, from
    a writable page of the pool (the byte layout follows the target's decisions)."""
    # x86_64, inline engine, no indirect, no persistent grants, 512-byte sectors, no
    # secure discard
    head = bytes([0, 2, 0, 0, 0, 0])
    step = bytes([0, 0, 0])  # submit, one request, a read/write-style slot
    rid = struct.pack("<Q", 1)
    sector = bytes([1]) + struct.pack("<I", 508)  # steered, then below(520)
    segs = bytes([1, 1, 0, 0, 7])  # one segment: the pool's first page, sectors 0-7
    op = bytes([0, 1]) + struct.pack("<H", 0)  # (the extra byte), WRITE, handle
    return head + step + rid + sector + segs + op


def test_target_is_listed() -> None:
    assert "blkback:driver" in TARGETS


def test_random_inputs_find_no_breach() -> None:
    run = get_target("blkback:driver")
    rng = random.Random(2026)
    for _ in range(150):
        run(rng.randbytes(rng.randrange(1, 900)))
    run(write_across_the_end())  # refused with an error status: no breach


def test_a_backend_that_trusts_a_wrong_size_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BlockImage, "sectors", property(lambda self: (self.size >> 9) + 64))
    with pytest.raises(InvariantViolation, match="image grew"):
        get_target("blkback:driver")(write_across_the_end())


def test_blkfront_target_runs_clean() -> None:
    assert "blkfront:driver" in TARGETS
    run = get_target("blkfront:driver")
    rng = random.Random(3)
    for _ in range(12):
        run(rng.randbytes(rng.randrange(50, 400)))


def test_blkfront_target_catches_a_frontend_that_crashes_on_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from xenpv.frontends.block import BlockFrontend

    def crash(self: object, *args: object) -> None:
        raise RuntimeError("a frontend that cannot take an answer")

    monkeypatch.setattr(BlockFrontend, "_on_responses", crash)
    run = get_target("blkfront:driver")
    rng = random.Random(3)
    with pytest.raises(InvariantViolation):
        for _ in range(40):
            run(rng.randbytes(rng.randrange(50, 400)))

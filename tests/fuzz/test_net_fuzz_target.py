"""The ``netback:driver`` and ``netfront:driver`` fuzz targets: they run the real net
drivers under hostile inputs without a breach, and they do catch a driver that breaks an
invariant."""

from __future__ import annotations

import random

import pytest

from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.targets import TARGETS, get_target


def test_targets_are_listed() -> None:
    assert "netback:driver" in TARGETS and "netfront:driver" in TARGETS


def test_netback_random_inputs_find_no_breach() -> None:
    run = get_target("netback:driver")
    rng = random.Random(2026)
    for _ in range(80):
        run(rng.randbytes(rng.randrange(1, 900)))


def test_netback_target_catches_a_backend_that_forwards_runts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A TX check that lets runts through (no minimum size) is reported."""
    from xenpv.backends.net import NetTx

    monkeypatch.setattr(NetTx, "_check", lambda self, pkt: (0, 0))
    run = get_target("netback:driver")
    rng = random.Random(7)
    with pytest.raises(InvariantViolation, match="frame reached the port"):
        for _ in range(300):
            run(rng.randbytes(rng.randrange(50, 900)))


def test_netfront_random_inputs_find_no_breach() -> None:
    run = get_target("netfront:driver")
    rng = random.Random(3)
    for _ in range(8):
        run(rng.randbytes(rng.randrange(50, 400)))


def test_netfront_target_catches_a_frontend_that_crashes_on_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from xenpv.frontends.net import NetFrontend

    def crash(self: object, *args: object) -> None:
        raise RuntimeError("a frontend that cannot take an answer")

    monkeypatch.setattr(NetFrontend, "_on_tx", crash)
    run = get_target("netfront:driver")
    rng = random.Random(3)
    with pytest.raises(InvariantViolation):
        for _ in range(40):
            run(rng.randbytes(rng.randrange(50, 400)))

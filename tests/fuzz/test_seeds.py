"""The saved regression seeds: up to date with their scripts, and every one replays clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.fuzz import runner
from xenpv.fuzz.seeds import SEEDS, Seed, check_seed, seed_path

SEED_DIR = Path(__file__).parent / "seeds"


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s.filename)
def test_seed_file_matches_its_script(seed: Seed) -> None:
    path = seed_path(SEED_DIR, seed)
    assert path.exists(), f"run: python -m xenpv.fuzz.seeds {SEED_DIR}"
    assert runner.read_reproducer(path) == (seed.target, seed.data)


@pytest.mark.parametrize("path", sorted(SEED_DIR.glob("*.repro")), ids=lambda p: p.name)
def test_saved_seed_replays_clean(path: Path) -> None:
    failure = runner.replay(path)
    assert failure is None, failure


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s.filename)
def test_seed_sequence_has_the_expected_outcome(seed: Seed) -> None:
    check_seed(seed)

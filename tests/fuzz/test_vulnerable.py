"""The harness finds each bug of the deliberately vulnerable backend and writes reproducers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xenpv.fuzz import runner
from xenpv.fuzz.targets import get_target

VULNERABLE = Path(__file__).parent / "vulnerable.py"
TARGETS = ["ring-backend:blkif", "ring-backend:netif-ctrl", "ring-backend:usbif-urb"]
EXPECTED = {
    "double_fetch": ("double fetch",),
    "unchecked_index": ("outside", "bound", "handled"),
    "unbounded_queue": ("bound",),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_harness_flags_the_bug_and_replay_confirms(target: str, bug: str, tmp_path: Path) -> None:
    victim = f"{VULNERABLE}:{bug}"
    # A fixed number of runs (not a time box) keeps the test deterministic on a busy machine.
    result = runner.run_random(target, get_target(target, victim), out_dir=tmp_path,
                               seconds=None, runs=500, seed=1)
    assert result.failures, f"{bug} not found by {target} in {result.runs} runs"
    assert any(any(word in f.signature for word in EXPECTED[bug]) for f in result.failures), [
        f.signature for f in result.failures]
    repro = result.failures[0].path
    assert runner.replay(repro, victim) is not None
    assert runner.replay(repro) is None  # xenpv's own backend survives the same input
    proc = subprocess.run([sys.executable, "-m", "xenpv", "fuzz", "--replay", str(repro),
                           "--victim", victim], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "still fails" in proc.stdout


@pytest.mark.parametrize("target", ["ring-frontend:blkif", "ring-frontend:usbif-urb"])
def test_harness_flags_a_frontend_double_fetch(target: str, tmp_path: Path) -> None:
    victim = f"{VULNERABLE}:double_fetch_frontend"
    result = runner.run_random(target, get_target(target, victim), out_dir=tmp_path,
                               seconds=None, runs=500, seed=1)
    assert any("double fetch" in f.signature for f in result.failures), [
        f.signature for f in result.failures]
    repro = next(f.path for f in result.failures if "double fetch" in f.signature)
    assert runner.replay(repro, victim) is not None
    assert runner.replay(repro) is None

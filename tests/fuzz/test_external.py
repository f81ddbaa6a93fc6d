"""The hostile xenstore client against server processes: ours survives, a fragile one is caught."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from xenpv.fuzz import runner
from xenpv.fuzz.targets import get_target

FRAGILE = f"{shlex.quote(sys.executable)} {Path(__file__).parent / 'fragile_xenstored.py'} {{dom0}} {{guest}}"


def test_embedded_xenstored_process_survives_hostile_guest(tmp_path: Path) -> None:
    fn = get_target("xenstore:process")
    try:
        result = runner.run_random("xenstore:process", fn, out_dir=tmp_path, seconds=None,
                                   runs=300, seed=5)
    finally:
        runner.close_target(fn)
    assert result.failures == [], result.failures[0].message


def test_crashing_server_process_is_flagged_and_replay_confirms(tmp_path: Path) -> None:
    fn = get_target("xenstore:process", FRAGILE)
    try:
        result = runner.run_random("xenstore:process", fn, out_dir=tmp_path, seconds=None,
                                   runs=400, seed=2)
    finally:
        runner.close_target(fn)
    assert result.failures, f"the planted crash was not found in {result.runs} runs"
    assert "died" in result.failures[0].message
    repro = result.failures[0].path
    assert runner.replay(repro, FRAGILE) is not None
    assert runner.replay(repro) is None  # the embedded xenstored survives the same input

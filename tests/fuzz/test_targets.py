"""Every fuzz target runs clean for a short time box; engines, reproducers and the CLI work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xenpv.fuzz import runner
from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.targets import TARGETS, get_target

SEEDS = Path(__file__).parent / "seeds"


def _seeds_for(name: str) -> list[bytes]:
    out = []
    for path in sorted(SEEDS.glob("*.repro")):
        target, data = runner.read_reproducer(path)
        if target == name:
            out.append(data)
    return out


#: inputs every target runs at least, whatever the machine's speed
MIN_RUNS = 50


#: targets with a time box of their own elsewhere (tests/fuzz/test_vchan_process.py)
OWN_TESTS = {"vchan:process"}


@pytest.mark.parametrize("name", sorted(set(TARGETS) - OWN_TESTS))
def test_target_survives_its_time_box(name: str, tmp_path: Path) -> None:
    fn = get_target(name)
    try:
        result = runner.run_random(name, fn, out_dir=tmp_path, seconds=1.5, seed=7,
                                   seeds=_seeds_for(name))
        failures = list(result.failures)
        # On a loaded machine the time box may hold few inputs: every target still gets a
        # minimum number of them (a count, never a speed, is what this test checks).
        if result.runs < MIN_RUNS:
            extra = runner.run_random(name, fn, out_dir=tmp_path, seconds=None,
                                      runs=MIN_RUNS - result.runs, seed=8)
            failures += extra.failures
    finally:
        runner.close_target(fn)
    assert failures == [], failures[0].message


def test_reproducer_round_trip(tmp_path: Path) -> None:
    path = runner.write_reproducer(tmp_path, "parse:kbdif", b"\x01\x02\x00")
    assert runner.read_reproducer(path) == ("parse:kbdif", b"\x01\x02\x00")
    assert runner.replay(path) is None


def test_random_engine_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    fn = get_target("parse:blkif")
    a = runner.run_random("parse:blkif", fn, out_dir=tmp_path, seconds=None, runs=300, seed=3)
    b = runner.run_random("parse:blkif", fn, out_dir=tmp_path, seconds=None, runs=300, seed=3)
    assert a.runs == b.runs == 300


def test_cli_lists_targets() -> None:
    out = subprocess.run([sys.executable, "-m", "xenpv", "fuzz", "--list"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted(TARGETS)


def test_cli_atheris_campaign(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xenpv", "fuzz", "parse:vchan", "--engine", "atheris", "--time", "2",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exec/s" in proc.stderr  # libFuzzer's progress lines
    assert "0 distinct failure(s)" in proc.stdout


def test_cli_unknown_target_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "xenpv", "fuzz", "no-such-target"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2


def test_cli_replay_of_a_passing_seed_exits_0() -> None:
    seed = sorted(SEEDS.glob("*.repro"))[0]
    proc = subprocess.run([sys.executable, "-m", "xenpv", "fuzz", "--replay", str(seed)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passes" in proc.stdout


def _failing_target(victim: object) -> object:
    def run(data: bytes) -> None:
        if data[:1] == b"\xff":
            raise InvariantViolation("a planted failure")

    return run


def test_cli_all_runs_every_target_and_writes_reproducers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from xenpv.cli import main
    from xenpv.fuzz import targets

    seeds = tmp_path / "seeds"
    runner.write_reproducer(seeds, "planted", b"\xff")  # the seed is run first: found at once
    table = {name: TARGETS[name] for name in ("parse:kbdif", "xenbus:keys")}
    table["planted"] = targets.Target("planted", "fails on inputs starting with 0xff", _failing_target)
    monkeypatch.setattr(targets, "TARGETS", table)
    out = tmp_path / "out"
    status = main(["fuzz", "--all", "--engine", "random", "--time", "0.3", "--seeds", str(seeds),
                   "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 1, text
    for name in table:
        assert f"{name}: " in text
    assert "all targets: 2 of 3 clean; failures in planted" in text
    repros = sorted(out.glob("*.repro"))
    assert [runner.read_reproducer(p) for p in repros] == [("planted", b"\xff")]


def test_cli_all_rejects_a_target_or_victim() -> None:
    for extra in (["parse:kbdif"], ["--victim", "x:y"]):
        proc = subprocess.run([sys.executable, "-m", "xenpv", "fuzz", "--all", *extra],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr

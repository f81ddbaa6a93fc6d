"""Smoke run of ``xenpv bench all --quick --json``: every benchmark in one document, each
with its figures' spreads, ratios, targets and conditions; ``--plot`` draws them all."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from xenpv.cli.bench import BENCHMARKS


@pytest.mark.timeout(700)
def test_bench_all_quick_json_reports_every_benchmark(peer_root: Path, tmp_path: Path) -> None:
    svg, saved = tmp_path / "all.svg", tmp_path / "all.json"
    # (a run that hangs is stopped with SIGABRT, whose faulthandler dump names the place)
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "xenpv", "bench",
                             "all", "--quick", "--json", "--plot", str(svg), "--output",
                             str(saved)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"bench all did not finish in 600 s:\n{err}")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == json.loads(saved.read_text())
    assert doc["benchmark"] == "all" and doc["quick"] is True
    assert set(doc["benchmarks"]) == set(BENCHMARKS)
    for name, result in doc["benchmarks"].items():
        assert result["benchmark"] == name
        assert result["rounds"] == 1
        assert result["ratios"] and set(result["targets_met"]) <= set(result["ratios"])
        assert result["targets"], name  # every benchmark has goals
        for figure, (low, high) in result["spread"].items():
            assert low <= high, figure
        cond = result["conditions"]
        assert {"placement", "cpu_model", "cpus", "load_before", "load_after", "noisy",
                "noise"} <= cond.keys()
        assert cond["noisy"]  # one round: the spread is unknown, and it says so
    root = ET.parse(svg).getroot()
    text = " ".join("".join(el.itertext()) for el in root.iter() if el.tag.endswith("text"))
    for name in BENCHMARKS:
        assert f"{name} · 1 rounds" in text, name

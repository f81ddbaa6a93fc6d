"""Smoke run of ``xenpv bench fuzz --quick``: the JSON has every ring target's figures."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_fuzz_quick_json_keys() -> None:
    out = subprocess.run([sys.executable, "-m", "xenpv", "bench", "fuzz", "--json", "--quick"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    figures = json.loads(out)
    assert figures["benchmark"] == "fuzz"
    targets = set(figures["ratios"])
    assert {"ring-backend:blkif", "bytering:xenstore"} <= targets
    assert targets == set(figures["hostile_ops_per_s"]) == set(figures["benign_ops_per_s"])
    for target in targets:
        assert figures["hostile_ops_per_s"][target] > 0
        assert figures["benign_ops_per_s"][target] > 0
        assert figures["anchors"][target] == [f"hostile_ops_per_s.{target}",
                                              f"benign_ops_per_s.{target}"]
        assert figures["targets"][target] == ">= 0.1"
        assert isinstance(figures["targets_met"][target], bool)

"""Smoke run of ``xenpv bench fuzz --quick``: the JSON has every ring target's figures."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_fuzz_quick_json_keys() -> None:
    out = subprocess.run([sys.executable, "-m", "xenpv", "bench", "fuzz", "--json", "--quick"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    figures = json.loads(out)
    assert "ring-backend:blkif" in figures and "bytering:xenstore" in figures
    for entry in figures.values():
        assert set(entry) == {"hostile_ops_per_s", "benign_ops_per_s", "ratio"}
        assert entry["hostile_ops_per_s"] > 0 and entry["benign_ops_per_s"] > 0

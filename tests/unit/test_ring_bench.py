"""The ring benchmark's smoke run and its two-process driver (real processes, eventfds)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from rings_conftest import rings_fixture  # noqa: F401

from xenpv.bench.ring import run_two_process

KEYS = {"c_macros", "cython", "reference", "two_process_c", "two_process_cython",
        "two_process_c_nospin", "two_process_cython_nospin", "ratios", "targets"}
RATIOS = {"cython/c_macros", "cython/reference", "two_process_cython/two_process_c"}


def test_quick_bench_reports_every_figure() -> None:
    """``xenpv bench ring --quick --json`` compiles its anchors and reports all keys."""
    proc = subprocess.run([sys.executable, "-m", "xenpv", "bench", "ring", "--quick", "--json"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert KEYS <= out.keys()
    assert RATIOS <= out["ratios"].keys()
    for key in KEYS - {"ratios", "targets"}:
        assert out[key] > 0, key


@pytest.mark.parametrize("spin_us", [0, 50])
def test_two_processes_complete_every_request_in_order(rings: SimpleNamespace,
                                                       spin_us: int) -> None:
    """Frontend here, backend forked: each request's sequence number comes back, in order,
    whether the sides sleep at once or spin first (a lost wake-up would time out)."""
    result = run_two_process(rings.name, seconds=None, count=3000, spin_us=spin_us,
                             batch=32, timeout_s=20, verify=True)
    assert result["requests"] == 3000
    # every sleep of one side was ended by a kick from the other (or by the stop kick)
    assert result["front_sleeps"] <= result["back_notifies"]
    assert result["back_sleeps"] <= result["front_notifies"] + 1

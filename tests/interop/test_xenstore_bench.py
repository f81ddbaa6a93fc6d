"""Smoke run of ``xenpv bench xenstore --quick`` (figures are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

KEYS = {"ours_sequential", "ours_pipelined", "pyxs_sequential", "libxenstore_sequential",
        "c_echo_floor", "ours_sequential_asyncio", "libxenstore_c_loop", "ours_ring_sequential",
        "ours_guest_socket_sequential", "xen_c_ring_sequential", "ratios"}


def test_bench_xenstore_quick_reports_every_figure(peer_root: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "xenpv", "bench", "xenstore", "--json", "--quick"],
        capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert KEYS <= data.keys()
    assert all(data[k] > 0 for k in KEYS - {"ratios"})
    assert {"ours_sequential/pyxs_sequential", "ours_pipelined/pyxs_sequential",
            "libxenstore_sequential/c_echo_floor",
            "ours_ring_sequential/xen_c_ring_sequential"} <= data["ratios"].keys()
    # every figure says how it was measured: placement, and the spread of its rounds
    assert data["setup"]["placement"] in {"split", "same", "free"}
    assert KEYS - {"ratios"} <= data["spread"].keys()

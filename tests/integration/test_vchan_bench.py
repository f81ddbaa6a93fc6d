"""Smoke run of ``xenpv bench vchan --quick --json``: it runs and reports every key."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_vchan_quick_reports_every_key() -> None:
    out = subprocess.run([sys.executable, "-m", "xenpv", "bench", "vchan", "--json", "--quick"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    result = json.loads(out)
    for key in ("vchan_gbps", "unix_socket_gbps", "libxenvchan_gbps", "vchan_rtt_us"):
        assert isinstance(result[key], float) and result[key] > 0
    assert isinstance(result["console_mbps"], float) and result["console_mbps"] > 0
    assert set(result["ratios"]) == {"vchan/unix_socket", "vchan/libxenvchan"}
    assert result["placement"]["name"] in ("cross", "same")  # pinned by default
    assert set(result["gb_per_cpu_second"]) == {"vchan", "unix_socket", "libxenvchan"}
    assert all(v > 0 for v in result["gb_per_cpu_second"].values())
    assert set(result["vchan_wakeups"]) == {"receiver_notifies", "receiver_sleeps",
                                            "sender_notifies", "sender_sleeps"}

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
    assert "console_mbps" in result
    assert set(result["ratios"]) == {"vchan/unix_socket", "vchan/libxenvchan"}

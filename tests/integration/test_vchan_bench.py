"""Smoke run of ``xenpv bench vchan --quick --json``: it runs and reports every key."""

from __future__ import annotations

import json
import subprocess
import sys

RATIOS = {"vchan/unix_socket": ">= 2", "vchan/libxenvchan": ">= 0.8",
          "vchan_4k/libxenvchan_4k": ">= 0.5", "vchan/libxenvchan per CPU-second": ">= 0.6",
          "vchan_rtt/libxenvchan_rtt": "<= 1.5"}


def test_bench_vchan_quick_reports_every_key() -> None:
    out = subprocess.run([sys.executable, "-m", "xenpv", "bench", "vchan", "--json", "--quick",
                          "--write-size", "32768"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    result = json.loads(out)
    for key in ("vchan_gbps", "unix_socket_gbps", "libxenvchan_gbps", "vchan_rtt_us",
                "vchan_gbps_4k", "libxenvchan_gbps_4k", "libxenvchan_rtt_us"):
        assert isinstance(result[key], float) and result[key] > 0, key
        assert key in result["spread"], key
    assert result["write_size"] == 32768
    assert isinstance(result["console_mbps"], float) and result["console_mbps"] > 0
    assert result["targets"] == RATIOS
    assert set(result["ratios"]) == set(RATIOS) == set(result["targets_met"])
    assert result["placement"]["name"] in ("cross", "same")  # pinned by default
    assert result["conditions"]["placement"] == result["placement"]
    assert {"vchan", "unix_socket", "libxenvchan", "vchan_4k",
            "libxenvchan_4k"} == set(result["gb_per_cpu_second"])
    assert all(v > 0 for v in result["gb_per_cpu_second"].values())
    assert set(result["vchan_wakeups"]) == {"receiver_notifies", "receiver_sleeps",
                                            "sender_notifies", "sender_sleeps"}

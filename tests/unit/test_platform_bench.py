"""Smoke run of ``xenpv bench platform --quick``: the JSON has every documented key."""

from __future__ import annotations

import json
import subprocess
import sys


def test_platform_bench_quick_reports_every_key() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xenpv", "bench", "platform", "--json", "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    res = json.loads(out.stdout)
    for key in (
        "notify_rtt_us",
        "eventfd_floor_rtt_us",
        "eventfd_read_floor_rtt_us",
        "map_unmap_batches_per_s_inprocess",
        "map_unmap_batches_per_s_crossprocess",
        "grant_copy_4k_gbps",
        "grant_copy_64k_gbps",
        "memcpy_4k_gbps",
        "memcpy_64k_gbps",
    ):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert {
        "notify_rtt_vs_eventfd_floor",
        "notify_rtt_vs_eventfd_read_floor",
        "grant_copy_64k_vs_memcpy",
    } <= set(res["ratios"])
    assert isinstance(res["measured"], str) and "epoll_wait" in res["measured"]

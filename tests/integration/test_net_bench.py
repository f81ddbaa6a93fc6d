"""Smoke run of ``xenpv bench net --quick --json``: every figure (ours, QEMU 10, veth) is measured
in one run and reported with its spread, units, ratios and targets, the namespaces are
gone afterwards (no timings are asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from xenpv.cli.bench import render_result

FIGURES = {"ours_tcp_gbps": "Gbit/s", "ours_tcp_rx_gbps": "Gbit/s",
           "ours_tcp_2streams_gbps": "Gbit/s", "veth_tcp_gbps": "Gbit/s",
           "ours_udp_pps": "packets/s", "veth_udp_pps": "packets/s",
           "qemu_tcp_gbps": "Gbit/s", "qemu_udp_pps": "packets/s"}
TARGETS = {"ours/qemu tcp": ">= 2", "ours/qemu udp": ">= 2", "ours/veth tcp": ">= 0.1"}


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20,
                         check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_bench_net_quick_reports_every_key(peer_root: Path, tmp_path: Path) -> None:
    saved = tmp_path / "net.json"
    before = namespaces()
    res = subprocess.run([sys.executable, "-m", "xenpv", "bench", "net", "--quick", "--json",
                          "--output", str(saved)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result == json.loads(saved.read_text())
    assert result["benchmark"] == "net" and result["rounds"] == 1
    for key, unit in FIGURES.items():
        assert isinstance(result[key], float) and result[key] > 0, key
        assert key in result["spread"] and result["units"][key] == unit, key
    assert result["targets"] == TARGETS
    assert set(result["targets_met"]) == set(TARGETS)
    assert set(result["ratios"]) == {*TARGETS, "ours/veth udp", "ours 2 streams/1 stream tcp"}
    assert all(v > 0 for v in result["ratios"].values())
    setup = result["setup"]
    assert setup["queues"] == 2 and setup["udp_payload_bytes"] == 64
    assert setup["qemu_queues"] == 1  # QEMU offers feature-rx-copy only
    assert not any(setup["qemu_backend_features"].values())
    assert setup["qemu_frontend_stats"]["tx_packets"] > 0
    assert set(setup["cpu_per_second"]) == {k for k in FIGURES if not k.startswith("veth")}
    assert all(set(v) == {"front", "back", "emulator"} for v in setup["cpu_per_second"].values())
    assert setup["frontend_stats"]["tx_gso"] > 0 and setup["frontend_stats"]["rx_gso"] > 0
    assert setup["backend_tap"]["rx_frames"] > 0 and setup["frontend_tap"]["tx_frames"] > 0
    assert "unpinned" in result["conditions"]["placement"]
    assert namespaces() <= before  # the run removed what it made
    text = render_result(result)
    assert "ours/veth tcp:" in text and "target >= 0.1: " in text


def test_sigterm_midway_ends_the_bench_with_one_line_and_leaves_nothing(peer_root: Path) -> None:
    """SIGTERM while the figures are measured stops the run as Ctrl-C does: one line, status
    130, and its namespaces, processes (emulator, drivers, QEMU, iperf3) and directories
    are gone (before, the bench died at once and left them behind)."""
    import os
    import signal
    import time

    before = namespaces()
    proc = subprocess.Popen([sys.executable, "-m", "xenpv", "bench", "net", "--quick"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not namespaces() - before:  # the bench's namespaces exist: it is measuring
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)
        mine = namespaces() - before
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True, timeout=20).stdout.split()
        assert children
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "xenpv bench net: interrupted (SIGTERM)"
    assert not namespaces() & mine
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}"), f"child {pid} left running"
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("xenpv-bench-net-*"))

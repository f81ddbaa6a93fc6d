"""Smoke run of ``xenpv bench block --quick --json``: every path, workload and phase is
measured in one run and reported with its spread, ratios and targets (no timings are
asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PATHS = ("ours", "qemu", "fio", "preadv")
WORKLOADS = ("randread_qd1", "randread_qd32", "randwrite_qd1", "randwrite_qd32")
TARGETS = {"ours_vs_qemu_randread_qd32": ">= 2", "ours_vs_qemu_seqread": ">= 2",
           "ours_vs_fio_randread_qd32": ">= 0.25"}


def test_bench_block_quick_reports_every_key(peer_root: Path, tmp_path: Path) -> None:
    saved = tmp_path / "block.json"
    res = subprocess.run([sys.executable, "-m", "xenpv", "bench", "block", "--quick",
                          "--json", "--output", str(saved)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result == json.loads(saved.read_text())
    assert result["benchmark"] == "block" and result["rounds"] == 1
    for phase in ("", "_direct"):
        for path in PATHS:
            keys = [f"{path}{phase}_{w}_iops" for w in WORKLOADS]
            keys.append(f"{path}{phase}_seqread_gbps")
            for key in keys:
                assert isinstance(result[key], float) and result[key] > 0, key
                assert key in result["spread"], key
                assert result["units"][key] == ("GB/s" if key.endswith("gbps") else "IOPS")
    assert {k: result["targets"][k] for k in TARGETS} == TARGETS
    assert set(result["targets_met"]) == set(TARGETS)
    assert all(result["ratios"][k] > 0 for k in result["ratios"])
    setup = result["setup"]
    assert setup["ours_engine"] == setup["ours_direct_engine"] == "io_uring"
    assert setup["ours_served"]["uring"] > 0 and setup["ours_served"]["errors"] == 0
    assert setup["ours_frontend"]["persistent"] and setup["ours_frontend"]["max_segments"] > 11
    assert setup["qemu_frontend"]["max_segments"] == 11  # QEMU offers no indirect
    assert setup["ours_frontend"]["batch"] == 8  # depth kept through read_many batches
    assert setup["qemu_o_direct"] in (True, False)
    cpu = setup["cpu_us_per_op"]
    assert set(cpu) == {f"{p}{phase}_{w}" for p in ("ours", "qemu") for phase in ("", "_direct")
                        for w in (*WORKLOADS, "seqread")}
    assert all(set(v) == {"front", "back", "emulator"} for v in cpu.values())
    for key in (f"{p}{phase}_{w}_{end}_cpu_us" for p in ("ours", "qemu")
                for phase in ("", "_direct") for w in (*WORKLOADS, "seqread")
                for end in ("front", "back")):
        assert isinstance(result[key], float) and result[key] >= 0, key
        assert result["units"][key] == "µs" and result["better"][key] == "lower", key
    text = subprocess.run([sys.executable, "-m", "xenpv", "bench", "compare", str(saved),
                           str(saved)], capture_output=True, text=True, timeout=60, check=True)
    assert "ours_randread_qd32_iops" in text.stdout


def test_bench_block_profiles_our_processes(peer_root: Path, tmp_path: Path) -> None:
    """``--workloads`` narrows the run, ``--profile`` runs our frontend and backend under
    cProfile: their stats files are written and summarised per request in ``setup``."""
    prof = tmp_path / "prof"
    res = subprocess.run([sys.executable, "-m", "xenpv", "bench", "block", "--quick",
                          "--json", "--no-direct", "--workloads", "randread_qd32",
                          "--profile", str(prof)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert [k for k in result if k.endswith("_iops")] == [
        f"{p}_randread_qd32_iops" for p in PATHS]
    assert set(result["ratios"]) == {"ours_vs_qemu_randread_qd32", "ours_vs_fio_randread_qd32",
                                     "ours_vs_preadv_randread_qd32"}
    assert sorted(p.name for p in prof.iterdir()) == ["back.prof", "front.prof"]
    summary = result["setup"]["profile"]["ours"]
    for end in ("front", "back"):
        assert summary[end]["total (own time, every function)"] > 0, summary
        assert len(summary[end]) > 3 and all(v >= 0 for v in summary[end].values()), summary

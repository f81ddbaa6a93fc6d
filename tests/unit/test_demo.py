"""``xenpv demo``: the README's main job runs, reports both pairs and cleans up."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile


def _demo_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "xenpv-demo-*")))


def test_demo_runs_both_pairs_and_leaves_nothing_behind() -> None:
    before = _demo_dirs()
    out = subprocess.run(
        [sys.executable, "-m", "xenpv", "demo", "--quick", "--console-bytes", "8192",
         "--vchan-bytes", "1048576", "--pings", "5", "--timeout", "30"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^(console|vchan)\s.*$", text, re.M)}
    assert set(rows) == {"console", "vchan"}, text
    assert "8.0 KiB" in rows["console"] and "text ok" in rows["console"]
    assert "1.0 MiB" in rows["vchan"] and "crc32 ok" in rows["vchan"]
    assert re.search(r"^pair\s+bytes\s+MB/s\s+rtt p50 us\s+rtt p99 us", text, re.M)
    assert "leaks: none" in text
    rundir = re.search(r"loopback emulator in (\S+)", text)
    assert rundir is not None and not os.path.exists(rundir.group(1))
    assert _demo_dirs() <= before
    # no process of the demo survives it
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert rundir.group(1) not in ps


def test_demo_fails_clearly_when_a_stage_cannot_finish() -> None:
    # a timeout far too short for the first stage: a clear message and a non-zero status
    out = subprocess.run(
        [sys.executable, "-m", "xenpv", "demo", "--quick", "--timeout", "0.001"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "xenpv demo: FAILED:" in out.stderr
    assert "leaks: none" not in out.stdout

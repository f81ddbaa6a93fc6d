"""``xenpv info`` reports the Xen devices and libraries the real-Xen platform needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xenpv.cli.info import xen_devices
from xenpv.platforms.loopback.env import shim_dir


def test_each_device_is_reported_present_or_missing(tmp_path: Path) -> None:
    for name in ("evtchn", "gntdev"):
        (tmp_path / name).write_bytes(b"")
    assert xen_devices(str(tmp_path)) == (
        "evtchn ok, gntdev ok, gntalloc missing, xenbus missing, privcmd missing")


def test_libraries_found_on_the_loader_path_are_reported_ok() -> None:
    env = dict(os.environ, LD_LIBRARY_PATH=str(shim_dir()))
    out = subprocess.run([sys.executable, "-m", "xenpv", "info"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "xen libraries: libxengnttab.so.1 ok, libxenevtchn.so.1 ok" in out.stdout

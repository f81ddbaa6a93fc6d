"""Processes that only move bytes (a vchan endpoint, a ring service) do not import numpy.

Importing numpy starts OpenBLAS's thread pool (a thread per allowed CPU beyond the first)
and costs a few hundred milliseconds of start-up; a vchan or ring process never uses it,
and on a two-CPU machine the pool's thread shares the CPUs the data path runs on.  numpy
comes in only where batch views are asked for (``Layout.dtype``, ``.array()`` of pages,
``take_requests(dtype=...)``).
"""

from __future__ import annotations

import json
import subprocess
import sys

BYTE_PATH = ("xenpv.vchan", "xenpv.vchan.tool", "xenpv.vchan.streams", "xenpv.vchan.endpoint",
             "xenpv.vchan.ring", "xenpv.rings", "xenpv.drivers.ringservice",
             "xenpv.platforms.loopback", "xenpv.protocols.vchan", "xenpv.protocols.console",
             "xenpv.protocols.xsring", "xenpv.cli")

PROBE = """
import importlib, json, os, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
before = sorted(m for m in sys.modules if m.split(".")[0] == "numpy")
threads = len(os.listdir("/proc/self/task"))
from xenpv.protocols import vchan
itemsize = vchan.RING_SHARED_LAYOUT.dtype.itemsize  # asked for: numpy comes in now
print(json.dumps([before, threads, itemsize, "numpy" in sys.modules]))
"""


def test_the_byte_path_does_not_import_numpy() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, *BYTE_PATH], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    numpy_modules, threads, itemsize, later = json.loads(out.stdout)
    assert numpy_modules == []
    assert threads == 1  # no thread pool started behind our back
    assert itemsize == 8 and later  # a record's dtype still works, importing numpy then

"""Xen's own ``xl`` (Debian's xen-utils-4.17) as the toolstack of the loopback emulator.

``xl`` and ``libxenlight`` load on the replacement libraries (the calls they never make
here are generated ENOSYS stubs, ``scripts/shim_stubs.py``), list the emulator's domains,
and attach, list and detach vbds and vifs that xenpv's own backends serve and xenpv's
frontends in the guests use (``xl_support.XlToolstack``: a private mount namespace gives
libxl its fixed paths).  The nodes ``xl`` writes equal those of ``xenpv device add``
modulo the differences listed in ``docs/xl.md``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from xenpv import peers
from xenpv.platforms.loopback.env import shim_dir

REPO = Path(__file__).resolve().parents[2]
XEN_BIN = peers.XEN_BIN
#: The toolstack and Xen's two xenstoreds (every one linked BIND_NOW).
PROGRAMS = (f"{XEN_BIN}/xl", f"{XEN_BIN}/xenstored", f"{XEN_BIN}/oxenstored")
#: oxenstored's libxenguest imports xtl_* and xencall1 unversioned; Debian's libxenctrl
#: brings libxentoollog and libxencall in, the replacement does not link Debian libraries.
PRELOAD = {f"{XEN_BIN}/oxenstored": "libxentoollog.so.1 libxencall.so.1"}


def test_xl_and_xens_servers_load_on_the_replacement_libraries() -> None:
    """Every symbol of xl, libxenlight, libxlutil, libxenguest and both xenstoreds
    resolves with the replacement libraries first (``ldd -r`` binds everything, as
    BIND_NOW does), libxenctrl and libxenforeignmemory come from them, and the generated
    stubs are what the generator writes for the peers tree."""
    env = peers.run_env([str(shim_dir())])
    for program in PROGRAMS:
        path = peers.find(program)
        run_env = dict(env)
        if program in PRELOAD:
            run_env["LD_PRELOAD"] = PRELOAD[program]
        out = subprocess.run(["ldd", "-r", str(path)], env=run_env, capture_output=True,
                             text=True, timeout=30)
        report = out.stdout + out.stderr
        assert out.returncode == 0, report
        assert "undefined symbol" not in report and "not found" not in report, report
        for lib in ("libxenctrl.so.4.17", "libxenforeignmemory.so.1"):
            lines = [line for line in report.splitlines() if line.strip().startswith(lib)]
            if lines:
                assert all(str(shim_dir()) in line for line in lines), report
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "shim_stubs.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

"""Running Debian's ``xl`` as dom0's toolstack on a loopback emulator (helper of
``test_xl_toolstack.py``; the setup is described in ``docs/xl.md``).

libxl reads and writes fixed paths: ``/etc/xen/xl.conf``, the hotplug scripts in
``/etc/xen/scripts``, the per-domain files in ``/var/lib/xen``, logs in ``/var/log/xen``,
``/var/run/xen``, and ``xl console`` execs ``/usr/lib/xen-4.17/bin/xenconsole``.  None of
them exists on the test machine, and a test must not create them there.  :class:`XlToolstack`
runs every ``xl`` command through ``shim/xl-namespace.sh``: a private mount namespace
(``unshare -m``) where ``/etc``, ``/var``, ``/run`` and ``/usr/lib`` are overlays whose
upper layers live in the test's temporary directory, so what libxl writes lands there and
the host sees nothing.  The hotplug scripts put there record their calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from xenpv import peers
from xenpv.platforms.loopback.env import shim_dir

#: Runs a command in xl's mount namespace (overlays with their upper layers in STATE).
NAMESPACE_SCRIPT = Path(__file__).resolve().parents[2] / "shim" / "xl-namespace.sh"

#: A hotplug script that records how libxl ran it (its arguments and the xenbus path)
#: and succeeds: xenpv's backends open ``params`` and join ``bridge`` themselves.
HOTPLUG_SCRIPT = """#!/bin/sh
echo "$(basename "$0") $1 $XENBUS_PATH" >> {log}
exit 0
"""


class XlToolstack:
    """``xl`` acting as dom0 of the loopback emulator in ``rundir``; its private files
    (the overlays' upper layers, the hotplug log) under ``state``."""

    def __init__(self, rundir: str | Path, state: Path) -> None:
        self.rundir = Path(rundir)
        self.state = state
        self.xl = peers.find(f"{peers.XEN_BIN}/xl")
        state.mkdir(parents=True, exist_ok=True)
        self.hotplug_log = state / "hotplug.log"
        self.hotplug_log.write_text("")
        scripts = state / "etc" / "up" / "xen" / "scripts"
        scripts.mkdir(parents=True)
        for name in ("block", "vif-bridge"):
            (scripts / name).write_text(HOTPLUG_SCRIPT.format(log=self.hotplug_log))
            (scripts / name).chmod(0o755)
        self.env = peers.run_env([str(shim_dir())], base={
            **os.environ,
            "XENPV_LOOPBACK_SOCKET": str(self.rundir / "dom0" / "control"),
            "XENPV_LOOPBACK_DOMID": "0",
            "XENSTORED_PATH": str(self.rundir / "dom0" / "xenstore"),
        })
        assert shutil.which("unshare"), "unshare (util-linux) runs xl in a mount namespace"

    def command(self, *args: str) -> list[str]:
        """The command running ``xl ARGS`` in its namespace (under :attr:`env`); every
        step execs the next, so its pid is xl's (and that of what xl execs)."""
        return [str(NAMESPACE_SCRIPT), str(self.state), str(peers.peers_root()), str(self.xl),
                *args]

    def call(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``xl ARGS``; its exit status and output."""
        return subprocess.run(self.command(*args), env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def run(self, *args: str) -> str:
        """Run ``xl ARGS``; its standard output (``AssertionError`` with its output if it
        fails)."""
        res = self.call(*args)
        assert res.returncode == 0, f"xl {' '.join(args)}: {res.returncode}\n{res.stderr}"
        return res.stdout

    def domains(self) -> dict[str, tuple[int, str]]:
        """``{name: (domid, uuid)}`` from ``xl list -v``."""
        rows = {}
        for line in self.run("list", "-v").splitlines()[1:]:
            m = re.match(r"(\S+)\s+(\d+)\s.*?([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})",
                         line)
            assert m, line
            rows[m.group(1)] = (int(m.group(2)), m.group(3))
        return rows

    def adopt(self, domid: int, name: str, uuid: str) -> None:
        """Give libxl what it keeps for a domain it built (the emulator built this one):
        the domain's configuration (``userdata-d.<domid>.<uuid>.libxl-json``, read and
        rewritten by every device change)."""
        config = {"c_info": {"type": "pv", "name": name, "uuid": uuid},
                  "b_info": {"type.pv": {}}}
        lib = self.state / "var" / "up" / "lib" / "xen"
        lib.mkdir(parents=True, exist_ok=True)
        (lib / f"userdata-d.{domid}.{uuid}.libxl-json").write_text(json.dumps(config))

    def hotplug_calls(self) -> list[str]:
        """The hotplug scripts libxl ran so far: ``"block add backend/vbd/1/51728"`` ..."""
        return self.hotplug_log.read_text().splitlines()

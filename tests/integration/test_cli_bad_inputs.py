"""Issue 14 item 12: bad input or a missing prerequisite gives a one-line error and a
non-zero exit status, never a traceback.

One emulator (domain 1 exists) serves the whole table; each row is a command line, the
domain whose environment it runs in (None: none), the exit status expected, and a piece
of the message.  Rows whose status is a usage error (2, or the status of the Xen tool
the command stands in for) may print argparse's usage lines before the error line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.platforms.loopback.harness import DaemonMachine

TIMEOUT = 60


def _env_for(rundir: str, domid: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XENPV_LOOPBACK_", "XENSTORED_"))}
    if domid is not None:
        from xenpv.platforms.loopback.env import domain_env

        env.update(domain_env(rundir, domid))
    else:  # nothing to find: xenstore clients must fail, not reach a real xenstored
        env["XENSTORED_PATH"] = os.path.join(rundir, "no-such-socket")
    return env


@pytest.fixture(scope="module")
def machine() -> Iterator[DaemonMachine]:
    m = DaemonMachine(max_grants=64, max_ports=32)
    try:
        m.create_domain(1)
        yield m
    finally:
        m.close()


def rows(run: str, tmp: Path) -> list[tuple[list[str], int | None, int, str]]:
    afile = tmp / "a-file"
    afile.write_text("x")
    occupied = tmp / "occupied"
    occupied.write_text("x")
    too_long = str(tmp / ("s" * 120))
    missing = str(tmp / "missing-dir")
    dom0_xs = os.path.join(run, "dom0", "xenstore")
    return [
        # loopback up
        (["loopback", "up", "--rundir", str(afile)], None, 1, "not a directory"),
        (["loopback", "up", "--rundir", str(afile / "sub")], None, 1, "run directory"),
        (["loopback", "up", "--rundir", str(tmp / "r1"), "--domain", "abc"], None, 2, "domid"),
        (["loopback", "up", "--rundir", str(tmp / "r2"), "--domain", "70000"], None, 2,
         "out of range"),
        (["loopback", "up", "--rundir", str(tmp / "r3"), "--max-grants", "3"], None, 2,
         "--max-grants"),
        (["loopback", "up", "--rundir", str(tmp / "r4"), "--max-ports", "0x10"], None, 2,
         "--max-ports"),
        # loopback domain / env / stats
        (["loopback", "domain", "create", "--rundir", run, "--domid", "-1"], None, 2, "domid"),
        (["loopback", "domain", "create", "--rundir", run], None, 2, "--domid"),
        (["loopback", "domain", "list", "--rundir", missing], None, 1, "no run directory"),
        (["loopback", "env", "--rundir", missing, "--domid", "1"], None, 1, "no run directory"),
        (["loopback", "env", "--rundir", run, "--domid", "9"], None, 1,
         "domain 9 does not exist"),
        (["loopback", "env", "--rundir", str(tmp), "--domid", "0"], None, 1,
         "no emulator"),
        (["loopback", "stats", "--rundir", missing], None, 1, "no run directory"),
        # block backend
        (["block", "backend", "--all", "--sector-size", "1000"], 0, 2, "power of two"),
        (["block", "backend", "--all", "--sector-size", "8192"], 0, 2, "out of range"),
        (["block", "backend", "--all", "--physical-sector-size", "3000"], 0, 2,
         "power of two"),
        # device
        (["device", "add", "console", "-f", "9", "-s", dom0_xs], None, 1,
         "domain 9 does not exist"),
        (["device", "add", "console", "-f", "1", "--devid", "3"], 1, 1, "dom0"),
        (["device", "add", "console", "-f", "99999"], 0, 2, "out of range"),
        (["device", "list", "console"], None, 1, "no-such-socket"),
        (["device", "add", "vif", "-f", "1", "--mac", "01:00:5e:00:00:01"], 0, 1,
         "group (multicast) address"),
        (["device", "add", "vif", "-f", "1", "--mtu", "20"], 0, 2, "mtu"),
        # net
        (["net", "info", "1", "7"], 0, 1, "no vif 7 in domain 1"),
        (["net", "frontend", "7", "--tap", "t0", "--rundir", run, "--domid", "1"], None, 1,
         "no vif 7 in domain 1"),
        (["net", "backend", "--all", "--tap", "t0", "--netns", "no-such-ns-xpv", "--rundir",
          run], None, 1, "no-such-ns-xpv"),
        # xenstore
        (["xenstore", "chmod", "/no/such/node", "n0"], 0, 1, "No such file or directory"),
        (["xenstore", "chmod", "/local", "n99999999999"], 0, 1, "Invalid argument"),
        (["xenstore", "read", "/x"], None, 1, "xs_open"),
        # vchan-proxy (run as dom1 unless said otherwise)
        (["vchan-proxy", "0", "/local/domain/1/data/v", str(occupied)], 1, 1,
         "Address already in use"),
        (["vchan-proxy", "0", "/local/domain/1/data/v", too_long], 1, 1, "too long"),
        (["vchan-proxy", "0", "/local/domain/1/data/v", os.path.join(missing, "s")], 1, 1,
         "No such file or directory"),
        (["vchan-proxy", "-s", "/local/domain/0/state", "0", "/local/domain/1/data/v",
          str(tmp / "vp1")], 1, 1, "xs_write: Permission denied"),
        (["vchan-proxy", "-m", "server", "0", "/local/domain/0/data/v", str(tmp / "vp2")],
         1, 1, "Permission denied"),
        (["vchan-proxy", "77", "/local/domain/0/data/v", str(tmp / "vp3")], 0, 1,
         "domain 77 does not exist"),
        (["vchan-proxy", "abc", "/x", str(tmp / "vp4")], 0, 1, "domid"),
        # console
        (["console", "attach", "9", "--rundir", run], None, 1, "domain 9 does not exist"),
        (["console", "attach", "1", "--rundir", run, "--timeout", "0.5"], None, 1,
         "no console backend published"),
        (["console", "attach", "1", "-n", "99999"], None, 22, "console number"),
        (["console", "publish", "--rundir", run, "--domid", "1", "--port", "-3"], None, 2,
         "port"),
        (["console", "backend", "--rundir", missing], None, 1, "No such file or directory"),
    ]


def test_bad_inputs_give_one_line_and_a_non_zero_status(machine: DaemonMachine,
                                                         tmp_path: Path) -> None:
    run = machine.rundir
    failures = []
    for argv, domid, status, words in rows(run, tmp_path):
        p = subprocess.run([sys.executable, "-m", "xenpv", *argv], env=_env_for(run, domid),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=TIMEOUT)
        lines = p.stderr.splitlines()
        usage = status in (2, 22) or (argv[0] == "vchan-proxy" and "usage" in p.stderr)
        ok = (p.returncode == status and "Traceback" not in p.stderr and lines
              and words in lines[-1] and (usage or len(lines) == 1))
        if not ok:
            failures.append((argv, p.returncode, p.stderr[-600:]))
    assert not failures, "\n".join(map(repr, failures))
    # nothing was bound before the domain check, and nothing was left after failures
    assert not any((tmp_path / n).exists() for n in ("vp1", "vp2", "vp3", "vp4"))

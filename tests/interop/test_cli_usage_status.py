"""Issue 14 item 13: usage errors exit as Xen's tools do, checked against the tools.

Each row is a command of ours and the Xen tool it stands in for, given the same bad
command line; both must exit with the same status (xenstore-utils and
vchan-socket-proxy: 1, xenconsole: 22).  A missing peer is an error, never a skip.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from xenpv import peers

ROWS = [
    ("xenstore-read", ["xenstore", "read"], ["--bogus", "/k"]),
    ("xenstore-chmod", ["xenstore", "chmod"], []),
    ("xenstore-watch", ["xenstore", "watch"], []),
    ("vchan-socket-proxy", ["vchan-proxy"], ["--bogus", "0", "/p", "-"]),
    ("vchan-socket-proxy", ["vchan-proxy"], ["0", "/p"]),
    ("xenconsole", ["console", "attach"], ["--bogus", "1"]),
    ("xenconsole", ["console", "attach"], ["abc"]),
    ("xenconsole", ["console", "attach"], []),
]


@pytest.mark.parametrize(("tool", "ours", "argv"), ROWS)
def test_usage_status_matches_xen_tools(tool: str, ours: list[str], argv: list[str]) -> None:
    env = peers.run_env()
    env["XENSTORED_PATH"] = "/nonexistent/xenstored.sock"
    real = subprocess.run([str(peers.find(tool)), *argv], env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    mine = subprocess.run([sys.executable, "-m", "xenpv", *ours, *argv], env=env,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    assert real.returncode in (1, 22), real.stderr
    assert mine.returncode == real.returncode, (real.stderr, mine.stderr)
    assert b"Traceback" not in mine.stderr

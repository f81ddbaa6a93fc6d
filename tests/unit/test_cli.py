"""The ``xenpv`` command's own behaviour."""

from __future__ import annotations

import subprocess
import sys


def run_xenpv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xenpv", *args], capture_output=True, text=True, env=env, timeout=60)


def test_help_lists_every_command() -> None:
    from xenpv.cli import COMMANDS

    out = run_xenpv("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_unknown_command_is_a_usage_error() -> None:
    out = run_xenpv("no-such-command")
    assert out.returncode == 2
    assert "unknown command" in out.stderr


def test_info_prints_version() -> None:
    from xenpv import __version__

    out = run_xenpv("info")
    assert out.returncode == 0, out.stderr
    assert f"xenpv: {__version__}" in out.stdout

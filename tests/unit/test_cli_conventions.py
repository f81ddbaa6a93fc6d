"""Issue 14 items 9 and 13: the conventions every ``xenpv`` command follows.

* every argument of every (sub)command has a help text, every subcommand a one-line one;
* numbers are plain decimal digits checked against their field's range, never masked;
* usage errors exit as the Xen tool a command stands in for (the interop test
  ``test_usage_status_matches_xen_tools`` checks those against the tools themselves);
* the global ``-v``/``--log-level`` options reach every command.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from xenpv.cli import COMMANDS, build_parser
from xenpv.cli.args import parse_uint


def walk(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, argparse.Action]]:
    """Every (parser, action) pair under ``parser``, subcommands included."""
    for action in parser._actions:
        yield parser, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str | None]]:
    """(prog, one-line help) of every subcommand under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield sub.prog, helps.get(name)
                yield from subcommands(sub)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_argument_has_help(name: str) -> None:
    missing = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p, a in walk(build_parser(name))
        if not isinstance(a, argparse._HelpAction) and not a.help
    ]
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_a_one_line_description(name: str) -> None:
    for prog, help_ in subcommands(build_parser(name)):
        assert help_ and "\n" not in help_ and len(help_) <= 90, (prog, help_)


def test_every_command_has_a_one_line_description() -> None:
    for name, (_module, help_) in COMMANDS.items():
        assert help_ and "\n" not in help_ and len(help_) <= 90, name


@pytest.mark.parametrize("text", ["", "-1", "+5", " 5", "5 ", "5_0", "0x10", "1e3", "٣",
                                  "99999999999999999999999"])
def test_numbers_must_be_plain_decimal_digits(text: str) -> None:
    with pytest.raises(ValueError):
        parse_uint(text, 0, 0xFFFFFFFF)


@pytest.mark.parametrize("text", ["32752", "65536", "99999999999", "4294967297"])
def test_domids_out_of_range_are_refused_not_masked(text: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_uint(text, 0, 0x7FEF, "domid")


def _xenpv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xenpv", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("argv", "status"), [
    (["xenstore", "read", "--bogus", "/k"], 1),  # as xenstore-read
    (["xenstore", "chmod"], 1),
    (["vchan-proxy", "--bogus", "0", "/p", "-"], 1),  # as vchan-socket-proxy
    (["vchan-proxy", "0", "/p"], 1),
    (["console", "attach", "--bogus", "1"], 22),  # as xenconsole (EINVAL)
    (["console", "attach", "abc"], 22),
    (["console", "backend", "--bogus"], 2),
    (["loopback", "up"], 2),
    (["device", "add", "console"], 2),
    (["loopback", "domain", "create", "--rundir", "/nonexistent", "--domid", "70000"], 2),
])
def test_usage_errors_exit_status(argv: list[str], status: int) -> None:
    p = _xenpv(*argv)
    assert p.returncode == status, p.stderr
    last = p.stderr.splitlines()[-1]
    assert "Traceback" not in p.stderr and ("error" in last or "Usage" in last)


@pytest.mark.parametrize("opts", [["-v"], ["-vv"], ["--verbose"], ["--log-level", "debug"],
                                  ["--log-level=error"]])
def test_global_logging_options(opts: list[str]) -> None:
    p = _xenpv(*opts, "info")
    assert p.returncode == 0, p.stderr


def test_global_logging_level_is_checked() -> None:
    p = _xenpv("--log-level", "loud", "info")
    assert p.returncode == 2 and "--log-level" in p.stderr


def test_global_verbose_option_reaches_the_command() -> None:
    code = ("import logging, sys; from xenpv import cli; cli.COMMANDS['info'] = "
            "('xenpv.cli.info', 'x'); import xenpv.cli.info as m; "
            "m.run = lambda a: print(logging.getLogger().getEffectiveLevel()) or 0; "
            "sys.exit(cli.main(sys.argv[1:]))")
    for opts, level in ((["-v"], "20"), (["-vv"], "10"), ([], "30"),
                        (["--log-level", "error"], "40")):
        p = subprocess.run([sys.executable, "-c", code, *opts, "info"], capture_output=True,
                           text=True, timeout=60)
        assert p.stdout.strip() == level, (opts, p.stdout, p.stderr)

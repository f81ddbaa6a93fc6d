"""The ``xenpv`` command.

Each subcommand lives in its own module under ``xenpv.cli`` and is imported only when it
is used, so ``xenpv --help`` and ``xenpv info`` stay fast.  A command module defines::

    def configure(parser: argparse.ArgumentParser) -> None   # add arguments/subparsers
    def run(args: argparse.Namespace) -> int                  # exit status

and is listed once in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

# name -> (module, one-line help).  Keep alphabetical.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("xenpv.cli.bench", "run a benchmark and report ratios against its anchor"),
    "block": ("xenpv.cli.block", "serve vbds from image files; show what a vbd negotiated"),
    "console": ("xenpv.cli.console", "attach to a guest console; run a console backend or frontend"),
    "demo": ("xenpv.cli.demo", "show xenpv at work (the README's main job)"),
    "device": ("xenpv.cli.device", "create, remove and list xenbus device pairs as the toolstack"),
    "fuzz": ("xenpv.cli.fuzz", "fuzz ring, xenbus and xenstore handling with hostile peers"),
    "hid": ("xenpv.cli.hid", "keyboard/pointer devices: serve, route, watch, focus, inject"),
    "info": ("xenpv.cli.info", "print version, ring implementation and platform facts"),
    "loopback": ("xenpv.cli.loopback", "run the loopback emulator daemon and manage its domains"),
    "net": ("xenpv.cli.net", "serve vifs through a userspace switch; show what a vif negotiated"),
    "peers": ("xenpv.cli.peers", "fetch and locate the real Xen programs used as test peers"),
    "vchan-proxy": ("xenpv.cli.vchan_proxy", "vchan to Unix socket proxy, a drop-in for vchan-socket-proxy"),
    "xenstore": ("xenpv.cli.xenstore", "xenstore-utils style client commands"),
    "xenstored": ("xenpv.cli.xenstored", "run the embedded xenstore daemon"),
}


LOG_LEVELS = ("debug", "info", "warning", "error")


class Parser(argparse.ArgumentParser):
    """``argparse`` with a per-parser exit status for usage errors.

    argparse exits 2; commands that stand in for one of Xen's tools exit as that tool
    does (xenstore-* and vchan-socket-proxy: 1, xenconsole: 22, ``EINVAL``), set with
    :func:`set_usage_status` (subparsers made afterwards inherit it)."""

    usage_status = 2
    is_subcommand = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """As argparse's; a subcommand reports arguments it does not know itself (so
        the error has its usage and its exit status)."""
        ns, extras = super().parse_known_args(args, namespace)
        if self.is_subcommand and extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``message``; exit with :attr:`usage_status`."""
        self.print_usage(sys.stderr)
        self.exit(self.usage_status, f"{self.prog}: error: {message}\n")

    def add_subparsers(self, **kwargs: Any) -> Any:
        """Subparsers whose usage errors exit with this parser's status."""
        action = super().add_subparsers(**kwargs)
        add_parser = action.add_parser

        def add(name: str, **kw: Any) -> argparse.ArgumentParser:
            sub: argparse.ArgumentParser = add_parser(name, **kw)
            set_usage_status(sub, self.usage_status)
            if isinstance(sub, Parser):
                sub.is_subcommand = True
            return sub

        setattr(action, "add_parser", add)  # noqa: B010 (a method of this instance only)
        return action


def set_usage_status(parser: argparse.ArgumentParser, status: int) -> None:
    """Make usage errors of ``parser`` (a :class:`Parser`) exit with ``status``."""
    if isinstance(parser, Parser):
        parser.usage_status = status


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<12} {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    parser = argparse.ArgumentParser(
        prog="xenpv",
        description="Xen paravirtual split drivers in Python.",
        epilog="commands:\n" + "\n".join(lines)
        + "\n\n'xenpv COMMAND --help' describes a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v: info, -vv: debug); for every command")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="logging threshold for every command (default: warning)")
    parser.add_argument("command", nargs="?", help="one of the commands below")
    return parser


def _global_options(args: list[str]) -> tuple[str | None, list[str]]:
    """Take the global ``-v``/``--log-level`` options off the front of ``args``: the
    logging level they ask for (None: not given) and the rest."""
    level: str | None = None
    verbose = 0
    while args:
        head = args[0]
        if head in ("-v", "--verbose") or (head.startswith("-v") and set(head[1:]) == {"v"}):
            verbose += 1 if head == "--verbose" else len(head) - 1
        elif head == "--log-level" and len(args) > 1:
            level = args[1]
            args = args[1:]
        elif head.startswith("--log-level="):
            level = head.partition("=")[2]
        else:
            break
        args = args[1:]
    if level is not None and level not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    if level is None and verbose:
        level = "info" if verbose == 1 else "debug"
    return level, args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xenpv`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        level, args = _global_options(args)
    except ValueError as exc:
        print(f"xenpv: {exc}", file=sys.stderr)
        return 2
    if not args or args[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if args else 2
    if args[0] == "--version":
        from xenpv import __version__

        print(f"xenpv {__version__}")
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"xenpv: unknown command {name!r} (see 'xenpv --help')", file=sys.stderr)
        return 2
    logging.basicConfig(level=(level or "warning").upper(), format=f"xenpv {name}: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    parser = build_parser(name)
    ns = parser.parse_args(args[1:])
    ns.log_level_global = level
    from xenpv.cli.args import CliError, UsageError
    from xenpv.errors import XenpvError
    from xenpv.xenstore.wire import XenstoreError

    try:
        return int(module.run(ns) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except UsageError as exc:
        parser.error(str(exc))
    except (CliError, XenpvError, XenstoreError, OSError, TimeoutError) as exc:
        # a failure of the command, not a bug: one line, never a traceback, naming the
        # subcommand where there is one ("xenpv block info: …")
        action = getattr(ns, "action", None)
        where = f"{name} {action}" if isinstance(action, str) else name
        print(f"xenpv {where}: {describe(exc)}", file=sys.stderr)
        return 1


def build_parser(name: str) -> argparse.ArgumentParser:
    """The complete argument parser of command ``name`` (also used by the tests that walk
    every subcommand)."""
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = Parser(prog=f"xenpv {name}", description=help_)
    set_usage_status(parser, getattr(module, "USAGE_STATUS", 2))
    module.configure(parser)
    return parser


def describe(exc: BaseException) -> str:
    """One line for a failure: ``strerror`` for an OS error (with the file it names),
    else the message (or the exception's name when it has none)."""
    if isinstance(exc, OSError) and exc.errno:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{os.strerror(exc.errno)}{where}"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

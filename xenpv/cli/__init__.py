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
import sys
from collections.abc import Sequence

# name -> (module, one-line help).  Keep alphabetical.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("xenpv.cli.bench", "run a benchmark and report ratios against its anchor"),
    "console": ("xenpv.cli.console", "attach to a guest console; run a console backend or frontend"),
    "demo": ("xenpv.cli.demo", "show xenpv at work (the README's main job)"),
    "device": ("xenpv.cli.device", "create, remove and list xenbus device pairs as the toolstack"),
    "fuzz": ("xenpv.cli.fuzz", "fuzz ring, xenbus and xenstore handling with hostile peers"),
    "hid": ("xenpv.cli.hid", "keyboard/pointer devices: serve, route, watch, focus, inject"),
    "info": ("xenpv.cli.info", "print version, ring implementation and platform facts"),
    "loopback": ("xenpv.cli.loopback", "run the loopback emulator daemon and manage its domains"),
    "peers": ("xenpv.cli.peers", "fetch and locate the real Xen programs used as test peers"),
    "vchan-proxy": ("xenpv.cli.vchan_proxy", "vchan to Unix socket proxy, a drop-in for vchan-socket-proxy"),
    "xenstore": ("xenpv.cli.xenstore", "xenstore-utils style client commands"),
    "xenstored": ("xenpv.cli.xenstored", "run the embedded xenstore daemon"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<12} {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    parser = argparse.ArgumentParser(
        prog="xenpv",
        description="Xen paravirtual split drivers in Python.",
        epilog="commands:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", help="one of the commands below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xenpv`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
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
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"xenpv {name}", description=help_)
    module.configure(parser)
    ns = parser.parse_args(args[1:])
    try:
        return int(module.run(ns) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``xenpv peers fetch|path|env``: the real Xen programs used as peers."""

from __future__ import annotations

import argparse
import shlex

from xenpv import peers


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                help="what to do")
    f = sub.add_parser("fetch", help="download and unpack the Debian packages (idempotent)")
    f.add_argument("--dir", help="target directory (default: $XENPV_PEERS_DIR or ~/.cache/xenpv/peers)")
    f.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    sub.add_parser("path", help="print the peers directory")
    sub.add_parser("env", help="print an LD_LIBRARY_PATH export line for the peers' libraries")


def run(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        from pathlib import Path

        root = peers.fetch(Path(args.dir) if args.dir else None, quiet=args.quiet)
        print(root)
    elif args.action == "path":
        print(peers.peers_root())
    else:
        print(f"export LD_LIBRARY_PATH={shlex.quote(peers.run_env()['LD_LIBRARY_PATH'])}")
    return 0

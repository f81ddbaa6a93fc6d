"""``xenpv info``: what this installation of xenpv is made of."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def facts() -> dict[str, str]:
    """Facts about this installation, as printed by ``xenpv info``."""
    from xenpv import __version__, peers

    out: dict[str, str] = {"xenpv": __version__, "python": platform.python_version()}
    try:
        from xenpv import rings

        out["rings"] = rings.IMPLEMENTATION
    except Exception as exc:  # an unbuilt tree still prints the rest
        out["rings"] = f"unavailable ({exc})"
    try:
        from xenpv import loops
        from xenpv.xenstore import server

        out["xenstored"] = f"{server.SERVE_IMPL}, loop {loops.default_loop_name()}"
    except Exception as exc:
        out["xenstored"] = f"unavailable ({exc})"
    out["xen"] = "present" if os.path.exists("/dev/xen/evtchn") else "absent (use the loopback emulator)"
    try:
        out["peers"] = str(peers.find("usr/bin/xenstore-read").parents[2])
    except peers.PeerMissing:
        out["peers"] = "not fetched (xenpv peers fetch)"
    return out


def run(args: argparse.Namespace) -> int:
    f = facts()
    if args.json:
        import json

        print(json.dumps(f))
    else:
        for k, v in f.items():
            print(f"{k}: {v}")
    sys.stdout.flush()
    return 0

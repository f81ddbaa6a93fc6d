"""``xenpv info``: what this installation of xenpv is made of."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


#: The devices xenpv uses on real Xen (docs/real-xen.md): event channels, mapping and
#: granting pages, the xenstore, hypercalls (dom0's toolstack).
XEN_DEVICES = ("evtchn", "gntdev", "gntalloc", "xenbus", "privcmd")
#: The libraries XenPlatform loads.
XEN_LIBRARIES = ("libxengnttab.so.1", "libxenevtchn.so.1")


def xen_devices(root: str = "/dev/xen") -> str:
    """Each device of :data:`XEN_DEVICES` under ``root``: ``ok`` (readable and writable by
    this process), ``no access`` or ``missing``."""
    states = []
    for name in XEN_DEVICES:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            state = "missing"
        elif os.access(path, os.R_OK | os.W_OK):
            state = "ok"
        else:
            state = "no access"
        states.append(f"{name} {state}")
    return ", ".join(states)


def xen_libraries() -> str:
    """Whether each library of :data:`XEN_LIBRARIES` can be loaded (``ok``/``missing``)."""
    import ctypes

    states = []
    for name in XEN_LIBRARIES:
        try:
            ctypes.CDLL(name)
            states.append(f"{name} ok")
        except OSError:
            states.append(f"{name} missing")
    return ", ".join(states)


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
    out["xen devices"] = xen_devices()
    out["xen libraries"] = xen_libraries()
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

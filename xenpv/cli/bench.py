"""``xenpv bench NAME [--json]``: benchmarks that measure an anchor in the same run.

Each benchmark is a module ``xenpv.bench.<name>`` with::

    def configure(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> dict    # JSON-able figures and ratios

With ``--json`` the dict is printed as one JSON object; otherwise as an indented listing.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

BENCHMARKS: dict[str, str] = {
    "fuzz": "hostile operations per second per fuzz target against benign throughput",
    "platform": "notify round trip, grant map/unmap and grant copy on the loopback emulator",
    "ring": "shared-ring requests per second: Xen's C macros, Cython core, reference",
    "vchan": "vchan throughput and latency against a Unix socket and libxenvchan",
    "xenstore": "xenstore operations per second: our client, pyxs, libxenstore, C echo floor",
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, help_ in sorted(BENCHMARKS.items()):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        try:
            mod = importlib.import_module(f"xenpv.bench.{name}")
        except ModuleNotFoundError:
            continue
        mod.configure(p)


def render(obj: Any, indent: int = 0) -> str:
    """Render a nested dict of figures as an indented, aligned listing."""
    lines: list[str] = []
    pad = "  " * indent
    if isinstance(obj, dict):
        width = max((len(str(k)) for k in obj), default=0)
        for k, v in obj.items():
            if isinstance(v, dict):
                lines.append(f"{pad}{k}:")
                lines.append(render(v, indent + 1))
            else:
                if isinstance(v, float):
                    v = f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
                lines.append(f"{pad}{str(k) + ':':<{width + 1}} {v}")
    else:
        lines.append(f"{pad}{obj}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        mod = importlib.import_module(f"xenpv.bench.{args.bench}")
    except ModuleNotFoundError:
        print(f"xenpv bench: benchmark {args.bench!r} is not available yet")
        return 1
    result = mod.run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(render(result))
    return 0

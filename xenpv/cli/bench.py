"""``xenpv bench NAME [--json] [--plot FILE] [--output FILE]``: benchmarks that measure an
anchor in the same run; ``bench all`` runs every one, ``bench compare A.json B.json``
prints the changes between two runs, ``bench plot RESULT.json FILE`` draws a saved run.

Each benchmark is a module ``xenpv.bench.<name>`` with::

    def configure(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> dict    # JSON-able figures and ratios
    def prerequisites() -> None                  # optional: LocalError if one is missing

and builds its result with :class:`xenpv.bench.report.Rounds` (medians and spreads of
interleaved rounds, ratios, targets, the run's conditions).  With ``--json`` the result is
printed as one JSON object; otherwise as a listing where every ratio with a target is
marked met or missed and a noisy run says so.  A missing prerequisite (the real Xen peers,
pyxs, a C compiler, matplotlib for ``--plot``) is a one-line error and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from xenpv.errors import LocalError

BENCHMARKS: dict[str, str] = {
    "block": "block I/O: our backend, QEMU's qdisk, fio and Python threads on one image",
    "fuzz": "hostile operations per second per fuzz target against benign throughput",
    "hid": "keyboard events per second and injection-to-delivery latency, ours and QEMU's vkbd",
    "net": "iperf3 TCP and UDP between two namespaces: our net pair, QEMU 10, a veth pair",
    "platform": "notify round trip, grant map/unmap and grant copy on the loopback emulator",
    "ring": "shared-ring requests per second: Xen's C macros, Cython core, reference",
    "vchan": "vchan throughput and latency against a Unix socket and libxenvchan",
    "xenstore": "xenstore operations per second: our client, pyxs, libxenstore, C echo floor",
}
TOOLS: dict[str, str] = {
    "all": "run every benchmark and report them in one document",
    "compare": "print the changes between two saved results (--json or --output files)",
    "plot": "draw a saved result (--json or --output file) into an SVG or PNG file",
}


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE", help="also draw the figures beside their anchors "
                   "into FILE (.svg, .png or .pdf; needs matplotlib: pip install 'xenpv[plot]')")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="also write the JSON result to FILE (for bench compare / bench plot)")


def configure(parser: argparse.ArgumentParser) -> None:
    """The subcommands: one per benchmark, plus ``all``, ``compare`` and ``plot``."""
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME",
                                help="the benchmark to run, or a tool for saved results")
    for name, help_ in sorted(BENCHMARKS.items()):
        p = sub.add_parser(name, help=help_, description=help_)
        _outputs(p)
        importlib.import_module(f"xenpv.bench.{name}").configure(p)
    p = sub.add_parser("all", help=TOOLS["all"], description=TOOLS["all"])
    _outputs(p)
    p.add_argument("--quick", action="store_true",
                   help="every benchmark's smoke run (figures are not meaningful)")
    p.add_argument("--rounds", type=int, metavar="N",
                   help="interleaved rounds of every benchmark (default: each one's own)")
    p = sub.add_parser("compare", help=TOOLS["compare"], description=TOOLS["compare"])
    p.add_argument("old", help="the earlier result (JSON)")
    p.add_argument("new", help="the later result (JSON)")
    p = sub.add_parser("plot", help=TOOLS["plot"], description=TOOLS["plot"])
    p.add_argument("result", help="a saved result (JSON)")
    p.add_argument("file", help="the picture to write (.svg, .png or .pdf)")


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


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
                lines.append(f"{pad}{str(k) + ':':<{width + 1}} {_value(v)}")
    else:
        lines.append(f"{pad}{obj}")
    return "\n".join(lines)


def render_result(result: Mapping[str, Any]) -> str:
    """A benchmark's result as text: figures with the range of their rounds, ratios with
    their targets marked met or missed, the details, and the run's conditions."""
    from xenpv.bench.report import META_KEYS, get

    if "spread" not in result or "ratios" not in result:
        return render(dict(result))
    lines: list[str] = []
    cond = result.get("conditions", {})
    name = result.get("benchmark", "bench")
    lines.append(f"{name}: {result.get('rounds', '?')} interleaved round(s), medians "
                 "[lowest .. highest round]")
    spread, units = result["spread"], result.get("units", {})
    width = max((len(k) for k in spread), default=0)
    for key, (lo, hi) in spread.items():
        unit = f" {units[key]}" if key in units else ""
        lines.append(f"  {key + ':':<{width + 1}} {_value(get(result, key))}{unit}"
                     f"  [{_value(lo)} .. {_value(hi)}]")
    ratios = result["ratios"]
    if ratios:
        lines.append("ratios (median of the per-round ratios [lowest .. highest]):")
        width = max(len(k) for k in ratios)
        for k, v in ratios.items():
            lo, hi = result.get("ratio_spread", {}).get(k, [v, v])
            line = f"  {k + ':':<{width + 1}} {v:.3f}  [{lo:.3f} .. {hi:.3f}]"
            target = result.get("targets", {}).get(k)
            if target:
                met = result.get("targets_met", {}).get(k)
                line += f"  target {target}: {'met' if met else 'MISSED'}"
            lines.append(line)
    figure_roots = {k.split(".")[0] for k in spread}
    rest = {k: v for k, v in result.items() if k not in META_KEYS and k not in figure_roots}
    for key in ("setup", "placement", "measured", "two_process_detail", "detail"):
        if key in result:
            rest[key] = result[key]
    if rest:
        lines.append("details:")
        lines.append(render(rest, 1))
    if cond:
        lines.append(f"conditions: placement {_placement(cond.get('placement'))}; "
                     f"{cond.get('cpus')} CPUs ({cond.get('cpu_model')}); load "
                     f"{cond.get('load_before', ['?'])[0]} before, "
                     f"{cond.get('load_after', ['?'])[0]} after")
        if cond.get("noisy"):
            lines.append("NOISY RUN, figures not to be trusted: " + "; ".join(cond["noise"]))
    return "\n".join(lines)


def summary(document: Mapping[str, Any]) -> str:
    """One line per benchmark of a ``bench all`` document: targets met and missed, noise."""
    lines = ["summary:"]
    for name, result in document["benchmarks"].items():
        met = result.get("targets_met", {})
        missed = [k for k, ok in met.items() if not ok]
        noisy = " (noisy run)" if result.get("conditions", {}).get("noisy") else ""
        lines.append(f"  {name}: {len(met) - len(missed)} of {len(met)} targets met"
                     + (f"; missed: {', '.join(missed)}" if missed else "") + noisy)
    return "\n".join(lines)


def _placement(p: Any) -> str:
    if isinstance(p, Mapping):
        return ", ".join(f"{k} {v}" for k, v in p.items())
    return str(p)


def _bench_args(name: str, argv: list[str]) -> argparse.Namespace:
    """The default arguments of benchmark ``name`` (plus ``argv``), as its parser makes them."""
    p = argparse.ArgumentParser(prog=f"xenpv bench {name}")
    _outputs(p)
    module = importlib.import_module(f"xenpv.bench.{name}")
    module.configure(p)
    args = p.parse_args(argv)
    args.bench = name
    return args


def _check(name: str) -> None:
    module = importlib.import_module(f"xenpv.bench.{name}")
    check = getattr(module, "prerequisites", None)
    if check is not None:
        check()


def run_all(quick: bool, rounds: int | None = None) -> dict[str, Any]:
    """Run every benchmark (after checking every prerequisite first) into one document;
    ``rounds`` overrides every benchmark's default number of rounds."""
    from xenpv.bench.report import cpu_model, loadavg

    for name in sorted(BENCHMARKS):
        _check(name)
    before = loadavg()
    results: dict[str, Any] = {}
    for name in sorted(BENCHMARKS):
        print(f"xenpv bench all: {name} …", file=sys.stderr, flush=True)
        argv = (["--quick"] if quick else []) + (["--rounds", str(rounds)] if rounds else [])
        results[name] = importlib.import_module(f"xenpv.bench.{name}").run(
            _bench_args(name, argv))
    noisy = sorted(n for n, r in results.items() if r.get("conditions", {}).get("noisy"))
    return {"benchmark": "all", "quick": quick, "rounds": rounds, "benchmarks": results,
            "conditions": {"cpu_model": cpu_model(), "load_before": before,
                           "load_after": loadavg(), "noisy": noisy}}


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; a missing prerequisite or failed step is one line on stderr.

    SIGTERM and SIGHUP stop a run as Ctrl-C does: every benchmark ends the processes,
    namespaces and directories it made on its way out, then one line says so."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args)
    except KeyboardInterrupt as exc:
        print(f"xenpv bench {args.bench}: interrupted{f' ({exc})' if str(exc) else ''}",
              file=sys.stderr)
        return 130
    except LocalError as exc:
        print(f"xenpv bench {args.bench}: {exc}", file=sys.stderr)
    except ModuleNotFoundError as exc:
        print(f"xenpv bench {args.bench}: needs the Python package {exc.name!r} "
              f"(pip install {exc.name}, or pip install 'xenpv[test]')", file=sys.stderr)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines() if isinstance(exc.stderr, str) else []
        cmd = exc.cmd[0] if isinstance(exc.cmd, list | tuple) else str(exc.cmd).split()[0]
        print(f"xenpv bench {args.bench}: {cmd} failed with status {exc.returncode}"
              + (f": {detail[-1]}" if detail else ""), file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1


def _run(args: argparse.Namespace) -> int:
    from xenpv.bench import compare, plot

    if args.bench == "compare":
        print(compare.render(compare.load(args.old), compare.load(args.new), args.old,
                             args.new))
        return 0
    if args.bench == "plot":
        plot.plot(compare.load(args.result), args.file)
        print(f"xenpv bench plot: wrote {args.file}")
        return 0
    if args.plot:
        plot.require(args.plot)  # say what to install before running anything
    if args.bench == "all":
        result = run_all(args.quick, args.rounds)
        text = "\n\n".join([*(render_result(r) for r in result["benchmarks"].values()),
                             summary(result)])
    else:
        _check(args.bench)
        result = importlib.import_module(f"xenpv.bench.{args.bench}").run(args)
        text = render_result(result)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if args.plot:
        plot.plot(result, args.plot)
    print(json.dumps(result) if args.json else text)
    return 0

"""``xenpv fuzz``: run a fuzz target, list targets, replay a reproducer.

::

    xenpv fuzz --list
    xenpv fuzz TARGET [--time S] [--runs N] [--seed N] [--out DIR] [--engine atheris|random]
                      [--victim MODULE:FACTORY | FILE.py:FACTORY] [--seeds DIR]
    xenpv fuzz --all [--time S] [--runs N] [--seed N] [--out DIR] [--engine ...] [--seeds DIR]
    xenpv fuzz --replay FILE [--victim ...]

``--all`` runs every target in turn (``--time`` seconds each, the default victims),
writes each failure's reproducer into ``--out`` and ends with a summary; a nightly-style
campaign is ``xenpv fuzz --all --time 300 --seeds tests/fuzz/seeds --out fuzz-nightly``
(docs/testing.md).

Exit status: 0 no failure, 1 failures found (or, with ``--replay``, the input still
fails), 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from xenpv.cli import args as args_
from xenpv.errors import LocalError

if TYPE_CHECKING:
    from xenpv.fuzz.runner import CampaignResult


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``xenpv fuzz``."""
    parser.add_argument("target", nargs="?", help="target name (see --list)")
    parser.add_argument("--list", action="store_true", help="name every target with a description")
    parser.add_argument("--all", action="store_true",
                        help="run every target in turn, --time seconds each (default victims)")
    parser.add_argument("--replay", metavar="FILE", help="run a reproducer file again")
    parser.add_argument("--time", type=args_.positive_float, default=10.0, help="time box in seconds (default 10)")
    parser.add_argument("--runs", type=args_.size(1, 1 << 62, "--runs"), default=None, help="stop after this many inputs")
    parser.add_argument("--seed", type=args_.uint(0, (1 << 64) - 1, "--seed"), default=0, help="random seed (default 0)")
    parser.add_argument("--out", default="fuzz-failures", help="reproducer directory")
    parser.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto",
                        help="coverage-guided atheris (default when installed) or random mutation")
    parser.add_argument("--victim", default=None,
                        help="driver to attack: MODULE:FACTORY or FILE.py:FACTORY "
                             "(a command line for the *:process targets)")
    parser.add_argument("--seeds", default=None,
                        help="seed reproducers (default: the saved regression seeds if present)")


def _engine(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "random"
    return "atheris"


def _seeds(seeds_dir: Path | None, target: str) -> list[bytes]:
    from xenpv.fuzz import runner

    out = []
    if seeds_dir is not None:
        for path in sorted(seeds_dir.glob("*.repro")):
            name, data = runner.read_reproducer(path)
            if name == target:
                out.append(data)
    return out


def _campaign(target: str, args: argparse.Namespace, engine: str, victim: str | None) -> CampaignResult:
    """One campaign against ``target``; returns its CampaignResult (LocalError: usage)."""
    from xenpv.fuzz import runner, targets

    fn = targets.get_target(target, victim)
    seeds_dir = Path(args.seeds) if args.seeds else None
    print(f"fuzzing {target} with {engine} for {args.time:g} s (seed {args.seed})", file=sys.stderr)
    if engine == "atheris":
        runner.close_target(fn)  # the worker builds its own
        return runner.run_atheris(target, out_dir=args.out, seconds=args.time, runs=args.runs,
                                  seed=args.seed, victim=victim, seed_dir=seeds_dir)
    try:
        return runner.run_random(target, fn, out_dir=args.out, seconds=args.time, runs=args.runs,
                                 seed=args.seed, seeds=_seeds(seeds_dir, target), progress=sys.stderr)
    finally:
        runner.close_target(fn)


def _report(result: CampaignResult) -> None:
    print(f"{result.target}: {result.runs} inputs in {result.seconds:.1f} s "
          f"({result.execs_per_s:,.0f}/s), {len(result.failures)} distinct failure(s)")
    for f in result.failures:
        print(f"  {f.signature}  ->  {f.path}")


def _run_all(args: argparse.Namespace, engine: str) -> int:
    """Every target in turn; a target that cannot run is reported and the others go on."""
    from xenpv.fuzz import targets

    failed: list[str] = []
    broken: list[str] = []
    for name in sorted(targets.TARGETS):
        try:
            result = _campaign(name, args, engine, None)
        except LocalError as e:
            print(f"{name}: could not run: {e}")
            broken.append(name)
            continue
        _report(result)
        if result.failures:
            failed.append(name)
    total = len(targets.TARGETS)
    print(f"all targets: {total - len(failed) - len(broken)} of {total} clean"
          + (f"; failures in {', '.join(failed)}" if failed else "")
          + (f"; could not run {', '.join(broken)}" if broken else "")
          + (f"; reproducers in {args.out}" if failed else ""))
    return 1 if failed or broken else 0


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from xenpv.fuzz import runner, targets

    if args.list:
        width = max(len(n) for n in targets.TARGETS)
        for name, t in sorted(targets.TARGETS.items()):
            print(f"{name:<{width}}  {t.description}")
        return 0
    try:
        if args.replay:
            failure = runner.replay(args.replay, args.victim)
            if failure is None:
                print(f"{args.replay}: passes")
                return 0
            print(f"{args.replay}: still fails\n{failure}")
            return 1
        if args.all:
            if args.target or args.victim:
                print("xenpv fuzz: --all takes no target and no --victim", file=sys.stderr)
                return 2
            return _run_all(args, _engine(args.engine))
        if not args.target:
            print("xenpv fuzz: name a target (see --list), --all, or --replay FILE", file=sys.stderr)
            return 2
        result = _campaign(args.target, args, _engine(args.engine), args.victim)
    except LocalError as e:
        print(f"xenpv fuzz: {e}", file=sys.stderr)
        return 2
    _report(result)
    return 1 if result.failures else 0

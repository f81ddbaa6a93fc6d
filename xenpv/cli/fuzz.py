"""``xenpv fuzz``: run a fuzz target, list targets, replay a reproducer.

::

    xenpv fuzz --list
    xenpv fuzz TARGET [--time S] [--runs N] [--seed N] [--out DIR] [--engine atheris|random]
                      [--victim MODULE:FACTORY | FILE.py:FACTORY] [--seeds DIR]
    xenpv fuzz --replay FILE [--victim ...]

Exit status: 0 no failure, 1 failures found (or, with ``--replay``, the input still
fails), 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xenpv.errors import LocalError


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``xenpv fuzz``."""
    parser.add_argument("target", nargs="?", help="target name (see --list)")
    parser.add_argument("--list", action="store_true", help="name every target with a description")
    parser.add_argument("--replay", metavar="FILE", help="run a reproducer file again")
    parser.add_argument("--time", type=float, default=10.0, help="time box in seconds (default 10)")
    parser.add_argument("--runs", type=int, default=None, help="stop after this many inputs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
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
        if not args.target:
            print("xenpv fuzz: name a target (see --list) or use --replay FILE", file=sys.stderr)
            return 2
        fn = targets.get_target(args.target, args.victim)
    except LocalError as e:
        print(f"xenpv fuzz: {e}", file=sys.stderr)
        return 2
    seeds_dir = Path(args.seeds) if args.seeds else None
    engine = _engine(args.engine)
    print(f"fuzzing {args.target} with {engine} for {args.time:g} s (seed {args.seed})",
          file=sys.stderr)
    if engine == "atheris":
        runner.close_target(fn)  # the worker builds its own
        result = runner.run_atheris(args.target, out_dir=args.out, seconds=args.time, runs=args.runs,
                                    seed=args.seed, victim=args.victim, seed_dir=seeds_dir)
    else:
        seeds = []
        if seeds_dir is not None:
            for path in sorted(seeds_dir.glob("*.repro")):
                name, data = runner.read_reproducer(path)
                if name == args.target:
                    seeds.append(data)
        try:
            result = runner.run_random(args.target, fn, out_dir=args.out, seconds=args.time,
                                       runs=args.runs, seed=args.seed, seeds=seeds,
                                       progress=sys.stderr)
        finally:
            runner.close_target(fn)
    print(f"{args.target}: {result.runs} inputs in {result.seconds:.1f} s "
          f"({result.execs_per_s:,.0f}/s), {len(result.failures)} distinct failure(s)")
    for f in result.failures:
        print(f"  {f.signature}  ->  {f.path}")
    return 1 if result.failures else 0

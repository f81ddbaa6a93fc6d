"""Coverage-guided worker: ``python -m xenpv.fuzz.worker TARGET --out DIR [...]``.

Instruments xenpv's protocol, ring, xenstore and fuzz modules for atheris *before*
importing them, then hands the target to libFuzzer.  Each distinct failure is written as a
reproducer (:class:`~xenpv.fuzz.runner.FailureLog`) and fuzzing goes on, so one campaign
reports every bug it finds.  libFuzzer prints progress and ends the process itself; the
number of inputs run is left in ``DIR/.<target>.runs`` for the parent.
"""

from __future__ import annotations

import argparse
import atexit
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, instrument, and fuzz (does not return when libFuzzer runs)."""
    p = argparse.ArgumentParser(prog="python -m xenpv.fuzz.worker")
    p.add_argument("target")
    p.add_argument("--out", required=True)
    p.add_argument("--time", type=int, default=10)
    p.add_argument("--runs", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--victim", default=None)
    p.add_argument("--seeds", default=None, help="directory of seed reproducers")
    args = p.parse_args(argv)

    import atheris

    with atheris.instrument_imports(include=["xenpv"]):
        from xenpv.fuzz.runner import MAX_LEN, FailureLog, read_reproducer, safe_name
        from xenpv.fuzz.targets import get_target

    fn = get_target(args.target, args.victim)
    close = getattr(fn, "close", None)
    if close is not None:
        atexit.register(close)
    log = FailureLog(args.target, args.out)
    counter = [0]
    last_save = [time.monotonic()]
    stats = Path(args.out) / f".{safe_name(args.target)}.runs"

    def save_stats() -> None:
        stats.write_text(str(counter[0]))

    def test_one(data: bytes) -> None:
        counter[0] += 1
        try:
            fn(data)
        except Exception as e:
            failure = log.record(data, e)
            if failure is not None:
                print(f"FAILURE {failure.signature}\n  reproducer: {failure.path}", file=sys.stderr,
                      flush=True)
        # libFuzzer ends the process with exit(), past Python's atexit: keep the count
        # current (every 256 inputs, and at least twice a second for slow targets)
        now = time.monotonic()
        if counter[0] % 256 == 0 or now - last_save[0] > 0.5:
            last_save[0] = now
            save_stats()

    corpus: list[str] = []
    if args.seeds:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="xenpv-corpus-"))
        for path in sorted(Path(args.seeds).glob("*.repro")):
            name, data = read_reproducer(path)
            if name == args.target:
                (tmp / path.name).write_bytes(data)
        corpus.append(str(tmp))
    atexit.register(save_stats)
    lf_args = [sys.argv[0], f"-max_total_time={args.time}", f"-seed={args.seed}",
               f"-max_len={MAX_LEN}", "-print_final_stats=1", *corpus]
    if args.runs >= 0:
        lf_args.append(f"-runs={args.runs}")
    atheris.Setup(lf_args, test_one)
    try:
        atheris.Fuzz()
    finally:
        save_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())

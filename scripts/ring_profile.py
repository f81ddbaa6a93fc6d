"""Where the time of the two-process shared ring goes: instructions per batch and side.

Usage::

    python scripts/ring_profile.py {cython,reference,c} [--small N] [--large N]

Runs the two-process ring of ``xenpv bench ring`` (frontend here, backend forked, 32-slot
blkif-sized ring, batches of 32, eventfd wake-ups) with both processes under valgrind's
callgrind, twice (``--small`` and ``--large`` requests), and prints the instructions each
side spends per batch of 32 requests, from the difference of the two runs (start-up
cancels out), with those spent in memcpy apart.

Two schemes: by default the sides do not spin (``spin_us`` 0) and every count includes
the sleeping path (``poll`` and the eventfd calls), taken as often as the timing under
valgrind makes a side find the ring empty.  ``--spin`` (the compiled ring only) is the
benchmark's main figure instead: both sides poll the ring for up to 5 s, so neither ever
sleeps, and the instructions of the busy-wait (``_Ring._spin``, inclusive) are left out;
what remains is each side's work per batch: its loop, its calls and the copies.  ``c`` runs
the C program of the benchmark's anchor (``csrc/two_process.c``), which runs for a time
rather than a count: its two runs last ``--small`` and ``--large`` milliseconds (defaults
0 and 2000; the compiler inlines its 112-byte copies, so they count with the rest).

Instruction counts do not depend on the machine's load, so this profile can be taken on
a busy machine where the benchmark's times cannot.  Run it from the tree whose ring you
want to measure (``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from vchan_profile import callgrind_total, valgrind

from xenpv import peers
from xenpv.bench.ring import BATCH, CSRC, cache_dir, compile_program

RUN = ("import sys; from xenpv.bench.ring import run_two_process; "
       "run_two_process(sys.argv[1], seconds=None, count=int(sys.argv[2]), "
       "spin_us=int(sys.argv[3]), timeout_s=300, pin=False)")
LONG_SPIN_US = 5_000_000


def spin_instructions(path: str) -> int:
    """Instructions spent in the compiled ring's busy-wait, callees included.  The
    function's inlined lines are listed again under their header file, each part of the
    function's own inclusive figure, which is the largest of its entries."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                          capture_output=True, text=True, check=False).stdout
    found = [0]
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) (?:\([^)]*\))?\s+(\S+)", line)
        if m and not m.group(2).startswith("=>") and m.group(2).endswith("_Ring__spin"):
            found.append(int(m.group(1).replace(",", "")))
    return max(found)


def run_sides(impl: str, n: int, tmp: str,
              spin: bool) -> tuple[int, dict[str, tuple[int, int]]]:
    """One run under callgrind: (batches done, {side: (instructions, memcpy instructions)}),
    the busy-wait left out when ``spin``."""
    out = os.path.join(tmp, f"cg-{n}.%p.out")
    if impl == "c":
        exe = compile_program("two_process", CSRC / "two_process.c",
                              [str(peers.include_dir())], cache_dir())
        cmd = [*valgrind(out), str(exe), str(n / 1000), "0", str(BATCH)]
    else:
        cmd = [*valgrind(out), sys.executable, "-c", RUN, impl, str(n),
               str(LONG_SPIN_US if spin else 0)]
    # cwd: ``python -c`` puts the working directory first on sys.path, where a checkout's
    # own ``xenpv`` would win over PYTHONPATH's
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=tmp)
    stdout, _ = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[-3:]} failed with status {proc.returncode}")
    done = int(stdout.split()[0]) if impl == "c" else n
    sides = {}
    for f in Path(tmp).glob(f"cg-{n}.*.out"):  # valgrind's pid is the frontend's
        total, copies = callgrind_total(str(f))
        if spin:
            total -= spin_instructions(str(f))
        sides["front" if f.name == f"cg-{n}.{proc.pid}.out" else "back"] = (total, copies)
    return done // BATCH, sides


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("impl", choices=["cython", "reference", "c"])
    p.add_argument("--small", type=int, help="requests (ms for c) of the short run")
    p.add_argument("--large", type=int, help="requests (ms for c) of the long run")
    p.add_argument("--spin", action="store_true",
                   help="both sides spin, never sleep; the busy-wait is left out (cython)")
    args = p.parse_args()
    c = args.impl == "c"
    if args.spin and args.impl != "cython":
        p.error("--spin separates the busy-wait of the compiled ring only")
    small = args.small if args.small is not None else (0 if c else 3200)
    large = args.large if args.large is not None else (2000 if c else 64000)
    with tempfile.TemporaryDirectory(prefix="xenpv-ringprof-") as tmp:
        (b0, s0), (b1, s1) = (run_sides(args.impl, n, tmp, args.spin)
                                      for n in (small, large))
    for side in ("front", "back"):
        ins = s1[side][0] - s0[side][0]
        copies = max(s1[side][1] - s0[side][1], 0)
        print(f"{args.impl} {side}: {(ins - copies) / (b1 - b0):.0f} instructions per batch "
              f"of {BATCH} besides the copies, {copies / (b1 - b0):.0f} in memcpy "
              f"({b0} and {b1} batches)")


if __name__ == "__main__":
    main()

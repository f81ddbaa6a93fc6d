"""Where the time of a vchan transfer goes: counts per MiB and instructions per call.

Usage::

    python scripts/vchan_profile.py counts [--bytes N] [--write-size N] [--spin-us N]
    python scripts/vchan_profile.py calls {xenpv,libxenvchan} {sender,receiver} [--write-size N]
    python scripts/vchan_profile.py record {xenpv,libxenvchan} [--bytes N] [--write-size N]
    python scripts/vchan_profile.py rtt {xenpv,libxenvchan} [--count N]
    python scripts/vchan_profile.py inprocess WRITE_SIZE COUNT [bulk|rtt]

``counts`` runs one throughput pair of xenpv's vchan and one of libxenvchan (the programs
``xenpv bench vchan`` runs, same rings and spin) with each process under ``perf stat``
(kernel tracepoints, no hardware counters needed) and prints, per MiB moved, each side's
event-channel notifications (writes to the eventfd), sleeps (poll/select calls), context
switches and CPU milliseconds.

``record`` samples where each side of one pair spends its CPU time (``perf record -e
cpu-clock``, by shared object and symbol).

``calls`` runs the chosen side of one pair under valgrind's callgrind twice (two transfer
sizes) while its peer runs natively and polls the ring all the time (so the measured side
never waits) and prints the instructions of that side per call and per byte, from the
difference of the two runs (start-up cancels out).  ``rtt`` does the same for the ping
side of the 64-byte round trip (instructions per round trip, the echo side native).
Instruction counts do not depend on what else the machine runs.

``inprocess`` is the per-call loop with both ends in this process (blocking ``send`` then
``recv_into`` until all arrived, or a round trip); run it under callgrind with two counts
and subtract to get the instructions per iteration of the Python data path.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xenpv.bench.vchan import CSRC, READ_SIZE, SPIN_US
from xenpv.testing.vchan import VchanLab, build_libxenvchan_program, read_line, vchan_path

MiB = 1 << 20
LONG_SPIN_US = 5_000_000  # the native peer never sleeps while the measured side works
EVENTS = ["task-clock", "context-switches", "syscalls:sys_enter_write",
          "syscalls:sys_enter_poll", "syscalls:sys_enter_ppoll", "syscalls:sys_enter_select",
          "syscalls:sys_enter_pselect6", "syscalls:sys_enter_epoll_wait",
          "syscalls:sys_enter_read"]


def perf_stat(out: str) -> list[str]:
    """The argv prefix that counts EVENTS for one process into ``out``."""
    return ["perf", "stat", "-x", ",", "-o", out, "-e", ",".join(EVENTS), "--"]


def read_perf(path: str) -> dict[str, float]:
    """Event name -> count of one ``perf stat -x ,`` file."""
    counts: dict[str, float] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0] and parts[0][0].isdigit():
            counts[parts[2]] = float(parts[0])
    return counts


def run_pair(lab: VchanLab, impl: str, total: int, chunk: int, exe: str, *,
             wrap_recv: list[str], wrap_send: list[str], spin_recv: int,
             spin_send: int) -> None:
    """One throughput transfer of ``total`` bytes in ``chunk``-byte writes (1 MiB rings)."""
    path = vchan_path(1, 2, f"p{impl[0]}{time.monotonic_ns() % 10**6}")  # libxenvchan: < 64 bytes with /ring-ref
    tool = [sys.executable, "-m", "xenpv.vchan.tool"]
    if impl == "xenpv":
        server = lab.spawn(1, [*wrap_recv, *tool, "server", "2", path, "--recv", str(total),
                               "--read-min", str(MiB), "--write-min", str(MiB), "--no-crc",
                               "--read-size", str(READ_SIZE), "--timeout", "600",
                               "--spin-us", str(spin_recv)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert '"ready"' in read_line(server, 300)
        client = lab.spawn(2, [*wrap_send, *tool, "client", "1", path, "--send", str(total),
                               "--no-crc", "--chunk", str(chunk), "--block", str(chunk),
                               "--timeout", "600", "--spin-us", str(spin_send)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert '"ready"' in read_line(client, 300)
        read_line(server, 900)
        read_line(client, 900)
    else:
        def sizes(spin: int) -> list[str]:
            return [str(total), str(MiB), str(chunk), str(spin), str(READ_SIZE)]

        server = lab.spawn(1, [*wrap_recv, exe, "server", "2", path, *sizes(spin_recv)],
                           stdout=subprocess.PIPE, bufsize=0)
        assert read_line(server, 300) == "ready"
        client = lab.spawn(2, [*wrap_send, exe, "client", "1", path, *sizes(spin_send)],
                           stdout=subprocess.PIPE, bufsize=0)
        read_line(server, 900)
        read_line(client, 900)
    client.wait(300)
    server.wait(300)


def counts(args: argparse.Namespace) -> None:
    """Notifications, sleeps, context switches and CPU per MiB, both implementations
    (from two transfers, ``--bytes`` and a quarter of it, so that start-up cancels out)."""
    sizes = (args.bytes // 4, args.bytes)
    mib = (sizes[1] - sizes[0]) / MiB
    with VchanLab((1, 2)) as lab, tempfile.TemporaryDirectory(prefix="xenpv-prof-") as tmp:
        exe = str(build_libxenvchan_program(CSRC, Path(tmp) / "vchan_libxenvchan"))
        for impl in ("xenpv", "libxenvchan"):
            got: dict[str, list[dict[str, float]]] = {"recv": [], "send": []}
            for total in sizes:
                files = {side: os.path.join(tmp, f"{impl}-{side}-{total}.txt")
                         for side in ("recv", "send")}
                run_pair(lab, impl, total, args.write_size, exe,
                         wrap_recv=perf_stat(files["recv"]), wrap_send=perf_stat(files["send"]),
                         spin_recv=args.spin_us, spin_send=args.spin_us)
                for side, f in files.items():
                    got[side].append(read_perf(f))
            for side, (c0, c1) in got.items():
                c = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
                sleeps = sum(v for k, v in c.items() if re.search("poll|select|epoll", k))
                print(f"{impl:12} {side:5} per MiB: notifies(eventfd writes) "
                      f"{c.get('syscalls:sys_enter_write', 0) / mib:8.2f}  sleeps "
                      f"{sleeps / mib:8.2f}  reads {c.get('syscalls:sys_enter_read', 0) / mib:8.2f}"
                      f"  ctx-switches {c.get('context-switches', 0) / mib:8.2f}  cpu ms "
                      f"{c.get('task-clock', 0) / mib:7.3f}")


def record(args: argparse.Namespace) -> None:
    """Where each side's CPU time goes: ``perf record`` (cpu-clock samples) of one pair,
    the top symbols of each side."""
    with VchanLab((1, 2)) as lab, tempfile.TemporaryDirectory(prefix="xenpv-prof-") as tmp:
        exe = str(build_libxenvchan_program(CSRC, Path(tmp) / "vchan_libxenvchan"))
        files = {side: os.path.join(tmp, f"{side}.data") for side in ("recv", "send")}
        run_pair(lab, args.impl, args.bytes, args.write_size, exe,
                 wrap_recv=["perf", "record", "-q", "-e", "cpu-clock", "-o", files["recv"], "--"],
                 wrap_send=["perf", "record", "-q", "-e", "cpu-clock", "-o", files["send"], "--"],
                 spin_recv=args.spin_us, spin_send=args.spin_us)
        for side, f in files.items():
            out = subprocess.run(["perf", "report", "-i", f, "--stdio", "--sort", "dso,sym",
                                  "--percent-limit", str(args.percent_limit)],
                                 capture_output=True, text=True, check=False).stdout
            print(f"== {args.impl} {side}")
            print("\n".join(line for line in out.splitlines()
                            if line.strip() and not line.startswith("#")))


def callgrind_total(out: str) -> tuple[int, int]:
    """Instructions of one callgrind run (all threads), and those spent in memcpy/memmove
    (valgrind counts every byte of a ``rep movsb`` copy as an instruction, so copies are
    reported apart from the rest)."""
    total = copies = 0
    for f in Path(out).parent.glob(Path(out).name + "*"):
        text = subprocess.run(["callgrind_annotate", "--threshold=100", str(f)],
                              capture_output=True, text=True, check=False).stdout
        for line in text.splitlines():
            m = re.match(r"\s*([\d,]+) (?:\([^)]*\))?\s+(\S.*)", line)
            if not m:
                continue
            count = int(m.group(1).replace(",", ""))
            if "PROGRAM TOTALS" in m.group(2):
                total += count
            elif re.search(r"mem(cpy|move)", m.group(2)) and not m.group(2).startswith("=>"):
                copies += count
    return total, copies


def valgrind(out: str) -> list[str]:
    """The argv prefix that runs a process under callgrind, writing ``out``."""
    return ["valgrind", "--tool=callgrind", "--separate-threads=no",
            f"--callgrind-out-file={out}"]


def calls(args: argparse.Namespace) -> None:
    """Instructions per call of one side (the peer native and always polling)."""
    chunk = args.write_size
    small, large = args.calls_small * chunk, args.calls_large * chunk
    totals = []
    with VchanLab((1, 2)) as lab, tempfile.TemporaryDirectory(prefix="xenpv-prof-") as tmp:
        exe = str(build_libxenvchan_program(CSRC, Path(tmp) / "vchan_libxenvchan"))
        for total in (small, large):
            out = os.path.join(tmp, f"cg-{total}")
            wrap = valgrind(out)
            run_pair(lab, args.impl, total, chunk, exe,
                     wrap_recv=wrap if args.side == "receiver" else [],
                     wrap_send=wrap if args.side == "sender" else [],
                     spin_recv=LONG_SPIN_US if args.side == "sender" else args.spin_us,
                     spin_send=LONG_SPIN_US if args.side == "receiver" else args.spin_us)
            totals.append(callgrind_total(out))
    moved = large - small
    ins = totals[1][0] - totals[0][0]
    copies = totals[1][1] - totals[0][1]
    print(f"{args.impl} {args.side}, {chunk}-byte writes, per {chunk} bytes moved: "
          f"{(ins - copies) / (moved / chunk):.0f} instructions besides the copies, "
          f"{copies / (moved / chunk):.0f} in memcpy (runs of {small} and {large} bytes: "
          f"{totals[0]} and {totals[1]})")


def rtt(args: argparse.Namespace) -> None:
    """Instructions per 64-byte round trip of the ping side (the echo side native)."""
    totals = []
    counts_ = (args.count, args.count * 10)
    tool = [sys.executable, "-m", "xenpv.vchan.tool"]
    with VchanLab((1, 2)) as lab, tempfile.TemporaryDirectory(prefix="xenpv-prof-") as tmp:
        exe = str(build_libxenvchan_program(CSRC, Path(tmp) / "vchan_libxenvchan"))
        for n in counts_:
            out = os.path.join(tmp, f"cg-{n}")
            path = vchan_path(1, 2, f"rtt-{n}")
            if args.impl == "xenpv":
                server = lab.spawn(1, [*tool, "server", "2", path, "--echo", "--timeout", "600",
                                       "--spin-us", str(LONG_SPIN_US)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
                read_line(server, 300)
                client = lab.spawn(2, [*valgrind(out), *tool, "client", "1", path, "--pingpong",
                                       str(n), "--size", "64", "--spin-us", str(args.spin_us),
                                       "--timeout", "600"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
                read_line(client, 300)
            else:
                server = lab.spawn(1, [exe, "echo", "2", path, str(n), "0", "64",
                                       str(LONG_SPIN_US)], stdout=subprocess.PIPE, bufsize=0)
                read_line(server, 300)
                client = lab.spawn(2, [*valgrind(out), exe, "ping", "1", path, str(n), "0", "64",
                                       str(args.spin_us)], stdout=subprocess.PIPE, bufsize=0)
            read_line(client, 900)
            client.wait(300)
            server.wait(300)
            totals.append(callgrind_total(out)[0])
    print(f"{args.impl} ping side: {(totals[1] - totals[0]) / (counts_[1] - counts_[0]):.0f} "
          f"instructions per 64-byte round trip")


def inprocess(write_size: int, count: int, mode: str) -> None:
    """Both ends in this process: ``count`` blocking send + recv_into rounds (no waits)."""
    from xenpv.testing.vchan import InProcessVchanLab
    from xenpv.vchan.endpoint import VchanClient, VchanServer

    with InProcessVchanLab((1, 2)) as lab:
        path = vchan_path(1, 2, "inprocess")
        ring = MiB if mode == "bulk" else 0
        srv = VchanServer(lab.platform(1), 2, path, read_min=ring, write_min=ring)
        cli = VchanClient(lab.platform(2), 1, path)
        srv.wait_connected(5)
        data = memoryview(os.urandom(write_size))
        buf = bytearray(max(write_size, READ_SIZE))

        def loop(srv: Any = srv, cli: Any = cli, n: int = count, w: int = write_size) -> None:
            for _ in range(n):
                cli.send(data)
                got = 0
                while got < w:
                    got += srv.recv_into(buf, w - got)
                if mode == "rtt":
                    srv.send(data)
                    got = 0
                    while got < w:
                        got += cli.recv_into(buf, w - got)

        t0 = time.perf_counter()
        loop()
        dt = time.perf_counter() - t0
        print(f"{mode} {write_size} x {count}: {dt / count * 1e6:.2f} µs per iteration",
              file=sys.stderr)
        cli.close()
        srv.close()


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("counts")
    c.add_argument("--bytes", type=int, default=256 * MiB)
    c.add_argument("--write-size", type=int, default=1 << 16)
    c.add_argument("--spin-us", type=int, default=SPIN_US)
    k = sub.add_parser("calls")
    k.add_argument("impl", choices=["xenpv", "libxenvchan"])
    k.add_argument("side", choices=["sender", "receiver"])
    k.add_argument("--write-size", type=int, default=1 << 16)
    k.add_argument("--spin-us", type=int, default=SPIN_US)
    k.add_argument("--calls-small", type=int, default=200)
    k.add_argument("--calls-large", type=int, default=5000)
    e = sub.add_parser("record")
    e.add_argument("impl", choices=["xenpv", "libxenvchan"])
    e.add_argument("--bytes", type=int, default=256 * MiB)
    e.add_argument("--write-size", type=int, default=1 << 16)
    e.add_argument("--spin-us", type=int, default=SPIN_US)
    e.add_argument("--percent-limit", type=float, default=2.0)
    r = sub.add_parser("rtt")
    r.add_argument("impl", choices=["xenpv", "libxenvchan"])
    r.add_argument("--count", type=int, default=500)
    r.add_argument("--spin-us", type=int, default=SPIN_US)
    i = sub.add_parser("inprocess")
    i.add_argument("write_size", type=int)
    i.add_argument("count", type=int)
    i.add_argument("mode", nargs="?", choices=["bulk", "rtt"], default="bulk")
    args = p.parse_args()
    if args.cmd == "counts":
        counts(args)
    elif args.cmd == "calls":
        calls(args)
    elif args.cmd == "record":
        record(args)
    elif args.cmd == "rtt":
        rtt(args)
    else:
        inprocess(args.write_size, args.count, args.mode)


if __name__ == "__main__":
    main()

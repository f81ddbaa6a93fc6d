"""``xenpv bench vchan``: vchan throughput and latency against a Unix socket and libxenvchan.

What is measured (one run, two processes per figure, 64 KiB writes, 1 MiB rings):

* ``vchan_gbps``: xenpv's vchan between two emulated domains on the loopback daemon
  (``python -m xenpv.vchan.tool``, blocking API on the compiled ring: the writer copies
  64 KiB slices, the reader takes whatever is in the ring up to 256 KiB per call; both
  poll the ring in C for up to ``--spin-us`` µs before sleeping on the event channel).
* ``unix_socket_gbps`` (anchor): a Unix stream socket between two Python processes,
  ``sendall`` of 64 KiB / ``recv_into`` a 64 KiB buffer.

All three writers send the same 64 KiB block over and over (the vchan tool's ``--block``).
* ``libxenvchan_gbps`` (anchor): Debian's libxenvchan driven by a small C program
  (``csrc/vchan_libxenvchan.c``) on the same emulator through the replacement libraries,
  with the same spin-then-sleep policy.
* ``vchan_rtt_us``: median round trip of a 64-byte message over xenpv's vchan (in-page
  rings), client and server in two processes.
* ``console_mbps``: console output throughput of the console pair on the in-process
  emulator (:func:`xenpv.backends.console.bench_console_mbps`).

Placement.  Every pair (all three throughputs and the round trip) runs with its receiver
pinned to one CPU and its sender to another (``--placement cross``, the default; ``same``
puts both on one CPU, ``none`` leaves placement to the scheduler).  Pinning happens with
:func:`os.sched_setaffinity` around the start of each process (children inherit it), so
the three measurements are placed alike; ``placement`` in the result says where they ran.

Throughput is bytes over the receiver's time from its first to its last byte (GB/s =
1e9 bytes per second).  The measurements run in ``--rounds`` interleaved rounds and the
medians are reported (``runs`` lists every figure; the three throughputs take turns in
going first): on a shared 2-vCPU machine one run
varies several-fold with what else the CPUs are doing.  ``gb_per_cpu_second`` divides the
bytes by the CPU time both processes spent in their transfer loops (medians): it varies far
less with load and shows what each byte costs.  ``vchan_wakeups`` are the medians of the
notifications sent and sleeps taken by each side of xenpv's vchan.  ``ratios`` compare
against the anchors measured in this run; ``targets`` are the project's goals.  ``--quick``
moves a few MiB only (smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any, NamedTuple

MiB = 1 << 20
CHUNK = 1 << 16
READ_SIZE = 1 << 18  # the reader takes up to this much per call
CSRC = Path(__file__).resolve().parent / "csrc" / "vchan_libxenvchan.c"
TARGETS = {"vchan/unix_socket": 2.0, "vchan/libxenvchan": 0.5}
SPIN_US = 50


class Placement(NamedTuple):
    """CPUs of the receiving and the sending process (``None``: not pinned)."""

    name: str
    receiver: int | None
    sender: int | None


class Sample(NamedTuple):
    """One throughput run: GB/s, CPU seconds of receiver and sender in their loops, and
    (xenpv's vchan only) notifications and sleeps of receiver and sender."""

    gbps: float
    bytes: int
    recv_cpu: float
    send_cpu: float
    wakeups: tuple[int, int, int, int] | None = None


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of the vchan benchmark."""
    parser.add_argument("--quick", action="store_true", help="tiny transfers (smoke test)")
    parser.add_argument("--bytes", type=int, default=512 * MiB, help="bytes per throughput run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians)")
    parser.add_argument("--rtt-count", type=int, default=2000, help="round trips to time")
    parser.add_argument("--placement", choices=["cross", "same", "none"], default="cross",
                        help="receiver and sender on two CPUs, on one, or unpinned")
    parser.add_argument("--spin-us", type=int, default=SPIN_US,
                        help="µs each side polls the ring before sleeping (vchan and C)")


def placement(kind: str) -> Placement:
    """The CPUs for ``kind`` among those this process may use (``cross`` falls back to
    ``same`` on a single CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    if kind == "none":
        return Placement("none", None, None)
    if kind == "cross" and len(cpus) >= 2:
        return Placement("cross", cpus[0], cpus[1])
    return Placement("same", cpus[0], cpus[0])


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run the body (a process start: the child inherits the affinity) on ``cpu``."""
    saved = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _unix_child(role: str, path: str, total: int) -> None:
    """One side of the Unix socket anchor; the receiver prints bytes, seconds and CPU
    seconds, the sender its CPU seconds."""
    if role == "recv":
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        print("ready", flush=True)
        conn, _ = lsock.accept()
        buf = bytearray(CHUNK)
        got = 0
        first = last = 0.0
        cpu = time.process_time()
        while got < total:
            n = conn.recv_into(buf)
            if not n:
                break
            last = time.perf_counter()
            if not got:
                first = last
            got += n
        print(f"done {got} {last - first:.9f} {time.process_time() - cpu:.6f}", flush=True)
        conn.close()
        lsock.close()
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        block = memoryview(os.urandom(CHUNK))
        sent = 0
        cpu = time.process_time()
        while sent < total:
            sock.sendall(block[: min(CHUNK, total - sent)])
            sent += min(CHUNK, total - sent)
        print(f"done {time.process_time() - cpu:.6f}", flush=True)
        sock.close()


def unix_socket_gbps(total: int, where: Placement) -> Sample:
    """The Unix socket anchor between two Python processes."""
    from xenpv.vchan.testing import read_line

    with tempfile.TemporaryDirectory(prefix="xenpv-bench-") as tmp:
        path = os.path.join(tmp, "s")
        me = [sys.executable, "-m", "xenpv.bench.vchan", "--unix-child"]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with pinned(where.receiver):
                recv = subprocess.Popen([*me, "recv", path, str(total)], stdout=subprocess.PIPE,
                                        bufsize=0)
            procs.append(recv)
            assert read_line(recv, 30) == "ready"
            with pinned(where.sender):
                send = subprocess.Popen([*me, "send", path, str(total)], stdout=subprocess.PIPE,
                                        bufsize=0)
            procs.append(send)
            _, got, seconds, recv_cpu = read_line(recv, 300).split()
            _, send_cpu = read_line(send, 60).split()
            send.wait(60)
            recv.wait(60)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
                if p.stdout is not None:
                    p.stdout.close()
    return Sample(int(got) / float(seconds) / 1e9, int(got), float(recv_cpu), float(send_cpu))


def vchan_gbps(lab: Any, total: int, where: Placement, spin_us: int) -> Sample:
    """xenpv vchan between two domain processes (1 MiB rings)."""
    from xenpv.vchan.testing import vchan_path

    path = vchan_path(1, 2, "bench")
    with pinned(where.receiver):
        server = lab.tool(1, "server", "2", path, "--recv", str(total), "--read-min", str(MiB),
                          "--write-min", str(MiB), "--no-crc", "--read-size", str(READ_SIZE),
                          "--timeout", "300", "--spin-us", str(spin_us))
    assert lab.read_json(server)["event"] == "ready"
    with pinned(where.sender):
        client = lab.tool(2, "client", "1", path, "--send", str(total), "--no-crc", "--chunk",
                          str(CHUNK), "--block", str(CHUNK), "--timeout", "300", "--spin-us",
                          str(spin_us))
    assert lab.read_json(client)["event"] == "ready"
    done = lab.read_json(server, 300)
    sent = lab.read_json(client, 60)
    client.wait(60)
    server.wait(60)
    got = int(done["received"])
    return Sample(got / float(done["recv_seconds"]) / 1e9, got, float(done["cpu_seconds"]),
                  float(sent["cpu_seconds"]),
                  (done["notifies"], done["sleeps"], sent["notifies"], sent["sleeps"]))


def libxenvchan_gbps(lab: Any, total: int, build_dir: str, where: Placement,
                     spin_us: int) -> Sample:
    """Debian's libxenvchan from C between two domain processes (1 MiB rings)."""
    from xenpv.vchan.testing import build_libxenvchan_program, read_line, vchan_path

    exe = str(build_libxenvchan_program(CSRC, Path(build_dir) / "vchan_libxenvchan"))
    path = vchan_path(1, 2, "bench-c")
    sizes = [str(total), str(MiB), str(CHUNK), str(spin_us)]
    with pinned(where.receiver):
        server = lab.spawn(1, [exe, "server", "2", path, *sizes], stdout=subprocess.PIPE,
                           bufsize=0)
    assert read_line(server, 30) == "ready"
    with pinned(where.sender):
        client = lab.spawn(2, [exe, "client", "1", path, *sizes], stdout=subprocess.PIPE,
                           bufsize=0)
    _, got, seconds, recv_cpu = read_line(server, 300).split()
    _, _, send_cpu = read_line(client, 60).split()
    server.wait(60)
    client.wait(60)
    return Sample(int(got) / float(seconds) / 1e9, int(got), float(recv_cpu), float(send_cpu))


def vchan_rtt_us(lab: Any, count: int, where: Placement) -> float:
    """Median 64-byte round trip over xenpv vchan (in-page rings), in microseconds."""
    from xenpv.vchan.testing import vchan_path

    path = vchan_path(1, 2, "rtt")
    with pinned(where.receiver):
        server = lab.tool(1, "server", "2", path, "--echo", "--timeout", "60")
    assert lab.read_json(server)["event"] == "ready"
    with pinned(where.sender):
        client = lab.tool(2, "client", "1", path, "--pingpong", str(count), "--size", "64")
    assert lab.read_json(client)["event"] == "ready"
    done = lab.read_json(client, 300)
    client.wait(60)
    server.wait(60)
    return float(done["rtt_us_median"])


def _per_cpu_second(samples: list[Sample]) -> float:
    return median(s.bytes / (s.recv_cpu + s.send_cpu) / 1e9 for s in samples
                  if s.recv_cpu + s.send_cpu > 0) if samples else 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements in interleaved rounds; report medians and their ratios."""
    from xenpv.backends.console import bench_console_mbps
    from xenpv.vchan.testing import VchanLab

    total = 16 * MiB if args.quick else args.bytes
    count = 50 if args.quick else args.rtt_count
    rounds = 1 if args.quick else max(1, args.rounds)
    where = placement(args.placement)
    samples: dict[str, list[Sample]] = {"vchan": [], "unix": [], "c": []}
    rtts: list[float] = []
    with VchanLab((1, 2)) as lab, tempfile.TemporaryDirectory(prefix="xenpv-bench-") as build:
        measure = {
            "unix": lambda: unix_socket_gbps(total, where),
            "vchan": lambda: vchan_gbps(lab, total, where, args.spin_us),
            "c": lambda: libxenvchan_gbps(lab, total, build, where, args.spin_us),
        }
        order = list(measure)
        for r in range(rounds):
            for kind in order[r % 3:] + order[: r % 3]:  # each goes first in turn
                samples[kind].append(measure[kind]())
            rtts.append(vchan_rtt_us(lab, count, where))
    console = bench_console_mbps(MiB if args.quick else 8 * MiB)
    ours, unix, c = (median(s.gbps for s in samples[k]) for k in ("vchan", "unix", "c"))
    ratios = {"vchan/unix_socket": ours / unix, "vchan/libxenvchan": ours / c}
    wakeups = [s.wakeups for s in samples["vchan"] if s.wakeups is not None]
    names = ("receiver_notifies", "receiver_sleeps", "sender_notifies", "sender_sleeps")
    return {
        "rounds": rounds,
        "runs": {"vchan": [s.gbps for s in samples["vchan"]],
                 "unix": [s.gbps for s in samples["unix"]],
                 "c": [s.gbps for s in samples["c"]], "rtt": rtts},
        "bytes": total,
        "write_size": CHUNK,
        "ring_bytes": MiB,
        "spin_us": args.spin_us,
        "placement": {"name": where.name, "receiver_cpu": where.receiver,
                      "sender_cpu": where.sender},
        "vchan_gbps": ours,
        "unix_socket_gbps": unix,
        "libxenvchan_gbps": c,
        "vchan_rtt_us": median(rtts),
        "console_mbps": float(console["console_mbps"]),
        "gb_per_cpu_second": {"vchan": _per_cpu_second(samples["vchan"]),
                              "unix_socket": _per_cpu_second(samples["unix"]),
                              "libxenvchan": _per_cpu_second(samples["c"])},
        "vchan_wakeups": {n: median(w[i] for w in wakeups) for i, n in enumerate(names)},
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": {k: ratios[k] >= v for k, v in TARGETS.items()},
    }


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--unix-child":
        _unix_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("usage: python -m xenpv.bench.vchan --unix-child recv|send PATH BYTES")

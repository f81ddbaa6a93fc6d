"""``xenpv bench vchan``: vchan throughput and latency against a Unix socket and libxenvchan.

What is measured (one run, two processes per figure, ``--write-size`` writes (64 KiB by
default), 1 MiB rings):

* ``vchan_gbps``: xenpv's vchan between two emulated domains on the loopback daemon
  (``python -m xenpv.vchan.tool``, blocking API on the compiled ring: the writer copies
  write-size slices, the reader takes whatever is in the ring up to 64 KiB per call; both
  poll the ring in C for up to ``--spin-us`` µs before sleeping on the event channel).
* ``unix_socket_gbps`` (anchor): a Unix stream socket between two Python processes,
  ``sendall`` of a write-size block / ``recv_into`` a buffer of that size.

All three writers send the same write-size block over and over (the vchan tool's
``--block``).
* ``libxenvchan_gbps`` (anchor): Debian's libxenvchan driven by a small C program
  (``csrc/vchan_libxenvchan.c``) on the same emulator through the replacement libraries,
  with the same spin-then-sleep policy, reading up to 64 KiB per call as ours does.
* ``vchan_gbps_4k`` / ``libxenvchan_gbps_4k``: the same two with 4 KiB writes (a quarter
  of ``--bytes``), measured in the same rounds.
* ``vchan_rtt_us``: median round trip of a 64-byte message over xenpv's vchan (in-page
  rings), client and server in two processes.
* ``libxenvchan_rtt_us`` (anchor): the same round trip between two C programs on
  libxenvchan (``vchan_libxenvchan.c`` ``ping`` / ``echo``), same rings, same spin.
* ``console_mbps``: console output throughput of the console pair on the in-process
  emulator (:func:`xenpv.bench.console.bench_console_mbps`).

Placement.  Every pair (all three throughputs and the round trip) runs with its receiver
pinned to one CPU and its sender to another (``--placement cross``, the default; ``same``
puts both on one CPU, ``none`` leaves placement to the scheduler).  Pinning happens with
:func:`os.sched_setaffinity` around the start of each process (children inherit it), so
the three measurements are placed alike; ``placement`` in the result says where they ran.

Throughput is bytes over the receiver's time from its first to its last byte (GB/s =
1e9 bytes per second).  The measurements run in ``--rounds`` interleaved rounds and the
medians are reported (``runs`` lists every figure, ``spread`` the lowest and highest; the
measurements take turns in going first; see :mod:`xenpv.bench.report`): on a shared
2-vCPU machine one run varies several-fold with what else the CPUs are doing.
``gb_per_cpu_second`` divides the bytes by the CPU time both processes spent in their
transfer loops (medians): it varies far less with load and shows what each byte costs.  ``vchan_wakeups`` are the medians of the
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
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import median
from typing import Any, NamedTuple

from xenpv.bench.report import Ratio, Rounds, add_rounds_option, rounds_of

MiB = 1 << 20
CHUNK = 1 << 16
# Both readers take up to this much per call.  64 KiB is where libxenvchan (the anchor) is
# fastest: 16.8 GB/s here, against 1.9 GB/s when it reads up to 256 KiB per call.
READ_SIZE = 1 << 16
CSRC = Path(__file__).resolve().parent / "csrc" / "vchan_libxenvchan.c"
SMALL_WRITE = 4096  # the ``_4k`` figures
SPIN_US = 50
RTT_SIZE = 64


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
    add_rounds_option(parser, 7)
    parser.add_argument("--rtt-count", type=int, default=2000, help="round trips to time")
    parser.add_argument("--placement", choices=["cross", "same", "none"], default="cross",
                        help="receiver and sender on two CPUs, on one, or unpinned")
    parser.add_argument("--spin-us", type=int, default=SPIN_US,
                        help="µs each side polls the ring before sleeping (vchan and C)")
    parser.add_argument("--write-size", type=int, default=CHUNK, metavar="BYTES",
                        help="bytes per write of the main throughput figures (default 65536;"
                             " the _4k figures always write 4096)")


def prerequisites() -> None:
    """Raise a one-line LocalError if libxenvchan (the peers tree) or gcc is missing."""
    import shutil

    from xenpv import peers
    from xenpv.errors import LocalError

    peers.find(f"{peers.LIB_DIR}/libxenvchan.so.4.17")
    peers.include_dir()
    if shutil.which("gcc") is None:
        raise LocalError("needs gcc to build the libxenvchan anchor")


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


def _unix_child(role: str, path: str, total: int, chunk: int = CHUNK) -> None:
    """One side of the Unix socket anchor; the receiver prints bytes, seconds and CPU
    seconds, the sender its CPU seconds."""
    if role == "recv":
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        print("ready", flush=True)
        conn, _ = lsock.accept()
        buf = bytearray(chunk)
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
        block = memoryview(os.urandom(chunk))
        sent = 0
        cpu = time.process_time()
        while sent < total:
            sock.sendall(block[: min(chunk, total - sent)])
            sent += min(chunk, total - sent)
        print(f"done {time.process_time() - cpu:.6f}", flush=True)
        sock.close()


def unix_socket_gbps(total: int, where: Placement, chunk: int = CHUNK) -> Sample:
    """The Unix socket anchor between two Python processes."""
    from xenpv.testing.vchan import read_line

    with tempfile.TemporaryDirectory(prefix="xenpv-bench-") as tmp:
        path = os.path.join(tmp, "s")
        me = [sys.executable, "-m", "xenpv.bench.vchan", "--unix-child"]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with pinned(where.receiver):
                recv = subprocess.Popen([*me, "recv", path, str(total), str(chunk)],
                                        stdout=subprocess.PIPE, bufsize=0)
            procs.append(recv)
            assert read_line(recv, 30) == "ready"
            with pinned(where.sender):
                send = subprocess.Popen([*me, "send", path, str(total), str(chunk)],
                                        stdout=subprocess.PIPE, bufsize=0)
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


def vchan_gbps(lab: Any, total: int, where: Placement, spin_us: int,
               chunk: int = CHUNK) -> Sample:
    """xenpv vchan between two domain processes (1 MiB rings), ``chunk``-byte writes."""
    from xenpv.testing.vchan import vchan_path

    path = vchan_path(1, 2, f"bench-{chunk}")
    with pinned(where.receiver):
        server = lab.tool(1, "server", "2", path, "--recv", str(total), "--read-min", str(MiB),
                          "--write-min", str(MiB), "--no-crc", "--read-size", str(READ_SIZE),
                          "--timeout", "300", "--spin-us", str(spin_us))
    assert lab.read_json(server)["event"] == "ready"
    with pinned(where.sender):
        client = lab.tool(2, "client", "1", path, "--send", str(total), "--no-crc", "--chunk",
                          str(chunk), "--block", str(chunk), "--timeout", "300", "--spin-us",
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


def _c_program(build_dir: str) -> str:
    from xenpv.testing.vchan import build_libxenvchan_program

    return str(build_libxenvchan_program(CSRC, Path(build_dir) / "vchan_libxenvchan"))


def libxenvchan_gbps(lab: Any, total: int, build_dir: str, where: Placement,
                     spin_us: int, chunk: int = CHUNK) -> Sample:
    """Debian's libxenvchan from C between two domain processes (1 MiB rings),
    ``chunk``-byte writes, reads of up to 64 KiB (as ours)."""
    from xenpv.testing.vchan import read_line, vchan_path

    exe = _c_program(build_dir)
    path = vchan_path(1, 2, f"bench-c-{chunk}")
    sizes = [str(total), str(MiB), str(chunk), str(spin_us), str(READ_SIZE)]
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


def vchan_rtt_us(lab: Any, count: int, where: Placement, spin_us: int = SPIN_US) -> float:
    """Median 64-byte round trip over xenpv vchan (in-page rings), in microseconds."""
    from xenpv.testing.vchan import vchan_path

    path = vchan_path(1, 2, "rtt")
    spin = ["--spin-us", str(spin_us)]
    with pinned(where.receiver):
        server = lab.tool(1, "server", "2", path, "--echo", "--timeout", "60", *spin)
    assert lab.read_json(server)["event"] == "ready"
    with pinned(where.sender):
        client = lab.tool(2, "client", "1", path, "--pingpong", str(count), "--size",
                          str(RTT_SIZE), *spin)
    assert lab.read_json(client)["event"] == "ready"
    done = lab.read_json(client, 300)
    client.wait(60)
    server.wait(60)
    return float(done["rtt_us_median"])


def libxenvchan_rtt_us(lab: Any, count: int, build_dir: str, where: Placement,
                       spin_us: int = SPIN_US) -> float:
    """Median 64-byte round trip between two C programs on libxenvchan (in-page rings)."""
    from xenpv.testing.vchan import read_line, vchan_path

    exe = _c_program(build_dir)
    path = vchan_path(1, 2, "rtt-c")
    with pinned(where.receiver):
        server = lab.spawn(1, [exe, "echo", "2", path, str(count), "0", str(RTT_SIZE),
                               str(spin_us)], stdout=subprocess.PIPE, bufsize=0)
    assert read_line(server, 30) == "ready"
    with pinned(where.sender):
        client = lab.spawn(2, [exe, "ping", "1", path, str(count), "0", str(RTT_SIZE),
                               str(spin_us)], stdout=subprocess.PIPE, bufsize=0)
    _, _, median_us, _ = read_line(client, 300).split()
    client.wait(60)
    server.wait(60)
    return float(median_us)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements in interleaved rounds; report medians and paired ratios."""
    from xenpv.bench.console import bench_console_mbps
    from xenpv.testing.vchan import VchanLab

    total = 16 * MiB if args.quick else args.bytes
    small_total = max(total // 4, MiB)
    count = 50 if args.quick else args.rtt_count
    rounds = rounds_of(args, 7)
    size = max(1, args.write_size)
    spin = args.spin_us
    where = placement(args.placement)
    rec = Rounds("vchan")
    wakeups: list[tuple[int, int, int, int]] = []

    def throughput(name: str, sample: Sample) -> float:
        cpu = sample.recv_cpu + sample.send_cpu
        rec.add(f"gb_per_cpu_second.{name}", sample.bytes / cpu / 1e9 if cpu > 0 else 0.0)
        if sample.wakeups is not None and name == "vchan":
            wakeups.append(sample.wakeups)
        return sample.gbps

    with VchanLab((1, 2)) as lab, tempfile.TemporaryDirectory(prefix="xenpv-bench-") as build:
        measures: dict[str, Callable[[], float]] = {
            "unix_socket_gbps": lambda: throughput(
                "unix_socket", unix_socket_gbps(total, where, size)),
            "vchan_gbps": lambda: throughput(
                "vchan", vchan_gbps(lab, total, where, spin, size)),
            "libxenvchan_gbps": lambda: throughput(
                "libxenvchan", libxenvchan_gbps(lab, total, build, where, spin, size)),
            "vchan_gbps_4k": lambda: throughput(
                "vchan_4k", vchan_gbps(lab, small_total, where, spin, SMALL_WRITE)),
            "libxenvchan_gbps_4k": lambda: throughput(
                "libxenvchan_4k",
                libxenvchan_gbps(lab, small_total, build, where, spin, SMALL_WRITE)),
            "vchan_rtt_us": lambda: vchan_rtt_us(lab, count, where, spin),
            "libxenvchan_rtt_us": lambda: libxenvchan_rtt_us(lab, count, build, where, spin),
        }
        rec.interleave(rounds, measures)
    rec.add("console_mbps", float(bench_console_mbps(MiB if args.quick else 8 * MiB)
                                  ["console_mbps"]))
    ratios = {
        "vchan/unix_socket": Ratio("vchan_gbps", "unix_socket_gbps", ">= 2"),
        "vchan/libxenvchan": Ratio("vchan_gbps", "libxenvchan_gbps", ">= 0.8"),
        "vchan_4k/libxenvchan_4k": Ratio("vchan_gbps_4k", "libxenvchan_gbps_4k", ">= 0.5"),
        "vchan/libxenvchan per CPU-second": Ratio(
            "gb_per_cpu_second.vchan", "gb_per_cpu_second.libxenvchan", ">= 0.6"),
        "vchan_rtt/libxenvchan_rtt": Ratio("vchan_rtt_us", "libxenvchan_rtt_us", "<= 1.5"),
    }
    units = {k: "GB/s" if "gbps" in k else "µs" if k.endswith("_us") else
             "GB per CPU-second" if k.startswith("gb_per") else "MB/s" for k in rec.samples}
    names = ("receiver_notifies", "receiver_sleeps", "sender_notifies", "sender_sleeps")
    where_json = {"name": where.name, "receiver_cpu": where.receiver,
                  "sender_cpu": where.sender}
    return rec.result(units=units, ratios=ratios, placement=where_json, extra={
        "bytes": total,
        "bytes_4k": small_total,
        "write_size": size,
        "ring_bytes": MiB,
        "rtt_message_bytes": RTT_SIZE,
        "spin_us": spin,
        "placement": where_json,
        "vchan_wakeups": {n: median(w[i] for w in wakeups) for i, n in enumerate(names)},
    })


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--unix-child":
        _unix_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit("usage: python -m xenpv.bench.vchan --unix-child recv|send PATH BYTES CHUNK")

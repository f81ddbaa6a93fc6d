"""``xenpv bench vchan``: vchan throughput and latency against a Unix socket and libxenvchan.

What is measured (one run, two processes per figure, 64 KiB writes, 1 MiB rings):

* ``vchan_gbps``: xenpv's vchan between two emulated domains on the loopback daemon
  (``python -m xenpv.vchan.tool``, blocking API on the compiled ring: the writer copies
  64 KiB slices, the reader takes whatever is in the ring up to 256 KiB per call; both
  spin up to 50 µs on the ring before sleeping on the event channel).
* ``unix_socket_gbps`` (anchor): a Unix stream socket between two Python processes,
  ``sendall`` of 64 KiB / ``recv_into`` a 64 KiB buffer.
* ``libxenvchan_gbps`` (anchor): Debian's libxenvchan driven by a small C program
  (``csrc/vchan_libxenvchan.c``) on the same emulator through the replacement libraries,
  with the same spin-then-sleep policy.
* ``vchan_rtt_us``: median round trip of a 64-byte message over xenpv's vchan (in-page
  rings), client and server in two processes.
* ``console_mbps``: ``null`` here; the console pair (``xenpv.frontends.console`` /
  ``xenpv.backends.console``, still being written) fills it in.

Throughput is bytes over the receiver's time from its first to its last byte (GB/s =
1e9 bytes per second).  The measurements run in ``--rounds`` interleaved rounds and the
medians are reported (``runs`` lists every figure): on a shared 2-vCPU machine one run
varies several-fold with where the scheduler puts the two processes.  ``ratios`` compare against the anchors measured in this run;
``targets`` are the project's goals.  ``--quick`` moves a few MiB only (smoke test).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
CHUNK = 1 << 16
READ_SIZE = 1 << 18  # the reader takes up to this much per call
CSRC = Path(__file__).resolve().parent / "csrc" / "vchan_libxenvchan.c"
TARGETS = {"vchan/unix_socket": 2.0, "vchan/libxenvchan": 0.5}


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of the vchan benchmark."""
    parser.add_argument("--quick", action="store_true", help="tiny transfers (smoke test)")
    parser.add_argument("--bytes", type=int, default=512 * MiB, help="bytes per throughput run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--rtt-count", type=int, default=2000, help="round trips to time")


def _unix_child(role: str, path: str, total: int) -> None:
    """One side of the Unix socket anchor; the receiver prints bytes and seconds."""
    if role == "recv":
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        print("ready", flush=True)
        conn, _ = lsock.accept()
        buf = bytearray(CHUNK)
        got = 0
        first = last = 0.0
        while got < total:
            n = conn.recv_into(buf)
            if not n:
                break
            last = time.perf_counter()
            if not got:
                first = last
            got += n
        print(f"done {got} {last - first:.9f}", flush=True)
        conn.close()
        lsock.close()
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        block = memoryview(os.urandom(CHUNK))
        sent = 0
        while sent < total:
            sock.sendall(block[: min(CHUNK, total - sent)])
            sent += min(CHUNK, total - sent)
        sock.close()


def unix_socket_gbps(total: int) -> float:
    """The Unix socket anchor: GB/s between two Python processes."""
    from xenpv.vchan.testing import read_line

    with tempfile.TemporaryDirectory(prefix="xenpv-bench-") as tmp:
        path = os.path.join(tmp, "s")
        me = [sys.executable, "-m", "xenpv.bench.vchan", "--unix-child"]
        recv = subprocess.Popen([*me, "recv", path, str(total)], stdout=subprocess.PIPE, bufsize=0)
        try:
            assert read_line(recv, 30) == "ready"
            send = subprocess.Popen([*me, "send", path, str(total)])
            _, got, seconds = read_line(recv, 300).split()
            send.wait(60)
            recv.wait(60)
        finally:
            for p in (recv,):
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    return int(got) / float(seconds) / 1e9


def vchan_gbps(lab: Any, total: int) -> float:
    """xenpv vchan: GB/s between two domain processes (1 MiB rings)."""
    from xenpv.vchan.testing import vchan_path

    path = vchan_path(1, 2, "bench")
    server = lab.tool(1, "server", "2", path, "--recv", str(total), "--read-min", str(MiB),
                      "--write-min", str(MiB), "--no-crc", "--read-size", str(READ_SIZE),
                      "--timeout", "300")
    assert lab.read_json(server)["event"] == "ready"
    client = lab.tool(2, "client", "1", path, "--send", str(total), "--no-crc", "--chunk",
                      str(CHUNK), "--timeout", "300")
    done = lab.read_json(server, 300)
    client.wait(60)
    server.wait(60)
    return float(done["received"]) / float(done["recv_seconds"]) / 1e9


def libxenvchan_gbps(lab: Any, total: int, build_dir: str) -> float:
    """Debian's libxenvchan from C: GB/s between two domain processes (1 MiB rings)."""
    from xenpv.vchan.testing import build_libxenvchan_program, read_line, vchan_path

    exe = str(build_libxenvchan_program(CSRC, Path(build_dir) / "vchan_libxenvchan"))
    path = vchan_path(1, 2, "bench-c")
    server = lab.spawn(1, [exe, "server", "2", path, str(total), str(MiB), str(CHUNK)],
                       stdout=subprocess.PIPE, bufsize=0)
    assert read_line(server, 30) == "ready"
    client = lab.spawn(2, [exe, "client", "1", path, str(total), str(MiB), str(CHUNK)],
                       stdout=subprocess.PIPE, bufsize=0)
    _, got, seconds = read_line(server, 300).split()
    server.wait(60)
    client.wait(60)
    return int(got) / float(seconds) / 1e9


def vchan_rtt_us(lab: Any, count: int) -> float:
    """Median 64-byte round trip over xenpv vchan (in-page rings), in microseconds."""
    from xenpv.vchan.testing import vchan_path

    path = vchan_path(1, 2, "rtt")
    server = lab.tool(1, "server", "2", path, "--echo", "--timeout", "60")
    assert lab.read_json(server)["event"] == "ready"
    client = lab.tool(2, "client", "1", path, "--pingpong", str(count), "--size", "64")
    assert lab.read_json(client)["event"] == "ready"
    done = lab.read_json(client, 300)
    client.wait(60)
    server.wait(60)
    return float(done["rtt_us_median"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements in interleaved rounds; report medians and their ratios."""
    from statistics import median

    from xenpv.vchan.testing import VchanLab

    total = 16 * MiB if args.quick else args.bytes
    count = 50 if args.quick else args.rtt_count
    rounds = 1 if args.quick else max(1, args.rounds)
    runs: dict[str, list[float]] = {"vchan": [], "unix": [], "c": [], "rtt": []}
    with VchanLab((1, 2)) as lab, tempfile.TemporaryDirectory(prefix="xenpv-bench-") as build:
        for _ in range(rounds):
            runs["unix"].append(unix_socket_gbps(total))
            runs["vchan"].append(vchan_gbps(lab, total))
            runs["c"].append(libxenvchan_gbps(lab, total, build))
            runs["rtt"].append(vchan_rtt_us(lab, count))
    ours, unix, c, rtt = (median(runs[k]) for k in ("vchan", "unix", "c", "rtt"))
    ratios = {"vchan/unix_socket": ours / unix, "vchan/libxenvchan": ours / c}
    return {
        "rounds": rounds,
        "runs": runs,
        "bytes": total,
        "write_size": CHUNK,
        "ring_bytes": MiB,
        "vchan_gbps": ours,
        "unix_socket_gbps": unix,
        "libxenvchan_gbps": c,
        "vchan_rtt_us": rtt,
        "console_mbps": None,
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": {k: ratios[k] >= v for k, v in TARGETS.items()},
    }


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--unix-child":
        _unix_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("usage: python -m xenpv.bench.vchan --unix-child recv|send PATH BYTES")

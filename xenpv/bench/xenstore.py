"""``xenpv bench xenstore``: xenstore round trips per second, all against one embedded server.

Theory of operation
-------------------
One ``xenpv xenstored`` process is started on a private socket and every client measures
READs of the same short value against it, in the same run:

(a) ``ours_sequential``  — our client for sequential callers, the blocking
    :class:`~xenpv.xenstore.blocking.BlockingClient`, one request at a time;
(b) ``ours_pipelined``   — our asyncio client with 64 requests in flight (windows of 64
    submits);
(c) ``pyxs_sequential``  — pyxs (PyPI), one request at a time;
(d) ``libxenstore_sequential`` — Xen's own ``libxenstore.so.4`` from Debian, called from
    Python through cffi (``_xs_cffi.py``: ``xs_open(0)``, then ``xs_read`` + ``free``
    per iteration);
(e) ``c_echo_floor``     — the transport floor: a C client and a C server exchanging
    16-byte-header messages over the same kind of Unix socket (``csrc/xs_echo.c``).

Over a guest's xenstore ring, against ``xenpv loopback up`` (the emulator with the embedded
xenstored as dom0's; domain 1 is this process, through the control socket):
``ours_ring_sequential`` — domain 1 reads its own ``domid`` one request at a time over its
ring (:class:`~xenpv.xenstore.ring.BlockingRingClient`), and
``ours_guest_socket_sequential`` — the same reads over the domain's socket, for reference
(ratio without a target); ``xen_c_ring_sequential`` — the same ring reads by domain 1 of a
second emulator whose dom0 xenstored is Xen's C xenstored (``xenpv loopback up
--xenstored xen-c``), in the same run.  The ratio ``ours_ring_sequential /
xen_c_ring_sequential`` has the target >= 1.0: both servers are reached the same way (an
event on the guest's port wakes the server, which reads ``req`` and writes ``rsp`` in the
shared page, then signals the guest), so it compares the servers' own costs.

Also reported, without targets: ``ours_sequential_asyncio`` (the asyncio client one
request at a time: it pays an event-loop wake-up and a task switch per reply) and
``libxenstore_c_loop`` (libxenstore called by a C loop, ``csrc/xs_libxs_read.c``: the
cost of cffi's call shows as its difference from (d)).  ``client_only_vs_c_echo_server``
repeats the sequential Python clients against the C echo server instead of xenstored,
so the clients' own cost shows without the server's.

The C programs are compiled at bench time with the system ``cc``.  Every figure is the
median of interleaved rounds (``spread`` gives the lowest and highest).  Every ratio is
the median of the ratios of the same round's two figures (``ratio_spread``: lowest and
highest), a paired statistic: on a shared virtual machine the speed drifts between rounds
by tens of percent, and pairing cancels what both figures of a round share.  Ratios:
(a)/(c) and (b)/(c) show what our client gains over pyxs on the same server; (d)/(e) shows
how close the server's round trip comes to the bare socket's (it is bounded by the
server's per-request cost, as every client here is).

Placement (``--placement``, reported under ``setup``) is the same for all measurements of
a run: ``same`` (default) pins every server (xenstored, the C echo server) and every
client (this process with pyxs's threads, the C clients) to the first allowed CPU, so a
round trip is two context switches and the CPU costs of client and server add up, which
is what the ratios compare; ``split`` pins the servers to the first CPU and the clients
to the second, so each round trip crosses vCPUs as a guest's request to dom0's xenstored
does; ``free`` leaves placement to the kernel.  On a 2-vCPU guest the cross-vCPU round
trip is dominated by waking a halted vCPU (the C echo floor drops several-fold under
``split``), which swamps the software's own cost; that is why ``same`` is the default
and why the placement is fixed for a run and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenpv import peers
from xenpv.bench.report import Ratio, Rounds, add_rounds_option, rounds_of
from xenpv.errors import LocalError
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.platforms.loopback.xenstoreds import xen_c_binary
from xenpv.xenstore.blocking import BlockingClient
from xenpv.xenstore.client import connect
from xenpv.xenstore.wire import XsType

CSRC = Path(__file__).parent / "csrc"
KEY = "/bench/key"
#: The emulated guest of the ring measurements, and the node it reads.
GUEST_DOMID = 1
GUEST_KEY = "domid"
VALUE = b"value"
WINDOW = 64
_START_TIMEOUT = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--count", type=int, default=20000, help="reads per measurement")
    add_rounds_option(parser, 7)
    parser.add_argument(
        "--placement",
        choices=sorted(PLACEMENTS),
        default="same",
        help="CPU placement of servers and clients (default: same)",
    )


#: Where the servers (xenstored, the C echo server) and the clients run.  Every
#: measurement of a run uses the same placement.
PLACEMENTS = {
    "same": "servers and clients all pinned to one CPU",
    "split": "servers pinned to one CPU, every client to another",
    "free": "no pinning (the kernel places every process)",
}


def _cpus(placement: str) -> tuple[str, set[int] | None, set[int] | None]:
    """Return the placement used and the CPU sets of (servers, clients) (None: not pinned).

    ``split`` on a single allowed CPU becomes ``same``.
    """
    if placement == "free":
        return placement, None, None
    allowed = sorted(os.sched_getaffinity(0))
    if placement == "split" and len(allowed) >= 2:
        return placement, {allowed[0]}, {allowed[1]}
    return "same", {allowed[0]}, {allowed[0]}


def _pin(pid: int, cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(pid, cpus)


def _pin_tree(pid: int, cpus: set[int] | None) -> None:
    """Pin ``pid`` and its children (threads included: each task is pinned)."""
    if cpus is None:
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            _pin_tree(int(child), cpus)


def _compile(work: Path, name: str, *extra: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise LocalError("xenpv bench xenstore needs a C compiler (cc)")
    out = work / name
    cmd = [cc, "-O2", "-o", str(out), str(CSRC / f"{name}.c"), *extra]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def _start_server(work: Path, cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(work / "xenstored.sock")
    pid_file = work / "xenstored.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenpv", "xenstored", "--socket", sock, "--pid-file", str(pid_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _pin(proc.pid, cpus)
    deadline = time.monotonic() + _START_TIMEOUT
    while not pid_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise LocalError("the embedded xenstored did not start")
        time.sleep(0.02)
    return proc, sock


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _ours(sock: str, count: int, pipelined: bool, setup: bool = True) -> float:
    c = await connect(sock, timeout=60)
    try:
        if setup:
            await c.write(KEY, VALUE)
        payload = KEY.encode() + b"\0"
        t0 = time.perf_counter()
        if pipelined:
            done = 0
            while done < count:
                futs = [c.submit(XsType.READ, payload) for _ in range(min(WINDOW, count - done))]
                for f in futs:
                    if await f != VALUE:
                        raise LocalError("unexpected value")
                done += len(futs)
        else:
            for _ in range(count):
                if await c.read(KEY) != VALUE:
                    raise LocalError("unexpected value")
        return count / (time.perf_counter() - t0)
    finally:
        await c.close()


def _blocking(sock: str, count: int, setup: bool = True) -> float:
    with BlockingClient(sock) as c:
        if setup:
            c.write(KEY, VALUE)
        read = c.read
        t0 = time.perf_counter()
        for _ in range(count):
            if read(KEY) != VALUE:
                raise LocalError("unexpected value")
        return count / (time.perf_counter() - t0)


def _guest_reads(client: Any, count: int) -> float:
    """Sequential READs of the guest's own ``domid`` through ``client``."""
    read = client.read
    expected = read(GUEST_KEY)
    t0 = time.perf_counter()
    for _ in range(count):
        if read(GUEST_KEY) != expected:
            raise LocalError("unexpected value")
    return count / (time.perf_counter() - t0)


def _guest_ring(guest: Any, count: int) -> float:
    with guest.blocking_xenstore_over_ring(timeout=60) as c:
        return _guest_reads(c, count)


def _guest_socket(guest: Any, count: int) -> float:
    with BlockingClient(guest.xenstore_path, timeout=60) as c:
        return _guest_reads(c, count)


def _pyxs(sock: str, count: int, setup: bool = True) -> float:
    import pyxs

    key = KEY.encode()
    with pyxs.Client(unix_socket_path=sock) as c:
        if setup:
            c[key] = VALUE
        t0 = time.perf_counter()
        for _ in range(count):
            c[key]
        return count / (time.perf_counter() - t0)


def _parse_rate(out: str) -> float:
    n, seconds = out.split()
    return int(n) / float(seconds)


def _libxenstore(cmd: list[str], sock: str, count: int) -> float:
    """Run a libxenstore reader (``cmd PATH COUNT``) against ``sock``."""
    env = peers.run_env()
    env["XENSTORED_PATH"] = sock
    res = subprocess.run(
        [*cmd, KEY, str(count)], env=env, capture_output=True, text=True, timeout=600
    )
    if res.returncode != 0:
        raise LocalError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return _parse_rate(res.stdout)


def _c_echo(exe: Path, work: Path, count: int, cpus: set[int] | None) -> float:
    """The C client against the C echo server."""
    return _against_echo(exe, work, cpus, lambda sock: _run_c_echo_client(exe, sock, count))


def _run_c_echo_client(exe: Path, sock: str, count: int) -> float:
    res = subprocess.run(
        [str(exe), "client", sock, str(count)], capture_output=True, text=True, timeout=600
    )
    if res.returncode != 0:
        raise LocalError(f"xs_echo client failed: {res.stderr.strip()}")
    return _parse_rate(res.stdout)


def _against_echo(
    exe: Path, work: Path, cpus: set[int] | None, client: Callable[[str], float]
) -> float:
    """Run ``client(socket)`` against a fresh C echo server (it serves one connection)."""
    sock = str(work / "echo.sock")
    with subprocess.Popen([str(exe), "server", sock], stdout=subprocess.PIPE, text=True) as srv:
        try:
            _pin(srv.pid, cpus)
            assert srv.stdout is not None
            if srv.stdout.readline().strip() != "ready":
                raise LocalError("xs_echo server did not start")
            return client(sock)
        finally:
            try:  # the server exits when its one client hangs up
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait(10)


def prerequisites() -> None:
    """Raise a one-line LocalError naming what is missing: the peers tree (libxenstore and
    Xen's headers, Xen's C xenstored), pyxs, or a C compiler."""
    peers.find(f"{peers.LIB_DIR}/libxenstore.so.4")
    xen_c_binary()
    peers.include_dir()
    try:
        import pyxs  # noqa: F401
    except ImportError:
        raise LocalError("the pyxs anchor needs pyxs: pip install pyxs "
                         "(or pip install 'xenpv[test]')") from None
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        raise LocalError("needs a C compiler (cc) for the C anchors")


#: Figures measured against the C echo server instead of xenstored (client cost alone).
CLIENT_ONLY = {
    "ours_vs_c_echo_server": "client_only_vs_c_echo_server.ours_sequential",
    "asyncio_vs_c_echo_server": "client_only_vs_c_echo_server.ours_sequential_asyncio",
    "pyxs_vs_c_echo_server": "client_only_vs_c_echo_server.pyxs_sequential",
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; return figures (operations per second) and ratios."""
    rec = Rounds("xenstore")
    count = 300 if args.quick else args.count
    rounds = rounds_of(args, 7)
    placement, server_cpus, client_cpus = _cpus(getattr(args, "placement", "same"))
    saved = os.sched_getaffinity(0)
    _pin(0, client_cpus)  # clients run in this process or are its children
    try:
        samples = _measure(count, rounds, server_cpus)
    finally:
        os.sched_setaffinity(0, saved)
    for key, values in samples.items():
        for v in values:
            rec.add(CLIENT_ONLY.get(key, key), v)
    ratios = {
        f"{a}/{b}": Ratio(a, b, TARGETS.get(f"{a}/{b}"))
        for a, b in (
            ("ours_sequential", "pyxs_sequential"),
            ("ours_pipelined", "pyxs_sequential"),
            ("libxenstore_sequential", "c_echo_floor"),
            ("ours_sequential", "libxenstore_sequential"),
            ("ours_sequential_asyncio", "pyxs_sequential"),
            ("libxenstore_c_loop", "c_echo_floor"),
            ("ours_ring_sequential", "ours_guest_socket_sequential"),
            ("ours_ring_sequential", "xen_c_ring_sequential"),
        )
    }
    ratios["client_only: ours_sequential/pyxs_sequential"] = Ratio(
        CLIENT_ONLY["ours_vs_c_echo_server"], CLIENT_ONLY["pyxs_vs_c_echo_server"])
    setup = {
        "reads_per_measurement": count,
        "pipelined_reads": count * 4,
        "window": WINDOW,
        "rounds": rounds,
        "statistic": (
            "figures: median of interleaved rounds (spread: min and max); ratios: median of"
            " the per-round ratios (ratio_spread: min and max)"
        ),
        "placement": placement,
        "placement_detail": PLACEMENTS[placement],
        "server_cpus": sorted(server_cpus) if server_cpus is not None else None,
        "client_cpus": sorted(client_cpus) if client_cpus is not None else None,
        "server": "xenpv xenstored, separate process, Unix socket",
        "ours_sequential": "BlockingClient.read, no timeout",
        "ours_pipelined": "XenstoreClient.submit, windows of 64",
        "libxenstore": "xs_read from Python through cffi (Debian libxenstore.so.4)",
        "libxenstore_c_loop": "xs_read from a C loop",
        "ours_ring_sequential": "BlockingRingClient.read of its domid by domain 1 of "
        "xenpv loopback up (this process), over its xenstore ring",
        "ours_guest_socket_sequential": "the same reads over domain 1's socket",
        "xen_c_ring_sequential": "the same ring reads by domain 1 of xenpv loopback up "
        "--xenstored xen-c (Xen's C xenstored 4.17 as dom0's xenstored)",
        "cpus": os.cpu_count(),
    }
    return rec.result(units={k: "ops/s" for k in rec.samples}, ratios=ratios,
                      placement=placement, extra={"setup": setup})


TARGETS = {
    "ours_sequential/pyxs_sequential": ">= 3.0",
    "ours_pipelined/pyxs_sequential": ">= 10.0",
    "libxenstore_sequential/c_echo_floor": ">= 0.5",
    "ours_ring_sequential/xen_c_ring_sequential": ">= 1.0",
}


def _measure(count: int, rounds: int, cpus: set[int] | None) -> dict[str, list[float]]:
    """Interleave ``rounds`` rounds of every measurement; return the samples of each."""
    with tempfile.TemporaryDirectory(prefix="xenpv-bench-xs-") as tmp:
        work = Path(tmp)
        echo = _compile(work, "xs_echo")
        libdir = str(peers.lib_dir())
        libxs = _compile(
            work,
            "xs_libxs_read",
            f"-I{peers.include_dir()}",
            os.path.join(libdir, "libxenstore.so.4"),
            f"-Wl,-rpath-link,{libdir}",
        )
        proc, sock = _start_server(work, cpus)
        emulator = start_daemon(work / "emu", domains=(GUEST_DOMID,))
        _pin_tree(emulator.pid, cpus)
        guest = ClientPlatform.for_domain(work / "emu", GUEST_DOMID)
        xen_c = start_daemon(work / "emu-xen-c", domains=(GUEST_DOMID,), xenstored="xen-c")
        _pin_tree(xen_c.pid, cpus)  # the daemon and the C xenstored it started
        xen_c_guest = ClientPlatform.for_domain(work / "emu-xen-c", GUEST_DOMID)
        try:
            cffi_reader = [sys.executable, "-m", "xenpv.bench._xs_cffi"]
            measures: dict[str, Callable[[], float]] = {
                "ours_sequential": lambda: _blocking(sock, count),
                "ours_pipelined": lambda: asyncio.run(_ours(sock, count * 4, True)),
                "ours_sequential_asyncio": lambda: asyncio.run(_ours(sock, count, False)),
                "pyxs_sequential": lambda: _pyxs(sock, count),
                "libxenstore_sequential": lambda: _libxenstore(cffi_reader, sock, count),
                "libxenstore_c_loop": lambda: _libxenstore([str(libxs)], sock, count),
                "c_echo_floor": lambda: _c_echo(echo, work, count, cpus),
                # client cost alone: the same clients against the C echo server
                "ours_vs_c_echo_server": lambda: _against_echo(
                    echo, work, cpus, lambda s: _blocking(s, count, setup=False)
                ),
                "asyncio_vs_c_echo_server": lambda: _against_echo(
                    echo, work, cpus, lambda s: asyncio.run(_ours(s, count, False, setup=False))
                ),
                "pyxs_vs_c_echo_server": lambda: _against_echo(
                    echo, work, cpus, lambda s: _pyxs(s, count, setup=False)
                ),
                # a guest of the emulator: over its ring, and over its socket
                "ours_ring_sequential": lambda: _guest_ring(guest, count),
                "ours_guest_socket_sequential": lambda: _guest_socket(guest, count),
                "xen_c_ring_sequential": lambda: _guest_ring(xen_c_guest, count),
            }
            rec = Rounds("xenstore")
            rec.interleave(rounds, measures)  # each measurement goes first in turn
            return rec.samples
        finally:
            guest.close()
            xen_c_guest.close()
            stop_daemon(xen_c)
            stop_daemon(emulator)
            _stop(proc)

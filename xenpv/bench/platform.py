"""``xenpv bench platform``: the loopback emulator's hot paths against their floors.

Measured in one run, medians over interleaved rounds (machine-baseline.md: absolute
figures drift, ratios are what to read):

(a) notify-and-wake round trip between two emulated domains in two processes (dom0 here,
    dom1 in a child echoing every event: notify; pending(None); unmask) next to its floor,
    a raw eventfd ping-pong between two processes that wait the same way (target ratio
    <= 1.3).  An event-channel handle is one pollable fd over many ports
    (``xenevtchn_fd``): a delivery is one ``epoll_wait`` on the handle's epoll fd (inboxes
    registered edge-triggered, never drained on the hot path, see ``events.py``), a
    notification one ``write``.  The floor (``eventfd_floor_rtt_us``) does exactly these
    system calls, with the same blocking wait, placement and Python loop, on a
    one-eventfd epoll set; what remains between the two is the handle's bookkeeping (port
    lookup, mask state, outbox cache check).  A ping-pong blocking in ``read`` instead
    (``eventfd_read_floor_rtt_us``, as many system calls, a cheaper wait) is reported
    beside it for information.  Measured with the processes pinned to different CPUs (the
    headline figures) and to the same CPU (``*_same_cpu``), since waking another vCPU
    dominates the first and system-call cost the second;
(b) map + unmap of 11-ref batches (one blkif request's worth of separately granted
    pages) per second, in process and across processes (through the daemon);
(c) grant copy of 4 KiB and 64 KiB (page-sized segments out of granted pages into a local
    buffer), in process and through the daemon, against numpy copying the same bytes
    (target ratio >= 0.5 at 64 KiB); through the daemon also into pages the copier shared
    itself (``*_own_pages``: the daemon copies page to page, no data on its socket).
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from xenpv.bench.report import Ratio, Rounds, add_rounds_option, rounds_of
from xenpv.platforms.base import PAGE_SIZE, GrantCopy, GrantPtr, LocalPtr, prepare_copy

BATCH = 11
_ONE = (1).to_bytes(8, "little")
_WAIT = select.EPOLLIN | select.EPOLLET  # how an event-channel handle waits (events.py)


def configure(parser: argparse.ArgumentParser) -> None:
    """``--quick``: a smoke run (tiny counts, one round)."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    add_rounds_option(parser, 5)


# ---------------------------------------------------------------------------- children


def _echo_eventfd(fd_in: int, fd_out: int, n: int) -> None:
    for _ in range(n):
        os.eventfd_read(fd_in)
        os.eventfd_write(fd_out, 1)


def _echo_eventfd_epoll(fd_in: int, fd_out: int, n: int) -> None:
    ep = select.epoll()
    ep.register(fd_in, _WAIT)
    try:
        for _ in range(n):
            ep.poll(-1.0, 1)
            os.write(fd_out, _ONE)
    finally:
        ep.close()


def _echo_domain(control: str, remote_port: int, n: int) -> None:
    from xenpv.platforms.loopback.client import ClientEvents

    ev = ClientEvents(control)
    try:
        port = ev.bind_interdomain(0, remote_port)
        ev.pending(None)  # the bind's own event
        ev.unmask(port)
        ev.notify(port)  # ready
        for _ in range(n):
            p = ev.pending(None)
            ev.unmask(p)  # type: ignore[arg-type]
            ev.notify(port)
    finally:
        ev.close()


def child_main(argv: list[str]) -> None:
    """Entry of the helper processes (``python -m xenpv.bench.platform child CPU …``)."""
    cpu, kind = int(argv[0]), argv[1]
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    if kind == "eventfd":
        _echo_eventfd(int(argv[2]), int(argv[3]), int(argv[4]))
    elif kind == "epoll":
        _echo_eventfd_epoll(int(argv[2]), int(argv[3]), int(argv[4]))
    elif kind == "domain":
        _echo_domain(argv[2], int(argv[3]), int(argv[4]))


def _spawn(cpu: int, args: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "xenpv.bench.platform", "child", str(cpu), *args],
        pass_fds=pass_fds,
    )


class _Pinned:
    """Pin this process to ``cpu`` for a measurement (no-op for -1), then restore."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.saved = os.sched_getaffinity(0)

    def __enter__(self) -> None:
        if self.cpu >= 0:
            os.sched_setaffinity(0, {self.cpu})

    def __exit__(self, *exc: object) -> None:
        os.sched_setaffinity(0, self.saved)


def placements() -> dict[str, tuple[int, int]]:
    """(parent cpu, child cpu) per placement; "cross" needs two usable CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    out = {"same": (cpus[0], cpus[0])}
    if len(cpus) > 1:
        out["cross"] = (cpus[0], cpus[1])
    return out


def _finish(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------------- (a)


def eventfd_read_floor_rtt_us(n: int, cpus: tuple[int, int] = (-1, -1)) -> float:
    """Raw eventfd ping-pong between two processes blocking in ``read``: µs per round trip
    (the same system-call count as :func:`eventfd_floor_rtt_us`, a different wait)."""
    a = os.eventfd(0, os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_CLOEXEC)
    proc = _spawn(cpus[1], ["eventfd", str(a), str(b), str(n + 1)], pass_fds=(a, b))
    try:
        with _Pinned(cpus[0]):
            os.eventfd_write(a, 1)  # warm-up: the child is up
            os.eventfd_read(b)
            t0 = time.perf_counter()
            for _ in range(n):
                os.eventfd_write(a, 1)
                os.eventfd_read(b)
            dt = time.perf_counter() - t0
    finally:
        _finish(proc)
        os.close(a)
        os.close(b)
    return dt / n * 1e6


def eventfd_floor_rtt_us(n: int, cpus: tuple[int, int] = (-1, -1)) -> float:
    """The floor of (a): eventfd ping-pong between two processes, each blocking in
    ``epoll_wait`` on an epoll instance holding its eventfd edge-triggered, then writing
    the other's: the same wait, system calls, placement and Python loop as a
    notify-and-wake round trip, minus the event-channel bookkeeping.  µs per round trip."""
    a = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    b = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ep = select.epoll()
    proc = _spawn(cpus[1], ["epoll", str(a), str(b), str(n + 1)], pass_fds=(a, b))
    try:
        ep.register(b, _WAIT)
        with _Pinned(cpus[0]):
            os.write(a, _ONE)  # warm-up: the child is up
            if not ep.poll(30.0, 1):
                raise RuntimeError("echo process did not come up")
            t0 = time.perf_counter()
            for _ in range(n):
                os.write(a, _ONE)
                ep.poll(-1.0, 1)
            dt = time.perf_counter() - t0
    finally:
        _finish(proc)
        ep.close()
        os.close(a)
        os.close(b)
    return dt / n * 1e6


def notify_rtt_us(rundir: str, n: int, cpus: tuple[int, int] = (-1, -1)) -> float:
    """Notify-and-wake round trip between dom0 (here) and dom1 (a child): µs."""
    from xenpv.platforms.loopback.client import ClientEvents

    ev = ClientEvents(os.path.join(rundir, "dom0", "control"))
    try:
        port = ev.alloc_unbound(1)
        control = os.path.join(rundir, "dom1", "control")
        proc = _spawn(cpus[1], ["domain", control, str(port), str(n)])
        try:
            if ev.pending(30) != port:
                raise RuntimeError("echo domain did not come up")
            ev.unmask(port)
            with _Pinned(cpus[0]):
                t0 = time.perf_counter()
                for _ in range(n):
                    ev.notify(port)
                    ev.pending(None)
                    ev.unmask(port)
                dt = time.perf_counter() - t0
        finally:
            _finish(proc)
    finally:
        ev.close()
    return dt / n * 1e6


# ---------------------------------------------------------------------------- (b), (c)


def _rate(fn: Callable[[], Any], n: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def map_unmap_per_s(granter: Any, mapper: Any, n: int) -> float:
    """Map + unmap of BATCH separately granted pages, batches per second."""
    shares = [granter.grants.grant(mapper.domid, 1) for _ in range(BATCH)]
    refs = [s.refs[0] for s in shares]
    dom = granter.domid

    def once() -> None:
        mapper.grants.unmap(mapper.grants.map(dom, refs))

    try:
        return _rate(once, n)
    finally:
        for s in shares:
            granter.grants.end_access(s)


def grant_copy_gbps(granter: Any, copier: Any, nbytes: int, n: int, *,
                    own: bool = False) -> float:
    """Grant copy of ``nbytes`` (page-sized segments) into a local buffer, GB/s.

    The copy is prepared once (``base.prepare_copy``) and run ``n`` times, as a driver
    copying into the same buffers would.  ``own``: the local buffer is pages the copier
    shared itself (through the daemon such a side is named, its bytes stay off the
    socket), else a private numpy array."""
    pages = nbytes // PAGE_SIZE
    share = granter.grants.grant(copier.domid, pages)
    mine = copier.grants.grant(granter.domid, pages) if own else None
    out = mine.mem if mine is not None else np.zeros(nbytes, dtype=np.uint8)
    segs = [
        GrantCopy(GrantPtr(granter.domid, ref, 0), LocalPtr(out, i * PAGE_SIZE), PAGE_SIZE)
        for i, ref in enumerate(share.refs)
    ]
    run_copy = prepare_copy(copier.grants, segs)
    try:
        rate = _rate(run_copy, n)
    finally:
        granter.grants.end_access(share)
        if mine is not None:
            copier.grants.end_access(mine)
    return rate * nbytes / 1e9


def memcpy_gbps(nbytes: int, n: int) -> float:
    """numpy copying the same bytes (the anchor), GB/s."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    return _rate(lambda: np.copyto(dst, src), n) * nbytes / 1e9


# ---------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; medians over rounds plus ratios."""
    from xenpv.platforms.loopback.harness import DaemonMachine, InProcessMachine

    quick = bool(getattr(args, "quick", False))
    rounds = rounds_of(args, 5)
    n_rtt = 50 if quick else 2000
    n_map = 20 if quick else 1000
    n_copy = 50 if quick else 5000
    rec = Rounds("platform")
    add = rec.add

    inproc = InProcessMachine(max_grants=1024, max_ports=64)
    daemon = DaemonMachine(max_grants=1024, max_ports=64)
    try:
        d0, d1 = inproc.domain(0), inproc.domain(1)
        c0, c1 = daemon.domain(0), daemon.domain(1)
        where = placements()
        for _ in range(rounds):
            for name, cpus in where.items():
                tag = "" if name == "cross" or len(where) == 1 else "_same_cpu"
                add(f"eventfd_read_floor_rtt_us{tag}", eventfd_read_floor_rtt_us(n_rtt, cpus))
                add(f"eventfd_floor_rtt_us{tag}", eventfd_floor_rtt_us(n_rtt, cpus))
                add(f"notify_rtt_us{tag}", notify_rtt_us(daemon.rundir, n_rtt, cpus))
            add("map_unmap_batches_per_s_inprocess", map_unmap_per_s(d1, d0, n_map))
            add("map_unmap_batches_per_s_crossprocess", map_unmap_per_s(c1, c0, n_map))
            for size, tag in ((4096, "4k"), (65536, "64k")):
                add(f"memcpy_{tag}_gbps", memcpy_gbps(size, n_copy))
                add(f"grant_copy_{tag}_gbps", grant_copy_gbps(d1, d0, size, n_copy))
                add(
                    f"grant_copy_{tag}_gbps_crossprocess",
                    grant_copy_gbps(c1, c0, size, max(10, n_copy // 20)),
                )
                add(
                    f"grant_copy_{tag}_gbps_crossprocess_own_pages",
                    grant_copy_gbps(c1, c0, size, max(10, n_copy // 20), own=True),
                )
    finally:
        inproc.close()
        daemon.close()
    ratios: dict[str, Ratio] = {}
    for tag in ("", "_same_cpu"):
        if f"notify_rtt_us{tag}" in rec.samples:
            ratios[f"notify_rtt_vs_eventfd_floor{tag}"] = Ratio(
                f"notify_rtt_us{tag}", f"eventfd_floor_rtt_us{tag}", "<= 1.3" if not tag else None)
            ratios[f"notify_rtt_vs_eventfd_read_floor{tag}"] = Ratio(
                f"notify_rtt_us{tag}", f"eventfd_read_floor_rtt_us{tag}")
    ratios.update({
        "grant_copy_4k_vs_memcpy": Ratio("grant_copy_4k_gbps", "memcpy_4k_gbps"),
        "grant_copy_64k_vs_memcpy": Ratio("grant_copy_64k_gbps", "memcpy_64k_gbps", ">= 0.5"),
        "grant_copy_64k_crossprocess_vs_memcpy": Ratio("grant_copy_64k_gbps_crossprocess",
                                                       "memcpy_64k_gbps"),
        "grant_copy_64k_crossprocess_own_pages_vs_memcpy": Ratio(
            "grant_copy_64k_gbps_crossprocess_own_pages", "memcpy_64k_gbps"),
        "map_unmap_crossprocess_vs_inprocess": Ratio("map_unmap_batches_per_s_crossprocess",
                                                     "map_unmap_batches_per_s_inprocess"),
    })
    units = {k: "µs" if k.endswith("_us") or "_rtt_us" in k else
             "GB/s" if "gbps" in k else "batches/s" for k in rec.samples}
    placement = (
        "notify_rtt_us / eventfd_floor_rtt_us / eventfd_read_floor_rtt_us: the two processes "
        "pinned to different CPUs (split drivers in two domains); *_same_cpu: both pinned to "
        "one CPU"
        if "cross" in where
        else "one usable CPU: both processes on it"
    )
    measured = (
        "round trips, Python loop on both sides of every pair, blocking waits: notify = "
        "notify + pending(None) + unmask (write; epoll_wait); eventfd_floor = write; "
        "epoll_wait on a one-eventfd edge-triggered epoll set (the target's floor); "
        "eventfd_read_floor = write; blocking read (informational)"
    )
    return rec.result(units=units, ratios=ratios,
                      placement={k: list(v) for k, v in where.items()},
                      extra={"placement": placement, "measured": measured})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])

"""``xenpv bench block``: block I/O through our backend, QEMU's qdisk, fio and Python
threads, on one image file, in one run.

Setup (the loopback daemon, one guest): an image of ``--size`` MiB of random bytes in a
temporary directory, in the page cache (read once before the cached phase).  Four paths
read and write it:

* ``ours``: our frontend in its own process (the guest, ``python -m xenpv.bench.block
  front``) against ``xenpv block backend --all`` in another (dom0, ``--engine`` as
  given, auto by default);
* ``qemu``: the same frontend process code against QEMU 7.2's qdisk backend (Debian's
  ``xen-qemu-system-i386`` as dom0's device model, ``params=aio:IMAGE``);
* ``fio``: Debian's fio on the image with ``ioengine=io_uring`` at the same depth, the
  machine's floor (``xenpv peers fetch`` brings it);
* ``preadv``: Python threads (as many as the depth) doing ``os.preadv``/``os.pwritev`` on
  the image, the best a naive Python backend could do (in the bench's own process, idle
  otherwise while they run).

Our frontend keeps the depth the way fio does, through its batch API: ``depth / 8``
lanes, each a ``read_many``/``write_many`` of 8 requests (one future per batch),
submitted again as soon as it is answered (:data:`BATCH`).

Workloads (each ``--duration`` seconds per path, the paths interleaved in every round):
``randread_qd1``, ``randread_qd32``, ``randwrite_qd1``, ``randwrite_qd32`` (4 KiB at
random 4 KiB-aligned offsets, IOPS) and ``seqread`` (1 MiB reads in order, 4 in flight,
GB/s).  Everything runs twice: with the page cache (keys ``PATH_WORKLOAD_iops``,
``PATH_seqread_gbps``) and with ``O_DIRECT`` where the file system allows it (keys
``PATH_direct_WORKLOAD_…``; our backend then runs with ``--direct``, fio with
``direct=1``, the threads on an ``O_DIRECT`` descriptor).  QEMU opens the image as it
decides for ``aio:`` (``setup.qemu_o_direct`` says whether that was ``O_DIRECT``).
``setup.cpu_us_per_op`` gives, for our frontend's paths (last round), the CPU time per
request of the frontend process, the backend process (ours or QEMU) and the emulator
daemon (``/proc/PID/stat``): what bounds a path on a shared machine.

Targets: ours at least twice QEMU for random reads at depth 32 and for sequential reads;
ours at least a quarter of fio for random reads at depth 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from xenpv.bench.report import Ratio, Rounds, add_rounds_option, rounds_of
from xenpv.errors import LocalError

GUEST = 7
KiB, MiB = 1 << 10, 1 << 20
WAIT = 60.0
#: name -> (kind, block size, depth)
WORKLOADS: dict[str, tuple[str, int, int]] = {
    "randread_qd1": ("randread", 4 * KiB, 1),
    "randread_qd32": ("randread", 4 * KiB, 32),
    "randwrite_qd1": ("randwrite", 4 * KiB, 1),
    "randwrite_qd32": ("randwrite", 4 * KiB, 32),
    "seqread": ("seqread", 1 * MiB, 4),
}
PATHS = ("ours", "qemu", "fio", "preadv")


def configure(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--rounds``, ``--duration``, ``--size``, ``--no-direct``."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    add_rounds_option(parser, 3)
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="seconds per workload and path (default 1; 0.05 with --quick)")
    parser.add_argument("--size", type=int, default=None, metavar="MIB",
                        help="image size in MiB (default 256; 8 with --quick)")
    parser.add_argument("--no-direct", action="store_true",
                        help="skip the O_DIRECT phase")
    parser.add_argument("--engine", choices=("auto", "io_uring", "threads", "inline"),
                        default="auto", help="our backend's I/O engine (default auto)")
    parser.add_argument("--workloads", default=None, metavar="W,W",
                        help=f"only these workloads (of {', '.join(WORKLOADS)})")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="run our frontend and backend processes under cProfile, "
                             "their stats in DIR (front*.prof, back*.prof)")


def prerequisites() -> None:
    """QEMU's build for Xen and fio must have been fetched (``xenpv peers fetch``)."""
    from xenpv import peers

    for what in (peers.QEMU, "fio"):
        try:
            peers.find(what)
        except Exception as exc:
            raise LocalError(f"bench block needs {what}: {exc}") from None


# -- the guest's side: our frontend in its own process ----------------------------------
async def _front_main(rundir: str, domid: int, fe_path: str, size: int) -> None:
    from xenpv.frontends.block import BlockFrontend
    from xenpv.platforms.loopback.client import ClientPlatform
    from xenpv.xenstore.client import connect

    platform = ClientPlatform.for_domain(rundir, domid)
    xs = await connect(str(Path(rundir) / f"dom{domid}" / "xenstore"))
    fe = BlockFrontend(platform, xs, fe_path)
    loop = asyncio.get_running_loop()
    try:
        await fe.start()
        await fe.ready(WAIT)
        if fe.size < size:
            raise LocalError(f"{fe_path}: {fe.size} bytes, {size} expected")
        info = fe.info()
        print(json.dumps({"event": "ready", "ring_pages": info.get("ring_pages"),
                          "queues": len(info.get("ring_pages") or []),
                          "max_segments": fe.max_segments, "persistent": fe.persistent,
                          "batch": BATCH}),
              flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            job = json.loads(line)
            ops, seconds = await _front_workload(fe, job["kind"], job["bs"], job["depth"],
                                                 job["duration"], size)
            print(json.dumps({"ops": ops, "seconds": seconds}), flush=True)
    finally:
        await fe.close()
        await xs.close()
        platform.close()


#: Requests per ``read_many``/``write_many`` call of the frontend process: the depth is
#: kept by ``depth / BATCH`` lanes, each refilling its batch as soon as it is answered.
BATCH = 8


async def _front_workload(fe: Any, kind: str, bs: int, depth: int, duration: float,
                          size: int) -> tuple[int, float]:
    """``depth`` requests kept in flight for ``duration`` s, as fio keeps its queue full:
    ``depth / BATCH`` lanes, each one ``read_many``/``write_many`` of up to ``BATCH``
    requests (one future for the batch), submitted again when it is answered."""
    rng = random.Random(depth * 1000 + bs)
    blocks = size // bs
    payload = os.urandom(bs)
    count = 0
    position = 0
    stop = time.perf_counter() + duration
    uniform = rng.random  # int(uniform() * blocks): half the cost of randrange(blocks)

    async def lane(width: int) -> None:
        nonlocal count, position
        bufs = [bytearray(bs) for _ in range(width)]
        while time.perf_counter() < stop:
            if kind == "randread":
                await fe.read_many([(int(uniform() * blocks) * bs, b) for b in bufs])
            elif kind == "randwrite":
                await fe.write_many([(int(uniform() * blocks) * bs, payload) for _ in bufs])
            else:
                batch = []
                for b in bufs:
                    batch.append((position, b))
                    position = (position + bs) % (blocks * bs)
                await fe.read_many(batch)
            count += width

    widths = [BATCH] * (depth // BATCH) + ([depth % BATCH] if depth % BATCH else [])
    t0 = time.perf_counter()
    await asyncio.gather(*(lane(w) for w in widths))
    return count, time.perf_counter() - t0


# -- Python threads on the file ---------------------------------------------------------
def _preadv_workload(path: str, kind: str, bs: int, depth: int, duration: float,
                     direct: bool) -> tuple[int, float]:
    flags = (os.O_RDONLY if kind != "randwrite" else os.O_RDWR) | os.O_CLOEXEC
    fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
    blocks = os.fstat(fd).st_size // bs
    counts = [0] * depth
    position = [0]
    lock = threading.Lock()
    start = threading.Barrier(depth + 1)
    stop = [0.0]

    def worker(k: int) -> None:
        buf = mmap.mmap(-1, bs)  # page-aligned, as O_DIRECT needs
        if kind == "randwrite":
            buf.write(os.urandom(bs))
        view = [memoryview(buf)]
        rng = random.Random(k)
        start.wait()
        n = 0
        while time.perf_counter() < stop[0]:
            if kind == "seqread":
                with lock:
                    offset, position[0] = position[0], (position[0] + bs) % (blocks * bs)
                os.preadv(fd, view, offset)
            elif kind == "randread":
                os.preadv(fd, view, rng.randrange(blocks) * bs)
            else:
                os.pwritev(fd, view, rng.randrange(blocks) * bs)
            n += 1
        counts[k] = n
        view[0].release()
        buf.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(depth)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop[0] = t0 + duration
    start.wait()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    os.close(fd)
    return sum(counts), seconds


# -- fio ----------------------------------------------------------------------------------
def _fio(path: str, kind: str, bs: int, depth: int, duration: float, direct: bool
         ) -> tuple[int, float]:
    from xenpv import peers

    rw = {"randread": "randread", "randwrite": "randwrite", "seqread": "read"}[kind]
    cmd = [str(peers.find("fio")), "--name=bench", f"--filename={path}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={depth}", "--ioengine=io_uring", f"--direct={int(direct)}",
           f"--runtime={max(int(duration * 1000), 50)}ms", "--time_based", "--norandommap",
           "--randrepeat=0", "--invalidate=0", "--output-format=json"]
    out = subprocess.run(cmd, env=peers.fio_env(), capture_output=True, text=True,
                         timeout=WAIT + duration, check=True)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["write" if kind == "randwrite" else "read"]
    seconds = side["runtime"] / 1000.0
    return int(side["total_ios"]), seconds


# -- the run --------------------------------------------------------------------------------
class _Front:
    """A frontend process (the guest) on one vbd: started here, connected once
    :meth:`wait_ready` returns; :meth:`run` one workload in it."""

    def __init__(self, lab: Any, fe_path: str, size: int, profile: str | None = None
                 ) -> None:
        self.fe_path = fe_path
        self.ready: dict[str, Any] = {}
        self.proc = lab.spawn(GUEST, [*_python(profile), "xenpv.bench.block", "front",
                                      lab.rundir, str(GUEST), fe_path, str(size)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def wait_ready(self) -> None:
        """Wait for the frontend to connect (its ``ready`` line)."""
        self.ready = self._line()
        if self.ready.get("event") != "ready":
            raise LocalError(f"frontend on {self.fe_path}: {self.ready}")

    def _line(self) -> dict[str, Any]:
        from xenpv.testing.vchan import read_line

        return dict(json.loads(read_line(self.proc, WAIT)))

    def run(self, kind: str, bs: int, depth: int, duration: float) -> tuple[int, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"kind": kind, "bs": bs, "depth": depth,
                                          "duration": duration}).encode() + b"\n")
        reply = self._line()
        return int(reply["ops"]), float(reply["seconds"])

    def close(self, wait: bool = True) -> None:
        """Tell the frontend to disconnect and end (and wait for it, with ``wait``)."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        if wait:
            self.proc.wait(WAIT)


def _python(profile: str | None) -> list[str]:
    """``python -m`` (under cProfile on the main thread's CPU clock, its stats written to
    ``profile``, if given)."""
    if profile is None:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "xenpv.bench.block", "profile", profile]


def _profiled(out: str, module: str, argv: list[str]) -> None:
    """Run ``module`` as ``__main__`` with ``argv``, profiled by cProfile (the main thread's
    CPU time, so neither waiting nor being preempted on a loaded machine counts) while
    measured: from a ``SIGUSR1`` to the next ``SIGUSR2`` (start-up is left out)."""
    import cProfile
    import runpy

    prof = cProfile.Profile(time.thread_time)
    sys.argv = [module, *argv]
    signal.signal(signal.SIGUSR1, lambda _sig, _frame: prof.enable())
    signal.signal(signal.SIGUSR2, lambda _sig, _frame: prof.disable())
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)


def profile_summary(path: str, requests: int, top: int = 15) -> dict[str, float]:
    """µs of CPU per request of the ``top`` functions (own time) in the cProfile stats at
    ``path``, over ``requests`` requests (and the total of every function)."""
    import pstats

    stats: dict[Any, Any] = pstats.Stats(path).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, _ncalls, tottime, _ct, _callers) in stats.items():
        where = name if filename == "~" else f"{Path(filename).name}:{line}({name})"
        rows.append((tottime, where))
    rows.sort(reverse=True)
    out = {where: round(t / max(requests, 1) * 1e6, 2) for t, where in rows[:top]}
    out["total (own time, every function)"] = round(
        sum(v[2] for v in stats.values()) / max(requests, 1) * 1e6, 1)
    return out


def _qemu_o_direct(pid: int, image: Path) -> bool | None:
    """Whether process ``pid`` has ``image`` open with O_DIRECT (None: not open)."""
    fds = Path(f"/proc/{pid}/fd")
    found: bool | None = None
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) != str(image):
                continue
            flags = int((Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
                        .split("flags:")[1].split()[0], 8)
        except (OSError, IndexError, ValueError):
            continue
        found = bool(flags & os.O_DIRECT) or bool(found)
    return found


async def _add_vbds(lab: Any, image: Path, ours_vdev: str, qemu_vdev: str
                    ) -> tuple[str, str]:
    from xenpv.xenbus.toolstack import add_device, vbd_keys
    from xenpv.xenstore.client import connect

    xs0 = await connect(str(Path(lab.rundir) / "dom0" / "xenstore"))
    try:
        devid, fkeys, bkeys = vbd_keys(str(image), vdev=ours_vdev)
        ours = await add_device(xs0, "vbd", GUEST, 0, devid, frontend_keys=fkeys,
                                backend_keys=bkeys)
        devid, fkeys, bkeys = vbd_keys(f"aio:{image}", vdev=qemu_vdev)
        bkeys.pop("type")
        qemu = await add_device(xs0, "vbd", GUEST, 0, devid, frontend_keys=fkeys,
                                backend_keys=bkeys, backend_type="qdisk")
    finally:
        await xs0.close()
    return ours.frontend_path, qemu.frontend_path


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _direct_ok(directory: str) -> bool:
    probe = Path(directory) / "direct.probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


def _make_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def _phase(lab: Any, image: Path, direct: bool, vdevs: tuple[str, str], rounds: int,
           duration: float, size: int, rec: Rounds, setup: dict[str, Any],
           qemu_pid: int, engine: str, workloads: dict[str, tuple[str, int, int]],
           profile: str | None = None) -> None:
    from xenpv.testing.vchan import read_line

    tag = "_direct" if direct else ""
    prof = {end: None if profile is None else str(Path(profile) / f"{end}{tag}.prof")
            for end in ("front", "back")}
    be = lab.spawn(0, [*_python(prof["back"]), "xenpv", "block", "backend", "--all",
                       "--rundir", lab.rundir, "--engine", engine,
                       *(["--direct"] if direct else [])],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    ready = json.loads(read_line(be, WAIT))
    setup[f"ours{tag}_engine"] = ready.get("engine")
    ours_path, qemu_path = asyncio.run(_add_vbds(lab, image, *vdevs))
    fronts: dict[str, _Front] = {}
    cpu = setup.setdefault("cpu_us_per_op", {})
    served: dict[str, int] = {}
    try:
        fronts["ours"] = _Front(lab, ours_path, size, prof["front"])
        fronts["qemu"] = _Front(lab, qemu_path, size)
        for front in fronts.values():  # both started before either is waited for
            front.wait_ready()
        setup[f"ours{tag}_frontend"] = fronts["ours"].ready
        setup[f"qemu{tag}_frontend"] = fronts["qemu"].ready
        setup[f"qemu{tag}_o_direct"] = _qemu_o_direct(qemu_pid, image)
        if not direct:
            subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)
        for r in range(rounds):
            for name, (kind, bs, depth) in workloads.items():
                order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
                for path in order:
                    if path in fronts:
                        pids = {"front": fronts[path].proc.pid,
                                "back": be.pid if path == "ours" else qemu_pid,
                                "emulator": lab.machine.proc.pid}
                        before = {k: _cpu_seconds(p) for k, p in pids.items()}
                        profiled = [pids["front"], pids["back"]] \
                            if path == "ours" and profile is not None else []
                        for pid in profiled:
                            os.kill(pid, signal.SIGUSR1)
                        ops, seconds = fronts[path].run(kind, bs, depth, duration)
                        for pid in profiled:
                            os.kill(pid, signal.SIGUSR2)
                        served[path] = served.get(path, 0) + ops
                        used = cpu[f"{path}{tag}_{name}"] = {
                            k: round((_cpu_seconds(p) - before[k]) / max(ops, 1) * 1e6, 1)
                            for k, p in pids.items()}
                        for end in ("front", "back"):
                            rec.add(f"{path}{tag}_{name}_{end}_cpu_us", used[end])
                    elif path == "fio":
                        ops, seconds = _fio(str(image), kind, bs, depth, duration, direct)
                    else:  # in this process, otherwise idle while it measures
                        ops, seconds = _preadv_workload(str(image), kind, bs, depth,
                                                        duration, direct)
                    if ops <= 0 or seconds <= 0:
                        raise LocalError(f"{path} {name}: nothing done ({ops} in {seconds} s)")
                    if kind == "seqread":
                        rec.add(f"{path}{tag}_seqread_gbps", ops * bs / seconds / 1e9)
                    else:
                        rec.add(f"{path}{tag}_{name}_iops", ops / seconds)
    finally:
        assert be.stdin is not None
        be.stdin.close()  # the backend reports its counters while still connected
        done = json.loads(read_line(be, WAIT))
        be.wait(WAIT)
        for f in fronts.values():  # both told to close before either is waited for
            f.close(wait=False)
        for f in fronts.values():
            f.close()
    if profile is not None:  # the processes have ended: their stats are written
        setup.setdefault("profile", {})[f"ours{tag}"] = {
            end: profile_summary(str(p), served.get("ours", 0))
            for end, p in prof.items() if p is not None}
    stats = [s for dev in done.get("devices", {}).values() for s in dev.get("requests", [])]
    setup[f"ours{tag}_served"] = {k: sum(s.get(k, 0) for s in stats)
                                  for k in ("uring", "inline", "threaded", "errors")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, medians over rounds, ratios and targets."""
    from xenpv import peers
    from xenpv.testing.vchan import VchanLab

    prerequisites()
    quick = bool(getattr(args, "quick", False))
    rounds = rounds_of(args, 3)
    duration = args.duration if args.duration is not None else (0.05 if quick else 1.0)
    size = (args.size if args.size is not None else (8 if quick else 256)) * MiB
    names = getattr(args, "workloads", None)
    workloads = dict(WORKLOADS)
    if names:
        unknown = set(names.split(",")) - set(WORKLOADS)
        if unknown:
            raise LocalError(f"unknown workloads {', '.join(sorted(unknown))}")
        workloads = {k: v for k, v in WORKLOADS.items() if k in names.split(",")}
    profile = getattr(args, "profile", None)
    if profile is not None:
        os.makedirs(profile, exist_ok=True)
        profile = os.path.abspath(profile)
    rec = Rounds("block")
    setup: dict[str, Any] = {"image_mib": size // MiB, "duration_s": duration,
                             "workloads": {k: {"kind": v[0], "bs": v[1], "depth": v[2]}
                                           for k, v in workloads.items()}}
    with tempfile.TemporaryDirectory(prefix="xenpv-bench-block-",
                                     dir=os.environ.get("XENPV_BENCH_DIR")) as tmp:
        image = Path(tmp) / "disk.img"
        _make_image(image, size)
        phases = [False]
        if not getattr(args, "no_direct", False):
            if _direct_ok(tmp):
                phases.append(True)
            else:
                setup["direct"] = f"the file system of {tmp} refuses O_DIRECT"
        with VchanLab(domains=(GUEST,), max_grants=8192) as lab:
            with open(Path(tmp) / "qemu.log", "wb") as qemu_log:
                qemu = lab.spawn(0, peers.qemu_device_model(GUEST), stdout=qemu_log,
                                 stderr=subprocess.STDOUT)
                vdevs = [("xvda", "xvdb"), ("xvdc", "xvdd")]
                for direct, pair in zip(phases, vdevs, strict=False):
                    _phase(lab, image, direct, pair, rounds, duration, size, rec, setup,
                           qemu.pid, getattr(args, "engine", "auto"), workloads, profile)
    ratios = {
        "ours_vs_qemu_randread_qd32": Ratio("ours_randread_qd32_iops",
                                            "qemu_randread_qd32_iops", ">= 2"),
        "ours_vs_qemu_seqread": Ratio("ours_seqread_gbps", "qemu_seqread_gbps", ">= 2"),
        "ours_vs_fio_randread_qd32": Ratio("ours_randread_qd32_iops",
                                           "fio_randread_qd32_iops", ">= 0.25"),
        "ours_vs_preadv_randread_qd32": Ratio("ours_randread_qd32_iops",
                                              "preadv_randread_qd32_iops"),
        "ours_vs_qemu_randwrite_qd32": Ratio("ours_randwrite_qd32_iops",
                                             "qemu_randwrite_qd32_iops"),
        "ours_vs_qemu_randread_qd1": Ratio("ours_randread_qd1_iops", "qemu_randread_qd1_iops"),
    }
    if True in phases:
        ratios.update({
            "ours_vs_qemu_direct_randread_qd32": Ratio("ours_direct_randread_qd32_iops",
                                                       "qemu_direct_randread_qd32_iops"),
            "ours_vs_fio_direct_randread_qd32": Ratio("ours_direct_randread_qd32_iops",
                                                      "fio_direct_randread_qd32_iops"),
            "ours_vs_qemu_direct_seqread": Ratio("ours_direct_seqread_gbps",
                                                 "qemu_direct_seqread_gbps"),
        })
    ratios = {k: r for k, r in ratios.items()
              if r.figure in rec.samples and r.anchor in rec.samples}
    units = {k: "GB/s" if k.endswith("_gbps") else "µs" if k.endswith("_us") else "IOPS"
             for k in rec.samples}
    return rec.result(ratios=ratios, units=units, extra={"setup": setup})


def main(argv: list[str]) -> int:
    """The frontend process: ``front RUNDIR DOMID FE_PATH SIZE`` (our frontend as the
    guest, workloads read as JSON lines on stdin, one JSON line of results each); or
    ``profile OUT MODULE ARGS...`` (``python -m MODULE ARGS`` under cProfile)."""
    if argv[0] == "front":
        asyncio.run(_front_main(argv[1], int(argv[2]), argv[3], int(argv[4])))
        return 0
    if argv[0] == "profile":  # profile OUT MODULE ARGS...
        _profiled(argv[1], argv[2], argv[3:])
        return 0
    raise SystemExit(f"unknown child {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

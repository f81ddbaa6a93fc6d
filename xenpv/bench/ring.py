"""``xenpv bench ring``: shared-ring requests per second against Xen's own C macros.

What is measured (one run; every figure is requests completed per second):

* ``c_macros`` (the anchor): a blkif-sized ring (112-byte slots, one page, 32 slots) driven
  by Xen's ``io/ring.h`` macros, the whole loop in C (compiled with cffi at bench time from
  libxen-dev's headers).  Per round: the frontend queues 32 requests and pushes, the backend
  copies them out, queues 32 responses and pushes, the frontend copies the responses out.
* ``cython``: the same rounds through xenpv's compiled batch API, from a Python loop (three
  batch calls per round: ``submit_requests``; ``take_and_respond``, which copies the
  requests out, queues the responses and pushes; ``poll_responses_into``).
* ``reference``: the same loop on the pure-Python reference ring.
* ``two_process_c`` / ``two_process_cython``: frontend and backend in two processes over a
  shared memfd, woken through eventfds under the event-index protocol, up to 32 requests in
  flight; a side with nothing to do spins up to 50 µs before re-arming and sleeping.  The
  ``*_nospin`` variants re-arm and sleep at once.  The C program uses the macros; the Python
  one uses :mod:`xenpv.rings` with one compiled call per batch on each side: the frontend's
  ``take_and_submit`` waits for the responses (spinning, then re-arming), copies them out
  and queues and pushes the next requests; the backend's ``take_and_respond`` does the same
  with requests and their answers.  A side's turn, from entries seen to the next ones
  published, thus stays in compiled code as in the C program, and Python runs while the
  peer works.  With two CPUs available the frontend and backend are pinned to different
  ones (``placement``), so every sleep costs a cross-CPU wake-up.

Every figure is the median of ``--rounds`` interleaved rounds (each variant going first in
turn; ``--seconds`` of measuring per figure, split over the rounds), and every ratio the
median of the per-round ratios (:mod:`xenpv.bench.report`).

Entries are whole slots copied once in each direction in every variant, so all do the same
work.  ``ratios`` compare each against its anchor measured in the same run; ``targets`` says
which ratio the project aims for.  Absolute figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import mmap
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from xenpv import peers
from xenpv.bench.report import Ratio, Rounds, add_rounds_option, rounds_of

SLOT = 112  # sizeof(blkif_request), x86_64 ABI
PAGE = 4096
BATCH = 32
SPIN_US = 50
CSRC = Path(__file__).resolve().parent / "csrc"
CONTROL = PAGE  # byte offset of the control words (second page of the shared memory)
CTL_STOP, CTL_NOTIFIES, CTL_SLEEPS = CONTROL, CONTROL + 4, CONTROL + 8

TARGETS = {
    "cython/c_macros": 0.30,
    "cython/reference": 20.0,
    "two_process_cython/two_process_c": 0.7,
}


def prerequisites() -> None:
    """Raise a one-line LocalError if Xen's headers (the peers tree) or cc are missing."""
    from xenpv.errors import LocalError

    peers.include_dir()
    if shutil.which(os.environ.get("CC", "cc")) is None:
        raise LocalError("needs a C compiler (cc, or $CC) for the C anchors")


def cache_dir() -> Path:
    """Where compiled benchmark helpers are kept (``$XDG_CACHE_HOME/xenpv/bench``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "xenpv" / "bench"


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def compile_cffi(modname: str, cdef: str, source: str, include_dirs: list[str],
                 build_root: Path) -> ModuleType:
    """Compile ``source`` with cffi (API mode) once per content and import the module.

    The extension lands in ``build_root/<modname>-<hash>/``; a second call with the same
    inputs only imports it.  Several processes may race: each builds in its own temporary
    directory and the first finished one is moved into place.
    """
    key = _digest(modname, cdef, source, *include_dirs, sys.version)
    final = build_root / f"{modname}-{key}"
    if not final.is_dir():
        import cffi

        build_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{modname}-", dir=build_root))
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source(modname, source, include_dirs=include_dirs,
                       extra_compile_args=["-O2", "-w"])
        ffi.compile(tmpdir=str(tmp))
        try:
            tmp.rename(final)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    built = sorted(final.glob(f"{modname}*.so"))
    if not built:
        raise RuntimeError(f"cffi build of {modname} left no extension in {final}")
    spec = importlib.util.spec_from_file_location(modname, built[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_program(name: str, source: Path, include_dirs: list[str], build_root: Path) -> Path:
    """Compile a standalone C program once per content; returns the executable's path."""
    text = source.read_text()
    exe = build_root / f"{name}-{_digest(name, text, *include_dirs)}"
    if not exe.exists():
        build_root.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_name(f".{exe.name}.{os.getpid()}")
        cc = os.environ.get("CC", "cc")
        cmd = [cc, "-O2", "-Wall", *(f"-I{d}" for d in include_dirs), "-o", str(tmp), str(source)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        tmp.replace(exe)
    return exe


def ring_macros_module() -> Any:
    """The cffi module running the io/ring.h anchor loop (``csrc/ring_macros.c``)."""
    cdef = ("long long bench_ring_macros(void *page, unsigned bytes, long long rounds, "
            "int batch, long long *notifies);")
    source = (CSRC / "ring_macros.c").read_text()
    return compile_cffi("_xenpv_bench_ring_macros", cdef, source,
                        [str(peers.include_dir())], cache_dir())


def _timed(seconds: float, step: Callable[[int], int], chunk: int) -> float:
    """Call ``step(chunk)`` (returns requests done) until ``seconds`` pass; requests/s."""
    done = 0
    start = time.perf_counter()
    while True:
        done += step(chunk)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def _best(seconds: float, repeats: int, once: Callable[[float], float]) -> float:
    """Best of ``repeats`` short measurements: the machine is shared, so take the least
    disturbed one."""
    return max(once(seconds / repeats) for _ in range(repeats))


def bench_c_macros(seconds: float, repeats: int = 3) -> float:
    """Requests/s of the io/ring.h anchor loop."""
    mod = ring_macros_module()
    page = bytearray(PAGE)
    cpage = mod.ffi.from_buffer(page)
    notifies = mod.ffi.new("long long *")

    def step(rounds: int) -> int:
        done = int(mod.lib.bench_ring_macros(cpage, PAGE, rounds, BATCH, notifies))
        if done < 0:
            raise RuntimeError("the anchor ring reported an overflow")
        return done

    return _best(seconds, repeats, lambda s: _timed(s, step, 20000))


def bench_python_loop(impl_name: str, seconds: float, repeats: int = 3) -> float:
    """Requests/s of the same rounds driven from Python through one ring implementation."""
    from xenpv.rings import implementation

    impl = implementation(impl_name)
    page = bytearray(PAGE)
    front = impl.FrontRing(page, SLOT)
    back = impl.BackRing(page, SLOT)
    reqs = bytes([0x5A]) * (SLOT * BATCH)
    rsps = bytes([0xA5]) * (SLOT * BATCH)
    got_req = bytearray(SLOT * BATCH)
    got_rsp = bytearray(SLOT * BATCH)
    submit, serve, poll = front.submit_requests, back.take_and_respond, front.poll_responses_into

    def step(rounds: int) -> int:
        done = 0
        for _ in range(rounds):
            submit(reqs, BATCH)
            serve(got_req, rsps, BATCH)
            done += poll(got_rsp, BATCH)
        return done

    chunk = 2000 if impl_name == "cython" else 20
    return _best(seconds, repeats, lambda s: _timed(s, step, chunk))


def placement() -> tuple[int, int] | None:
    """CPUs for (frontend, backend): two different ones we may run on, or None (one CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def bench_two_process_c(seconds: float, spin_us: int) -> dict[str, float]:
    """Run the C two-process program; requests/s and notification counts."""
    exe = compile_program("two_process", CSRC / "two_process.c",
                          [str(peers.include_dir())], cache_dir())
    cpus = [str(c) for c in placement() or (-1, -1)]
    out = subprocess.run([str(exe), str(seconds), str(spin_us), str(BATCH), *cpus], check=True,
                         capture_output=True, text=True, timeout=seconds + 30).stdout.split()
    done, fn, bn, fs, bs, ns = (int(x) for x in out)
    return _two_process_result(done, fn, bn, fs, bs, ns / 1e9)


def _two_process_result(done: int, front_notifies: int, back_notifies: int,
                        front_sleeps: int, back_sleeps: int, elapsed: float) -> dict[str, float]:
    return {
        "requests": done,
        "seconds": elapsed,
        "requests_per_s": done / elapsed if elapsed > 0 else 0.0,
        "front_notifies": front_notifies,
        "back_notifies": back_notifies,
        "front_sleeps": front_sleeps,
        "back_sleeps": back_sleeps,
    }


class _Waker:
    """Sleep on one eventfd with a timeout, kick another (a peer that never answers must
    not hang us: every wait is bounded)."""

    def __init__(self, mine: int, peer: int) -> None:
        self.mine, self.peer = mine, peer
        self._poll = select.poll()
        self._poll.register(mine, select.POLLIN)

    def kick(self) -> None:
        os.eventfd_write(self.peer, 1)

    def sleep(self, timeout_s: float) -> None:
        if not self._poll.poll(int(timeout_s * 1000)):
            raise TimeoutError("the peer process did not notify within the timeout")
        try:
            os.eventfd_read(self.mine)
        except BlockingIOError:
            pass


def _backend_loop(impl_name: str, shared: mmap.mmap, waker: _Waker, spin_ns: int,
                  batch: int, timeout_s: float) -> None:
    from xenpv.rings import implementation

    impl = implementation(impl_name)
    back = impl.BackRing(memoryview(shared)[:PAGE], SLOT)
    got = bytearray(SLOT * batch)
    notifies = sleeps = 0
    serve, load_u32 = back.take_and_respond, impl.load_u32
    while True:
        # one call per batch: spin up to spin_ns for requests, re-arm when there are none,
        # copy them out, queue each one's echo as its response and push
        n, notify = serve(got, got, batch, spin_ns)
        if n == 0:  # the ring is empty and armed; the stop flag is looked at only here,
            if load_u32(shared, CTL_STOP):  # as the C backend's loop does once per pass
                break
            sleeps += 1
            waker.sleep(timeout_s)
        elif notify:
            notifies += 1
            waker.kick()
    impl.store_u32(shared, CTL_NOTIFIES, notifies)
    impl.store_u32(shared, CTL_SLEEPS, sleeps)
    back.release()


def run_two_process(impl_name: str = "cython", *, seconds: float | None = 1.0,
                    count: int | None = None, spin_us: int = SPIN_US, batch: int = BATCH,
                    timeout_s: float = 10.0, verify: bool = False,
                    pin: bool = True) -> dict[str, float]:
    """Frontend here, backend in a forked child, over a shared memfd with eventfd wake-ups.

    Runs for ``seconds`` or until ``count`` requests completed (whichever is given/first).
    The backend answers each request with a copy of it; with ``verify`` every request
    carries its sequence number (at the offset of blkif's ``id``) and the frontend checks
    that the answers come back complete and in order (a RuntimeError otherwise).
    With ``pin`` (and two CPUs available) the frontend and backend run on different CPUs
    (see :func:`placement`); this process's affinity is restored afterwards.
    Returns requests/s, notification and sleep counts of both sides.
    """
    from xenpv.rings import implementation

    impl = implementation(impl_name)
    fd = os.memfd_create("xenpv-ring-demo", os.MFD_CLOEXEC)
    to_back = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    to_front = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fds = [fd, to_back, to_front]
    try:
        os.ftruncate(fd, 2 * PAGE)
        shared = mmap.mmap(fd, 2 * PAGE)
        page = memoryview(shared)[:PAGE]
        front = impl.FrontRing(page, SLOT)
        spin_ns = spin_us * 1000
        cpus = placement() if pin else None
        affinity = os.sched_getaffinity(0)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through shared memory
            status = 0
            try:
                _pin(cpus[1] if cpus else None)
                _backend_loop(impl_name, shared, _Waker(to_back, to_front), spin_ns, batch,
                              timeout_s)
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        try:
            _pin(cpus[0] if cpus else None)
            result = _frontend_loop(front, _Waker(to_front, to_back), spin_ns, batch, seconds,
                                    count, timeout_s, verify)
        finally:
            impl.store_u32(shared, CTL_STOP, 1)
            impl.full_barrier()
            os.eventfd_write(to_back, 1)
            status = _reap(pid, timeout_s)
            os.sched_setaffinity(0, affinity)
        front.release()
        result["back_notifies"] = impl.load_u32(shared, CTL_NOTIFIES)
        result["back_sleeps"] = impl.load_u32(shared, CTL_SLEEPS)
        page.release()
        shared.close()
        if status != 0:
            raise RuntimeError(f"the backend process failed (status {status})")
        return result
    finally:
        for f in fds:
            os.close(f)


def _reap(pid: int, timeout_s: float) -> int:
    """Wait for the child, killing it if it does not exit within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def _frontend_loop(front: Any, waker: _Waker, spin_ns: int, batch: int,
                   seconds: float | None, count: int | None, timeout_s: float,
                   verify: bool) -> dict[str, float]:
    reqs: Any = bytes([0x5A]) * (SLOT * batch)
    got: Any = bytearray(SLOT * batch)
    if verify:  # numpy only then: its thread pool would otherwise share our CPUs
        import numpy as np

        # a request's sequence number sits where blkif keeps ``id`` (offset 8)
        id_dtype = np.dtype({"names": ["id"], "formats": ["<u8"], "offsets": [8],
                             "itemsize": SLOT})
        reqs, got = np.zeros(batch, id_dtype), np.zeros(batch, id_dtype)
        reqs_ids, got_ids = reqs["id"], got["id"]
        window = np.arange(batch, dtype=np.uint64)
    done = submitted = notifies = sleeps = 0
    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else float("inf")
    limit = count if count is not None else -1
    exchange, clock = front.take_and_submit, time.perf_counter
    k = batch
    while done != limit and clock() < deadline:
        if limit >= 0 and k > limit - submitted:
            k = limit - submitted
        if verify:  # the next requests' sequence numbers, however many will fit
            reqs_ids[:] = window + submitted
        # one call per batch: wait for responses when nothing more can be sent (spin up to
        # spin_ns, then re-arm), take them, queue and push what fits of the next batch
        n, queued, notify = exchange(got, reqs, k, batch, spin_ns)
        if notify:
            notifies += 1
            waker.kick()
        submitted += queued
        if n == 0:
            if queued == 0:  # nothing came, nothing to send, rsp_event armed: sleep
                sleeps += 1
                waker.sleep(timeout_s)
            continue
        if verify and not (got_ids[:n] == window[:n] + done).all():
            raise RuntimeError(f"responses {done}..{done + n} came back wrong or out of order")
        done += n
    elapsed = time.perf_counter() - start
    return _two_process_result(done, notifies, 0, sleeps, 0, elapsed)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ring benchmark's options."""
    parser.add_argument("--quick", action="store_true",
                        help="a very short run (smoke test; figures are not meaningful)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="measuring time per figure over all rounds (default 2)")
    add_rounds_option(parser, 5)
    parser.add_argument("--demo", type=int, metavar="N", default=0,
                        help="instead: push N checked requests between two processes, with "
                             "and without spinning, and print a table")


def demo(count: int, spin_us: int = SPIN_US, batch: int = BATCH) -> dict[str, Any]:
    """The two-process ring demonstration: print a summary table, return its figures."""
    from xenpv import rings

    impl = rings.IMPLEMENTATION
    print("Frontend (this process) and backend (a forked child) share one 4 KiB page:")
    print(f"{rings.ring_size(PAGE, SLOT)} slots of {SLOT} bytes (blkif-sized), up to {batch} "
          f"requests in flight, {impl} ring core.")
    print("They kick each other's eventfd only when the peer asked (event-index protocol);")
    print("every response echoes its request's sequence number and is checked.\n")
    header = (f"{'run':<22} {'requests':>10} {'seconds':>8} {'req/s':>12} "
              f"{'kicks F/B':>13} {'sleeps F/B':>13}")
    print(header)
    print("-" * len(header))
    figures: dict[str, Any] = {}
    for label, spin in ((f"spin {spin_us} us, then sleep", spin_us), ("sleep at once", 0)):
        r = run_two_process(impl, seconds=None, count=count, spin_us=spin, batch=batch,
                            verify=True)
        kicks = f"{r['front_notifies']:,}/{r['back_notifies']:,}"
        sleeps = f"{r['front_sleeps']:,}/{r['back_sleeps']:,}"
        print(f"{label:<22} {int(r['requests']):>10,} {r['seconds']:>8.3f} "
              f"{r['requests_per_s']:>12,.0f} {kicks:>13} {sleeps:>13}")
        figures["spin" if spin else "nospin"] = r
    print("\nAll responses came back complete and in order.\n")
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant once and return the figures, ratios and targets."""
    if args.demo:
        return demo(args.demo)
    from xenpv.rings import ring_size

    rounds = rounds_of(args, 5)
    seconds = 0.05 if args.quick else args.seconds / rounds
    tp_seconds = 0.1 if args.quick else seconds
    cpus = placement()
    where = (f"front on CPU {cpus[0]}, back on CPU {cpus[1]}" if cpus
             else "front and back share one CPU")
    rec = Rounds("ring")
    detail: dict[str, list[dict[str, float]]] = {}

    def two_process(name: str, spin: int, c: bool) -> float:
        r = (bench_two_process_c(tp_seconds, spin) if c
             else run_two_process("cython", seconds=tp_seconds, spin_us=spin))
        detail.setdefault(name, []).append(r)
        return r["requests_per_s"]

    measures: dict[str, Callable[[], float]] = {
        "c_macros": lambda: bench_c_macros(seconds, 1),
        "cython": lambda: bench_python_loop("cython", seconds, 1),
        "reference": lambda: bench_python_loop("reference", seconds, 1),
    }
    for name, spin in (("", SPIN_US), ("_nospin", 0)):
        measures[f"two_process_c{name}"] = functools.partial(
            two_process, f"two_process_c{name}", spin, True)
        measures[f"two_process_cython{name}"] = functools.partial(
            two_process, f"two_process_cython{name}", spin, False)
    rec.interleave(rounds, measures)
    ratios = {
        "cython/c_macros": Ratio("cython", "c_macros", f">= {TARGETS['cython/c_macros']}"),
        "cython/reference": Ratio("cython", "reference", f">= {TARGETS['cython/reference']}"),
        "two_process_cython/two_process_c": Ratio(
            "two_process_cython", "two_process_c",
            f">= {TARGETS['two_process_cython/two_process_c']}"),
        "two_process_cython_nospin/two_process_c_nospin": Ratio(
            "two_process_cython_nospin", "two_process_c_nospin"),
    }
    # the notification and sleep counts of each variant's median round
    middle = {k: sorted(v, key=lambda r: r["requests_per_s"])[len(v) // 2]
              for k, v in detail.items()}
    return rec.result(
        units={k: "requests/s" for k in measures}, ratios=ratios, placement=where,
        extra={"unit": "requests/s", "slot_size": SLOT, "ring_slots": ring_size(PAGE, SLOT),
               "batch": BATCH, "spin_us": SPIN_US, "placement": where,
               "two_process_detail": middle})

"""``xenpv demo``: xenpv at work on one ordinary Linux machine (the README's main job).

Theory of operation
-------------------
The demo plays toolstack and user; every driver runs in its own process, acting as its
own emulated domain:

1. start the loopback emulator (``xenpv loopback up``) in a temporary run directory and
   create a guest domain (dom1);
2. **console pair**: the guest's console frontend (``xenpv console frontend --shell``, as
   dom1) shares its ring at grant ref 0; the demo publishes ``/local/domain/1/console``
   as the toolstack would; the console backend (``xenpv console backend``, as dom0) maps
   it and serves it on a pty, whose path it writes to ``console/tty``.  The demo opens
   that pty like ``xenconsole`` and talks to the guest's little shell: ``echo`` round
   trips for latency, then ``send N`` for throughput;
3. **vchan pair**: a vchan server (dom0) and client (dom1), two more processes
   (``xenpv demo --worker vchan-server|vchan-client``), ping-pong for latency, then a bulk
   stream checked with CRC-32;
4. print a summary table, stop every process, check the emulator's accounting (grants,
   mappings, ports, handles: "leaks: none"), stop the daemon, remove the run directory.

Exit status 0 on success; on any failure a one-line reason on stderr and status 1.
Progress is one updating line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
import tty
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

GUEST = 1
VCHAN_PATH = f"/local/domain/0/data/vchan/{GUEST}/demo"
_PING = 64


class DemoError(Exception):
    """A stage of the demo failed (the message says which and why)."""


class Stopped(BaseException):
    """The demo received SIGTERM, SIGINT or SIGHUP (it then ends its children)."""

    def __init__(self, signum: int) -> None:
        """Record the signal."""
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGTERM/SIGINT/SIGHUP into :class:`Stopped`; ignore the rest while
    the caller cleans up (its cleanup is bounded), then restore the old handlers."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(signum: int, _frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options: sizes, ``--quick``, and the hidden worker roles."""
    parser.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    parser.add_argument("--console-bytes", type=int, help="console output to move")
    parser.add_argument("--vchan-bytes", type=int, help="vchan bytes to move")
    parser.add_argument("--pings", type=int, help="round trips per pair for latency")
    parser.add_argument("--timeout", type=float, default=45.0, help="limit per stage (s)")
    parser.add_argument("--worker", choices=["vchan-server", "vchan-client"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--rundir", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- helpers


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """One updating status line on ``out`` (a terminal gets ``\\r`` updates)."""

    def __init__(self, out: TextIO) -> None:
        """Draw on ``out``."""
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0
        self._width = 0

    def show(self, label: str, done: int, total: int, force: bool = False) -> None:
        """Update the line (at most 20 times a second)."""
        now = time.monotonic()
        if not force and now - self._last < 0.05:
            return
        self._last = now
        pct = 100 * done // max(total, 1)
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        line = f"  {label:<8} [{bar}] {pct:3d}%  {_human(done)} / {_human(total)}"
        if self.tty:
            self.out.write("\r" + line.ljust(self._width))
            self._width = len(line)
        elif force:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        """Finish the line."""
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()
        self._width = 0


@dataclass
class PairResult:
    """What one pair achieved."""

    name: str
    bytes: int
    seconds: float
    rtts: list[float] = field(default_factory=list)
    check: str = ""

    def row(self) -> list[str]:
        """The summary-table row."""
        rtts = sorted(self.rtts)
        med = rtts[len(rtts) // 2] * 1e6 if rtts else 0.0
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6 if rtts else 0.0
        mbps = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return [self.name, _human(self.bytes), f"{mbps:.2f}", f"{med:.0f}", f"{p99:.0f}",
                self.check]


def _table(rows: list[list[str]]) -> str:
    head = ["pair", "bytes", "MB/s", "rtt p50 us", "rtt p99 us", "check"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


class Children:
    """Every process the demo starts; :meth:`stop` ends them all (also on failure)."""

    def __init__(self) -> None:
        """Nothing started yet."""
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` with pipes for stdin/stdout (stderr passes through)."""
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs.append((name, p))
        return p

    def read_event(self, name: str, p: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        """The next JSON line of ``p`` (DemoError on timeout, exit or garbage)."""
        assert p.stdout is not None
        fd = p.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise DemoError(f"{name}: no answer within {timeout:.0f} s")
        line = p.stdout.readline()
        if not line:
            raise DemoError(f"{name} exited with status {p.wait(5)}")
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError:
            raise DemoError(f"{name}: unexpected output {line[:80]!r}") from None
        if event.get("event") == "error":
            raise DemoError(f"{name}: {event.get('error')}")
        return event

    def finish(self, p: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
        """Close ``p``'s stdin (its signal to stop) and wait for it."""
        with contextlib.suppress(OSError):
            if p.stdin is not None:
                p.stdin.close()
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait(5)

    def stop(self) -> None:
        """End every process still running (SIGTERM, then SIGKILL)."""
        for _name, p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    if p.stdin is not None:
                        p.stdin.close()
                p.terminate()
        for _name, p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()


def _xenpv(*args: str) -> list[str]:
    return [sys.executable, "-m", "xenpv", *args]


# --------------------------------------------------------------------------- console


async def _publish_console(rundir: str, port: int) -> None:
    """As the toolstack: publish console 0 of the guest."""
    from xenpv.backends.console import publish_primary_console
    from xenpv.xenstore.client import connect

    client = await connect(os.path.join(rundir, "dom0", "xenstore"))
    try:
        await publish_primary_console(client, GUEST, port=port, ring_ref=0)
    finally:
        await client.close()


async def _wait_tty(rundir: str, timeout: float) -> str:
    from xenpv.xenstore.client import connect

    client = await connect(os.path.join(rundir, "dom0", "xenstore"))
    path = f"/local/domain/{GUEST}/console/tty"
    try:
        async with asyncio.timeout(timeout), client.watch(path, max_pending=4) as watch:
            async for _ in watch:
                value = await client.read(path)
                if value:
                    return value.decode("ascii", "replace")
    except TimeoutError:
        pass
    finally:
        await client.close()
    raise DemoError("the console backend never published console/tty")


class Pty:
    """A terminal end the demo (or a test) types into and reads from, like ``xenconsole``.

    ``Pty(fd)`` wraps an open descriptor (made non-blocking); :meth:`open` opens a pty
    path in raw mode.  Failures raise :class:`DemoError`."""

    def __init__(self, fd: int) -> None:
        """Use ``fd`` (owned from now on: :meth:`close` closes it)."""
        os.set_blocking(fd, False)
        self.fd = fd
        self.buf = bytearray()

    @classmethod
    def open(cls, path: str) -> Pty:
        """Open the pty ``path`` in raw mode."""
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd, termios.TCSANOW)  # keep output the guest already wrote
        return cls(fd)

    def write(self, data: bytes) -> None:
        """Type ``data``."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[n:]

    def read_until(self, marker: bytes, timeout: float,
                   progress: Callable[[int], None] | None = None) -> bytes:
        """Read until ``marker``; returns everything up to and including it."""
        deadline = time.monotonic() + timeout
        searched = 0
        while True:
            at = self.buf.find(marker, max(0, searched - len(marker)))
            if at >= 0:
                end = at + len(marker)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            searched = len(self.buf)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(f"console: no {marker!r} within {timeout:.0f} s "
                                f"(got {bytes(self.buf[-200:])!r})")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError as exc:  # EIO: the other side of the terminal is gone
                    raise DemoError(f"console: the terminal closed ({exc})") from None
                if not chunk:
                    raise DemoError("console: the terminal closed")
                self.buf += chunk
                if progress is not None:
                    progress(len(self.buf))

    def close(self) -> None:
        """Close the pty."""
        os.close(self.fd)


def console_stage(rundir: str, kids: Children, nbytes: int, pings: int, timeout: float,
                  progress: Progress) -> PairResult:
    """Run the console pair; returns its figures."""
    fe = kids.start("console frontend", _xenpv(
        "console", "frontend", "--rundir", rundir, "--domid", str(GUEST), "--shell"))
    ready = kids.read_event("console frontend", fe, timeout)
    asyncio.run(_publish_console(rundir, int(ready["port"])))
    be = kids.start("console backend", _xenpv(
        "console", "backend", "--rundir", rundir, "--domid", str(GUEST), "--no-secondary",
        "--log-dir", os.path.join(rundir, "console-logs")))
    kids.read_event("console backend", be, timeout)
    pty = Pty.open(asyncio.run(_wait_tty(rundir, timeout)))
    try:
        rtts = []
        for i in range(pings):
            t0 = time.perf_counter()
            pty.write(b"echo ping-%d\n" % i)
            pty.read_until(b"ping-%d\n" % i, timeout)
            rtts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pty.write(b"send %d\n" % nbytes)
        out = pty.read_until(b"<done %d>\n" % nbytes, timeout,
                             lambda n: progress.show("console", min(n, nbytes), nbytes))
        seconds = time.perf_counter() - t0
        progress.show("console", nbytes, nbytes, force=True)
        progress.end()
        from xenpv.cli.console import text_block

        body = out[: -len(b"<done %d>\n" % nbytes)]
        if body[-nbytes:] != text_block(nbytes):
            raise DemoError("console: the text read back differs from what the guest sent")
        pty.write(b"quit\n")
        pty.read_until(b"bye\n", timeout)
    finally:
        pty.close()
    # the backend lets go of the page first, so the guest can end its grant cleanly
    if kids.finish(be) != 0:
        raise DemoError("console backend failed")
    if kids.finish(fe) != 0:
        raise DemoError("console frontend failed")
    return PairResult("console", nbytes, seconds, rtts, "text ok")


# --------------------------------------------------------------------------- vchan


def _vchan_worker(args: argparse.Namespace) -> int:
    """One end of the demo vchan (runs in its own process, as its own domain)."""
    from xenpv.platforms.loopback.client import ClientPlatform
    from xenpv.vchan import VchanClient, VchanServer

    nbytes, pings = args.vchan_bytes or 0, args.pings or 0
    server = args.worker == "vchan-server"
    platform = ClientPlatform.for_domain(args.rundir, 0 if server else GUEST)
    ep: Any = None
    try:
        if server:
            ep = VchanServer(platform, GUEST, VCHAN_PATH, read_min=1 << 16, write_min=1 << 12)
            _emit(event="ready")
            if not ep.wait_connected(args.timeout):
                raise TimeoutError("no vchan client")
            msg = os.urandom(_PING)
            rtts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                ep.send(msg, args.timeout)
                if ep.recv_exactly(_PING, args.timeout) != msg:
                    raise ValueError("ping came back changed")
                rtts.append(time.perf_counter() - t0)
            buf = bytearray(1 << 16)
            got = crc = 0
            t0 = time.perf_counter()
            last = 0.0
            while got < nbytes:
                n = ep.recv_into(buf, min(len(buf), nbytes - got), args.timeout)
                if not n:
                    raise EOFError("vchan closed early")
                crc = zlib.crc32(memoryview(buf)[:n], crc)
                got += n
                now = time.perf_counter()
                if now - last > 0.05:
                    last = now
                    _emit(event="progress", bytes=got)
            seconds = time.perf_counter() - t0
            _emit(event="done", bytes=got, seconds=seconds, crc=crc, rtts=rtts)
        else:
            ep = VchanClient(platform, 0, VCHAN_PATH)
            _emit(event="ready")
            for _ in range(pings):
                ep.send(ep.recv_exactly(_PING, args.timeout), args.timeout)
            block = os.urandom(1 << 16)
            sent = crc = 0
            while sent < nbytes:
                piece = block[: min(len(block), nbytes - sent)]
                ep.send(piece, args.timeout)
                crc = zlib.crc32(piece, crc)
                sent += len(piece)
            _emit(event="done", bytes=sent, crc=crc)
            # stay until the server has everything (it closes first)
            while ep.is_open:
                ep.wait_event(0.2)
    except Exception as exc:  # reported to the demo, which prints it
        _emit(event="error", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        if ep is not None:
            ep.close()
        platform.close()
    return 0


def vchan_stage(rundir: str, kids: Children, nbytes: int, pings: int, timeout: float,
                progress: Progress) -> PairResult:
    """Run the vchan pair; returns its figures."""
    common = ["--rundir", rundir, "--vchan-bytes", str(nbytes), "--pings", str(pings),
              "--timeout", str(timeout)]
    srv = kids.start("vchan server", _xenpv("demo", "--worker", "vchan-server", *common))
    kids.read_event("vchan server", srv, timeout)
    cli = kids.start("vchan client", _xenpv("demo", "--worker", "vchan-client", *common))
    kids.read_event("vchan client", cli, timeout)
    while True:
        event = kids.read_event("vchan server", srv, timeout)
        if event["event"] == "progress":
            progress.show("vchan", int(event["bytes"]), nbytes)
            continue
        break
    progress.show("vchan", nbytes, nbytes, force=True)
    progress.end()
    sent = kids.read_event("vchan client", cli, timeout)
    if event.get("bytes") != nbytes or sent.get("crc") != event.get("crc"):
        raise DemoError("vchan: the bytes received differ from the bytes sent")
    if kids.finish(srv) != 0 or kids.finish(cli) != 0:
        raise DemoError("a vchan process failed")
    return PairResult("vchan", nbytes, float(event["seconds"]), list(event["rtts"]),
                      "crc32 ok")


# --------------------------------------------------------------------------- main


def _leaks(rundir: str) -> dict[str, int]:
    """Everything the emulator still holds, beyond the demo's own control handle."""
    from xenpv.platforms.loopback import proto
    from xenpv.platforms.loopback.client import ControlConnection

    conn = ControlConnection(Path(rundir) / "dom0" / "control", timeout=10.0)
    try:
        deadline = time.monotonic() + 5.0
        while True:
            out, _ = conn.call(proto.Op.DOMAIN_LIST)
            (count,) = proto.U32.unpack_from(out)
            totals = {"grants": 0, "mappings": 0, "ports": 0, "handles": 0, "watches": 0}
            for i in range(count):
                domid = proto.U32x2.unpack_from(out, 4 + 8 * i)[0]
                st, _ = conn.call(proto.Op.STATS, proto.U32.pack(domid))
                # docs/loopback-protocol.md STATS: grants, revoking, mappings, ports,
                # shares, handles[, xenstore watches]
                fields = struct.unpack_from(f"<{len(st) // 4}I", st)
                totals["grants"] += fields[0]
                totals["mappings"] += fields[2]
                totals["ports"] += fields[3]
                totals["handles"] += fields[5] - (1 if domid == 0 else 0)
                totals["watches"] += fields[6] if len(fields) > 6 else 0
            left = {k: v for k, v in totals.items() if v}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)  # connection closes reach the daemon asynchronously
    finally:
        conn.close()


def _sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    console = args.console_bytes or (32 << 10 if args.quick else 256 << 10)
    vchan = args.vchan_bytes or (4 << 20 if args.quick else 64 << 20)
    pings = args.pings if args.pings is not None else (10 if args.quick else 100)
    return console, vchan, pings


def demo(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the whole demo; returns the exit status.

    SIGTERM, SIGINT and SIGHUP end it early: every child process is stopped (by pid),
    the emulator too, and the run directory is removed (status 128 + the signal)."""
    try:
        with stop_on_signals():
            return _demo(args, out, err)
    except Stopped as exc:
        return 128 + exc.signum


def _demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from xenpv.platforms.loopback.harness import start_daemon, stop_daemon

    console_bytes, vchan_bytes, pings = _sizes(args)
    rundir = tempfile.mkdtemp(prefix="xenpv-demo-")
    kids = Children()
    progress = Progress(err)
    daemon: subprocess.Popen[bytes] | None = None
    status = 1
    t_start = time.monotonic()
    try:
        print(f"xenpv demo: loopback emulator in {rundir}", file=out, flush=True)
        daemon = start_daemon(rundir, domains=(GUEST,))
        print(f"  dom0 (toolstack, backends) and dom{GUEST} (guest) are up", file=out,
              flush=True)
        results = [
            console_stage(rundir, kids, console_bytes, pings, args.timeout, progress),
            vchan_stage(rundir, kids, vchan_bytes, pings, args.timeout, progress),
        ]
        kids.stop()
        left = _leaks(rundir)
        print("", file=out)
        print(_table([r.row() for r in results]), file=out)
        print("", file=out)
        if left:
            raise DemoError(f"leaks: {left}")
        print("leaks: none", file=out)
        print("(the console backend limits each guest to 30 events per 200 ms, like "
              "xenconsoled;\n the console's latency tail and throughput show it)", file=out)
        status = 0
    except Stopped as exc:
        progress.end()
        print(f"xenpv demo: stopped by {exc}; ending its processes", file=err, flush=True)
        raise
    except DemoError as exc:
        progress.end()
        print(f"xenpv demo: FAILED: {exc}", file=err)
    except Exception as exc:
        progress.end()
        print(f"xenpv demo: FAILED: {type(exc).__name__}: {exc}", file=err)
    finally:
        for sig in STOP_SIGNALS:  # the cleanup below is bounded: let it finish
            signal.signal(sig, signal.SIG_IGN)
        kids.stop()
        if daemon is not None:
            stop_daemon(daemon)
        shutil.rmtree(rundir, ignore_errors=True)
        gone = not os.path.exists(rundir)
        if not gone:
            status = 1
            print(f"xenpv demo: FAILED: could not remove {rundir}", file=err)
    if status == 0:
        print(f"processes ended, run directory removed; {time.monotonic() - t_start:.1f} s",
              file=out)
    return status


def run(args: argparse.Namespace) -> int:
    """``xenpv demo`` (or one of its worker roles)."""
    if args.worker:
        return _vchan_worker(args)
    return demo(args)

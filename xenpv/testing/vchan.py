"""A loopback machine for vchan tests and benchmarks: daemon, domains, peer processes.

:class:`VchanLab` starts ``xenpv loopback up`` (via
:class:`~xenpv.platforms.loopback.harness.DaemonMachine`, with grant tables large enough
for 1 MiB rings), creates the domains asked for, hands out platforms acting as any domain
in this process, and starts programs (``python -m xenpv.vchan.tool``, Xen's
``vchan-socket-proxy``, C programs linked with libxenvchan) in a domain's environment:
``xenpv loopback env`` (the replacement libraries first on ``LD_LIBRARY_PATH``) followed by
Debian's libraries from :mod:`xenpv.peers`.  :meth:`VchanLab.close` kills every process it
started and stops the daemon; it is safe to call on failure paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xenpv import peers
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.emulator import InProcessEmulator
from xenpv.platforms.loopback.env import domain_env
from xenpv.platforms.loopback.harness import DaemonMachine

__all__ = ["InProcessVchanLab", "VchanLab", "build_libxenvchan_program", "read_line", "vchan_path"]


def vchan_path(server: int, client: int, name: str) -> str:
    """The conventional vchan path ``/local/domain/<server>/data/vchan/<client>/<name>``."""
    return f"/local/domain/{server}/data/vchan/{client}/{name}"


def build_libxenvchan_program(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Compile a C program against Debian's ``libxenvchan.so.4.17`` (headers and library
    from the peers tree; raises :class:`~xenpv.peers.PeerMissing` if it is absent)."""
    lib = peers.lib_dir()
    peers.find("usr/lib/x86_64-linux-gnu/libxenvchan.so.4.17")
    out = Path(out)
    src = Path(source)
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", f"-I{peers.include_dir()}", "-o", str(tmp), str(src),
         f"-L{lib}", "-l:libxenvchan.so.4.17", f"-Wl,-rpath-link,{lib}"],
        check=True, capture_output=True, text=True, timeout=120)
    os.replace(tmp, out)
    return out


class VchanLab:
    """The loopback daemon with ``domains`` created, plus everything started on it."""

    def __init__(self, domains: tuple[int, ...] = (1, 2), *, max_grants: int = 4096,
                 max_ports: int = 256) -> None:
        self.machine = DaemonMachine(max_grants=max_grants, max_ports=max_ports)
        self.rundir = self.machine.rundir
        self.procs: list[subprocess.Popen[Any]] = []
        self.platforms: list[ClientPlatform] = []
        try:
            for d in domains:
                self.machine.create_domain(d)
        except BaseException:
            self.close()
            raise

    def env(self, domid: int, **extra: str) -> dict[str, str]:
        """Environment of a program acting as ``domid`` (shim, then Debian's libraries)."""
        env = dict(os.environ)
        env.update(domain_env(self.rundir, domid))
        env["LD_LIBRARY_PATH"] = f"{env['LD_LIBRARY_PATH']}:{peers.lib_dir()}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.update(extra)
        return env

    def platform(self, domid: int) -> ClientPlatform:
        """A platform acting as ``domid`` in this process (closed by :meth:`close`)."""
        p = ClientPlatform.for_domain(self.rundir, domid)
        self.platforms.append(p)
        return p

    def spawn(self, domid: int, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` as domain ``domid`` (tracked; killed by :meth:`close`)."""
        kw.setdefault("env", self.env(domid))
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def tool(self, domid: int, *args: str) -> subprocess.Popen[bytes]:
        """``python -m xenpv.vchan.tool ARGS`` as ``domid``, stdout an unbuffered pipe
        (read it with :func:`read_line`), stdin a pipe (closing it ends ``--hold``)."""
        return self.spawn(domid, [sys.executable, "-m", "xenpv.vchan.tool", *args],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    @staticmethod
    def read_json(proc: subprocess.Popen[Any], timeout: float = 60.0) -> dict[str, Any]:
        """The next JSON line ``proc`` prints (``AssertionError`` on EOF or timeout)."""
        data: dict[str, Any] = json.loads(read_line(proc, timeout))
        return data

    def outstanding(self) -> dict[str, int]:
        """Grants, mappings and ports still held in every domain."""
        out = self.machine.outstanding()
        out.pop("handles", None)
        return out

    def assert_released(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until no grant, mapping or port is held; else AssertionError."""
        self.machine.assert_released(timeout, handles=False)

    def close(self) -> None:
        """Kill every process, close every platform, stop the daemon."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(10)
            if proc.stdout is not None and not proc.stdout.closed:
                _pending.pop(proc.stdout.fileno(), None)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
        self.procs.clear()
        for p in self.platforms:
            with contextlib.suppress(Exception):
                p.close()
        self.platforms.clear()
        self.machine.close()

    def __enter__(self) -> VchanLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessVchanLab(InProcessEmulator):
    """The in-process loopback mode: an
    :class:`~xenpv.platforms.loopback.emulator.InProcessEmulator` (every domain in this
    process, the embedded xenstored on its own thread) with the :meth:`platform`,
    :meth:`outstanding` and :meth:`assert_released` of :class:`VchanLab` (no processes).
    Platforms of this mode must be used from one thread."""

    def __init__(self, domains: tuple[int, ...] = (1, 2), *, max_grants: int = 4096,
                 max_ports: int = 256) -> None:
        super().__init__(domains, max_grants=max_grants, max_ports=max_ports)

    def outstanding(self) -> dict[str, int]:
        """Grants, mappings and ports still held."""
        out = super().outstanding()
        out.pop("handles", None)
        return out

    def assert_released(self, timeout: float = 5.0) -> None:
        """Raise AssertionError if a grant, mapping or port is still held (``timeout`` is
        accepted for :class:`VchanLab`'s signature: nothing here is asynchronous)."""
        super().assert_released()


_pending: dict[int, bytearray] = {}


def read_line(proc: subprocess.Popen[Any], timeout: float = 60.0) -> str:
    """One line of ``proc``'s stdout (an unbuffered binary pipe), waiting at most
    ``timeout`` seconds; ``AssertionError`` on timeout or end of output."""
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = _pending.setdefault(fd, bytearray())
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line from {proc.args!r} within {timeout} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            _pending.pop(fd, None)
            raise AssertionError(f"{proc.args!r} ended (status {proc.poll()}) without a line")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()

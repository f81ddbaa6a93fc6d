"""Emulated machines for tests and benchmarks: in-process, or a daemon plus one process per domain.

Both machine kinds offer the same small API, so a test suite written against the
platform interfaces runs unchanged on each:

* ``machine.domain(domid)`` — a :class:`~xenpv.platforms.base.Platform` acting as
  ``domid`` (the domain is created on first use).  On a :class:`DaemonMachine`, dom0 lives
  in the calling process and every other domain in its own child process
  (:class:`~xenpv.platforms.loopback.remote.RemotePlatform`).
* ``machine.kill(platform)`` — the domain's process dies (in process: its handles close).
* ``machine.hold_mapped(domid, ref)`` / ``release_hold`` — fault injection.
* ``machine.outstanding()`` / ``assert_released()`` — accounting after a test.
* ``machine.release()`` — close every platform handed out (children are kept and
  reopened for the next test, which keeps process start-up off the test budget).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenpv.platforms.base import PlatformGone
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.core import FAULT_HOLD_MAPPED, FAULT_RELEASE_HOLD, Hypervisor
from xenpv.platforms.loopback.env import domain_env
from xenpv.platforms.loopback.inprocess import InProcessPlatform
from xenpv.platforms.loopback.remote import DEFAULT_FACTORY, RemotePlatform

__all__ = ["DaemonMachine", "InProcessMachine", "start_daemon", "stop_daemon"]


class InProcessMachine:
    """Every domain in this process, on one :class:`Hypervisor`."""

    mode = "inprocess"

    def __init__(self, *, max_grants: int = 128, max_ports: int = 32) -> None:
        self.hv = Hypervisor(max_grants=max_grants, max_ports=max_ports)
        self._platforms: list[InProcessPlatform] = []

    def domain(self, domid: int) -> InProcessPlatform:
        """A new platform acting as ``domid`` (created if needed)."""
        if domid not in self.hv.domains:
            self.hv.create_domain(domid)
        p = InProcessPlatform(self.hv, domid)
        self._platforms.append(p)
        return p

    def kill(self, platform: Any) -> None:
        """The domain's process "dies": its handles close."""
        platform.close()

    def hold_mapped(self, domid: int, ref: int) -> None:
        """Pin grant ``(domid, ref)`` as if a peer kept it mapped."""
        self.hv.hold_mapped(domid, ref)

    def release_hold(self, domid: int, ref: int) -> None:
        """Undo :meth:`hold_mapped`."""
        self.hv.release_hold(domid, ref)

    def outstanding(self) -> dict[str, int]:
        """Grants, mappings, ports and handles still held."""
        return self.hv.outstanding()

    def assert_released(self, timeout: float = 0.0) -> None:
        """Raise ``AssertionError`` if anything is still held."""
        self.hv.assert_released()

    def release(self) -> None:
        """Close every platform handed out."""
        for p in self._platforms:
            p.close()
        self._platforms.clear()

    def close(self) -> None:
        """Release everything and the hypervisor."""
        self.release()
        self.hv.close()


def _die_with_parent() -> None:
    # prctl(PR_SET_PDEATHSIG, SIGTERM): a test runner killed outright leaves no daemon behind
    # (the signal follows the death of the *thread* that started it: start from a long-lived one)
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def start_daemon(
    rundir: str | os.PathLike[str],
    *,
    domains: tuple[int, ...] = (),
    max_grants: int = 4096,
    max_ports: int = 1024,
    timeout: float = 20.0,
    loop: str = "auto",
    stderr: Any = None,
    xenstored: str = "ours",
) -> subprocess.Popen[bytes]:
    """Start ``xenpv loopback up`` and wait until it listens (raise if it does not).

    ``loop`` is the daemon's event loop (``--loop``: auto, uvloop or asyncio); ``stderr``
    where its log goes (as for :class:`subprocess.Popen`; default: inherited);
    ``xenstored`` dom0's xenstored (``--xenstored``)."""
    cmd = [sys.executable, "-m", "xenpv", "loopback", "up", "--rundir", str(rundir)]
    cmd += ["--max-grants", str(max_grants), "--max-ports", str(max_ports), "--loop", loop]
    cmd += ["--xenstored", xenstored]
    for d in domains:
        cmd += ["--domain", str(d)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_die_with_parent
    )
    pidfile = Path(rundir) / "daemon.pid"
    deadline = time.monotonic() + timeout
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_daemon(proc)
            raise PlatformGone(f"xenpv loopback up did not come up in {rundir}")
        time.sleep(0.02)
    return proc


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM the daemon, wait, SIGKILL if it does not stop; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)


class DaemonMachine:
    """``xenpv loopback up`` in a child process; dom0 here, other domains in children."""

    mode = "crossprocess"

    def __init__(
        self,
        *,
        max_grants: int = 128,
        max_ports: int = 32,
        factory: str = DEFAULT_FACTORY,
        local_factory: Callable[[str, int], Any] | None = None,
        env_for: Callable[[str, int], dict[str, str]] | None = None,
        rundir: str | None = None,
        loop: str = "auto",
    ) -> None:
        from xenpv.platforms.loopback.client import ClientPlatform, ControlConnection

        self._tmp = None if rundir else tempfile.TemporaryDirectory(prefix="xenpv-lb-")
        self.rundir = rundir or self._tmp.name  # type: ignore[union-attr]
        self.factory = factory
        self.local_factory = local_factory or ClientPlatform.for_domain
        self.env_for = env_for or domain_env
        self.proc = start_daemon(
            self.rundir, max_grants=max_grants, max_ports=max_ports, loop=loop
        )
        self.ctl = ControlConnection(Path(self.rundir) / "dom0" / "control", timeout=10.0)
        self._pool: dict[int, list[RemotePlatform]] = {}
        self._out: list[Any] = []

    def _domains(self) -> list[int]:
        out, _ = self.ctl.call(proto.Op.DOMAIN_LIST)
        (count,) = proto.U32.unpack_from(out)
        return [proto.U32x2.unpack_from(out, 4 + 8 * i)[0] for i in range(count)]

    def create_domain(self, domid: int, name: str = "") -> None:
        """Create ``domid`` through the daemon (as the toolstack would)."""
        self.ctl.call(proto.Op.DOMAIN_CREATE, proto.U32.pack(domid) + name.encode())

    def destroy_domain(self, domid: int) -> None:
        """Destroy ``domid`` through the daemon."""
        self.ctl.call(proto.Op.DOMAIN_DESTROY, proto.U32.pack(domid))

    def domain(self, domid: int) -> Any:
        """A platform acting as ``domid``: here for dom0, else in a child process."""
        if domid not in self._domains():
            self.create_domain(domid)
        if domid == 0:
            p = self.local_factory(self.rundir, 0)
        elif self._pool.get(domid):
            p = self._pool[domid].pop()
        else:
            p = RemotePlatform.spawn(
                self.rundir, domid, factory=self.factory, env=self.env_for(self.rundir, domid)
            )
        self._out.append(p)
        return p

    def kill(self, platform: Any) -> None:
        """Kill the domain's process (dom0 here: close its handles)."""
        if isinstance(platform, RemotePlatform):
            platform.kill()
        else:
            platform.close()

    def _fault(self, kind: int, domid: int, ref: int) -> None:
        self.ctl.call(proto.Op.FAULT, proto.U32x4.pack(kind, domid, ref, 0))

    def hold_mapped(self, domid: int, ref: int) -> None:
        """Pin grant ``(domid, ref)`` as if a peer kept it mapped."""
        self._fault(FAULT_HOLD_MAPPED, domid, ref)

    def release_hold(self, domid: int, ref: int) -> None:
        """Undo :meth:`hold_mapped`."""
        self._fault(FAULT_RELEASE_HOLD, domid, ref)

    def outstanding(self) -> dict[str, int]:
        """Grants, mappings, ports and xenstore watches held in all domains, and control
        handles beyond ours."""
        total = {"grants": 0, "shares": 0, "mappings": 0, "ports": 0, "handles": 0, "watches": 0}
        for domid in self._domains():
            out, _ = self.ctl.call(proto.Op.STATS, proto.U32.pack(domid))
            grants, _rev, mappings, ports, shares, handles, watches = proto.STATS_REPLY.unpack(out)
            total["watches"] += watches
            total["shares"] += shares
            total["grants"] += grants
            total["mappings"] += mappings
            total["ports"] += ports
            total["handles"] += handles - (1 if domid == 0 else 0)
        return total

    def assert_released(self, timeout: float = 10.0, *, handles: bool = True) -> None:
        """Wait (bounded) until nothing is held; else raise ``AssertionError``.

        Connection closes reach the daemon asynchronously, hence the short wait."""
        deadline = time.monotonic() + timeout
        while True:
            left = {
                k: v for k, v in self.outstanding().items() if v and (handles or k != "handles")
            }
            if not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"loopback daemon still holds {left}")
            time.sleep(0.02)

    def release(self) -> None:
        """Close every platform handed out; keep live children for reuse."""
        for p in self._out:
            if isinstance(p, RemotePlatform):
                if p.proc.poll() is None:
                    try:
                        p.reopen()
                    except Exception:
                        p.kill()
                        continue
                    self._pool.setdefault(p.domid, []).append(p)
            else:
                p.close()
        self._out.clear()

    def close(self) -> None:
        """Stop children and the daemon; remove the run directory."""
        for p in self._out:
            with contextlib.suppress(Exception):
                p.close()
        for pool in self._pool.values():
            for p in pool:
                with contextlib.suppress(Exception):
                    p.close()
        self._out.clear()
        self._pool.clear()
        self.ctl.close()
        stop_daemon(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()

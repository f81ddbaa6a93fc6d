"""Running unmodified Xen programs as emulated domains (helper of the shim/vchan tests).

:class:`LoopbackRun` starts ``xenpv loopback up`` in a fresh run directory, creates
domains with ``xenpv loopback domain create`` and runs programs under the environment
``xenpv loopback env`` prints (the replacement libraries first on ``LD_LIBRARY_PATH``,
then Debian's).  Every process it starts is killed at :meth:`LoopbackRun.close`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from xenpv import peers
from xenpv.platforms.loopback.env import shim_dir
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll ``check`` until it returns something truthy; ``AssertionError`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def wait_xenstore_value(client: Any, path: str, timeout: float = 20.0) -> bytes:
    """The value of ``path`` (read with the asyncio xenstore ``client``) once it exists
    and is not empty; ``AssertionError`` after ``timeout`` seconds."""

    async def poll() -> bytes:
        while True:
            try:
                value: bytes = await client.read(path)
            except Exception:  # not there yet
                value = b""
            if value:
                return value
            await asyncio.sleep(0.05)

    try:
        return await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"{path} never got a value") from None


def run_showing_log(main: Callable[[], Coroutine[Any, Any, None]], log: Path,
                    who: str) -> None:
    """``asyncio.run(main())``; a failure carries the tail of ``who``'s ``log``."""
    try:
        asyncio.run(main())
    except Exception as exc:
        text = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        raise AssertionError(f"{exc!r}; {who} said: {text}") from exc


def xenpv_cli(*args: str, timeout: float = 60.0) -> str:
    """Run ``python -m xenpv ARGS`` and return its standard output (raise on failure)."""
    return subprocess.run(
        [sys.executable, "-m", "xenpv", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    ).stdout


class LoopbackRun:
    """A loopback daemon with some domains, and the peer processes started on it."""

    def __init__(self, domains: dict[int, str], *, xenstored: str = "ours") -> None:
        """``xenstored``: dom0's xenstored (``loopback up --xenstored``)."""
        # Short path: Unix socket paths are limited to 107 bytes.
        self.rundir = Path(tempfile.mkdtemp(prefix="xenpv-shim-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._env: dict[int, dict[str, str]] = {}
        self.daemon = start_daemon(self.rundir, xenstored=xenstored)
        try:
            for domid, name in domains.items():
                xenpv_cli(
                    "loopback", "domain", "create", "--rundir", str(self.rundir),
                    "--domid", str(domid), "--name", name,
                )
        except BaseException:
            self.close()
            raise

    def env(self, domid: int, **extra: str) -> dict[str, str]:
        """The environment of a program acting as ``domid``: what ``xenpv loopback env``
        prints, with Debian's Xen libraries after the replacement ones."""
        if domid not in self._env:
            out = xenpv_cli(
                "loopback", "env", "--rundir", str(self.rundir), "--domid", str(domid)
            )
            base = dict(os.environ)
            for line in out.splitlines():
                words = shlex.split(line)
                if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                    key, _, value = words[1].partition("=")
                    base[key] = value
            self._env[domid] = peers.run_env([str(shim_dir())], base=base)
        return {**self._env[domid], **extra}

    def spawn(self, domid: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` acting as ``domid`` (killed at :meth:`close`)."""
        proc = subprocess.Popen(list(cmd), env=self.env(domid), **kwargs)
        self.procs.append(proc)
        return proc

    def domain_op(self, op: str, domid: int, *, name: str = "", reason: int = 0) -> None:
        """``create``, ``destroy`` or ``shutdown`` (with ``reason``) domain ``domid``,
        as dom0 over the control socket."""
        from xenpv.platforms.loopback import proto
        from xenpv.platforms.loopback.client import ControlConnection

        requests = {
            "create": (proto.Op.DOMAIN_CREATE, proto.U32.pack(domid) + name.encode()),
            "destroy": (proto.Op.DOMAIN_DESTROY, proto.U32.pack(domid)),
            "shutdown": (proto.Op.DOMAIN_SHUTDOWN, proto.U32x2.pack(domid, reason)),
        }
        ctl = ControlConnection(self.rundir / "dom0" / "control", timeout=20.0)
        try:
            ctl.call(*requests[op])
        finally:
            ctl.close()

    def xenstore_read(self, path: str) -> str | None:
        """Read ``path`` as dom0 with Debian's ``xenstore-read``; ``None`` if absent."""
        res = subprocess.run(
            [str(peers.find("xenstore-read")), path],
            env=self.env(0),
            capture_output=True,
            text=True,
            timeout=20,
        )
        return res.stdout.strip() if res.returncode == 0 else None

    def xenstore_write(self, path: str, value: str) -> None:
        """Write ``path`` as dom0 with Debian's ``xenstore-write``."""
        subprocess.run(
            [str(peers.find("xenstore-write")), path, value],
            env=self.env(0),
            check=True,
            capture_output=True,
            timeout=20,
        )

    def close(self) -> None:
        """Kill every peer process, stop the daemon, remove the run directory."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        self.procs.clear()
        stop_daemon(self.daemon)
        shutil.rmtree(self.rundir, ignore_errors=True)

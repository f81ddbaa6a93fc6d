"""Xen's own xenstoreds (C and OCaml) as dom0's xenstore server on the loopback emulator.

Theory of operation
-------------------
The embedded server (``xenpv.xenstore.server``) is the emulator's default xenstored.
:class:`XenCXenstored` runs Xen's C ``xenstored`` (Debian's ``xen-utils-4.17``, fetched by
``xenpv peers fetch``) in its place, unmodified, as a process of dom0:

* it reaches grants and event channels through the replacement libraries (``shim/``):
  the environment is ``xenpv loopback env --domid 0`` with Debian's libraries behind
  them;
* at startup it introduces dom0 to itself from the ring page and port a dom0 kernel
  publishes in ``/proc/xen/xsd_kva`` and ``/proc/xen/xsd_port``.  Here the launcher
  plays that kernel: it offers an unbound dom0 port to dom0 (held open on its own control
  connection for as long as the server runs), writes a zeroed one-page file as the ring,
  and the ``open`` interposer ``libxenpv_xsd.so`` (``LD_PRELOAD``, see shim/README.md)
  sends the server's opens of the two paths to those files;
* it binds ``VIRQ_DOM_EXC`` and, on every domain shutdown or destruction the emulator
  signals there, asks ``xc_domain_getinfo`` which introduced domains went away, releasing
  them and firing ``@releaseDomain``;
* it listens on ``$XENSTORED_PATH`` (``WORKDIR/socket``); every socket client is dom0;
* it dies with its launcher: the interposer watches the read end of a pipe whose write end
  only the launcher holds (``XENPV_XSD_LIFELINE``), and kills the server at end of file,
  so a launcher killed by SIGKILL (a ``loopback up`` daemon, a test) leaves no server.

:class:`XenOxenstored` runs Xen's OCaml ``oxenstored`` the same way, with the few things
it needs besides (its class docstring): a configuration file, a mount namespace for its
compiled-in socket path, and two more answers from the interposer.

Guests reach it over their own xenstore ring once introduced (``XS_INTRODUCE`` with the
guest's grant ref 1 and an unbound port offered to dom0).  Everything it was given is
released when :meth:`XenCXenstored.stop` ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from xenpv import peers
from xenpv.errors import LocalError
from xenpv.platforms.base import PAGE_SIZE
from xenpv.platforms.loopback.env import ENV_XENSTORED_PATH, domain_env, shim_dir

if TYPE_CHECKING:
    from xenpv.platforms.loopback.client import ClientEvents
    from xenpv.xenstore.client import XenstoreClient

__all__ = ["XSD_INTERPOSER", "XenCDom0Xenstored", "XenCXenstored", "XenOxenstored",
           "xen_c_binary"]

#: The LD_PRELOAD library that redirects ``/proc/xen/xsd_{kva,port}`` (built from shim/).
XSD_INTERPOSER = "libxenpv_xsd.so"
#: The environment variable naming the server's end of its lifeline pipe.
ENV_LIFELINE = "XENPV_XSD_LIFELINE"
#: Seconds C xenstored may take to release a destroyed domain (VIRQ_DOM_EXC).
RELEASE_WAIT = 10.0
#: Where C xenstored sits in the peers tree.
XEN_C_XENSTORED = "usr/lib/xen-4.17/bin/xenstored"
#: Where oxenstored sits in the peers tree.
OXENSTORED = "usr/lib/xen-4.17/bin/oxenstored"


def xen_c_binary() -> Path:
    """Xen's C xenstored in the peers tree (``PeerMissing`` when it was not fetched)."""
    return peers.find(XEN_C_XENSTORED)


def _connectable(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


class XenCXenstored:
    """Xen's C xenstored serving dom0 (and introduced guests) of a loopback emulator.

    ``rundir`` is a running emulator's run directory; the server's files (ring page, port
    file, log, and the socket unless ``socket_path`` names another) go in ``workdir``
    (default ``RUNDIR/xen-c``).  ``args`` are
    passed to xenstored after ``--no-fork`` (quotas such as ``--entry-nb``).  Use as a
    context manager or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        rundir: str | os.PathLike[str],
        *,
        workdir: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        args: tuple[str, ...] = (),
        verbose: bool = False,
    ) -> None:
        self.rundir = Path(rundir)
        self.workdir = Path(workdir) if workdir is not None else self.rundir / "xen-c"
        self.socket_path = Path(socket_path) if socket_path else self.workdir / "socket"
        self.log_path = self.workdir / "xenstored.log"
        self.args = tuple(args)
        self.verbose = verbose
        self.proc: subprocess.Popen[bytes] | None = None
        self.dom0_port = 0
        self._events: ClientEvents | None = None  # holds dom0's xenstore port
        self._lifeline = -1  # the write end of the server's lifeline pipe

    # -- lifecycle
    def env(self) -> dict[str, str]:
        """The server's environment: dom0 of the emulator, the interposer preloaded."""
        env = peers.run_env([str(shim_dir())], base={**os.environ, **domain_env(self.rundir, 0)})
        env[ENV_XENSTORED_PATH] = str(self.socket_path)
        env["XENSTORED_RUNDIR"] = str(self.workdir)
        env["LD_PRELOAD"] = str(shim_dir() / XSD_INTERPOSER)
        env["XENPV_XSD_KVA"] = str(self.workdir / "xsd_kva")
        env["XENPV_XSD_PORT"] = str(self.workdir / "xsd_port")
        return env

    def client_env(self) -> dict[str, str]:
        """The environment of a dom0 program talking to this server over its socket."""
        env = self.env()
        del env["LD_PRELOAD"]
        env.pop(ENV_LIFELINE, None)
        return env

    def start(self, timeout: float = 20.0) -> XenCXenstored:
        """Prepare dom0's ring page and port, start the server, wait until it accepts.

        Raises ``PeerMissing`` without the peers tree and :class:`LocalError` when the
        server exits or does not listen within ``timeout`` seconds (with its log)."""
        from xenpv.platforms.loopback.client import ClientEvents
        from xenpv.platforms.loopback.daemon import control_path

        binary = self.binary()
        interposer = shim_dir() / XSD_INTERPOSER
        if not interposer.exists():
            raise LocalError(f"{interposer} is missing: build the shim (setup.py build_ext)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        events = ClientEvents(control_path(self.rundir, 0))
        try:
            # what a dom0 kernel does for a local xenstored: a port offered to itself
            self.dom0_port = events.alloc_unbound(0)
            (self.workdir / "xsd_kva").write_bytes(bytes(PAGE_SIZE))
            cmd = self._prepare(binary)
            # the write end is not inheritable: no other child keeps the server alive
            lifeline, self._lifeline = os.pipe()
            try:
                with open(self.log_path, "wb") as log:
                    self.proc = subprocess.Popen(
                        cmd, env={**self.env(), ENV_LIFELINE: str(lifeline)},
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        cwd=self.workdir, pass_fds=(lifeline,),
                    )
            finally:
                os.close(lifeline)
        except BaseException:
            events.close()
            self._close_lifeline()
            raise
        self._events = events
        deadline = time.monotonic() + timeout
        while not _connectable(self.socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with status {self.proc.returncode}"
                       if self.proc.poll() is not None else f"not listening after {timeout} s")
                tail = self.log_tail()
                self.stop()
                raise LocalError(f"C xenstored {why}; its log: {tail}")
            time.sleep(0.02)
        return self

    def binary(self) -> Path:
        """The server's executable (``PeerMissing`` without the peers tree)."""
        return xen_c_binary()

    def _prepare(self, binary: Path) -> list[str]:
        """Write the server's files (the ring page exists); its command line."""
        (self.workdir / "xsd_port").write_text(f"{self.dom0_port}\n")
        return [str(binary), "--no-fork", *(["--verbose"] if self.verbose else []), *self.args]

    def log_tail(self, nbytes: int = 2000) -> str:
        """The end of the server's output (for failure messages)."""
        try:
            return self.log_path.read_bytes()[-nbytes:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """End the server (SIGTERM, then SIGKILL) and release dom0's port; its exit
        status, or ``None`` if it was not running (idempotent)."""
        status = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
            status = self.proc.returncode
            self.proc = None
        self._close_lifeline()
        if self._events is not None:
            self._events.close()
            self._events = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        return status

    def _close_lifeline(self) -> None:
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1

    def remove_workdir(self) -> None:
        """Delete the server's files (after :meth:`stop`)."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> XenCXenstored:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class XenOxenstored(XenCXenstored):
    """Xen's OCaml ``oxenstored`` (4.17) in the place of :class:`XenCXenstored`.

    What differs from C xenstored, each answered here:

    * dom0's ring and port come from its configuration file (``xenstored-kva``,
      ``xenstored-port``: the port file without a trailing newline), written into the
      work directory and passed with ``--config-file``; so are its pid and log files;
    * its socket is compiled in (``/var/run/xenstored/socket``): it runs in a private
      mount namespace (``unshare -m``, root) where the work directory's ``run/`` is bound
      over ``/var/run/xenstored``, and :attr:`socket_path` is a symbolic link to the
      socket there (``RUNDIR/xen-oxenstored/socket`` by default); the mount point
      ``/var/run/xenstored`` is made if missing (an empty directory of the host);
    * it raises ``RLIMIT_NOFILE`` to ``/proc/sys/fs/nr_open``, which needs
      ``CAP_SYS_RESOURCE``: the interposer sends that ``open`` to a file holding the
      current hard limit;
    * it maps a guest's ring by the frame named in ``XS_INTRODUCE``
      (``xc_map_foreign_range``, given by the interposer over the replacement
      ``libxenforeignmemory``);
    * its ``libxenguest`` imports ``xtl_*`` and ``xencall1`` without versions, which
      Debian's ``libxenctrl`` brings in and the replacement does not: Debian's
      ``libxentoollog`` and ``libxencall`` are preloaded.
    """

    def __init__(self, rundir: str | os.PathLike[str], *,
                 workdir: str | os.PathLike[str] | None = None,
                 socket_path: str | os.PathLike[str] | None = None,
                 args: tuple[str, ...] = (), verbose: bool = False) -> None:
        """As :class:`XenCXenstored` (work directory ``RUNDIR/xen-oxenstored``)."""
        rundir = Path(rundir)
        super().__init__(rundir, workdir=workdir or rundir / "xen-oxenstored",
                         socket_path=socket_path, args=args, verbose=verbose)
        self.log_path = self.workdir / "oxenstored.out"

    def binary(self) -> Path:
        """oxenstored in the peers tree."""
        return peers.find(OXENSTORED)

    def env(self) -> dict[str, str]:
        """:meth:`XenCXenstored.env`, with Debian's logging and hypercall libraries
        preloaded and the ``nr_open`` file named."""
        env = super().env()
        env["LD_PRELOAD"] = f"libxentoollog.so.1 libxencall.so.1 {env['LD_PRELOAD']}"
        env["XENPV_XSD_NR_OPEN"] = str(self.workdir / "nr_open")
        return env

    def _prepare(self, binary: Path) -> list[str]:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise LocalError("oxenstored needs unshare (util-linux): its socket path is "
                             "compiled in and is given its own mount namespace")
        work = self.workdir
        run = work / "run"
        run.mkdir(exist_ok=True)
        (work / "xsd_port").write_text(str(self.dom0_port))  # no newline: OCaml's parse
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        (work / "nr_open").write_text(f"{hard}\n")
        (work / "oxenstored.conf").write_text(
            f"xenstored-kva = {work}/xsd_kva\nxenstored-port = {work}/xsd_port\n"
            f"pid-file = {run}/xenstored.pid\nxenstored-log-file = {work}/xenstored.log\n"
            f"access-log-file = {work}/access.log\n")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.symlink_to(run / "socket")
        script = ('mkdir -p /var/run/xenstored && mount --bind "$0" /var/run/xenstored '
                  '&& exec "$@"')
        return [unshare, "-m", "--propagation", "private", "sh", "-c", script, str(run),
                str(binary), "--no-fork", "--config-file", str(work / "oxenstored.conf"),
                *self.args]


class XenCDom0Xenstored:
    """C xenstored (or oxenstored: ``server_class``) in the role of dom0's xenstored of a
    running emulator daemon (``xenpv loopback up --xenstored xen-c|oxenstored``), driven
    from the daemon's event loop.

    The daemon calls :meth:`start` once dom0 exists, :meth:`introduce` after building a
    domain's xenstore ring, :meth:`release` after destroying a domain, :meth:`close` at
    shutdown.  The server listens where dom0's programs look (``RUNDIR/dom0/xenstore``,
    what ``xenpv loopback env --domid 0`` names).  The blocking parts (preparing dom0's
    ring, starting and stopping the process) run in a worker thread, so the daemon keeps
    answering the control requests they make."""

    def __init__(self, *, args: tuple[str, ...] = (), verbose: bool = False,
                 server_class: type[XenCXenstored] = XenCXenstored) -> None:
        """``server_class``: :class:`XenCXenstored` or :class:`XenOxenstored`."""
        self.args = args
        self.verbose = verbose
        self.server_class = server_class
        self.server: XenCXenstored | None = None
        self._xs: XenstoreClient | None = None

    async def start(self, rundir: Path) -> None:
        """Start the server on the daemon running in ``rundir`` and connect to it."""
        from xenpv.platforms.loopback.daemon import xenstore_path
        from xenpv.xenstore.client import connect

        server = self.server_class(rundir, socket_path=xenstore_path(rundir, 0),
                                   args=self.args, verbose=self.verbose)
        await asyncio.to_thread(server.start)
        self.server = server
        try:
            self._xs = await connect(str(server.socket_path))
        except BaseException:
            await asyncio.to_thread(server.stop)
            self.server = None
            raise

    def socket_path(self, domid: int) -> str | None:
        """Dom0's socket; other domains reach the server only over their rings."""
        if domid == 0 and self.server is not None:
            return str(self.server.socket_path)
        return None

    def _client(self) -> XenstoreClient:
        if self._xs is None:
            raise LocalError("C xenstored is not running")
        return self._xs

    async def introduce(self, domid: int, gfn: int, port: int) -> None:
        """``INTRODUCE domid gfn port``: the server maps the domain's grant ref 1 and
        binds ``port`` (an unbound port the domain offers to dom0)."""
        await self._client().introduce(domid, gfn, port)

    async def release(self, domid: int) -> None:
        """Wait until the server has released a destroyed domain.  As on Xen, where the
        toolstack sends no ``RELEASE`` on destroy, C xenstored notices the death itself:
        VIRQ_DOM_EXC fires, ``xc_domain_getinfo`` no longer lists the domain, and the
        server drops it and fires ``@releaseDomain``.  :class:`LocalError` if it has not
        within :data:`RELEASE_WAIT` seconds."""
        xs = self._client()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELEASE_WAIT
        while await xs.is_domain_introduced(domid):
            if loop.time() > deadline:
                raise LocalError(f"C xenstored did not release dom{domid} within "
                                 f"{RELEASE_WAIT} s of its destruction")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Disconnect and stop the server (idempotent)."""
        if self._xs is not None:
            with contextlib.suppress(Exception):
                await self._xs.close()
            self._xs = None
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server.remove_workdir()  # (its files live in the run directory)
            self.server = None

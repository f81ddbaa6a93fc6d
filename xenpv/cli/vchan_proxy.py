"""``xenpv vchan-proxy``: a drop-in replacement for Xen's ``vchan-socket-proxy``.

::

    xenpv vchan-proxy [-m client|server] [-s STATE_PATH] [-v] DOMID NODEPATH {SOCKET|FD|-}

Theory of operation
-------------------
It behaves as Xen's program does (real-peers.md), on xenpv's own vchan endpoints:

* **server mode** publishes a vchan for DOMID at NODEPATH with both rings inside the
  control page (``server_init(…, 0, 0)``: orders 10 and 11).  Each time a vchan client is
  connected it opens the local side: it connects to the Unix socket SOCKET, or uses file
  descriptor FD, or stdin/stdout for ``-``, and pumps bytes both ways.  When the vchan client
  leaves, buffered output is flushed, the local side is closed and unread vchan data is
  discarded; when the local side reaches end of file, buffered input is written to the
  vchan and the local side is closed.  With a socket path it then waits for the next
  connection; with FD or ``-`` it exits.
* **client mode** listens on the Unix socket SOCKET (or the listening descriptor FD), or
  uses stdin/stdout for ``-``.  For every accepted connection it watches NODEPATH and
  ``@releaseDomain`` and tries to connect to the vchan each time one fires, giving up when
  domain DOMID is gone; then it pumps bytes as above, and closes the vchan when the
  connection ends.  With ``-`` it exits after the first vchan connection ends.

``-s STATE_PATH`` writes ``running`` to that xenstore path once the proxy is set up.  The
process acts as the domain of its environment (``xenpv loopback env``, or real Xen).

Client mode checks that DOMID exists before it binds SOCKET (a home it may not read counts
as existing).  Failures are one line in the words of Xen's proxy where it has them
(``bind: Address already in use``, ``xs_write: Permission denied``,
``libxenvchan_server_init: Permission denied``) and exit 1, as do usage errors.  The socket
file the proxy made is removed when it exits, also on SIGTERM, SIGINT or SIGHUP (status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import traceback
from typing import Any

from xenpv.cli import args as args_
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.choose import open_platform
from xenpv.protocols.vchan import VCHAN_NOTIFY_READ, VCHAN_NOTIFY_WRITE
from xenpv.vchan.endpoint import VchanClient, VchanEndpoint, VchanServer
from xenpv.xenstore.wire import XenstoreError

BUFSIZE = 1 << 16
USAGE_STATUS = 1  # as vchan-socket-proxy
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_verbose = False


def log(message: str) -> None:
    """A diagnostic line on stderr with ``-v``."""
    if _verbose:
        print(f"vchan-proxy: {message}", file=sys.stderr, flush=True)


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of Xen's vchan-socket-proxy."""
    parser.add_argument("-m", "--mode", choices=["client", "server"], default="client",
                        help="vchan connection mode (client by default)")
    parser.add_argument("-s", "--state-path", help='xenstore path where "running" is written at startup')
    parser.add_argument("-v", "--verbose", action="store_true", help="verbose logging")
    parser.add_argument("domid", type=args_.domid, help="the peer domain")
    parser.add_argument("nodepath", help="xenstore path of the vchan")
    parser.add_argument("socket", help="socket path, file descriptor number, or - for stdin/stdout")


def _is_fd(text: str) -> bool:
    try:
        int(text, 0)
    except ValueError:
        return False
    return True


class _Pump:
    """Moves bytes between a vchan endpoint and a local input/output fd pair."""

    def __init__(self, ep: VchanEndpoint, in_fd: int, out_fd: int) -> None:
        self.ep = ep
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.tmp = bytearray(BUFSIZE)
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self._readers: set[int] = set()
        self._writers: set[int] = set()
        self._always_writable = False

    def _want(self, fd: int, reading: bool, on: bool) -> None:
        regs = self._readers if reading else self._writers
        if on and fd not in regs:
            try:
                (self.loop.add_reader if reading else self.loop.add_writer)(fd, self.wake.set)
            except PermissionError:  # regular files never block
                if not reading:
                    self._always_writable = True
                return
            regs.add(fd)
        elif not on and fd in regs:
            (self.loop.remove_reader if reading else self.loop.remove_writer)(fd)
            regs.discard(fd)

    def _unregister(self) -> None:
        for fd in list(self._readers):
            self._want(fd, True, False)
        for fd in list(self._writers):
            self._want(fd, False, False)
        self.ep.hub.unwatch(self.ep.port)

    def _write_out(self) -> None:
        if self.outbuf and self.out_fd >= 0:
            try:
                n = os.write(self.out_fd, self.outbuf)
            except BlockingIOError:
                return
            del self.outbuf[:n]

    async def run(self) -> str:
        """Pump until the vchan peer leaves (``"vchan-closed"``) or the input ends
        (``"input-eof"``)."""
        ep = self.ep
        ep.hub.watch(ep.port, self.wake.set)
        try:
            return await self._run()
        finally:
            self._unregister()

    async def _run(self) -> str:
        ep = self.ep
        input_eof = False
        while True:
            self.wake.clear()
            progress = False
            if not input_eof and len(self.inbuf) < BUFSIZE:
                try:
                    chunk = os.read(self.in_fd, BUFSIZE - len(self.inbuf))
                except BlockingIOError:
                    chunk = None
                except OSError as exc:
                    raise LocalError(f"reading the local side: {exc}") from exc
                if chunk is not None:
                    progress = True
                    if chunk:
                        self.inbuf += chunk
                    else:
                        input_eof = True
            if self.inbuf:
                try:
                    n = ep.send_nowait(self.inbuf)
                except BrokenPipeError:
                    n = 0
                if n:
                    del self.inbuf[:n]
                    progress = True
            if len(self.outbuf) < BUFSIZE:
                n = ep.recv_nowait(self.tmp, BUFSIZE - len(self.outbuf))
                if n:
                    self.outbuf += self.tmp[:n]
                    progress = True
            before = len(self.outbuf)
            self._write_out()
            progress = progress or len(self.outbuf) != before
            if input_eof and not self.inbuf:
                log("local side reached end of file")
                return "input-eof"
            if not ep.is_open and not ep.data_ready():
                log("vchan peer disconnected")
                await self._flush_out()
                return "vchan-closed"
            if progress:
                await asyncio.sleep(0)
                continue
            # about to sleep: ask to hear of writes (and reads, while we hold input)
            ep.rings.request_notify(VCHAN_NOTIFY_WRITE | (VCHAN_NOTIFY_READ if self.inbuf else 0))
            if ep.rings.data_ready() or (self.inbuf and ep.rings.buffer_space()):
                continue
            self._want(self.in_fd, True, not input_eof and len(self.inbuf) < BUFSIZE)
            self._want(self.out_fd, False, bool(self.outbuf) and not self._always_writable)
            if input_eof and self.inbuf:
                await self._wait_vchan(0.1)
            else:
                await self.wake.wait()

    async def _wait_vchan(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)

    async def _flush_out(self) -> None:
        while self.outbuf and self.out_fd >= 0:
            before = len(self.outbuf)
            try:
                self._write_out()
            except OSError:
                return
            if len(self.outbuf) == before:
                self._want(self.out_fd, False, not self._always_writable)
                self.wake.clear()
                await self._wait_vchan(1.0)


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def _connect_local(target: str) -> tuple[int, int]:
    """The local side of a server-mode connection: stdin/stdout, a descriptor, a socket."""
    if target == "-":
        _set_nonblocking(0)
        _set_nonblocking(1)
        return 0, 1
    if _is_fd(target):
        fd = int(target, 0)
        _set_nonblocking(fd)
        return fd, fd
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    fd = sock.detach()
    return fd, fd


def _close_local(in_fd: int, out_fd: int) -> None:
    for fd in {in_fd, out_fd}:
        if fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)


class ProxyError(Exception):
    """A failure reported as one line, in the words of Xen's proxy where it has them."""


def _strerror(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(exc) or type(exc).__name__


async def _write_state(platform: Any, path: str | None) -> None:
    if path:
        xs = await platform.xenstore()
        try:
            await xs.write(path, "running")
        except (XenstoreError, LocalError) as exc:
            raise ProxyError(f"xs_write: {_strerror(exc)}") from None
        finally:
            await xs.close()


async def check_domain(platform: Any, domid: int) -> None:
    """:class:`ProxyError` unless domain ``domid`` exists (its home is in xenstore; one
    this domain may not read counts as existing)."""
    xs = await platform.xenstore()
    try:
        if not await xs.exists(f"/local/domain/{domid}"):
            raise ProxyError(f"domain {domid} does not exist")
    except XenstoreError as exc:
        if exc.errno_name != "EACCES":
            raise ProxyError(f"xs_read: {_strerror(exc)}") from None
    finally:
        await xs.close()


def listen_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path``; :class:`ProxyError` (``bind: …``) on an
    occupied or too long path or a missing directory."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(5)
    except OSError as exc:
        sock.close()
        raise ProxyError(f"bind: {_strerror(exc)} ({path})") from None
    return sock


async def run_server(platform: Any, args: argparse.Namespace) -> int:
    """Server mode (see the module docstring)."""
    try:
        server = await VchanServer.create(platform, args.domid, args.nodepath, read_min=0,
                                          write_min=0)
    except (XenstoreError, PlatformError) as exc:
        # drop the failed setup's frames now (they hold views of its pages)
        traceback.clear_frames(exc.__traceback__)
        raise ProxyError(f"libxenvchan_server_init: {_strerror(exc)}") from None
    try:
        await _write_state(platform, args.state_path)
        while True:
            await server.wait_client()
            log("vchan client connected")
            try:
                in_fd, out_fd = _connect_local(args.socket)
            except OSError as exc:
                print(f"vchan-proxy: connect_socket failed: {exc}", file=sys.stderr)
                return 1
            try:
                how = await _Pump(server, in_fd, out_fd).run()
            finally:
                _close_local(in_fd, out_fd)
            if how == "vchan-closed":
                server.rings.discard()
            if not args.socket.startswith("/"):
                return 0
    finally:
        await server.aclose()


async def connect_vchan(platform: Any, domid: int, path: str) -> VchanClient | None:
    """Watch ``path`` and ``@releaseDomain``; try to connect on every event; ``None`` once
    domain ``domid`` is gone."""
    xs = await platform.xenstore()
    try:
        watches = [xs.watch(path, "path")]
        with contextlib.suppress(PlatformError, LocalError, PeerError, OSError):
            watches.append(await xs.watch("@releaseDomain", "release").register())
        await watches[0].register()
        tasks = {asyncio.ensure_future(w.get()): w for w in watches}
        try:
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    w = tasks.pop(t)
                    t.result()
                    tasks[asyncio.ensure_future(w.get())] = w
                try:
                    return await VchanClient.create(platform, domid, path, xs=xs)
                except XenstoreError as exc:  # keys not (all) there yet, or not readable
                    log(f"vchan not ready: {exc.errno_name}")
                except (PlatformError, PeerError) as exc:
                    log(f"vchan not ready: {exc}")
                try:
                    if not await xs.exists(f"/local/domain/{domid}"):
                        return None
                except (PlatformError, PeerError):
                    pass  # like EPERM from the domain query: keep waiting
        finally:
            for t in tasks:
                t.cancel()
            for w in watches:
                with contextlib.suppress(Exception):
                    await w.unregister()
    finally:
        await xs.close()


async def run_client(platform: Any, args: argparse.Namespace) -> int:
    """Client mode (see the module docstring)."""
    listener: socket.socket | None = None
    bound: tuple[str, int] | None = None  # the socket file we made: removed on exit
    await check_domain(platform, args.domid)
    if args.socket != "-":
        if _is_fd(args.socket):
            try:
                listener = socket.socket(fileno=int(args.socket, 0))
            except OSError as exc:
                raise ProxyError(f"listening descriptor {args.socket}: {_strerror(exc)}") from None
        else:
            listener = listen_unix(args.socket)
            bound = (args.socket, os.stat(args.socket).st_ino)
    try:
        await _write_state(platform, args.state_path)
        loop = asyncio.get_running_loop()
        while True:
            if listener is None:
                in_fd, out_fd = 0, 1
            else:
                listener.setblocking(False)
                conn, _ = await loop.sock_accept(listener)
                in_fd = out_fd = conn.detach()
            _set_nonblocking(in_fd)
            _set_nonblocking(out_fd)
            client = await connect_vchan(platform, args.domid, args.nodepath)
            if client is None:
                print("vchan-proxy: vchan client init: domain is gone", file=sys.stderr)
                _close_local(in_fd, out_fd)
                return 1
            try:
                await _Pump(client, in_fd, out_fd).run()
            finally:
                _close_local(in_fd, out_fd)
                await client.aclose()
            if listener is None:
                return 0
    finally:
        if listener is not None:
            listener.close()
        if bound is not None:
            with contextlib.suppress(OSError):
                if os.stat(bound[0]).st_ino == bound[1]:
                    os.unlink(bound[0])


async def _until_signal(main: Any) -> int:
    """Run ``main`` until it ends or SIGTERM/SIGINT/SIGHUP comes (then 0, after its
    cleanup: the socket file it made is removed)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main)
    stopped: list[int] = []

    def stop(sig: int) -> None:
        stopped.append(sig)
        task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return int(await task)
    except asyncio.CancelledError:
        if stopped:
            return 0
        raise
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    """Run the proxy until it is done (or killed)."""
    global _verbose
    _verbose = args.verbose
    try:
        platform = open_platform()  # from the environment: the emulator's or real Xen
    except (PlatformError, LocalError, OSError) as exc:
        print(f"vchan-proxy: {exc}", file=sys.stderr)
        return 1
    try:
        main = run_server if args.mode == "server" else run_client
        return asyncio.run(_until_signal(main(platform, args)))
    except ProxyError as exc:
        print(f"vchan-proxy: {exc}", file=sys.stderr)
        return 1
    except (PlatformError, PeerError, LocalError, XenstoreError) as exc:
        print(f"vchan-proxy: {_strerror(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            print(f"vchan-proxy: {_strerror(exc)}", file=sys.stderr)
        return 1
    finally:
        platform.close()

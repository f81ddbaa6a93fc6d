"""``xenpv console``: attach to a guest console, run a console backend or frontend.

::

    xenpv console attach DOMID [-n N] [--backend-domid B] [--rundir DIR]  # like xenconsole --type pv
    xenpv console backend [--rundir DIR] [--backend-domid B] [--domid N ... | --all] [--no-secondary]
                          [--log-dir DIR] [--log-max BYTES] [--limit BYTES] [--policy P]
    xenpv console frontend [--rundir DIR] --domid N [--backend-domid B] [--devid K]
                           [--send BYTES] [--shell]
    xenpv console publish [--rundir DIR] --domid N --port P [--ring-ref R]

With ``--rundir`` a command acts on the loopback emulator running there (as dom0, or as
the domain named); without it, the platform comes from the environment (``xenpv loopback
env``).  ``backend`` and ``frontend`` print one JSON object per line on stdout
(``{"event": "ready", …}`` first) and run until SIGTERM, SIGINT or SIGHUP, or, when
stdin is a pipe, until its other end closes (how a parent process stops them); they
never read a terminal or ``/dev/null``, so they run in the background of a shell.

``frontend`` (the guest side) sets up console 0 (or, with ``--devid``, the secondary
console ``device/console/K``), then optionally writes ``--send`` bytes of text, and with
``--shell`` answers lines typed on the console: ``echo TEXT`` prints TEXT, ``send N``
prints N bytes of text followed by ``<done N>``, ``quit`` ends.  Console 0 needs the
toolstack to publish its ring and port (``publish``, or
:func:`xenpv.backends.console.publish_primary_console`); ``frontend`` prints them in its
ready line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import select
import signal
import stat
import sys
import termios
import tty
from collections.abc import Awaitable
from typing import Any, TypeVar

from xenpv.cli import args as args_
from xenpv.cli import describe, set_usage_status
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.xenstore.wire import XenstoreError

T = TypeVar("T")
ESCAPE = 0x1D  # Ctrl-], as xenconsole
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def emit(**fields: Any) -> None:
    """Print one JSON line and flush."""
    print(json.dumps(fields), flush=True)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``attach``, ``backend``, ``frontend`` and ``publish`` subcommands."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                help="what to do")

    at = sub.add_parser("attach", help="connect this terminal to a guest's console pty")
    set_usage_status(at, errno.EINVAL)  # xenconsole exits with EINVAL on a usage error
    at.add_argument("domid", type=args_.domid, help="the guest domain")
    at.add_argument("-n", "--num", type=args_.uint(0, 0xFFFF, "console number"), default=0,
                    help="console number (0: primary, N: device/console/N), as xenconsole's")
    at.add_argument("--backend-domid", type=args_.domid, default=0,
                    help="domain serving secondary console N (default 0)")
    at.add_argument("--timeout", type=args_.positive_float, default=10.0,
                    help="seconds to wait for the console's pty (default 10)")
    at.add_argument("--rundir", help="loopback emulator run directory (default: the environment)")

    be = sub.add_parser("backend", help="serve consoles on ptys (dom0 by default)")
    be.add_argument("--rundir", help="loopback emulator run directory (default: the environment)")
    be.add_argument("--backend-domid", "--as", dest="as_domid", type=args_.domid, default=0,
                    help="the domain this backend acts as (default 0)")
    be.add_argument("--domid", type=args_.domid, action="append", default=[],
                    help="serve console 0 of this guest (repeatable)")
    be.add_argument("--all", action="store_true",
                    help="serve console 0 of every domain, as they come and go")
    be.add_argument("--no-secondary", action="store_true",
                    help="do not serve secondary consoles (device/console/N)")
    be.add_argument("--log-dir", help="write NAME.log per console here")
    be.add_argument("--log-max", type=args_.size(1, 1 << 40, "--log-max"), default=1 << 20,
                    help="log size cap in bytes (default 1 MiB)")
    be.add_argument("--limit", type=args_.size(1, 1 << 40, "--limit"), default=1 << 20,
                    help="buffered output cap in bytes (default 1 MiB)")
    be.add_argument("--policy", choices=["discard", "block"], default="discard",
                    help="when the buffer is full: drop the oldest output (discard, the "
                    "default) or stop reading the guest's ring (block)")

    fe = sub.add_parser("frontend", help="the guest side of a console")
    fe.add_argument("--rundir", help="loopback emulator run directory (default: the environment)")
    fe.add_argument("--domid", type=args_.domid, required=True, help="the guest domain")
    fe.add_argument("--backend-domid", type=args_.domid, default=0,
                    help="the backend's domain (default 0)")
    fe.add_argument("--devid", type=args_.uint(1, 0xFFFF, "console number"),
                    help="secondary console device/console/DEVID (default: console 0)")
    fe.add_argument("--send", type=args_.size(0, 1 << 40, "--send"), default=0,
                    help="bytes of text to print at start")
    fe.add_argument("--shell", action="store_true", help="answer echo/send/quit lines")

    pub = sub.add_parser("publish", help="toolstack: publish console 0 of a guest")
    pub.add_argument("--rundir", help="loopback emulator run directory (default: the environment)")
    pub.add_argument("--domid", type=args_.guest_domid, required=True, help="the guest domain")
    pub.add_argument("--port", type=args_.port, required=True,
                     help="the guest's unbound event-channel port")
    pub.add_argument("--ring-ref", type=args_.grant_ref, default=0,
                     help="the ring page's frame number (default 0)")
    pub.add_argument("--backend-domid", type=args_.domid, default=0,
                     help="the domain serving the console (default 0)")


def _platform(rundir: str | None, domid: int) -> Any:
    from xenpv.platforms.choose import open_platform

    return open_platform(rundir=rundir, domid=domid)


async def _xenstore(rundir: str | None, domid: int) -> Any:
    from xenpv.xenstore.client import connect

    if rundir is None:
        return await connect()
    return await connect(os.path.join(rundir, f"dom{domid}", "xenstore"))


def _stdin_is_a_pipe() -> bool:
    """Whether stdin is a pipe or socket (a parent process holding the other end)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _stdin_closed(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A future that completes on SIGTERM, SIGINT or SIGHUP, or when stdin is a pipe
    and reaches EOF (the parent let go of us).

    A terminal, ``/dev/null`` or a file on stdin is never read: a service started with
    ``&`` must neither stop at once (``/dev/null`` cannot be polled) nor be stopped for
    reading its terminal from the background."""
    fut: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        fd = sys.stdin.fileno()
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            if not fut.done():
                fut.set_result(None)

    def stop() -> None:
        if not fut.done():
            fut.set_result(None)

    if _stdin_is_a_pipe():
        fd = sys.stdin.fileno()
        loop.add_reader(fd, readable)
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    return fut


async def until_stopped(aw: Awaitable[T], stop: asyncio.Future[None]) -> T | None:
    """Await ``aw`` unless ``stop`` completes first (then cancel it and return None), so
    a signal is obeyed at once even while setting up waits for a peer."""
    task = asyncio.ensure_future(aw)
    waiting: set[asyncio.Future[Any]] = {task, stop}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


# --------------------------------------------------------------------------- backend


async def _backend(args: argparse.Namespace) -> int:
    from xenpv.backends.console import ConsoleBackend, ConsoleConfig

    config = ConsoleConfig(limit=args.limit, policy=args.policy, log_dir=args.log_dir,
                           log_max=args.log_max)
    platform = _platform(args.rundir, args.as_domid)
    client = await _xenstore(args.rundir, args.as_domid)
    backend = ConsoleBackend(platform, client, config, domids=args.domid,
                             all_domains=args.all, secondary=not args.no_secondary)
    stop = _stdin_closed(asyncio.get_running_loop())
    try:
        await until_stopped(backend.start(), stop)
        if not stop.done():
            emit(event="ready", domids=args.domid)
        await stop
        stats = {str(d): (srv.session.stats if srv.session else None)
                 for d, srv in backend.primaries.items()}
        emit(event="done", stats=stats)
    finally:
        await backend.close()
        await client.close()
        platform.close()
    return 0


# --------------------------------------------------------------------------- frontend


def text_block(n: int) -> bytes:
    """``n`` bytes of printable text in 64-byte lines (safe on any terminal)."""
    line = b"".join(bytes([0x41 + (i % 26)]) for i in range(63)) + b"\n"
    reps = n // len(line) + 1
    return (line * reps)[:n]


async def _send(writer: asyncio.StreamWriter, n: int) -> None:
    block = text_block(min(n, 1 << 16))
    left = n
    while left > 0:
        piece = block[: min(left, len(block))]
        writer.write(piece)
        left -= len(piece)
        await writer.drain()


async def _shell(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 stop: asyncio.Future[None]) -> None:
    """Answer ``echo``/``send``/``quit`` lines until quit or ``stop``."""
    while not stop.done():
        line_task = asyncio.ensure_future(reader.readline())
        waiting: set[asyncio.Future[Any]] = {line_task, stop}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not line_task.done():
            line_task.cancel()
            return
        line = line_task.result().rstrip(b"\r\n")
        if not line and reader.at_eof():
            return
        cmd, _, rest = line.partition(b" ")
        if cmd == b"echo":
            writer.write(rest + b"\n")
        elif cmd == b"send" and rest.isdigit():
            n = int(rest)
            await _send(writer, n)
            writer.write(b"<done %d>\n" % n)
        elif cmd == b"quit":
            writer.write(b"bye\n")
            await writer.drain()
            return
        await writer.drain()


async def _frontend(args: argparse.Namespace) -> int:
    from xenpv.frontends.console import ConsoleFrontend, PrimaryConsole

    platform = _platform(args.rundir, args.domid)
    loop = asyncio.get_running_loop()
    stop = _stdin_closed(loop)
    primary: PrimaryConsole | None = None
    driver: ConsoleFrontend | None = None
    client: Any = None
    async def start() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal primary, driver, client
        if args.devid is None:
            primary = PrimaryConsole(platform, args.backend_domid).setup()
            emit(event="ready", port=primary.port, ring_ref=primary.ring_ref)
            reader, writer = await primary.open()
        else:
            client = await _xenstore(args.rundir, args.domid)
            path = f"/local/domain/{args.domid}/device/console/{args.devid}"
            # a stopped frontend gives its backend 2 s to let go, not the default 10
            driver = ConsoleFrontend(platform, client, path, close_timeout=2.0)
            await driver.start()
            reader, writer = await driver.streams(timeout=30.0)
            emit(event="ready", path=path)
        if args.send:
            await _send(writer, args.send)
            emit(event="sent", bytes=args.send)
        return reader, writer

    try:
        streams = await until_stopped(start(), stop)
        if streams is None:  # stopped while waiting for the backend
            emit(event="done")
            return 0
        reader, writer = streams
        if args.shell:
            await _shell(reader, writer, stop)
        # stay until told to go, so the backend can let go of the page first
        await stop
        # let the backend take what is still queued (bounded)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while writer.transport.get_write_buffer_size():
                    await asyncio.sleep(0.01)
        emit(event="done")
    finally:
        if driver is not None:
            await driver.close()
        if client is not None:
            await client.close()
        if primary is not None:
            primary.close()
        platform.close()
    return 0


async def _publish(args: argparse.Namespace) -> int:
    from xenpv.backends.console import publish_primary_console

    client = await _xenstore(args.rundir, 0)
    try:
        path = await publish_primary_console(client, args.domid, port=args.port,
                                             ring_ref=args.ring_ref,
                                             backend_domid=args.backend_domid)
    finally:
        await client.close()
    print(path)
    return 0


# --------------------------------------------------------------------------- attach


def tty_node(domid: int, num: int, backend_domid: int = 0) -> str:
    """The xenstore node ``attach`` takes console ``num`` of ``domid``'s pty path from.

    Console 0: ``/local/domain/<domid>/console/tty`` (the toolstack makes that directory
    read-only to the guest).  Secondary consoles: the backend's own directory,
    ``/local/domain/<backend>/backend/console/<domid>/<num>/tty``, never the guest-owned
    ``device/console/<num>/tty`` that Xen's ``xenconsole`` reads (R14)."""
    if num == 0:
        return f"/local/domain/{domid}/console/tty"
    return f"/local/domain/{backend_domid}/backend/console/{domid}/{num}/tty"


def guest_can_write(perms: list[Any], domid: int) -> bool:
    """Whether ``domid`` may write a node with permissions ``perms`` (owner first)."""
    if not perms or perms[0].domid == domid:
        return True
    for perm in perms[1:]:
        if perm.domid == domid:
            return bool(perm.can_write)
    return bool(perms[0].can_write)


async def _tty_path(args: argparse.Namespace, timeout: float = 10.0) -> str:
    client = await _xenstore(args.rundir, 0)
    path = tty_node(args.domid, args.num, args.backend_domid)
    try:
        if not await client.exists(f"/local/domain/{args.domid}"):
            raise LocalError(f"domain {args.domid} does not exist")
        try:
            async with asyncio.timeout(timeout), client.watch(path, max_pending=4) as watch:
                async for _ in watch:
                    with contextlib.suppress(XenstoreError):
                        value = await client.read(path)
                        if not value:
                            continue
                        if guest_can_write(await client.get_perms(path), args.domid):
                            raise LocalError(f"{path} is writable by domain {args.domid}: "
                                             "not opening a terminal the guest names")
                        return value.decode("ascii", "replace")
        except TimeoutError:
            raise LocalError(
                f"no console backend published {path} within {timeout:.0f} s "
                f"(is `xenpv console backend` serving domain {args.domid}?)") from None
    finally:
        await client.close()
    raise LocalError(f"{path} never appeared")


def _attach(args: argparse.Namespace) -> int:
    path = asyncio.run(_tty_path(args, args.timeout))
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    if not os.isatty(fd):
        os.close(fd)
        raise LocalError(f"{path} is not a terminal")
    tty.setraw(fd, termios.TCSANOW)  # TCSANOW: keep what the guest already wrote
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    def detach(_signum: int, _frame: object) -> None:
        raise _Detach

    old_handlers = {sig: signal.signal(sig, detach) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)  # keep type-ahead
        while True:
            ready, _, _ = select.select([fd, stdin], [], [])
            if fd in ready:
                data = os.read(fd, 4096)
                if not data:
                    return 0
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    return 0
                if ESCAPE in data:
                    os.write(fd, data[: data.index(ESCAPE)])
                    return 0
                os.write(fd, data)
    except _Detach:  # SIGTERM/SIGHUP: leave, with the terminal restored
        return 0
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if saved is not None:
            with contextlib.suppress(termios.error):  # a hung-up terminal is gone
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        os.close(fd)


class _Detach(Exception):
    """``attach`` got SIGTERM or SIGHUP."""


def run(args: argparse.Namespace) -> int:
    """Run one ``xenpv console`` action."""
    try:
        if args.action == "attach":
            return _attach(args)
        if args.action == "backend":
            return asyncio.run(_backend(args))
        if args.action == "frontend":
            return asyncio.run(_frontend(args))
        return asyncio.run(_publish(args))
    except (LocalError, PeerError, PlatformError, XenstoreError, OSError) as exc:
        print(f"xenpv console {args.action}: {describe(exc)}", file=sys.stderr)
        return 1

"""``xenpv xenstored``: run the embedded xenstore daemon in the foreground.

It serves dom0's (privileged) socket and one socket per ``--domain DOMID=PATH``; it exits
with status 0 on SIGTERM, SIGINT or SIGHUP after saving ``--state-file`` and removing its
sockets and ``--pid-file``.  If a live process serves one of the sockets or uses the state
file (their ``.lock`` files, :mod:`xenpv.pidlock`), it exits with status 1 and a one-line
error naming that process, having changed nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from xenpv import loops
from xenpv.errors import LocalError
from xenpv.loops import LOOPS
from xenpv.pidlock import PidLock
from xenpv.xenstore.server import XenstoredServer
from xenpv.xenstore.store import Quotas


def _domain(text: str) -> tuple[int, str]:
    domid, sep, path = text.partition("=")
    if not sep or not domid.isdigit() or not path or not 0 < int(domid) <= 0x7FEF:
        raise argparse.ArgumentTypeError(f"expected DOMID=SOCKETPATH with 0 < DOMID, got {text!r}")
    return int(domid), path


def quota_arg(text: str) -> tuple[str, str]:
    """Parse a ``NAME=VALUE`` quota override (an argparse ``type``)."""
    name, sep, value = text.partition("=")
    if not sep or name.replace("_", "-") not in Quotas.names():
        choices = ", ".join(Quotas.names())
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of: {choices}")
    return name, value


def make_quotas(overrides: list[tuple[str, str]]) -> Quotas:
    """The default quotas with ``overrides`` (from :func:`quota_arg`) applied; raises
    ``ValueError`` naming a bad value."""
    quotas = Quotas()
    for name, value in overrides:
        try:
            quotas.set(name, value)
        except ValueError as exc:
            raise ValueError(f"bad quota {name}={value}: {exc}") from None
    return quotas


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the daemon's options."""
    parser.add_argument("--socket", required=True, help="dom0's (privileged) socket path")
    parser.add_argument("--state-file", help="load the tree from here and save it on exit")
    parser.add_argument(
        "--save-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with --state-file, also save a changed tree this often (0: only on exit; "
        "default 5)",
    )
    parser.add_argument(
        "--domain",
        action="append",
        default=[],
        type=_domain,
        metavar="DOMID=SOCKETPATH",
        help="serve a socket whose connections act as DOMID (repeatable)",
    )
    parser.add_argument(
        "--quota",
        action="append",
        default=[],
        type=quota_arg,
        metavar="NAME=VALUE",
        help="override a per-domain quota, e.g. nodes=2000 (0 disables; repeatable)",
    )
    parser.add_argument("--pid-file", help="write the daemon's pid here once it listens")
    parser.add_argument(
        "--always-eagain",
        action="store_true",
        help="answer every transaction commit with EAGAIN (for testing clients)",
    )
    parser.add_argument(
        "--spin-us",
        type=float,
        default=50.0,
        metavar="MICROSECONDS",
        help="after answering a connection, poll it this long before sleeping (a "
        "sequential client's next request then costs no wake-up; 0: never; default 50)",
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop when installed (auto, the default), uvloop or asyncio",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (default: xenpv's global one, warning)",
    )


async def _serve(args: argparse.Namespace, quotas: Quotas) -> None:
    # A live daemon owning the state file or a socket makes this one refuse before it
    # touches anything (InUseError names its pid); nothing is saved or removed then.
    state_lock = None
    if args.state_file:
        state_lock = PidLock(f"{args.state_file}.lock", f"state file {args.state_file}")
        state_lock.acquire()
    try:
        server = XenstoredServer(
            quotas=quotas,
            state_file=args.state_file,
            always_eagain=args.always_eagain,
            save_interval=args.save_interval,
            spin_us=args.spin_us,
        )
        try:
            await server.listen(args.socket, 0)
            for domid, path in args.domain:
                await server.listen(path, domid)
        except BaseException:
            await server.close(save=False)  # only the sockets this process bound go
            raise
        await _serve_until_stopped(args, server)
    finally:
        if state_lock is not None:
            state_lock.release()


async def _serve_until_stopped(args: argparse.Namespace, server: XenstoredServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.pid_file:
            tmp = f"{args.pid_file}.tmp"
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, args.pid_file)
        await stop.wait()
    finally:
        await server.close()
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except FileNotFoundError:
                pass


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the exit status."""
    if args.log_level is not None:
        logging.getLogger().setLevel(args.log_level.upper())
    try:
        quotas = make_quotas(args.quota)
    except ValueError as exc:
        logging.error("%s", exc)
        return 2
    try:
        loops.run(_serve(args, quotas), args.loop)
    except (LocalError, OSError) as exc:
        logging.error("%s", exc)
        return 1
    return 0

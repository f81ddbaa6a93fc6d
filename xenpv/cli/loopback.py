"""``xenpv loopback``: run the loopback emulator and manage its domains.

::

    xenpv loopback up --rundir DIR [--domain N[:NAME] ...] [--max-grants G] [--max-ports P]
    xenpv loopback domain create|destroy --rundir DIR --domid N [--name NAME]
    xenpv loopback domain list --rundir DIR [--json]
    xenpv loopback env --rundir DIR --domid N [--wait SECONDS]
    xenpv loopback stats --rundir DIR [--json]

``up`` stays in the foreground until SIGTERM, SIGINT or SIGHUP.  Failures print one
line and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

from xenpv import loops
from xenpv.cli import args as args_
from xenpv.cli.args import CliError, UsageError
from xenpv.cli.xenstored import make_quotas, quota_arg
from xenpv.errors import LocalError, PlatformError
from xenpv.loops import LOOPS
from xenpv.pidlock import InUseError
from xenpv.platforms.base import GNTTAB_NR_RESERVED_ENTRIES
from xenpv.platforms.loopback.env import domain_env
from xenpv.platforms.loopback.xsd import CHOICES as XSD_CHOICES
from xenpv.platforms.loopback.xsd import OURS as XSD_OURS
from xenpv.platforms.loopback.xsd import choose as choose_xenstored


def _domain_spec(text: str) -> tuple[int, str]:
    """``N[:NAME]`` of ``--domain``: an ordinary guest domid and an optional name."""
    num, _, name = text.partition(":")
    try:
        domid = args_.parse_uint(num, 1, args_.DOMID_MAX, "domid")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (expected N[:NAME])") from None
    return domid, name or f"dom{domid}"


RUNDIR_HELP = "the emulator's run directory (its sockets, one directory per domain)"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``up``, ``domain``, ``env`` and ``stats`` subcommands."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                help="what to do")

    up = sub.add_parser("up", help="run the emulator daemon (stays in the foreground)",
                        description="Run the emulator daemon in the foreground until "
                        "SIGTERM, SIGINT or SIGHUP; it prints a ready line once it serves.")
    up.add_argument("--rundir", required=True, help=RUNDIR_HELP + "; created if missing")
    up.add_argument(
        "--domain",
        action="append",
        default=[],
        type=_domain_spec,
        metavar="N[:NAME]",
        help="create domain N at start (repeatable)",
    )
    up.add_argument("--max-grants", type=args_.size(GNTTAB_NR_RESERVED_ENTRIES + 1, 1 << 20,
                                                    "--max-grants"),
                    default=4096, help="grant table size per domain (default 4096)")
    up.add_argument("--max-ports", type=args_.size(2, args_.EVTCHN_PORT_MAX + 1, "--max-ports"),
                    default=1024, help="event-channel ports per domain (default 1024)")
    up.add_argument(
        "--xenstore-quota",
        action="append",
        default=[],
        type=quota_arg,
        metavar="NAME=VALUE",
        help="override a quota of the embedded xenstored, e.g. connections=16 (as "
        "xenpv xenstored --quota; repeatable)",
    )
    up.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop when installed (auto, the default), uvloop or asyncio",
    )
    up.add_argument(
        "--xenstored",
        choices=XSD_CHOICES,
        default=XSD_OURS,
        help="dom0's xenstored: ours (embedded, the default), xen-c or oxenstored (Xen's, "
        "where this build provides them); every domain is introduced to it with its ring",
    )
    up.add_argument("-v", "--verbose", action="store_true", help="log every domain change")

    dom = sub.add_parser("domain", help="create, destroy or list domains (acts as dom0)")
    dom.add_argument("op", choices=["create", "destroy", "shutdown", "list"],
                     help="create, destroy or shut down domain DOMID, or list every domain")
    dom.add_argument("--rundir", required=True, help=RUNDIR_HELP)
    dom.add_argument("--domid", type=args_.guest_domid, help="the domain (create/destroy)")
    dom.add_argument("--name", help="domain name (create; default domN)")
    dom.add_argument("--reason", type=args_.uint(0, 255, "--reason"), default=0,
                     help="shutdown: sched.h SHUTDOWN_* code (0 poweroff, 1 reboot, "
                     "2 suspend, 3 crash; default 0)")
    dom.add_argument("--json", action="store_true", help="list: print one JSON array")

    env = sub.add_parser("env", help="print the environment under which a program is domain N")
    env.add_argument("--rundir", required=True, help=RUNDIR_HELP)
    env.add_argument("--domid", type=args_.domid, required=True,
                     help="the domain the programs act as (0: dom0, the toolstack)")
    env.add_argument("--wait", type=args_.positive_float, default=0.0, metavar="SECONDS",
                     help="wait this long for the emulator to serve the domain (default: "
                     "fail at once)")

    stats = sub.add_parser("stats", help="what every domain holds (grants, mappings, ports …)")
    stats.add_argument("--rundir", required=True, help=RUNDIR_HELP)
    stats.add_argument("--json", action="store_true", help="print one JSON object per domain "
                       "in an array")


def _up(args: argparse.Namespace) -> int:
    from xenpv.platforms.loopback.daemon import run_daemon

    if args.verbose and logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)

    try:
        choose_xenstored(args.xenstored)  # refused before anything is created
    except LocalError as exc:
        raise CliError(str(exc)) from None
    rundir = Path(args.rundir)
    if rundir.exists() and not rundir.is_dir():
        raise CliError(f"run directory {args.rundir} is not a directory")
    created = not rundir.exists()  # a directory made here is removed again when empty
    try:
        rundir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create run directory {args.rundir}: "
                       f"{os.strerror(exc.errno or 0)}") from None

    def ready(daemon: Any) -> None:
        # SIGHUP (the terminal went away) stops the daemon as SIGTERM and SIGINT do
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.stop)
        print(f"xenpv loopback: ready in {args.rundir}", flush=True)

    try:
        quotas = make_quotas(args.xenstore_quota)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        loops.run(
            run_daemon(
                args.rundir,
                dict(args.domain),
                max_grants=args.max_grants,
                max_ports=args.max_ports,
                ready=ready,
                quotas=quotas,
                xenstored=args.xenstored,
            ),
            args.loop,
        )
    except InUseError as exc:  # a live daemon owns the rundir: it is left alone
        raise CliError(str(exc)) from None
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty: someone else's files stay
                rundir.rmdir()
    return 0


_FLAGS = ("privileged", "dying", "running", "shutdown")
_STATS = ("grants", "revoking", "mappings", "ports", "shares", "handles", "watches")


def _domain(args: argparse.Namespace) -> int:
    from xenpv.platforms.loopback import proto
    from xenpv.platforms.loopback.client import ControlConnection
    from xenpv.platforms.loopback.daemon import control_path

    if not Path(args.rundir).is_dir():
        raise CliError(f"no run directory {args.rundir} (start `xenpv loopback up` first)")
    conn = ControlConnection(control_path(args.rundir, 0), timeout=10.0)
    try:
        if args.op in ("stats", "list"):
            out, _ = conn.call(proto.Op.DOMAIN_LIST)
            (count,) = proto.U32.unpack_from(out)
            rows: list[dict[str, Any]] = []
            for i in range(count):
                domid, flags = proto.U32x2.unpack_from(out, 4 + 8 * i)
                bits = (proto.DOMFLAG_PRIVILEGED, proto.DOMFLAG_DYING, proto.DOMFLAG_RUNNING,
                        proto.DOMFLAG_SHUTDOWN)
                row: dict[str, Any] = {"domid": domid}
                if args.op == "list":
                    row["flags"] = [t for bit, t in zip(bits, _FLAGS, strict=True) if flags & bit]
                else:
                    st, _ = conn.call(proto.Op.STATS, proto.U32.pack(domid))
                    row.update(zip(_STATS, proto.STATS_REPLY.unpack(st), strict=True))
                rows.append(row)
            if args.json:
                print(json.dumps(rows))
            elif args.op == "list":
                for row in rows:
                    print(f"{row['domid']}\t{','.join(row['flags'])}")
            else:
                print("domid\t" + "\t".join(_STATS))
                for row in rows:
                    print("\t".join(str(row[k]) for k in ("domid", *_STATS)))
            return 0
        domid = args.domid
        if domid is None:
            raise UsageError(f"{args.op} needs --domid")
        if args.op == "create":
            name = (args.name or "").encode()
            conn.call(proto.Op.DOMAIN_CREATE, struct.pack("<I", domid) + name)
        elif args.op == "shutdown":
            conn.call(proto.Op.DOMAIN_SHUTDOWN, struct.pack("<II", domid, args.reason))
        else:
            conn.call(proto.Op.DOMAIN_DESTROY, struct.pack("<I", domid))
        return 0
    finally:
        conn.close()


def _serving(rundir: str, domid: int) -> bool:
    """Whether an emulator answers on ``domid``'s control socket in ``rundir``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(str(Path(rundir) / f"dom{domid}" / "control"))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _env(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    while not _serving(args.rundir, args.domid):
        if time.monotonic() >= deadline:
            if not Path(args.rundir).is_dir():
                raise CliError(f"no run directory {args.rundir} "
                               "(start `xenpv loopback up` first)")
            if not _serving(args.rundir, 0):
                raise CliError(f"no emulator is serving {args.rundir}")
            raise CliError(f"domain {args.domid} does not exist in {args.rundir} "
                           "(see `xenpv loopback domain list`)")
        time.sleep(0.05)
    for key, value in domain_env(args.rundir, args.domid).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one ``xenpv loopback`` action."""
    try:
        if args.action == "up":
            return _up(args)
        if args.action == "domain":
            return _domain(args)
        if args.action == "stats":
            args.op = "stats"
            return _domain(args)
        return _env(args)
    except (PlatformError, LocalError) as exc:
        raise CliError(str(exc)) from None

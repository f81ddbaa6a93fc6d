"""``xenpv loopback``: run the loopback emulator and manage its domains.

::

    xenpv loopback up --rundir DIR [--domain N[:NAME] ...] [--max-grants G] [--max-ports P]
    xenpv loopback domain create|destroy --rundir DIR --domid N [--name NAME]
    xenpv loopback domain list --rundir DIR
    xenpv loopback env --rundir DIR --domid N
    xenpv loopback stats --rundir DIR
"""

from __future__ import annotations

import argparse
import logging
import shlex
import struct
import sys

from xenpv import loops
from xenpv.cli.xenstored import make_quotas, quota_arg
from xenpv.errors import PlatformError
from xenpv.loops import LOOPS
from xenpv.pidlock import InUseError
from xenpv.platforms.loopback.env import domain_env


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``up``, ``domain`` and ``env`` subcommands."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    up = sub.add_parser("up", help="run the emulator daemon in the foreground")
    up.add_argument("--rundir", required=True, help="directory for the domains' sockets")
    up.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="N[:NAME]",
        help="create domain N at start (repeatable)",
    )
    up.add_argument("--max-grants", type=int, default=4096, help="grant table size per domain")
    up.add_argument("--max-ports", type=int, default=1024, help="event-channel ports per domain")
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
    up.add_argument("-v", "--verbose", action="store_true", help="log every domain change")

    dom = sub.add_parser("domain", help="create, destroy or list domains (acts as dom0)")
    dom.add_argument("op", choices=["create", "destroy", "list"])
    dom.add_argument("--rundir", required=True)
    dom.add_argument("--domid", type=int, help="domain id (create/destroy)")
    dom.add_argument("--name", help="domain name (create)")

    env = sub.add_parser("env", help="print the environment under which a program is domain N")
    env.add_argument("--rundir", required=True)
    env.add_argument("--domid", type=int, required=True)

    stats = sub.add_parser("stats", help="what every domain holds (grants, mappings, ports …)")
    stats.add_argument("--rundir", required=True)


def _parse_domains(specs: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for spec in specs:
        num, _, name = spec.partition(":")
        out[int(num)] = name or f"dom{int(num)}"
    return out


def _up(args: argparse.Namespace) -> int:
    from xenpv.platforms.loopback.daemon import run_daemon

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="xenpv loopback: %(message)s",
    )

    def ready(_daemon: object) -> None:
        print(f"xenpv loopback: ready in {args.rundir}", flush=True)

    try:
        quotas = make_quotas(args.xenstore_quota)
    except ValueError as exc:
        print(f"xenpv loopback: {exc}", file=sys.stderr)
        return 2
    try:
        loops.run(
            run_daemon(
                args.rundir,
                _parse_domains(args.domain),
                max_grants=args.max_grants,
                max_ports=args.max_ports,
                ready=ready,
                quotas=quotas,
            ),
            args.loop,
        )
    except InUseError as exc:  # a live daemon owns the rundir: it is left alone
        print(f"xenpv loopback: {exc}", file=sys.stderr)
        return 1
    return 0


def _domain(args: argparse.Namespace) -> int:
    from xenpv.platforms.loopback import proto
    from xenpv.platforms.loopback.client import ControlConnection
    from xenpv.platforms.loopback.daemon import control_path

    conn = ControlConnection(control_path(args.rundir, 0), timeout=10.0)
    try:
        if args.op == "stats":
            out, _ = conn.call(proto.Op.DOMAIN_LIST)
            (count,) = proto.U32.unpack_from(out)
            names = ("grants", "revoking", "mappings", "ports", "shares", "handles", "watches")
            print("domid\t" + "\t".join(names))
            for i in range(count):
                domid, _flags = proto.U32x2.unpack_from(out, 4 + 8 * i)
                st, _ = conn.call(proto.Op.STATS, proto.U32.pack(domid))
                print(f"{domid}\t" + "\t".join(str(v) for v in proto.STATS_REPLY.unpack(st)))
            return 0
        if args.op == "list":
            out, _ = conn.call(proto.Op.DOMAIN_LIST)
            (count,) = proto.U32.unpack_from(out)
            for i in range(count):
                domid, flags = proto.U32x2.unpack_from(out, 4 + 8 * i)
                tags = [
                    t
                    for bit, t in (
                        (proto.DOMFLAG_PRIVILEGED, "privileged"),
                        (proto.DOMFLAG_DYING, "dying"),
                        (proto.DOMFLAG_RUNNING, "running"),
                    )
                    if flags & bit
                ]
                print(f"{domid}\t{','.join(tags)}")
            return 0
        if args.domid is None:
            print("xenpv loopback domain: --domid is required", file=sys.stderr)
            return 2
        if args.op == "create":
            name = (args.name or "").encode()
            conn.call(proto.Op.DOMAIN_CREATE, struct.pack("<I", args.domid) + name)
        else:
            conn.call(proto.Op.DOMAIN_DESTROY, struct.pack("<I", args.domid))
        return 0
    finally:
        conn.close()


def _env(args: argparse.Namespace) -> int:
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
    except PlatformError as exc:
        print(f"xenpv loopback: {exc}", file=sys.stderr)
        return 1

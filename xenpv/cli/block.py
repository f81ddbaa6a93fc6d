"""``xenpv block backend|info|export`` — serve vbds; show a vbd's negotiation; export a
guest's disk over NBD.

``backend --all`` (run as the backend domain: ``--as DOMID``, dom0 by default) serves
every ``backend/vbd/<fe>/<devid>`` directory of that domain, including devices added
later, with the image named by each device's ``params`` and its ``mode``; it prints one
JSON line ``{"event": "ready", "engine": ...}`` (the I/O engine serving) once watching
and runs until stdin closes or SIGTERM, then prints ``{"event": "done", "devices": {...}}`` with every driver's counters.

``info DOMID VDEV`` reads the frontend directory of guest ``DOMID``'s disk ``VDEV``
(``xvda`` or its number ``51712``) and its backend directory and prints, as JSON, what the
two sides negotiated: states, ABI, ring pages, queues, features, size; and, under
``live``, what the backend process serving it keeps in its stats directory (per queue:
requests in flight, completed, errors, persistent grants held; ``stale`` when that
process is gone), or null.

``export VDEV --socket PATH``, run as the guest (under ``xenpv loopback env`` or with
``--rundir``/``--domid``), attaches a frontend to that domain's vbd ``VDEV`` and serves the
disk to NBD clients on the Unix socket ``PATH`` (:mod:`xenpv.frontends.nbd`); it prints
``{"event": "ready", ...}`` once listening and, when stdin closes or on SIGTERM,
``{"event": "done", ...}`` with the export's counters, then detaches the frontend.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from typing import Any

from xenpv.cli import args as cliargs
from xenpv.cli.console import _stdin_closed, emit
from xenpv.cli.ends import (
    backend_parser,
    device_ends,
    domain_session,
    guest_arguments,
    print_info,
)
from xenpv.errors import LocalError


def default_stats_dir(rundir: str | os.PathLike[str] | None = None) -> str:
    """The live stats directory of ``block backend`` and ``block info``:
    ``RUNDIR/block-stats`` for a loopback emulator's run directory (given, or the one
    whose environment this process runs in), else
    :data:`xenpv.backends.block.DEFAULT_STATS_DIR`."""
    from xenpv.backends.block import DEFAULT_STATS_DIR
    from xenpv.platforms.loopback.env import ENV_SOCKET

    if rundir is None and os.environ.get(ENV_SOCKET):
        rundir = os.path.dirname(os.path.dirname(os.environ[ENV_SOCKET]))  # R/domN/control
    if rundir is None:
        return DEFAULT_STATS_DIR
    return os.path.join(os.fspath(rundir), "block-stats")


def vdev_number(text: str) -> int:
    """An argparse ``type=`` for a virtual device: a name (``xvda``) or its number."""
    from xenpv.protocols.blkif import vdev_encode

    if text[:1].isdigit():
        return cliargs.uint(0, (1 << 29) - 1, "virtual device")(text)
    try:
        return vdev_encode(text)
    except LocalError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``backend``, ``info`` and ``export`` subcommands."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                help="what to do (see ACTION --help)")

    be = backend_parser(sub, "vbd", "serve this domain's vbds from image files")
    be.add_argument("--engine", choices=("auto", "io_uring", "threads", "inline"),
                    default="auto",
                    help="reads and writes through io_uring (io_uring; auto, the default, "
                         "where the kernel allows it, else small I/O inline and large in "
                         "threads); all in a thread pool; all inline in the ring pass")
    be.add_argument("--direct", action="store_true",
                    help="open images with O_DIRECT (bypass the page cache)")
    be.add_argument("--workers", type=cliargs.uint(1, 256, "workers"), default=8,
                    help="I/O threads (default 8)")
    be.add_argument("--max-ring-order", type=cliargs.uint(0, 4, "ring order"), default=4,
                    help="largest ring order offered, 0..4 (default 4: 16 pages)")
    be.add_argument("--max-queues", type=cliargs.uint(1, 4, "queues"), default=4,
                    help="most queues offered, 1..4 (default 4)")
    be.add_argument("--max-indirect-segments", type=cliargs.uint(0, 4096, "segments"), default=256,
                    help="0: no indirect requests")
    be.add_argument("--no-persistent", action="store_true", help="no persistent grants")
    be.add_argument("--no-discard", action="store_true", help="do not offer discard")
    be.add_argument("--discard-secure", action="store_true",
                    help="offer secure discard (discard-secure=1): a file's data is "
                         "overwritten with zeros, then punched out; a device gets "
                         "BLKSECDISCARD")
    be.add_argument("--sector-size", type=_sector_size,
                    help="logical sector size published, 512..4096 (default: a block "
                         "device's logical block size, 512 for an image file)")
    be.add_argument("--physical-sector-size", type=_physical_sector_size,
                    help="physical-sector-size published (default: a block device's, "
                         "else the sector size)")
    be.add_argument("--stats-dir",
                    help="keep each device's live state (requests in flight, completed, "
                         "errors, persistent grants) in a file here for 'block info' "
                         "(default: RUNDIR/block-stats, or /run/xenpv/block)")
    be.add_argument("--stats-interval", type=cliargs.positive_float, default=1.0,
                    help="seconds between rewrites of a changing stats file (default 1; "
                         "0: keep none)")

    info = sub.add_parser("info", help="show what a vbd's two ends negotiated")
    info.add_argument("domid", type=cliargs.domid, help="the guest (frontend) domain")
    info.add_argument("vdev", help="the disk: xvda, hdb, ... or its number")
    info.add_argument("-s", "--socket", help="xenstore socket (default: as xenstore-utils, "
                                             "or dom0's of --rundir)")
    info.add_argument("--rundir", help="loopback emulator run directory (dom0's xenstore "
                                       "and the stats directory there)")
    info.add_argument("--stats-dir", help="where the backend process keeps live state "
                                          "(default: as 'block backend')")

    ex = sub.add_parser("export", help="serve this domain's vbd to NBD clients")
    ex.add_argument("vdev", type=vdev_number, help="the disk: xvda, ... or its number 51712")
    ex.add_argument("--socket", required=True, help="Unix socket to listen on for NBD clients")
    guest_arguments(ex)
    ex.add_argument("--name", help="export name (default: the vdev's name, e.g. xvda; the "
                                   "empty default name reaches the export too)")
    ex.add_argument("--max-ring-order", type=cliargs.uint(0, 4, "ring order"), default=4,
                    help="largest ring order asked for, 0..4 (default 4)")
    ex.add_argument("--max-queues", type=cliargs.uint(1, 4, "queues"), default=4,
                    help="most queues asked for, 1..4 (default 4)")
    ex.add_argument("--no-indirect", action="store_true", help="no indirect requests")
    ex.add_argument("--no-persistent", action="store_true", help="no persistent grants")
    ex.add_argument("--max-payload", type=cliargs.size(4096, 1 << 30, "max payload"),
                    default=32 << 20, help="longest NBD read or write in bytes (default 32 MiB)")
    ex.add_argument("--max-connections", type=cliargs.uint(1, 1024, "connections"), default=16,
                    help="NBD clients served at once (default 16)")


def _power_of_two(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse ``type=`` for a power of two in ``lo..hi``."""
    number = cliargs.uint(lo, hi, what)

    def convert(text: str) -> int:
        value: int = number(text)
        if value & (value - 1):
            raise argparse.ArgumentTypeError(f"{what} {value} is not a power of two")
        return value

    return convert


_sector_size = _power_of_two(512, 4096, "sector size")
_physical_sector_size = _power_of_two(512, 1 << 20, "physical sector size")


async def _backend(args: argparse.Namespace) -> int:
    from xenpv.backends.block import BlockBackend, BlockConfig
    from xenpv.backends.blockio import effective_engine

    config = BlockConfig(max_ring_order=args.max_ring_order, max_queues=args.max_queues,
                         max_indirect_segments=args.max_indirect_segments,
                         persistent=not args.no_persistent, discard=not args.no_discard,
                         discard_secure=args.discard_secure, sector_size=args.sector_size,
                         physical_sector_size=args.physical_sector_size,
                         engine=args.engine, workers=args.workers, direct=args.direct)
    engine = effective_engine(args.engine)  # logs why if io_uring cannot be used
    async with domain_session(args.rundir, args.as_domid) as (platform, _domid, client):
        backend = BlockBackend(platform, client, config,
                               stats_dir=args.stats_dir or default_stats_dir(args.rundir),
                               stats_interval=args.stats_interval)
        try:
            await backend.start()
            emit(event="ready", domid=args.as_domid, engine=engine)
            await _stdin_closed(asyncio.get_running_loop())
            emit(event="done", devices={d.path: d.info() for d in backend.drivers})
        finally:
            await backend.close()
    return 0


_FRONT_KEYS = ("state", "backend", "backend-id", "virtual-device", "device-type", "protocol",
               "ring-ref", "ring-page-order", "event-channel", "multi-queue-num-queues",
               "feature-persistent")
_BACK_KEYS = ("state", "online", "params", "mode", "type", "dev", "sectors", "sector-size",
              "physical-sector-size", "info", "max-ring-page-order",
              "multi-queue-max-queues", "feature-max-indirect-segments",
              "feature-persistent", "feature-flush-cache", "feature-barrier",
              "feature-discard", "discard-granularity", "discard-alignment", "discard-secure")


async def vbd_info(client: Any, domid: int, vdev: str,
                   stats_dir: str | None = None) -> dict[str, Any]:
    """What the frontend and backend of guest ``domid``'s disk ``vdev`` wrote, and
    (``live``) the state the backend process keeps in ``stats_dir``, if any."""
    from xenpv.backends.block import read_live_stats
    from xenpv.protocols.blkif import vdev_decode, vdev_encode

    devid = int(vdev) if vdev.isdigit() else vdev_encode(vdev)
    fe, be, front, back = await device_ends(client, domid, "vbd", devid, vdev, _FRONT_KEYS,
                                            _BACK_KEYS)
    try:
        queues = int(front.get("multi-queue-num-queues", "1"))
        order = int(front.get("ring-page-order", "0"))
    except ValueError:
        queues, order = 0, 0
    live = read_live_stats(stats_dir, be) if be and stats_dir is not None else None
    return {"domid": domid, "vdev": vdev_decode(devid), "devid": devid,
            "frontend": fe, "backend": be, "queues": queues, "ring_pages": 1 << order,
            "frontend_keys": front, "backend_keys": back, "live": live}


async def _info(args: argparse.Namespace) -> int:
    socket = args.socket
    if socket is None and args.rundir is not None:
        socket = os.path.join(args.rundir, "dom0", "xenstore")
    stats_dir = args.stats_dir or default_stats_dir(args.rundir)
    return await print_info(socket, lambda client: vbd_info(client, args.domid, args.vdev,
                                                            stats_dir))


async def _export(args: argparse.Namespace) -> int:
    from xenpv.frontends.block import BlockFrontend, FrontConfig
    from xenpv.frontends.nbd import NbdConfig, NbdExport
    from xenpv.protocols.blkif import vdev_decode
    from xenpv.xenbus.paths import frontend_path

    async with domain_session(args.rundir, args.domid) as (platform, domid, client):
        name = args.name if args.name is not None else vdev_decode(args.vdev)
        path = frontend_path(domid, "vbd", args.vdev)
        frontend = None
        export = None
        try:
            if not await client.exists(path):
                raise LocalError(f"no vbd {name} in domain {domid} ({path})")
            config = FrontConfig(max_ring_order=args.max_ring_order,
                                 max_queues=args.max_queues, indirect=not args.no_indirect,
                                 persistent=not args.no_persistent)
            frontend = BlockFrontend(platform, client, path, config=config)
            await frontend.start()
            await frontend.ready(30.0)
            export = NbdExport(frontend, name, NbdConfig(
                max_payload=args.max_payload, max_buffered=max(64 << 20, args.max_payload),
                max_connections=args.max_connections))
            await export.listen(args.socket)
            emit(event="ready", socket=args.socket, name=name, size=frontend.size,
                 readonly=frontend.readonly)
            await _stdin_closed(asyncio.get_running_loop())
            emit(event="done", export=export.info())
        finally:
            if export is not None:
                await export.close()
            if frontend is not None:
                await frontend.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one ``block`` subcommand; returns the exit status (failures are reported in
    one line by the ``xenpv`` entry point)."""
    if args.action == "backend":
        return asyncio.run(_backend(args))
    if args.action == "export":
        return asyncio.run(_export(args))
    return asyncio.run(_info(args))

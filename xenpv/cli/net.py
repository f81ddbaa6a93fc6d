"""``xenpv net backend|frontend|info`` — serve vifs through a userspace switch; put a
guest's vif on a TAP device; show what a vif negotiated.

``backend --all`` (run as the backend domain: ``--as DOMID``, dom0 by default) serves
every ``backend/vif/<fe>/<devid>`` directory of that domain, including devices added
later, joining each vif to the userspace switch its ``bridge`` node names (``--switch``
if none): guests of one backend process talk to each other without the kernel.  It
prints one JSON line ``{"event": "ready"}`` once watching and runs until stdin closes or
SIGTERM, then prints ``{"event": "done", "devices": {...}, "switches": {...}}`` with every
driver's and switch port's counters.  ``--tap NAME [--netns NS]`` also joins a TAP
device (created in network namespace ``NS`` if given) to the default switch, so a kernel
stack sits behind the backend.

``frontend DEVID --tap NAME [--netns NS]``, run as the guest (under ``xenpv loopback
env`` or with ``--rundir``/``--domid``), attaches a frontend to that domain's vif
``DEVID`` and bridges it to a TAP device (in namespace ``NS`` if given), so a kernel stack
runs on our frontend, with one TAP queue per vif queue (``IFF_MULTI_QUEUE``);
``ready``/``done`` JSON lines as the backend.

``info DOMID DEVID`` reads the frontend directory of guest ``DOMID``'s vif ``DEVID`` and
its backend directory and prints, as JSON, what the two sides negotiated: states, MAC,
queues, event channels (split or not) and each feature as offered and as requested.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from xenpv import loops
from xenpv.cli import args as cliargs
from xenpv.cli.console import _stdin_closed, emit
from xenpv.cli.ends import (
    backend_parser,
    device_ends,
    domain_session,
    guest_arguments,
    print_info,
)
from xenpv.errors import LocalError, PeerError, PlatformError


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``backend`` and ``info`` subcommands."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                help="what to do (see ACTION --help)")

    be = backend_parser(sub, "vif", "serve this domain's vifs through a userspace switch")
    be.add_argument("--switch", default="xenpv0",
                    help="switch for vifs without a bridge node (default xenpv0)")
    be.add_argument("--max-queues", type=cliargs.uint(1, 64, "queues"), default=4,
                    help="most queues offered, 1..64 (default 4)")
    be.add_argument("--no-sg", action="store_true", help="do not offer feature-sg")
    be.add_argument("--no-gso", action="store_true", help="do not offer GSO (TCPv4, TCPv6)")
    be.add_argument("--no-ipv6-csum", action="store_true",
                    help="do not offer IPv6 checksum offload")
    be.add_argument("--no-split", action="store_true", help="do not offer split event channels")
    be.add_argument("--tap", help="also join this TAP device to the default switch")
    be.add_argument("--netns", help="create the TAP in this network namespace (ip netns name)")
    be.add_argument("--no-offload", action="store_true",
                    help="no checksum/TSO offload on the TAP")
    be.add_argument("--tap-queues", type=cliargs.uint(1, 16, "queues"), default=1,
                    help="TAP queues (IFF_MULTI_QUEUE when more than 1; default 1)")

    fe = sub.add_parser("frontend", help="as the guest: bridge this domain's vif to a TAP")
    fe.add_argument("devid", type=cliargs.devid, help="the vif's device id (0 for vif0)")
    fe.add_argument("--tap", required=True, help="the TAP device to create or attach to")
    fe.add_argument("--netns", help="create the TAP in this network namespace (ip netns name)")
    guest_arguments(fe)
    fe.add_argument("--max-queues", type=cliargs.uint(1, 64, "queues"), default=4,
                    help="most queues asked for (default 4)")
    fe.add_argument("--no-offload", action="store_true",
                    help="ask for no sg/GSO/checksum offload, none on the TAP either")

    info = sub.add_parser("info", help="show what a vif's two ends negotiated")
    info.add_argument("domid", type=cliargs.domid, help="the guest (frontend) domain")
    info.add_argument("devid", type=cliargs.devid, help="the vif's device id (0 for vif0)")
    info.add_argument("-s", "--socket", help="xenstore socket (default: as xenstore-utils)")


async def _backend(args: argparse.Namespace) -> int:
    from xenpv.backends.net import NetBackend, NetConfig

    config = NetConfig(sg=not args.no_sg, gso_tcpv4=not args.no_gso, gso_tcpv6=not args.no_gso,
                       ipv6_csum=not args.no_ipv6_csum, split_events=not args.no_split,
                       max_queues=args.max_queues)
    from xenpv.backends.netswitch import TapUplink
    from xenpv.drivers.tap import TapDevice

    async with domain_session(args.rundir, args.as_domid) as (platform, _domid, client):
        backend = NetBackend(platform, client, config, default_switch=args.switch)
        uplink = None
        try:
            if args.tap:
                tap = TapDevice.open(args.tap, netns=args.netns, offload=not args.no_offload,
                                     queues=args.tap_queues)
                uplink = TapUplink(backend.switch(args.switch), tap)
                uplink.start()
            await backend.start()
            emit(event="ready", domid=args.as_domid, tap=args.tap)
            await _stdin_closed(asyncio.get_running_loop())
            emit(event="done", devices={d.path: d.info() for d in backend.drivers},
                 switches={n: s.info() for n, s in backend.switches.items()},
                 tap=uplink.tap.info() if uplink else None)
        finally:
            await backend.close()
            if uplink is not None:
                await uplink.close()
    return 0


async def _frontend(args: argparse.Namespace) -> int:
    from xenpv.drivers.tap import TapDevice
    from xenpv.frontends.net import NetFrontConfig, NetFrontend, TapBridge
    from xenpv.xenbus.paths import frontend_path

    async with domain_session(args.rundir, args.domid) as (platform, domid, client):
        path = frontend_path(domid, "vif", args.devid)
        offload = not args.no_offload
        frontend = bridge = None
        try:
            if not await client.exists(path):
                raise LocalError(f"no vif {args.devid} in domain {domid} ({path})")
            config = NetFrontConfig(max_queues=args.max_queues, sg=offload,
                                    gso_tcpv4=offload, gso_tcpv6=offload, csum=offload,
                                    ipv6_csum=offload)
            frontend = NetFrontend(platform, client, path, config=config)
            await frontend.start()
            await frontend.ready(30.0)
            bridge = TapBridge(frontend, TapDevice.open(args.tap, netns=args.netns,
                                                        offload=offload,
                                                        queues=min(len(frontend.queues), 16)))
            bridge.start()
            emit(event="ready", tap=args.tap, mac=frontend.info()["mac"],
                 queues=len(frontend.queues))
            await _stdin_closed(asyncio.get_running_loop())
            emit(event="done", vif=frontend.info(), tap=bridge.tap.info())
        finally:
            if bridge is not None:
                await bridge.close()
            if frontend is not None:
                await frontend.close()
    return 0


_FEATURES = ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6",
             "feature-ipv6-csum-offload", "feature-no-csum-offload", "feature-rx-copy",
             "feature-rx-flip", "feature-split-event-channels", "feature-rx-notify",
             "request-rx-copy", "feature-multicast-control", "feature-ctrl-ring")
_FRONT_KEYS = ("state", "backend", "backend-id", "handle", "mac", "mtu",
               "multi-queue-num-queues", "tx-ring-ref", "rx-ring-ref", "event-channel",
               "event-channel-tx", "event-channel-rx", *_FEATURES)
_BACK_KEYS = ("state", "online", "frontend-id", "handle", "mac", "mtu", "bridge", "script",
              "type", "rate", "multi-queue-max-queues", *_FEATURES)


async def vif_info(client: Any, domid: int, devid: int) -> dict[str, Any]:
    """What the frontend and backend of guest ``domid``'s vif ``devid`` wrote."""
    fe, be, front, back = await device_ends(client, domid, "vif", devid, str(devid),
                                            _FRONT_KEYS, _BACK_KEYS)
    try:
        queues = int(front.get("multi-queue-num-queues", "1"))
    except ValueError:
        queues = 0
    split_key = "event-channel-tx" if queues <= 1 else "queue-0/event-channel-tx"
    split = await client.exists(f"{fe}/{split_key}")

    def on(keys: dict[str, str], name: str) -> bool:
        return keys.get(name, "0") == "1"

    features = {name: {"backend": on(back, name), "frontend": on(front, name)}
                for name in _FEATURES}
    return {"domid": domid, "devid": devid, "frontend": fe, "backend": be,
            "mac": back.get("mac") or front.get("mac"), "queues": queues,
            "split_event_channels": split, "features": features,
            "frontend_keys": front, "backend_keys": back}


async def _info(args: argparse.Namespace) -> int:
    return await print_info(args.socket, lambda client: vif_info(client, args.domid,
                                                                 args.devid))


def run(args: argparse.Namespace) -> int:
    """Run one ``net`` subcommand; returns the exit status."""
    from xenpv.xenstore.wire import WireError, XenstoreError

    try:
        # the drivers' processes spend much of each frame in the event loop's own
        # machinery (wake-ups, readers): uvloop's, in C, where installed (xenpv.loops)
        if args.action == "backend":
            return loops.run(_backend(args))
        if args.action == "frontend":
            return loops.run(_frontend(args))
        return asyncio.run(_info(args))
    except (LocalError, PeerError, PlatformError, XenstoreError, WireError, TimeoutError,
            OSError) as exc:
        print(f"xenpv net {args.action}: {exc}", file=sys.stderr)
        return 1

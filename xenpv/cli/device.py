"""``xenpv device add|remove|list|diagram`` — the toolstack's device operations as dom0.

``add`` creates a frontend/backend directory pair with libxl's permissions and keys in one
transaction (``--key K=V`` adds a frontend key, ``--backend-key K=V`` a backend key);
``remove`` runs the removal handshake (``online = 0``, ``state = 5``, wait for the backend
to reach Closed, delete both directories; ``--force`` does not wait); ``list`` prints one
line per device served by the backend domain; ``diagram`` prints a transition table as
Mermaid or Graphviz text.

The xenstore server is found like xenstore-utils find it (``$XENSTORED_PATH``, then
``$XENSTORED_RUNDIR/socket``, then ``/dev/xen/xenbus``) unless ``-s SOCKET`` names one;
``add`` and ``remove`` must run as dom0 (a guest gets a message saying so); ``list``
prints a table, or with ``--json`` one array.  Failures print one line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from xenpv.cli import args as args_
from xenpv.cli.args import CliError
from xenpv.errors import LocalError, PlatformError
from xenpv.xenbus.diagram import TABLES, render_dot, render_mermaid
from xenpv.xenbus.states import XenbusState
from xenpv.xenbus.toolstack import (
    DeviceInfo,
    add_device,
    list_devices,
    remove_device,
    vbd_keys,
    vif_keys,
)
from xenpv.xenstore.client import XenstoreClient
from xenpv.xenstore.wire import WireError, XenstoreError


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _touch(text: str) -> dict[str, str]:
    """``WxHxN`` as the vkbd backend keys a toolstack writes (libxl's names)."""
    try:
        w, h, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxHxN, got {text!r}") from None
    if not (0 < w <= 0x7FFF and 0 < h <= 0x7FFF and 0 < n <= 256):
        raise argparse.ArgumentTypeError(f"multi-touch {text} out of range")
    return {"feature-multi-touch": "1", "multi-touch-width": str(w),
            "multi-touch-height": str(h), "multi-touch-num-contacts": str(n)}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``device`` subcommands."""
    sub = parser.add_subparsers(dest="mode", required=True, metavar="ACTION",
                                help="what to do")

    def common(p: argparse.ArgumentParser, *, devid_required: bool) -> None:
        p.add_argument("type", help="device type, e.g. vbd, vif, console, vkbd")
        p.add_argument("--frontend-domid", "-f", type=args_.domid, required=True,
                       help="the guest (frontend) domain")
        p.add_argument("--backend-domid", "-b", type=args_.domid, default=0,
                       help="the backend domain (default 0)")
        p.add_argument("--devid", "-d", type=args_.devid, required=devid_required,
                       help="device id" + ("" if devid_required else
                                           " (default: the lowest free one)"))
        p.add_argument("--backend-type", help="backend directory type (default: TYPE)")
        p.add_argument("-s", "--socket", help="xenstore socket (default: as xenstore-utils)")

    add = sub.add_parser("add", help="create a device pair")
    common(add, devid_required=False)
    add.add_argument("--key", type=_pair, action="append", default=[], metavar="K=V",
                     help="frontend key (repeatable)")  # fmt: skip
    add.add_argument("--backend-key", type=_pair, action="append", default=[],
                     metavar="K=V", help="backend key (repeatable)")  # fmt: skip
    add.add_argument("--multi-touch", type=_touch, metavar="WxHxN",
                     help="vkbd: offer a multi-touch surface of W x H with N contacts")
    add.add_argument("--target", help="vbd: the image file or block device (params)")
    add.add_argument("--mode", dest="mode_rw", choices=("r", "w"), default="w",
                     help="vbd: r (read-only) or w")
    add.add_argument("--vdev", default="xvda", help="vbd: the guest's name (xvda, hdb, ...)")
    add.add_argument("--mac", help="vif: the guest's MAC (default: random, 00:16:3e:...)")
    add.add_argument("--bridge", "--switch", dest="bridge", default="xenpv0",
                     help="vif: the bridge, for xenpv's net backend the switch (default xenpv0)")
    add.add_argument("--mtu", type=args_.uint(68, 65535, "mtu"), default=1500,
                     help="vif: the MTU (default 1500)")
    add.add_argument("--rate", metavar="BYTES,USECS",
                     help="vif: credit limit, BYTES per USECS microseconds (the rate node)")

    rem = sub.add_parser("remove", help="remove a device pair")
    common(rem, devid_required=True)
    rem.add_argument("--timeout", type=args_.positive_float, default=10.0,
                     help="seconds to wait for the backend to close (default 10)")  # fmt: skip
    rem.add_argument("--force", action="store_true", help="do not wait for the backend")

    lst = sub.add_parser("list", help="list the devices of a backend domain")
    lst.add_argument("type", help="device type, e.g. vbd, vif, console, vkbd")
    lst.add_argument("--frontend-domid", "-f", type=args_.domid,
                     help="only the devices of this guest")
    lst.add_argument("--backend-domid", "-b", type=args_.domid, default=0,
                     help="the backend domain (default 0)")
    lst.add_argument("--backend-type", help="backend directory type (default: TYPE)")
    lst.add_argument("-s", "--socket", help="xenstore socket (default: as xenstore-utils)")
    lst.add_argument("--json", action="store_true", help="print one JSON array")

    dia = sub.add_parser("diagram", help="print a xenbus transition table as a diagram")
    dia.add_argument("table", nargs="?", default="backend", choices=sorted(TABLES),
                     help="which table (default: backend)")
    dia.add_argument("--format", choices=("mermaid", "dot"), default="mermaid",
                     help="Mermaid (default) or Graphviz text")


def _state(state: XenbusState | None) -> str:
    return "-" if state is None else f"{int(state)} {state.name}"


def format_table(devices: list[DeviceInfo]) -> str:
    """The ``list`` output: a header and one aligned line per device."""
    rows = [("TYPE", "DEVID", "FRONTEND", "BACKEND", "FE-STATE", "BE-STATE", "ONLINE")]
    for d in devices:
        online = "-" if d.online is None else str(int(d.online))
        rows.append(
            (d.devtype, str(d.devid), str(d.frontend_domid), str(d.backend_domid),
             _state(d.frontend_state), _state(d.backend_state), online)
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def as_json(devices: list[DeviceInfo]) -> str:
    """The ``list --json`` output: one array of objects."""
    return json.dumps([
        {"type": d.devtype, "devid": d.devid, "frontend_domid": d.frontend_domid,
         "backend_domid": d.backend_domid, "frontend_path": d.frontend_path,
         "backend_path": d.backend_path,
         "frontend_state": None if d.frontend_state is None else int(d.frontend_state),
         "backend_state": None if d.backend_state is None else int(d.backend_state),
         "online": None if d.online is None else int(d.online)}
        for d in devices
    ])  # fmt: skip


async def _check_domains(client: XenstoreClient, *domids: int) -> None:
    for domid in dict.fromkeys(domids):
        try:
            if not await client.exists(f"/local/domain/{domid}"):
                raise CliError(f"domain {domid} does not exist")
        except XenstoreError as exc:
            if exc.errno_name != "EACCES":  # not ours to read: the action itself decides
                raise


def _dom0_only(args: argparse.Namespace) -> CliError:
    me = os.environ.get("XENPV_LOOPBACK_DOMID")
    who = f"this process acts as domain {me}" if me and me != "0" else "this connection"
    return CliError(
        f"permission denied (EACCES): `device {args.mode}` is a dom0 (toolstack) action "
        f"and {who} may not write the device directories; run it as dom0 (e.g. after "
        "`eval \"$(xenpv loopback env --rundir DIR --domid 0)\"`)")


async def _free_vif(client: XenstoreClient, domid: int) -> int:
    """The lowest vif devid not used in guest ``domid`` (its ``handle`` is the devid)."""
    try:
        used = {int(n) for n in await client.directory(f"/local/domain/{domid}/device/vif")
                if n.isdigit()}
    except XenstoreError as exc:
        if exc.errno_name != "ENOENT":
            raise
        used = set()
    return min(set(range(len(used) + 1)) - used)


async def _with_client(args: argparse.Namespace) -> int:
    client = await XenstoreClient.connect(args.socket, timeout=10.0)
    try:
        if args.mode in ("add", "remove"):
            await _check_domains(client, args.frontend_domid, args.backend_domid)
        if args.mode == "add":
            devid, fkeys, bkeys = args.devid, dict(args.key), dict(args.backend_key)
            if args.multi_touch is not None:
                if args.type != "vkbd":
                    raise LocalError("--multi-touch is for vkbd devices")
                bkeys.update(args.multi_touch)
            if args.type == "vbd" and args.target is not None:
                vdevid, vfront, vback = vbd_keys(args.target, mode=args.mode_rw,
                                                 vdev=args.vdev)
                devid = vdevid if devid is None else devid
                fkeys, bkeys = {**vfront, **fkeys}, {**vback, **bkeys}
            if args.type == "vif":
                devid = await _free_vif(client, args.frontend_domid) if devid is None \
                    else devid
                vfront, vback = vif_keys(devid, mac=args.mac, bridge=args.bridge,
                                         mtu=args.mtu, rate=args.rate)
                fkeys, bkeys = {**vfront, **fkeys}, {**vback, **bkeys}
            info = await add_device(
                client, args.type, args.frontend_domid, args.backend_domid, devid,
                frontend_keys=fkeys, backend_keys=bkeys, backend_type=args.backend_type,
                frontend_readonly=("mtu",) if args.type == "vif" else (),
            )  # fmt: skip
            print(f"{info.frontend_path}\n{info.backend_path}")
        elif args.mode == "remove":
            clean = await remove_device(
                client, args.type, args.frontend_domid, args.devid, args.backend_domid,
                backend_type=args.backend_type, timeout=args.timeout, force=args.force,
            )  # fmt: skip
            if not clean and not args.force:
                print("backend did not reach Closed in time; removed by force", file=sys.stderr)
        else:
            devices = await list_devices(
                client, args.type, backend_domid=args.backend_domid,
                frontend_domid=args.frontend_domid, backend_type=args.backend_type,
            )  # fmt: skip
            print(as_json(devices) if args.json else format_table(devices))
    finally:
        await client.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one ``device`` subcommand; returns the exit status."""
    if args.mode == "diagram":
        render = render_mermaid if args.format == "mermaid" else render_dot
        sys.stdout.write(render(args.table))
        return 0
    try:
        return asyncio.run(_with_client(args))
    except XenstoreError as exc:
        if exc.errno_name == "EACCES" and args.mode in ("add", "remove"):
            raise _dom0_only(args) from None
        raise CliError(f"{exc.errno_name}: {os.strerror(exc.errno)}") from None
    except (LocalError, PlatformError, WireError, TimeoutError) as exc:
        raise CliError(str(exc) or type(exc).__name__) from None

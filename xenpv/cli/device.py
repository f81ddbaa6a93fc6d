"""``xenpv device add|remove|list|diagram`` — the toolstack's device operations as dom0.

``add`` creates a frontend/backend directory pair with libxl's permissions and keys in one
transaction (``--key K=V`` adds a frontend key, ``--backend-key K=V`` a backend key);
``remove`` runs the removal handshake (``online = 0``, ``state = 5``, wait for the backend
to reach Closed, delete both directories; ``--force`` does not wait); ``list`` prints one
line per device served by the backend domain; ``diagram`` prints a transition table as
Mermaid or Graphviz text.

The xenstore server is found like xenstore-utils find it (``$XENSTORED_PATH``, then
``$XENSTORED_RUNDIR/socket``, then ``/dev/xen/xenbus``) unless ``-s SOCKET`` names one;
the connection must be dom0's.  Failures print a message and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from xenpv.errors import LocalError, PlatformError
from xenpv.xenbus.diagram import TABLES, render_dot, render_mermaid
from xenpv.xenbus.states import XenbusState
from xenpv.xenbus.toolstack import DeviceInfo, add_device, list_devices, remove_device
from xenpv.xenstore.client import XenstoreClient
from xenpv.xenstore.wire import WireError, XenstoreError


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _domid(text: str) -> int:
    value = int(text)
    if not 0 <= value < 0x7FF0:
        raise argparse.ArgumentTypeError(f"{text} is not a domid")
    return value


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
    sub = parser.add_subparsers(dest="mode", required=True)

    def common(p: argparse.ArgumentParser, *, devid_required: bool) -> None:
        p.add_argument("type", help="device type, e.g. vbd, vif, console, vkbd")
        p.add_argument("--frontend-domid", "-f", type=_domid, required=True)
        p.add_argument("--backend-domid", "-b", type=_domid, default=0)
        p.add_argument("--devid", "-d", type=int, required=devid_required)
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

    rem = sub.add_parser("remove", help="remove a device pair")
    common(rem, devid_required=True)
    rem.add_argument("--timeout", type=float, default=10.0,
                     help="seconds to wait for the backend to close (default 10)")  # fmt: skip
    rem.add_argument("--force", action="store_true", help="do not wait for the backend")

    lst = sub.add_parser("list", help="list the devices of a backend domain")
    lst.add_argument("type")
    lst.add_argument("--frontend-domid", "-f", type=_domid)
    lst.add_argument("--backend-domid", "-b", type=_domid, default=0)
    lst.add_argument("--backend-type")
    lst.add_argument("-s", "--socket")

    dia = sub.add_parser("diagram", help="print a xenbus transition table as a diagram")
    dia.add_argument("table", nargs="?", default="backend", choices=sorted(TABLES))
    dia.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")


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


async def _with_client(args: argparse.Namespace) -> int:
    client = await XenstoreClient.connect(args.socket, timeout=10.0)
    try:
        if args.mode == "add":
            backend_keys = dict(args.backend_key)
            if args.multi_touch is not None:
                if args.type != "vkbd":
                    raise LocalError("--multi-touch is for vkbd devices")
                backend_keys.update(args.multi_touch)
            info = await add_device(
                client, args.type, args.frontend_domid, args.backend_domid, args.devid,
                frontend_keys=dict(args.key), backend_keys=backend_keys,
                backend_type=args.backend_type,
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
            print(format_table(devices))
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
    except (LocalError, XenstoreError, PlatformError, WireError, TimeoutError) as exc:
        print(f"xenpv device {args.mode}: {exc}", file=sys.stderr)
        return 1

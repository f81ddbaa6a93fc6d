"""``xenpv hid``: serve vkbd devices from input sources; watch, focus and inject.

::

    xenpv hid backend [--rundir DIR] [--as DOMID] [--control PATH] [--usb]
                      [--hotkey KEY+KEY] [--width W] [--height H] [--multi-touch WxHxN]
                      [--no-abs] [--no-raw]
    xenpv hid list    [--rundir DIR | --control PATH] [--usb]
    xenpv hid focus   DOMID [--rundir DIR | --control PATH]
    xenpv hid inject  EVENT... [--rundir DIR | --control PATH]
    xenpv hid watch   DOMID [--rundir DIR] [--devid N] [--backend-domid B] [--count N]
                      [--relative] [--raw] [--multi-touch]

``backend`` serves every ``vkbd`` device of its domain (:class:`~xenpv.backends.keyboard.
KeyboardBackend`), routes input to the guest with the focus (the hotkey, default
``RIGHTCTRL+SCROLLLOCK``, cycles it), takes every USB HID interface with ``--usb``
(pyusb over libusb), and listens on a control socket (``--control``, default
``DIR/hid.sock`` with ``--rundir``, else ``/run/xenpv/hid.sock``) for ``list``, ``focus``
and ``inject``.  Events for ``inject``: ``a`` (tap: press and release), ``+a`` / ``-a``
(press / release; names as ``KEY_*`` without the prefix, ``BTN_LEFT``, or numbers),
``rel:DX,DY[,WHEEL]``, ``abs:X,Y,XMAX,YMAX`` (put ``--`` before a list that starts with
a release: ``xenpv hid inject -- -a``).  ``watch`` is a frontend in the guest
``DOMID`` printing the events it receives, one JSON object per line, like ``evtest``.
``backend`` and ``watch`` print ``{"event": "ready", …}`` first and run until stdin is
closed or SIGTERM (``watch`` also after ``--count`` events; with ``--timing`` it prints no
events, only their receive times in its ``done`` line, for ``xenpv bench hid``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import time
from typing import Any

from xenpv.cli import args as cliargs
from xenpv.cli.console import _platform, _stdin_closed, _xenstore, emit
from xenpv.errors import LocalError, PeerError

DEFAULT_CONTROL = "/run/xenpv/hid.sock"
#: Largest control request (one JSON line).
_MAX_LINE = 1 << 16


def _mt(text: str) -> tuple[int, int, int]:
    try:
        w, h, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxHxN, got {text!r}") from None
    return w, h, n


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``hid`` actions."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                help="what to do (see ACTION --help)")

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rundir", help="loopback emulator run directory (default: environment)")
        p.add_argument("--control", help=f"control socket (default: {DEFAULT_CONTROL})")

    be = sub.add_parser("backend", help="serve vkbd devices, route input to the focused guest")
    where(be)
    be.add_argument("--as", dest="as_domid", type=cliargs.domid, default=0, help="backend domain")
    be.add_argument("--usb", action="store_true", help="use every USB HID interface")
    be.add_argument("--hotkey", default="RIGHTCTRL+SCROLLLOCK",
                    help="focus hotkey, modifiers first ('none': no hotkey)")
    be.add_argument("--width", type=cliargs.uint(1, 0x7FFF, "width"), default=800,
                    help="absolute pointer width in pixels (default 800)")
    be.add_argument("--height", type=cliargs.uint(1, 0x7FFF, "height"), default=600,
                    help="absolute pointer height in pixels (default 600)")
    be.add_argument("--multi-touch", type=_mt, metavar="WxHxN",
                    help="offer a multi-touch surface of W x H with N contacts")
    be.add_argument("--no-abs", action="store_true", help="no absolute pointer")
    be.add_argument("--no-raw", action="store_true", help="no raw pointer mode")

    ls = sub.add_parser("list", help="sources, guests and focus of a running backend")
    where(ls)
    ls.add_argument("--usb", action="store_true", help="list this host's USB HID interfaces")

    fo = sub.add_parser("focus", help="give the focus to a guest")
    where(fo)
    fo.add_argument("domid", type=cliargs.domid, help="the guest that gets the focus")

    inj = sub.add_parser("inject", help="send events to the focused guest")
    where(inj)
    inj.add_argument("events", nargs="+", metavar="EVENT",
                     help="events to send, in order (see docs/hid.md)")

    wa = sub.add_parser("watch", help="a frontend printing the events it receives")
    wa.add_argument("domid", type=cliargs.domid, help="the guest whose frontend this is")
    wa.add_argument("--rundir", help="loopback emulator run directory (default: environment)")
    wa.add_argument("--devid", type=cliargs.devid, default=0, help="vkbd device id (default 0)")
    wa.add_argument("--count", type=int, default=0, help="stop after N events (0: never)")
    wa.add_argument("--relative", action="store_true", help="do not request absolute")
    wa.add_argument("--raw", action="store_true", help="request raw pointer mode")
    wa.add_argument("--multi-touch", action="store_true", help="request multi-touch")
    wa.add_argument("--timing", action="store_true",
                    help="print no events: the receive time of each (monotonic s) at the end")


def _control_path(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    if args.rundir:
        return os.path.join(args.rundir, "hid.sock")
    return DEFAULT_CONTROL


def parse_event(text: str) -> list[Any]:
    """The source events of one ``inject`` word (see the module docstring)."""
    from xenpv.backends.hid.source import AbsInput, KeyInput, RelInput
    from xenpv.protocols.keycodes import code_by_name

    try:
        if text.startswith("rel:"):
            vals = [int(v) for v in text[4:].split(",")]
            if len(vals) not in (2, 3):
                raise ValueError(text)
            return [RelInput(*vals)]
        if text.startswith("abs:"):
            x, y, xm, ym = (int(v) for v in text[4:].split(","))
            return [AbsInput(x, y, xm, ym)]
        if text[:1] in "+-" and len(text) > 1:
            return [KeyInput(code_by_name(text[1:]), text[0] == "+")]
        code = code_by_name(text)
    except (KeyError, ValueError):
        raise LocalError(f"bad event {text!r} (a, +a, -a, rel:DX,DY[,W], abs:X,Y,XMAX,YMAX)"
                         ) from None
    return [KeyInput(code, True), KeyInput(code, False)]


def _event_from_json(item: dict[str, Any]) -> Any:
    from xenpv.backends.hid.source import AbsInput, KeyInput, RelInput, TouchInput

    kinds = {"key": KeyInput, "rel": RelInput, "abs": AbsInput, "touch": TouchInput}
    cls = kinds.get(str(item.get("kind")))
    if cls is None:
        raise LocalError(f"unknown event kind {item.get('kind')!r}")
    fields = {k: v for k, v in item.items() if k != "kind"}
    try:
        return cls(**fields)
    except TypeError as exc:
        raise LocalError(f"bad event {item!r}: {exc}") from None


def _event_to_json(ev: Any) -> dict[str, Any]:
    kind = {"KeyInput": "key", "RelInput": "rel", "AbsInput": "abs",
            "TouchInput": "touch"}[type(ev).__name__]
    return {"kind": kind, **dataclasses.asdict(ev)}


# --------------------------------------------------------------------------- backend


class _Control:
    """The control socket of a running ``hid backend`` (one JSON request per line)."""

    def __init__(self, backend: Any, api: Any) -> None:
        self.backend, self.api = backend, api

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = self.handle(json.loads(line[:_MAX_LINE]))
                except (LocalError, ValueError, TypeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        router = self.backend.router
        op = req.get("op")
        if op == "list":
            return {"ok": True, "focus": router.focused, "guests": sorted(router.targets),
                    "sources": sorted(router.sources), "stats": router.stats}
        if op == "focus":
            router.focus(int(req["domid"]))
            return {"ok": True, "focus": router.focused}
        if op == "inject":
            events = [_event_from_json(e) for e in req.get("events", [])]
            accepted = sum(1 for ev in events if self.api.put(ev))
            return {"ok": accepted == len(events), "accepted": accepted}
        raise LocalError(f"unknown op {op!r}")


async def _backend(args: argparse.Namespace) -> int:
    from xenpv.backends.hid.router import FocusRouter
    from xenpv.backends.hid.source import ProgrammaticSource
    from xenpv.backends.keyboard import KeyboardBackend, KeyboardConfig
    from xenpv.protocols.keycodes import code_by_name

    hotkey = None if args.hotkey == "none" else tuple(
        code_by_name(k) for k in args.hotkey.split("+"))
    config = KeyboardConfig(abs_pointer=not args.no_abs, raw_pointer=not args.no_raw,
                            width=args.width, height=args.height,
                            multi_touch=args.multi_touch)
    platform = _platform(args.rundir, args.as_domid)
    client = await _xenstore(args.rundir, args.as_domid)
    router = FocusRouter(hotkey=hotkey, on_focus=lambda d: emit(event="focus", domid=d))
    backend = KeyboardBackend(platform, client, config, router=router)
    api = ProgrammaticSource("api")
    usb_sources: list[Any] = []
    path = _control_path(args)
    server = None
    try:
        await backend.start()
        router.add_source(api)
        if args.usb:
            from xenpv.backends.hid.usb import UsbHidSource, find_hid_interfaces

            for hid in find_hid_interfaces():
                try:
                    src = await UsbHidSource(hid).open()
                except (LocalError, PeerError) as exc:
                    emit(event="usb-refused", name=hid.name, error=str(exc))
                    continue
                usb_sources.append(src)
                router.add_source(src)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await asyncio.start_unix_server(_Control(backend, api).serve, path)
        emit(event="ready", control=path, usb=[s.name for s in usb_sources])
        await _stdin_closed(asyncio.get_running_loop())
        emit(event="done", stats=router.stats)
    finally:
        if server is not None:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        await api.close()
        for src in usb_sources:
            await src.close()
        await backend.close()
        await client.close()
        platform.close()
    return 0


# --------------------------------------------------------------------------- clients


async def _request(args: argparse.Namespace, req: dict[str, Any]) -> dict[str, Any]:
    path = _control_path(args)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5.0)
    except (OSError, TimeoutError) as exc:
        raise LocalError(f"no hid backend at {path}: {exc}") from None
    try:
        writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10.0)
    finally:
        writer.close()
    reply: dict[str, Any] = json.loads(line) if line else {"ok": False, "error": "no reply"}
    if not reply.get("ok"):
        raise LocalError(str(reply.get("error", reply)))
    return reply


async def _client(args: argparse.Namespace) -> int:
    if args.action == "list":
        if args.usb:
            from xenpv.backends.hid.usb import find_hid_interfaces

            for hid in find_hid_interfaces():
                print(f"{hid.name}  {hid.kind}")
            return 0
        reply = await _request(args, {"op": "list"})
        print(f"focus: {reply['focus']}")
        print(f"guests: {' '.join(str(d) for d in reply['guests']) or '-'}")
        print(f"sources: {' '.join(reply['sources']) or '-'}")
        return 0
    if args.action == "focus":
        await _request(args, {"op": "focus", "domid": args.domid})
        return 0
    events = [e for word in args.events for e in parse_event(word)]
    await _request(args, {"op": "inject", "events": [_event_to_json(e) for e in events]})
    return 0


# --------------------------------------------------------------------------- watch


def _record(ev: Any) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(ev).items() if k != "type"}
    return {"type": type(ev).__name__, **fields}


async def _watch(args: argparse.Namespace) -> int:
    from xenpv.frontends.keyboard import KeyboardFrontend
    from xenpv.protocols.kbdif import XENKBD_DRIVER_NAME

    platform = _platform(args.rundir, args.domid)
    client = await _xenstore(args.rundir, args.domid)
    path = f"/local/domain/{args.domid}/device/{XENKBD_DRIVER_NAME}/{args.devid}"
    fe = KeyboardFrontend(platform, client, path, abs_pointer=not args.relative,
                          raw_pointer=args.raw, multi_touch=args.multi_touch)
    stop = _stdin_closed(asyncio.get_running_loop())
    try:
        await fe.start()
        await fe.wait_connected(30.0)
        mode = dataclasses.asdict(fe.mode) if fe.mode is not None else {}
        emit(event="ready", path=path, mode=mode)
        seen = 0
        times: list[float] = []

        async def pump() -> None:
            nonlocal seen
            async for ev in fe.events():
                seen += 1
                if args.timing:
                    times.append(time.monotonic())
                else:
                    emit(event="input", **_record(ev), pressed_keys=sorted(fe.pressed))
                if args.count and seen >= args.count:
                    return

        task = asyncio.ensure_future(pump())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if args.timing:
            emit(event="done", events=seen, stats=fe.counters(), times=times)
        else:
            emit(event="done", events=seen, stats=fe.counters())
    finally:
        await fe.close()
        await client.close()
        platform.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one ``xenpv hid`` action (failures are reported in one line by the ``xenpv``
    entry point)."""
    if args.action == "backend":
        return asyncio.run(_backend(args))
    if args.action == "watch":
        return asyncio.run(_watch(args))
    return asyncio.run(_client(args))

"""Our keyboard frontend served by QEMU's vkbd backend (Debian's qemu-system-xen 7.2).

QEMU runs as dom0's device model for the guest on the loopback emulator, through the
replacement libraries, with a QMP socket.  The toolstack creates ``vkbd`` device 0
(``backend/vkbd/<guest>/0`` with ``online=1``, ``state=1`` is what makes QEMU create it);
our frontend publishes ``page-ref`` (the page's guest frame, which QEMU maps with
``xenforeignmemory_map``), ``page-gref`` and ``event-channel``.  QMP ``input-send-event``
injects keys, buttons and pointer motion; our frontend must receive them event by event.
QEMU offers absolute positions only together with raw mode (``0..0x7fff``), relative
motion otherwise.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from qemu_support import QemuGuest, with_qemu_guest

from xenpv.frontends.keyboard import KeyboardFrontend
from xenpv.protocols import kbdif as K
from xenpv.protocols.keycodes import BTN_LEFT, NAMES
from xenpv.xenbus.states import XenbusState
from xenpv.xenbus.toolstack import add_device, remove_device

GUEST = 34
WAIT = 20.0


class Qmp:
    """A minimal QMP client (one command at a time, events skipped)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path, timeout: float) -> Qmp:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.05)
            qmp = cls(reader, writer)
            await qmp._line()  # greeting
            await qmp.execute("qmp_capabilities")
            return qmp

    async def _line(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("QMP closed")
        return dict(json.loads(line))

    async def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        while True:
            reply = await self._line()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error']}")

    async def send(self, *events: dict[str, Any]) -> None:
        await self.execute("input-send-event", events=list(events))

    def close(self) -> None:
        self.writer.close()


def key(name: str, down: bool) -> dict[str, Any]:
    return {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": name}}}


def btn(name: str, down: bool) -> dict[str, Any]:
    return {"type": "btn", "data": {"down": down, "button": name}}


def axis(kind: str, name: str, value: int) -> dict[str, Any]:
    return {"type": kind, "data": {"axis": name, "value": value}}


async def receive(fe: KeyboardFrontend, n: int) -> list[Any]:
    it = fe.events()
    out = [await asyncio.wait_for(it.__anext__(), WAIT) for _ in range(n)]
    await it.aclose()
    return out


@pytest.mark.parametrize("mode", ["raw-absolute", "relative"])
def test_our_frontend_receives_qmp_input_through_qemus_vkbd(tmp_path: Path, mode: str) -> None:
    qmp_path = tmp_path / "qmp.sock"
    absolute = mode == "raw-absolute"

    async def body(w: QemuGuest) -> None:
        frontend = None
        qmp = None
        try:
            info = await add_device(w.xs0, "vkbd", GUEST, 0, 0)
            w.start_qemu()
            frontend = KeyboardFrontend(w.guest, w.xsg, info.frontend_path,
                                        abs_pointer=absolute, raw_pointer=absolute)
            await frontend.start()
            await frontend.wait_state(XenbusState.Connected, timeout=WAIT)
            assert frontend.mode is not None
            assert frontend.mode.abs_pointer == absolute
            assert frontend.mode.raw_pointer == absolute
            qmp = await Qmp.connect(qmp_path, WAIT)
            # QEMU registers its input handlers once it sees us Connected
            async with asyncio.timeout(WAIT):
                while await w.xs0.read(f"{info.backend_path}/state") != b"4":
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            await qmp.send(key("a", True))
            await qmp.send(key("a", False))
            await qmp.send(key("shift", True), key("b", True))
            await qmp.send(key("b", False), key("shift", False))
            KEY = K.XENKBD_TYPE_KEY
            assert await receive(frontend, 6) == [
                K.Key(KEY, 1, NAMES["A"]), K.Key(KEY, 0, NAMES["A"]),
                K.Key(KEY, 1, NAMES["LEFTSHIFT"]), K.Key(KEY, 1, NAMES["B"]),
                K.Key(KEY, 0, NAMES["B"]), K.Key(KEY, 0, NAMES["LEFTSHIFT"])]
            await qmp.send(btn("left", True))
            await qmp.send(btn("left", False))
            # QEMU follows each button with the pointer state of its sync: keep the keys
            keys: list[Any] = []
            pointer: list[Any] = []
            it = frontend.events()
            async with asyncio.timeout(WAIT):
                while len(keys) < 2:
                    ev = await it.__anext__()
                    (keys if isinstance(ev, K.Key) else pointer).append(ev)
            await it.aclose()
            assert keys == [K.Key(KEY, 1, BTN_LEFT), K.Key(KEY, 0, BTN_LEFT)]
            assert all(isinstance(e, K.Position if absolute else K.Motion) for e in pointer)
            if absolute:
                await qmp.send(axis("abs", "x", 0x4000), axis("abs", "y", 0x2000))
                want: Any = K.Position(K.XENKBD_TYPE_POS, 0x4000, 0x2000, 0)
                stale: Any = K.Position(K.XENKBD_TYPE_POS, 0, 0, 0)
            else:
                await qmp.send(axis("rel", "x", 7), axis("rel", "y", -3))
                want = K.Motion(K.XENKBD_TYPE_MOTION, 7, -3, 0)
                stale = K.Motion(K.XENKBD_TYPE_MOTION, 0, 0, 0)
            # before it, only the (unchanged) pointer state of the button syncs
            it = frontend.events()
            async with asyncio.timeout(WAIT):
                while (ev := await it.__anext__()) != want:
                    assert ev == stale, ev
            await it.aclose()
            stats = frontend.counters()
            assert stats["bad_events"] == 0
            await remove_device(w.xs0, "vkbd", GUEST, 0, 0, timeout=5.0)
        finally:
            if qmp is not None:
                qmp.close()
            if frontend is not None:
                await frontend.close()

    with_qemu_guest(GUEST, tmp_path, body, qmp=qmp_path)

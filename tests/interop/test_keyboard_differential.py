"""Differential: one input script through QEMU 7.2's vkbd (QMP) and through ours (the
programmatic source) gives the same event stream at our frontend.

The guest has two vkbd devices: device 0 is served by QEMU (dom0's device model), device
1 by our backend running as a driver domain.  The script -- keys, a button, motion, a
wheel step, absolute positions in raw mode -- is fed to QEMU with QMP
``input-send-event`` and to our backend as source events; each device has our frontend.
QEMU follows each input batch with its pointer state even when nothing moved (a MOTION
of 0,0 or the unchanged POS); those no-op events are removed from both streams before
the comparison, everything else must be equal event by event.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from qemu_support import qemu_command, start_qemu
from shim_peers import LoopbackRun, run_showing_log
from test_keyboard_qemu import Qmp, axis, btn, key

from xenpv.backends.hid.source import AbsInput, KeyInput, RelInput
from xenpv.backends.keyboard import KeyboardBackendDriver, KeyboardConfig
from xenpv.frontends.keyboard import KeyboardFrontend
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.protocols import kbdif as K
from xenpv.protocols.keycodes import BTN_LEFT, NAMES
from xenpv.xenbus.states import XenbusState
from xenpv.xenbus.toolstack import add_device
from xenpv.xenstore.client import connect

GUEST, DRIVER = 35, 3
WAIT = 20.0
SENTINEL = NAMES["ESC"]

# (QMP events, our source events) per step
KEYS = [("a", "A"), ("shift", "LEFTSHIFT"), ("b", "B"), ("ret", "ENTER"), ("1", "1")]


def script(absolute: bool) -> list[tuple[list[dict[str, Any]], list[Any]]]:
    steps: list[tuple[list[dict[str, Any]], list[Any]]] = []
    for q, n in KEYS[:2]:
        steps.append(([key(q, True)], [KeyInput(NAMES[n], True)]))
    for q, n in reversed(KEYS[:2]):
        steps.append(([key(q, False)], [KeyInput(NAMES[n], False)]))
    for q, n in KEYS[2:]:
        steps.append(([key(q, True)], [KeyInput(NAMES[n], True)]))
        steps.append(([key(q, False)], [KeyInput(NAMES[n], False)]))
    if absolute:
        for x, y in ((0x1000, 0x2000), (0x7FFF, 0), (0, 0x7FFF), (0x4000, 0x4000)):
            steps.append(([axis("abs", "x", x), axis("abs", "y", y)],
                          [AbsInput(x, y, 0x7FFF, 0x7FFF)]))
    else:
        for dx, dy in ((5, 7), (-3, 0), (0, -12), (100, 100)):
            steps.append(([axis("rel", "x", dx), axis("rel", "y", dy)], [RelInput(dx, dy)]))
    steps.append(([btn("left", True)], [KeyInput(BTN_LEFT, True)]))
    steps.append(([btn("left", False)], [KeyInput(BTN_LEFT, False)]))
    steps.append(([btn("wheel-up", True), btn("wheel-up", False)], [RelInput(0, 0, -1)]))
    steps.append(([key("esc", True)], [KeyInput(SENTINEL, True)]))
    steps.append(([key("esc", False)], [KeyInput(SENTINEL, False)]))
    return steps


def meaningful(events: list[Any]) -> list[Any]:
    """Without no-op pointer events (zero motion, an unchanged position, no wheel)."""
    out: list[Any] = []
    last_pos: tuple[int, int] | None = None
    for ev in events:
        if isinstance(ev, K.Motion) and (ev.rel_x, ev.rel_y, ev.rel_z) == (0, 0, 0):
            continue
        if isinstance(ev, K.Position):
            if (ev.abs_x, ev.abs_y) == last_pos and ev.rel_z == 0:
                continue
            last_pos = (ev.abs_x, ev.abs_y)
        out.append(ev)
    return out


async def until_sentinel(fe: KeyboardFrontend) -> list[Any]:
    got: list[Any] = []
    it = fe.events()
    async with asyncio.timeout(WAIT):
        while True:
            ev = await it.__anext__()
            got.append(ev)
            if isinstance(ev, K.Key) and ev.keycode == SENTINEL and not ev.pressed:
                break
    await it.aclose()
    return got


@pytest.mark.parametrize("mode", ["raw-absolute", "relative"])
def test_same_script_same_stream_through_qemu_and_ours(tmp_path: Path, mode: str) -> None:
    absolute = mode == "raw-absolute"
    qmp_path = tmp_path / "qmp.sock"
    qemu = qemu_command(GUEST, qmp_path)
    qemu_log = tmp_path / "qemu.log"
    run = LoopbackRun({GUEST: "guest", DRIVER: "driver"})
    try:
        rundir = Path(run.rundir)

        async def body() -> None:
            guest = ClientPlatform.for_domain(rundir, GUEST)
            driver = ClientPlatform.for_domain(rundir, DRIVER)
            xs0 = await connect(str(rundir / "dom0" / "xenstore"))
            xsg = await connect(str(rundir / f"dom{GUEST}" / "xenstore"))
            xsd = await connect(str(rundir / f"dom{DRIVER}" / "xenstore"))
            fes: list[KeyboardFrontend] = []
            ours = None
            qmp = None
            try:
                await xs0.set_perms(f"/local/domain/{DRIVER}", [f"n{DRIVER}"])
                q_info = await add_device(xs0, "vkbd", GUEST, 0, 0)
                o_info = await add_device(xs0, "vkbd", GUEST, DRIVER, 1)
                start_qemu(run, qemu, qemu_log)
                ours = KeyboardBackendDriver(driver, xsd, o_info.backend_path,
                                             KeyboardConfig(abs_pointer=True, raw_pointer=True))
                await ours.start()
                for info in (q_info, o_info):
                    fe = KeyboardFrontend(guest, xsg, info.frontend_path,
                                          abs_pointer=absolute, raw_pointer=absolute)
                    await fe.start()
                    fes.append(fe)
                for fe in fes:
                    await fe.wait_state(XenbusState.Connected, timeout=WAIT)
                async with asyncio.timeout(WAIT):
                    while await xs0.read(f"{q_info.backend_path}/state") != b"4" or \
                            ours.session is None:
                        await asyncio.sleep(0.05)
                qmp = await Qmp.connect(qmp_path, WAIT)
                await asyncio.sleep(0.2)
                for qmp_events, our_events in script(absolute):
                    await qmp.send(*qmp_events)
                    for ev in our_events:
                        assert ours.send(ev)
                from_qemu = await until_sentinel(fes[0])
                from_ours = await until_sentinel(fes[1])
                assert meaningful(from_qemu) == meaningful(from_ours)
                assert meaningful(from_ours) == from_ours  # ours sends no no-op events
                assert len(from_ours) == 19  # 10 keys, 4 moves, 2 buttons, wheel, sentinel
                for fe in fes:
                    assert fe.counters()["bad_events"] == 0
            finally:
                if qmp is not None:
                    qmp.close()
                for fe in fes:
                    await fe.close()
                if ours is not None:
                    await ours.close()
                for c in (xsd, xsg, xs0):
                    await c.close()
                driver.close()
                guest.close()

        run_showing_log(body, qemu_log, "QEMU")
    finally:
        run.close()

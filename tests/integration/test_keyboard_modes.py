"""The keyboard pair on the emulator's three platform modes.

* ``inprocess``: the in-process emulator and embedded xenstored (as in
  ``test_keyboard_pair``);
* ``crossprocess``: the loopback daemon, both ends on :class:`ClientPlatform`;
* ``xen``: the loopback daemon, both ends on :class:`~xenpv.platforms.xen.XenPlatform`
  (cffi on Xen's library API, the emulator's replacement libraries underneath) -- there
  the guest has no guest frames, so the frontend publishes ``page-gref`` only.

Each mode connects a pair, sends keys, an absolute position and a touch, checks them
event by event, closes, and checks the emulator holds nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from test_keyboard_pair import WAIT, keyboard_pair, run, wait_for

from xenpv.backends.hid.source import AbsInput, InputEvent, KeyInput, TouchInput
from xenpv.backends.keyboard import KeyboardBackendDriver, KeyboardConfig
from xenpv.frontends.keyboard import KeyboardFrontend
from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.protocols import kbdif as K
from xenpv.protocols.keycodes import NAMES
from xenpv.testing.xenmode import daemon_pair
from xenpv.xenbus import XenbusState as S
from xenpv.xenbus.toolstack import add_device

GUEST = 9
CFG = KeyboardConfig(width=1000, height=500, multi_touch=(200, 100, 2))
SEND: list[InputEvent] = [
    KeyInput(NAMES["A"], True), KeyInput(NAMES["A"], False), AbsInput(1, 1, 2, 2),
    TouchInput("down", 1, x=1, y=1, x_max=2, y_max=2), TouchInput("frame", 1),
]
T = K.XENKBD_TYPE_MTOUCH
EXPECT = [
    K.Key(K.XENKBD_TYPE_KEY, 1, NAMES["A"]), K.Key(K.XENKBD_TYPE_KEY, 0, NAMES["A"]),
    K.Position(K.XENKBD_TYPE_POS, 500, 250, 0),
    K.MTouchPos(T, K.XENKBD_MT_EV_DOWN, 1, 100, 50), K.MTouch(T, K.XENKBD_MT_EV_SYN, 1),
]


async def exchange(be: KeyboardBackendDriver, fe: KeyboardFrontend) -> None:
    for ev in SEND:
        assert be.send(ev)
    it = fe.events()
    got = [await asyncio.wait_for(it.__anext__(), WAIT) for _ in EXPECT]
    await it.aclose()
    assert got == EXPECT
    assert fe.counters()["bad_events"] == 0


def test_inprocess() -> None:
    async def body() -> None:
        async with keyboard_pair(CFG, multi_touch=True) as p:
            await exchange(p.be, p.fe)

    run(body())


@pytest.fixture(params=["crossprocess", "xen"])
def mode(request: pytest.FixtureRequest) -> Iterator[tuple[DaemonMachine, str]]:
    machine = DaemonMachine(max_grants=64, max_ports=32)
    try:
        machine.create_domain(GUEST)
        yield machine, request.param
    finally:
        machine.close()


def test_daemon_modes(mode: tuple[DaemonMachine, str]) -> None:
    machine, name = mode

    async def body() -> None:
        async with daemon_pair(machine.rundir, GUEST,
                               on_xen=(0, GUEST) if name == "xen" else ()) as p:
            info = await add_device(p.xs0, "vkbd", GUEST, 0, 0)
            be = p.closing(KeyboardBackendDriver(p.dom0, p.xs0, info.backend_path, CFG))
            fe = p.closing(KeyboardFrontend(p.guest, p.xsg, info.frontend_path,
                                            multi_touch=True))
            await be.start()
            await fe.start()
            await wait_for(lambda: be.session is not None and fe.state is S.Connected,
                           "connected")
            keys = set(await p.xsg.directory(info.frontend_path))
            assert ("page-ref" in keys) == (name == "crossprocess")
            await exchange(be, fe)

    run(body())
    machine.assert_released()

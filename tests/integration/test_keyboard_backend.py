"""KeyboardBackend: every vkbd of the domain served, toolstack settings honoured, each
connected guest a router target (in process)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_keyboard_pair import WAIT, key, run, wait_for

from xenpv.backends.hid.source import KeyInput, TouchInput
from xenpv.backends.keyboard import KeyboardBackend, KeyboardConfig
from xenpv.frontends.keyboard import KeyboardFrontend
from xenpv.fuzz.xenbus_driver import BE, FE, xenstore_world
from xenpv.protocols import kbdif as K
from xenpv.protocols.keycodes import NAMES
from xenpv.xenbus import XenbusState as S
from xenpv.xenbus.toolstack import remove_device

MT_KEYS = {"feature-multi-touch": "1", "multi-touch-width": "640",
           "multi-touch-height": "480", "multi-touch-num-contacts": "3", "width": "1024",
           "unique-id": "panel"}


def test_toolstack_settings_and_routing_to_the_connected_guest() -> None:
    async def body() -> None:
        async with xenstore_world("vkbd") as w:
            backend = KeyboardBackend(w.machine.domain(BE), w.be, KeyboardConfig())
            fp, _bp = await w.add(0, backend_keys=MT_KEYS)
            fe = KeyboardFrontend(w.machine.domain(FE), w.fe, fp, multi_touch=True)
            try:
                await backend.start()
                await fe.start()
                await wait_for(lambda: FE in backend.router.targets and
                               fe.state is S.Connected, "guest routed")
                assert backend.router.focused == FE
                assert fe.mode is not None
                assert (fe.mode.multi_touch, fe.mode.width, fe.mode.unique_id) == (
                    (640, 480, 3), 1024, "panel")
                backend.router.route(KeyInput(NAMES["A"], True))
                backend.router.route(TouchInput("down", 2, x=1, y=1, x_max=1, y_max=1))
                it = fe.events()
                got = [await asyncio.wait_for(it.__anext__(), WAIT) for _ in range(2)]
                await it.aclose()
                assert got == [key(NAMES["A"], 1),
                               K.MTouchPos(K.XENKBD_TYPE_MTOUCH, K.XENKBD_MT_EV_DOWN, 2, 640,
                                           480)]
                assert await remove_device(w.dom0, "vkbd", FE, 0, BE, timeout=WAIT)
                await wait_for(lambda: FE not in backend.router.targets, "target removed")
                assert backend.router.focused is None
            finally:
                await fe.close()
                await backend.close()
                w.machine.release()
                w.machine.assert_released()

    run(body())


def test_malformed_toolstack_settings_refuse_the_device() -> None:
    async def body() -> None:
        async with xenstore_world("vkbd") as w:
            backend = KeyboardBackend(w.machine.domain(BE), w.be, KeyboardConfig(),
                                      close_timeout=0.5)  # no frontend will answer
            await w.add(0, backend_keys={"width": "wide"})
            try:
                await backend.start()
                await wait_for(lambda: bool(backend.drivers), "driver made")
                (driver,) = backend.drivers.values()
                async with asyncio.timeout(WAIT):
                    while not await w.dom0.exists(driver.error_path):
                        await asyncio.sleep(0.01)
                assert b"toolstack vkbd settings" in await w.dom0.read(driver.error_path)
                assert driver.session is None
            finally:
                await backend.close()
                w.machine.release()
                w.machine.assert_released()

    run(body())

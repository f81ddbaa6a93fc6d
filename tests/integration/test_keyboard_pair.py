"""The keyboard pair end to end: our kbdif frontend with our backend, in process.

Each test runs the embedded xenstored and the in-process loopback emulator
(:func:`xenpv.fuzz.xenbus_driver.xenstore_world`): dom0 creates ``vkbd`` devices, domain
FE runs :class:`KeyboardFrontend`, domain BE runs :class:`KeyboardBackendDriver`.  Events
are checked one by one at the frontend; afterwards the emulator holds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from xenpv.backends.hid.source import AbsInput, InputEvent, KeyInput, RelInput, TouchInput
from xenpv.backends.keyboard import KeyboardBackendDriver, KeyboardConfig
from xenpv.frontends.keyboard import KeyboardFrontend
from xenpv.fuzz.xenbus_driver import BE, FE, World, xenstore_world
from xenpv.protocols import kbdif as K
from xenpv.protocols.keycodes import BTN_LEFT, NAMES
from xenpv.xenbus import XenbusState as S

WAIT = 10.0
KEY_A = NAMES["A"]


def run(coro: Any, timeout: float = 60.0) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(main())


@dataclass
class Pair:
    world: World
    fe: KeyboardFrontend
    be: KeyboardBackendDriver
    fp: str
    bp: str

    async def send(self, *events: InputEvent) -> None:
        for ev in events:
            assert self.be.send(ev)

    async def receive(self, n: int) -> list[Any]:
        it = self.fe.events()
        out = []
        for _ in range(n):
            out.append(await asyncio.wait_for(it.__anext__(), WAIT))
        await it.aclose()
        return out

    async def nothing_more(self) -> None:
        await asyncio.sleep(0.1)
        assert not self.fe._queue, f"unexpected events {list(self.fe._queue)}"


async def wait_for(pred: Any, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not pred():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def keyboard_pair(config: KeyboardConfig | None = None, **fe_kw: Any
                        ) -> AsyncIterator[Pair]:
    async with xenstore_world("vkbd") as w:
        fp, bp = await w.add()
        be = KeyboardBackendDriver(w.machine.domain(BE), w.be, bp, config or KeyboardConfig())
        fe = KeyboardFrontend(w.machine.domain(FE), w.fe, fp, **fe_kw)
        await be.start()
        await fe.start()
        try:
            await fe.wait_connected(WAIT)
            await wait_for(lambda: be.session is not None and fe.state is S.Connected
                           and be.state is S.Connected, "both connected")
            yield Pair(w, fe, be, fp, bp)
        finally:
            await fe.close()
            await be.close()
            w.machine.release()
            w.machine.assert_released()


def key(code: int, pressed: int) -> K.Key:
    return K.Key(K.XENKBD_TYPE_KEY, pressed, code)


# --------------------------------------------------------------------- negotiation


@pytest.mark.parametrize("offer_abs,offer_raw,want_abs,want_raw", [
    (True, True, True, True), (True, True, True, False), (True, False, True, True),
    (False, True, True, True), (True, True, False, True), (False, False, False, False),
])  # fmt: skip
def test_pointer_modes_are_the_offer_intersected_with_the_requests(
        offer_abs: bool, offer_raw: bool, want_abs: bool, want_raw: bool) -> None:
    cfg = KeyboardConfig(abs_pointer=offer_abs, raw_pointer=offer_raw, width=1000, height=500)

    async def body() -> None:
        async with keyboard_pair(cfg, abs_pointer=want_abs, raw_pointer=want_raw) as p:
            abs_on = offer_abs and want_abs
            raw_on = abs_on and offer_raw and want_raw
            fkeys = set(await p.world.dom0.directory(p.fp))
            assert ("request-abs-pointer" in fkeys) == abs_on
            assert ("request-raw-pointer" in fkeys) == raw_on
            assert {"page-gref", "page-ref", "event-channel"} <= fkeys
            assert p.be.mode is not None and p.fe.mode is not None
            assert (p.be.mode.abs_pointer, p.be.mode.raw_pointer) == (abs_on, raw_on)
            assert (p.fe.mode.abs_pointer, p.fe.mode.raw_pointer) == (abs_on, raw_on)
            await p.send(AbsInput(250, 100, 1000, 1000), RelInput(3, -4, 1))
            got = await p.receive(2)
            if raw_on:
                assert got == [K.Position(K.XENKBD_TYPE_POS, 8192, 3277, 0),
                               K.Position(K.XENKBD_TYPE_POS, 8195, 3273, 1)]
            elif abs_on:
                assert got == [K.Position(K.XENKBD_TYPE_POS, 250, 50, 0),
                               K.Position(K.XENKBD_TYPE_POS, 253, 46, 1)]
            else:  # absolute input becomes relative motion from the tracked position
                assert got == [K.Motion(K.XENKBD_TYPE_MOTION, 250, 50, 0),
                               K.Motion(K.XENKBD_TYPE_MOTION, 3, -4, 1)]
            await p.nothing_more()

    run(body())


def test_backend_publishes_every_feature_key() -> None:
    cfg = KeyboardConfig(multi_touch=(1920, 1080, 10), width=1024, height=768,
                         unique_id="kbd-1", disable_keyboard=False, disable_pointer=False)

    async def body() -> None:
        async with keyboard_pair(cfg) as p:
            d = p.world.dom0
            got = {k: await d.read(f"{p.bp}/{k}") for k in (
                "feature-abs-pointer", "feature-raw-pointer", "feature-multi-touch",
                "feature-disable-keyboard", "feature-disable-pointer", "width", "height",
                "unique-id", "multi-touch-width", "multi-touch-height",
                "multi-touch-num-contacts")}
            assert got == {"feature-abs-pointer": b"1", "feature-raw-pointer": b"1",
                           "feature-multi-touch": b"1", "feature-disable-keyboard": b"0",
                           "feature-disable-pointer": b"0", "width": b"1024",
                           "height": b"768", "unique-id": b"kbd-1",
                           "multi-touch-width": b"1920", "multi-touch-height": b"1080",
                           "multi-touch-num-contacts": b"10"}
            assert p.fe.mode is not None and p.fe.mode.unique_id == "kbd-1"
            # the frontend publishes the page both ways: a frame and a grant of it
            fp = p.fp
            gref = int(await d.read(f"{fp}/page-gref"))
            gfn = int(await d.read(f"{fp}/page-ref"))
            assert gfn >= 0x10000 and gref != gfn

    run(body())


# --------------------------------------------------------------------- events


def test_keys_and_buttons_arrive_in_order_with_the_pressed_set() -> None:
    async def body() -> None:
        async with keyboard_pair() as p:
            shift = NAMES["LEFTSHIFT"]
            await p.send(KeyInput(shift, True), KeyInput(KEY_A, True))
            got = await p.receive(2)
            assert got == [key(shift, 1), key(KEY_A, 1)]
            assert p.fe.pressed == {shift, KEY_A}
            await p.send(KeyInput(KEY_A, False), KeyInput(shift, False),
                         KeyInput(BTN_LEFT, True), KeyInput(BTN_LEFT, False))
            assert await p.receive(4) == [key(KEY_A, 0), key(shift, 0), key(BTN_LEFT, 1),
                                          key(BTN_LEFT, 0)]
            assert p.fe.pressed == set()
            await p.nothing_more()

    run(body())


def test_multi_touch_steps_scaled_to_the_surface() -> None:
    cfg = KeyboardConfig(multi_touch=(2000, 1000, 4))

    async def body() -> None:
        async with keyboard_pair(cfg, multi_touch=True) as p:
            assert p.fe.mode is not None and p.fe.mode.multi_touch == (2000, 1000, 4)
            rng = {"x_max": 100, "y_max": 100}
            await p.send(TouchInput("down", 1, x=10, y=20, **rng),
                         TouchInput("shape", 1, major=5, minor=3, **rng),
                         TouchInput("orient", 1, orientation=-90),
                         TouchInput("frame", 1),
                         TouchInput("move", 1, x=50, y=50, **rng),
                         TouchInput("frame", 1),
                         TouchInput("up", 1), TouchInput("frame", 1))
            T = K.XENKBD_TYPE_MTOUCH
            assert await p.receive(8) == [
                K.MTouchPos(T, K.XENKBD_MT_EV_DOWN, 1, 200, 200),
                K.MTouchShape(T, K.XENKBD_MT_EV_SHAPE, 1, 100, 30),
                K.MTouchOrient(T, K.XENKBD_MT_EV_ORIENT, 1, -90),
                K.MTouch(T, K.XENKBD_MT_EV_SYN, 1),
                K.MTouchPos(T, K.XENKBD_MT_EV_MOTION, 1, 1000, 500),
                K.MTouch(T, K.XENKBD_MT_EV_SYN, 1),
                K.MTouch(T, K.XENKBD_MT_EV_UP, 1),
                K.MTouch(T, K.XENKBD_MT_EV_SYN, 1),
            ]
            assert p.fe.contacts == {}
            # a contact beyond the advertised count is not produced
            await p.send(TouchInput("down", 4, x=1, y=1, **rng))
            await p.nothing_more()
            assert p.be.session is not None
            assert p.be.session.counters()["unsupported"] == 1

    run(body())


def test_multi_touch_not_requested_sends_no_touch_events() -> None:
    cfg = KeyboardConfig(multi_touch=(2000, 1000, 4))

    async def body() -> None:
        async with keyboard_pair(cfg, multi_touch=False) as p:
            fkeys = await p.world.dom0.directory(p.fp)
            assert "request-multi-touch" not in fkeys
            await p.send(TouchInput("down", 0, x=1, y=1, x_max=2, y_max=2), KeyInput(KEY_A, True))
            assert await p.receive(1) == [key(KEY_A, 1)]
            await p.nothing_more()

    run(body())


@pytest.mark.parametrize("disabled", ["keyboard", "pointer"])
def test_a_disabled_device_gets_none_of_its_events(disabled: str) -> None:
    cfg = KeyboardConfig(disable_keyboard=disabled == "keyboard",
                         disable_pointer=disabled == "pointer")

    async def body() -> None:
        async with keyboard_pair(cfg) as p:
            await p.send(KeyInput(KEY_A, True), KeyInput(BTN_LEFT, True), RelInput(1, 1))
            if disabled == "keyboard":
                assert await p.receive(2) == [key(BTN_LEFT, 1),
                                              K.Position(K.XENKBD_TYPE_POS, 1, 1, 0)]
            else:
                assert await p.receive(1) == [key(KEY_A, 1)]
            await p.nothing_more()

    run(body())


# --------------------------------------------------------------------- overflow rule


def test_overflow_coalesces_motion_and_never_loses_a_release() -> None:
    """The guest stops reading: motion coalesces, presses beyond the backlog are dropped
    and counted, but every key the guest sees pressed is released in the end."""
    cfg = KeyboardConfig(abs_pointer=False, backlog=8)

    async def body() -> None:
        async with keyboard_pair(cfg, queue=1) as p:
            for _ in range(200):
                await p.send(RelInput(1, 2))
            for code in range(2, 60):
                await p.send(KeyInput(code, True))
            for code in range(2, 60):
                await p.send(KeyInput(code, False))
            await p.send(RelInput(5, 5))
            session = p.be.session
            assert session is not None
            stats = session.counters()
            assert stats["coalesced"] > 0 and stats["dropped"] > 0
            assert len(session.producer.backlog) <= cfg.backlog + 58
            pressed_seen: set[int] = set()
            motion = [0, 0]
            it = p.fe.events()
            async with asyncio.timeout(WAIT):
                while session.producer.backlog or session.ring.available():
                    ev = await it.__anext__()
                    if isinstance(ev, K.Key):
                        (pressed_seen.add if ev.pressed else pressed_seen.discard)(ev.keycode)
                    else:
                        motion[0] += ev.rel_x
                        motion[1] += ev.rel_y
            while p.fe._queue:
                ev = await it.__anext__()
                if isinstance(ev, K.Key):
                    (pressed_seen.add if ev.pressed else pressed_seen.discard)(ev.keycode)
            await it.aclose()
            assert pressed_seen == set() and p.fe.pressed == set()  # no key stays stuck
            assert motion[0] > 0
            # every event is accounted for: written, coalesced, dropped, or cancelled in pairs
            stats = session.counters()
            assert stats["written"] + stats["dropped"] + stats["coalesced"] + \
                2 * stats["cancelled"] == 200 + 2 * 58 + 1

    run(body())


# --------------------------------------------------------------------- lifecycle


def test_reconnect_after_frontend_close_leaks_nothing() -> None:
    async def body() -> None:
        async with keyboard_pair() as p:
            await p.send(KeyInput(KEY_A, True))
            assert await p.receive(1) == [key(KEY_A, 1)]
            old_fe, old_be = p.fe.consumer, p.be.session
            await p.fe.reconnect()
            await wait_for(lambda: p.be.session not in (None, old_be)
                           and p.fe.consumer not in (None, old_fe)
                           and p.fe._connected.is_set(), "reconnected")
            await p.send(KeyInput(KEY_A, False))
            assert await p.receive(1) == [key(KEY_A, 0)]
            assert p.fe.pressed == set()
            held = p.world.machine.outstanding()
            assert held["mappings"] == 1 and held["ports"] == 2

    run(body())

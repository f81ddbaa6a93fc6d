"""Focus routing: typing through many random focus switches.

Checked for every run: no event reaches a background guest except the releases sent at
the switch (each for a key that guest had pressed), no key stays pressed anywhere at the
end, and the hotkey is never delivered.  The last test runs the whole chain -- a USB
keyboard (emulated), the router, three keyboard backends and their frontends -- and
compares each frontend's stream event by event with what the router sent its backend.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_keyboard_pair import WAIT, run, wait_for

from xenpv.backends.hid.router import DEFAULT_HOTKEY, FocusRouter
from xenpv.backends.hid.source import (
    InputEvent,
    KeyInput,
    ProgrammaticSource,
    RelInput,
    TouchInput,
)
from xenpv.backends.hid.usb import UsbHidSource, find_hid_interfaces
from xenpv.backends.keyboard import KeyboardBackendDriver, KeyboardConfig
from xenpv.frontends.keyboard import KeyboardFrontend
from xenpv.fuzz.xenbus_driver import BE, FE, xenstore_world
from xenpv.protocols import kbdif as K
from xenpv.protocols.keycodes import NAMES
from xenpv.testing.usbhid import EmulatedUsbBackend, boot_keyboard
from xenpv.xenbus import XenbusState as S

HOT_MOD, HOT_TRIGGER = DEFAULT_HOTKEY


class Recorder:
    """A target that records (had the focus?, event) for each delivery."""

    def __init__(self, router: FocusRouter, domid: int, inner: Any = None) -> None:
        self.router, self.domid, self.inner = router, domid, inner
        self.log: list[tuple[bool, InputEvent]] = []

    def send(self, ev: InputEvent) -> bool:
        self.log.append((self.router.focused == self.domid, ev))
        return self.inner.send(ev) if self.inner is not None else True

    def held(self) -> set[int]:
        pressed: set[int] = set()
        for _, ev in self.log:
            if isinstance(ev, KeyInput):
                (pressed.add if ev.pressed else pressed.discard)(ev.code)
            elif isinstance(ev, TouchInput) and ev.kind in ("down", "up"):
                (pressed.add if ev.kind == "down" else pressed.discard)(-1 - ev.contact)
        return pressed


def watch_switches(router: FocusRouter, recs: dict[int, Recorder]) -> list[int]:
    """After every switch, every guest without the focus has nothing pressed."""
    switches: list[int] = []

    def on_focus(domid: int | None) -> None:
        switches.append(-1 if domid is None else domid)
        for d, rec in recs.items():
            if d != domid:
                assert rec.held() == set(), f"domain {d} lost the focus with {rec.held()} down"

    router.on_focus = on_focus
    return switches


def check_guarantees(rec: Recorder) -> None:
    pressed: set[int] = set()
    contacts: set[int] = set()
    for focused, ev in rec.log:
        if isinstance(ev, KeyInput):
            assert ev.code != HOT_TRIGGER, "the hotkey was delivered"
            if not focused:
                assert not ev.pressed and ev.code in pressed, f"{ev} reached a background guest"
            if ev.pressed:
                pressed.add(ev.code)
            else:
                assert ev.code in pressed, f"release of {ev.code} never pressed here"
                pressed.discard(ev.code)
        elif isinstance(ev, TouchInput):
            if not focused:
                assert ev.kind in ("up", "frame"), f"{ev} reached a background guest"
            if ev.kind == "down":
                contacts.add(ev.contact)
            elif ev.kind == "up":
                contacts.discard(ev.contact)
        else:
            assert focused, f"{ev} reached a background guest"
    assert pressed == set(), f"domain {rec.domid}: keys stuck {pressed}"
    assert contacts == set(), f"domain {rec.domid}: contacts stuck {contacts}"


def typing_script(rng: random.Random, n: int) -> list[Any]:
    """Random typing: presses and releases (several keys held at times), motion, touch,
    the hotkey chord, and API switches ("focus", domid)."""
    keys = [NAMES[k] for k in ("A", "S", "D", "F", "LEFTSHIFT", "SPACE", "ENTER")] + [0x110]
    held: set[int] = set()
    touching = False
    out: list[Any] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            code = rng.choice(keys)
            out.append(KeyInput(code, code not in held))
            (held.discard if code in held else held.add)(code)
        elif r < 0.55:
            out.append(RelInput(rng.randint(-5, 5), rng.randint(-5, 5)))
        elif r < 0.62:
            kind = "up" if touching else "down"
            touching = not touching
            out += [TouchInput(kind, 0, x=1, y=1, x_max=2, y_max=2), TouchInput("frame", 0)]
        elif r < 0.75:
            out += [KeyInput(HOT_MOD, True), KeyInput(HOT_TRIGGER, True),
                    KeyInput(HOT_TRIGGER, False), KeyInput(HOT_MOD, False)]
            held.discard(HOT_MOD)
        elif r < 0.85:
            out.append(("focus", rng.choice([1, 2, 3])))
        else:
            out.append(("sleep", rng.random() * 0.002))
    out += [KeyInput(code, False) for code in sorted(held)]
    return out


def test_random_switches_while_typing_in_memory() -> None:
    async def body() -> None:
        for seed in range(40):
            rng = random.Random(seed)
            router = FocusRouter()
            recs = {d: Recorder(router, d) for d in (1, 2, 3)}
            for d, r in recs.items():
                router.add_target(d, r)
            switches = watch_switches(router, recs)
            src = ProgrammaticSource(limit=100_000)
            router.add_source(src)
            for step in typing_script(rng, 400):
                if isinstance(step, tuple) and step[0] == "focus":
                    await asyncio.sleep(0)  # a switch at a random point of the stream
                    router.focus(step[1])
                elif isinstance(step, tuple):
                    await asyncio.sleep(step[1])
                else:
                    assert src.put(step)
            await src.close()
            await wait_for(lambda r=router: not r.sources, "source drained")
            for r in recs.values():
                check_guarantees(r)  # before close(): nothing may be left to release
            await router.close()
            assert router.stats["hotkeys"] > 0 and len(switches) > 1

    run(body())


def test_unplugged_source_releases_its_keys() -> None:
    async def body() -> None:
        router = FocusRouter()
        rec = Recorder(router, 1)
        router.add_target(1, rec)
        src = ProgrammaticSource()
        router.add_source(src)
        src.press(NAMES["A"])
        await src.close()  # the device goes away with A down
        await wait_for(lambda: not router.sources, "source ended")
        assert [ev for _, ev in rec.log] == [KeyInput(NAMES["A"], True),
                                             KeyInput(NAMES["A"], False)]

    run(body())


def test_removing_the_focused_target_moves_the_focus_and_releases() -> None:
    router = FocusRouter(hotkey=None)
    a, b = Recorder(router, 1), Recorder(router, 2)
    router.add_target(1, a)
    router.add_target(2, b)
    router.route(KeyInput(NAMES["A"], True))
    router.remove_target(1)
    assert router.focused == 2
    assert [ev for _, ev in a.log] == [KeyInput(NAMES["A"], True), KeyInput(NAMES["A"], False)]
    router.route(KeyInput(NAMES["A"], False))  # its release: nobody has A pressed now
    assert b.log == [] and router.stats["orphan_releases"] == 1


def test_a_single_key_hotkey_is_swallowed() -> None:
    scroll = NAMES["SCROLLLOCK"]
    router = FocusRouter(hotkey=(scroll,))
    a, b = Recorder(router, 1), Recorder(router, 2)
    router.add_target(1, a)
    router.add_target(2, b)
    for ev in (KeyInput(scroll, True), KeyInput(scroll, False), KeyInput(30, True)):
        router.route(ev)
    assert a.log == [] and [ev for _, ev in b.log] == [KeyInput(30, True)]


def test_usb_keyboard_through_router_to_three_guests() -> None:
    """The whole chain: emulated USB keyboard → router → 3 backends → 3 frontends."""

    async def body() -> None:
        async with xenstore_world("vkbd") as w:
            router = FocusRouter()
            pairs = []
            for devid in (1, 2, 3):
                fp, bp = await w.add(devid)
                be = KeyboardBackendDriver(w.machine.domain(BE), w.be, bp,
                                           KeyboardConfig(backlog=4096))
                fe = KeyboardFrontend(w.machine.domain(FE), w.fe, fp, queue=100_000)
                await be.start()
                await fe.start()
                pairs.append((devid, be, fe))
            kbd = boot_keyboard()
            usb_backend = EmulatedUsbBackend([kbd])
            (hid,) = find_hid_interfaces(usb_backend)
            source = await UsbHidSource(hid, read_timeout_ms=20).open()
            try:
                for _devid, be, fe in pairs:
                    await wait_for(lambda be=be, fe=fe: be.state is S.Connected and
                                   fe.state is S.Connected, "connected")
                recs = {devid: Recorder(router, devid, be) for devid, be, _ in pairs}
                for devid, rec in recs.items():
                    router.add_target(devid, rec)
                switches = watch_switches(router, recs)
                router.add_source(source)
                rng = random.Random(7)
                usages = [0x04, 0x16, 0x07, 0x09, 0x2C]  # a s d f space
                held: list[int] = []
                for _ in range(150):
                    r = rng.random()
                    if r < 0.12:  # hotkey: right ctrl + scroll lock, then let go
                        kbd.send(bytes([0x10, 0, 0x47, 0, 0, 0, 0, 0]), bytes(8))
                        held = []
                        continue
                    if r < 0.2:
                        await asyncio.sleep(0.002)
                        router.focus(rng.choice([1, 2, 3]))
                        continue
                    if held and rng.random() < 0.5:
                        held.pop(rng.randrange(len(held)))
                    elif len(held) < 3:
                        u = rng.choice(usages)
                        if u not in held:
                            held.append(u)
                    kbd.send(bytes([0, 0, *held, *[0] * (6 - len(held))]))
                    await asyncio.sleep(rng.random() * 0.001)
                kbd.send(bytes(8))
                kbd.unplug(mid_transfer=True)
                await wait_for(lambda: not router.sources, "usb source ended")
                for rec in recs.values():
                    check_guarantees(rec)
                await router.close()
                assert len(switches) > 5
                # each frontend got exactly what the router sent its backend
                for devid, _be, fe in pairs:
                    sent = [K.Key(K.XENKBD_TYPE_KEY, int(ev.pressed), ev.code)
                            for _, ev in recs[devid].log if isinstance(ev, KeyInput)]
                    got: list[Any] = []
                    it = fe.events()
                    async with asyncio.timeout(WAIT):
                        while len(got) < len(sent):
                            got.append(await it.__anext__())
                    await it.aclose()
                    assert got == sent
                    assert fe.pressed == set()
                assert router.stats["hotkeys"] > 0
            finally:
                await source.close()
                for _devid, be, fe in pairs:
                    await fe.close()
                    await be.close()
                w.machine.release()
                w.machine.assert_released()

    run(body())

"""Hostile peers of the keyboard pair (hostile-inputs.md scenarios 16, 18 and 28).

The hostile backend is our backend whose session writes raw bytes into the event ring
(and raw indexes into the page); the hostile frontend is domain FE's own xenstore client
writing its connect-time keys by hand.  Every test ends with the emulator holding
nothing.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_keyboard_pair import KEY_A, WAIT, key, keyboard_pair, run, wait_for

from xenpv.backends.keyboard import KeyboardBackendDriver, KeyboardConfig
from xenpv.fuzz.xenbus_driver import BE, FE, xenstore_world
from xenpv.protocols import kbdif as K
from xenpv.xenbus import XenbusState as S

T = K.XENKBD_TYPE_MTOUCH


def raw_write(p: Any, *events: bytes) -> None:
    session = p.be.session
    assert session is not None
    assert session.ring.write(b"".join(events)) == len(events)
    session._notify()


BAD_EVENTS = {
    "position beyond width": K.Position(K.XENKBD_TYPE_POS, 801, 5, 0).pack(),
    "negative position": K.Position(K.XENKBD_TYPE_POS, -1, 5, 0).pack(),
    "keycode beyond KEY_MAX": K.Key(K.XENKBD_TYPE_KEY, 1, 0x300).pack(),
    "keycode 0": K.Key(K.XENKBD_TYPE_KEY, 1, 0).pack(),
    "keycode 2^32-1": K.Key(K.XENKBD_TYPE_KEY, 1, 0xFFFFFFFF).pack(),
    "pressed 2": K.Key(K.XENKBD_TYPE_KEY, 2, KEY_A).pack(),
    "multi-touch not negotiated": K.MTouchPos(T, K.XENKBD_MT_EV_DOWN, 0, 1, 1).pack(),
}


@pytest.mark.parametrize("name", sorted(BAD_EVENTS))
def test_scenario_28_bad_event_dropped_and_counted_stream_goes_on(name: str) -> None:
    async def body() -> None:
        async with keyboard_pair() as p:
            raw_write(p, BAD_EVENTS[name], key(KEY_A, 1).pack())
            assert await p.receive(1) == [key(KEY_A, 1)]
            stats = p.fe.counters()
            assert stats["bad_events"] == 1 and stats["delivered"] == 1
            assert p.fe.pressed == {KEY_A}
            assert p.fe.state is S.Connected and not p.fe.misbehaving

    run(body())


MT_BAD = {
    "contact id beyond num-contacts": K.MTouchPos(T, K.XENKBD_MT_EV_DOWN, 4, 1, 1).pack(),
    "touch beyond the surface": K.MTouchPos(T, K.XENKBD_MT_EV_MOTION, 0, 2001, 1).pack(),
    "unknown sub-type": K.MTouch(T, 9, 0).pack(),
    "orientation 181": K.MTouchOrient(T, K.XENKBD_MT_EV_ORIENT, 0, 181).pack(),
    "position in relative mode": K.Position(K.XENKBD_TYPE_POS, 1, 1, 0).pack(),
}


@pytest.mark.parametrize("name", sorted(MT_BAD))
def test_scenario_28_bad_touch_event_dropped(name: str) -> None:
    cfg = KeyboardConfig(multi_touch=(2000, 1000, 4))

    async def body() -> None:
        async with keyboard_pair(cfg, multi_touch=True, abs_pointer=False) as p:
            good = K.MTouchPos(T, K.XENKBD_MT_EV_DOWN, 3, 2000, 1000)
            raw_write(p, MT_BAD[name], good.pack())
            assert await p.receive(1) == [good]
            assert p.fe.counters()["bad_events"] == 1

    run(body())


def test_scenario_28_unknown_event_types_are_skipped() -> None:
    async def body() -> None:
        async with keyboard_pair() as p:
            unknown = bytes([K.XENKBD_TYPE_RESERVED]) + b"\xff" * 39
            raw_write(p, unknown, bytes([200]) + bytes(39), key(KEY_A, 1).pack())
            assert await p.receive(1) == [key(KEY_A, 1)]
            stats = p.fe.counters()
            assert stats["unknown"] == 2 and stats["bad_events"] == 0

    run(body())


@pytest.mark.parametrize("ahead", [K.XENKBD_IN_RING_LEN + 1, 1 << 31, 0xFFFFFFFF])
def test_scenario_28_in_prod_beyond_the_ring_fails_closed(ahead: int) -> None:
    async def body() -> None:
        async with keyboard_pair() as p:
            session = p.be.session
            assert session is not None
            cons = struct.unpack_from("<I", session.page, 0)[0]
            struct.pack_into("<I", session.page, 4, (cons + ahead) & 0xFFFFFFFF)
            session._notify()
            await wait_for(lambda: p.fe.consumer is not None and
                           p.fe.consumer.broken is not None, "ring broken")
            await wait_for(lambda: p.fe.misbehaving, "peer marked")
            assert p.fe.counters()["delivered"] == 0
            err = await p.world.dom0.read(p.fe.error_path)
            assert b"ring" in err or b"prod" in err
            await wait_for(lambda: p.fe.state in (S.Closing, S.Closed), "frontend closing")

    run(body())


def test_scenario_16_event_flood_is_rate_limited_and_the_guest_stays_responsive() -> None:
    async def body() -> None:
        async with keyboard_pair() as p:
            session = p.be.session
            assert session is not None
            for _ in range(20_000):
                session.events.notify(session.port)
                if _ % 1000 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            raw_write(p, key(KEY_A, 1).pack())
            assert await p.receive(1) == [key(KEY_A, 1)]
            stats = p.fe.counters()
            assert stats["spurious"] > 0
            assert stats["events"] < 20_000  # coalesced by the emulator and the budget

    run(body())


def test_scenario_16_rate_limit_masks_the_port() -> None:
    async def body() -> None:
        async with keyboard_pair() as p:
            consumer = p.fe.consumer
            assert consumer is not None
            consumer.limiter.allowance = 5
            session = p.be.session
            assert session is not None
            for _ in range(200):
                session.events.notify(session.port)
                await asyncio.sleep(0)
            await wait_for(lambda: consumer.stats["rate_limited"] > 0, "rate limited")
            raw_write(p, key(KEY_A, 1).pack())
            assert await p.receive(1) == [key(KEY_A, 1)]

    run(body())


def test_hostile_frontend_in_cons_insane_backend_bounded() -> None:
    cfg = KeyboardConfig(backlog=16)

    async def body() -> None:
        async with keyboard_pair(cfg, queue=1) as p:
            session = p.be.session
            assert session is not None
            prod = struct.unpack_from("<I", session.page, 4)[0]
            struct.pack_into("<I", session.page, 0, (prod + 1000) & 0xFFFFFFFF)
            for i in range(500):
                session.send_records([key(2 + i % 50, 1)])
            stats = session.counters()
            assert stats["insane"] > 0
            assert len(session.producer.backlog) <= cfg.backlog
            assert stats["dropped"] > 0

    run(body())


# --------------------------------------------------------------------- scenario 18

BAD_KEYS = [
    ("page-gref", b"abc"), ("page-gref", b"-1"), ("page-gref", str(2**40).encode()),
    ("page-gref", b"4000"), ("event-channel", b"abc"), ("event-channel", b"99999"),
    ("event-channel", b"31"), ("request-abs-pointer", b"yes"),
    ("request-multi-touch", b"2"),
]


@pytest.mark.parametrize("name,value", BAD_KEYS)
def test_scenario_18_bad_frontend_keys_refused_with_an_error_node(name: str,
                                                                  value: bytes) -> None:
    async def body() -> None:
        async with xenstore_world("vkbd") as w:
            fp, bp = await w.add()
            bplat, gplat = w.machine.domain(BE), w.machine.domain(FE)
            be = KeyboardBackendDriver(bplat, w.be, bp, KeyboardConfig(),
                                       close_timeout=0.5)
            await be.start()
            try:
                await wait_for_state(w, bp, S.InitWait)
                page = gplat.grants.grant(BE, 1)
                port = gplat.events.alloc_unbound(BE)
                keys = {"page-gref": str(page.refs[0]).encode(),
                        "event-channel": str(port).encode(), name: value}
                for k, v in keys.items():
                    await w.fe.write(f"{fp}/{k}", v)
                await w.fe.write(f"{fp}/state", b"3")
                async with asyncio.timeout(WAIT):
                    while not be.misbehaving:
                        await asyncio.sleep(0.01)
                err = await w.dom0.read(be.error_path)
                assert err
                assert be.session is None
                await w.fe.write(f"{fp}/state", b"6")
                async with asyncio.timeout(WAIT):
                    while be.state not in (S.Closed, S.InitWait):
                        await asyncio.sleep(0.01)
                gplat.events.unbind(port)
                gplat.grants.end_access(page)
            finally:
                await be.close()
                w.machine.release()
                w.machine.assert_released()

    run(body())


async def wait_for_state(w: Any, path: str, state: S) -> None:
    async with asyncio.timeout(WAIT):
        while await w.dom0.read(f"{path}/state") != str(int(state)).encode():
            await asyncio.sleep(0.01)

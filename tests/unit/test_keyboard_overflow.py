"""The backend's overflow rule (EventProducer) and translation (EventTranslator) on a
plain page: the producer never laps the consumer, motion coalesces, presses are dropped
and counted, releases and contact ups are never lost."""

from __future__ import annotations

import struct

from xenpv.backends.hid.source import AbsInput, KeyInput, RelInput, TouchInput
from xenpv.backends.keyboard import EventProducer, EventTranslator, KeyboardMode
from xenpv.drivers.kbdring import kbd_in_ring
from xenpv.protocols import kbdif as K

KEY, MT = K.XENKBD_TYPE_KEY, K.XENKBD_TYPE_MTOUCH


class Page:
    """A kbdif page with both ends: the producer under test and a consumer we drive."""

    def __init__(self, backlog: int) -> None:
        self.mem = bytearray(4096)
        self.notes = 0
        self.producer = EventProducer(kbd_in_ring(self.mem, on_insane="zero"), self.note,
                                      backlog)
        self.consumer = kbd_in_ring(self.mem, on_insane="error")

    def note(self) -> None:
        self.notes += 1

    def drain(self) -> list[K.InEvent]:
        out = []
        while True:
            raw = self.consumer.read(1)
            if not raw:
                self.producer.flush()  # the frontend notified: room again
                if not self.consumer.available():
                    return out
                continue
            out.append(K.parse_in_event(raw))


def key(code: int, pressed: int) -> K.Key:
    return K.Key(KEY, pressed, code)


def motion(x: int, y: int) -> K.Motion:
    return K.Motion(K.XENKBD_TYPE_MOTION, x, y, 0)


def test_the_ring_takes_51_then_motion_coalesces() -> None:
    p = Page(backlog=8)
    p.producer.put([motion(1, 1)] * 50)
    assert p.producer.stats["coalesced"] == 0  # room for all: nothing is merged
    p.producer.put([motion(1, 1)] * 10)  # 1 fits, 9 would wait: merged into the last
    assert p.consumer.available() == 51 and not p.producer.backlog
    assert p.producer.stats["coalesced"] == 9
    p.producer.put([motion(1, 1)] * 5)  # the ring is full: they wait as one
    assert list(p.producer.backlog) == [motion(5, 5)]
    got = p.drain()
    assert got == [motion(1, 1)] * 50 + [motion(10, 10), motion(5, 5)]


def test_a_full_backlog_drops_presses_but_keeps_releases() -> None:
    p = Page(backlog=4)
    p.producer.put([motion(0, 0)] * 51)  # the ring is full, the guest is not reading
    p.producer.put([key(c, 1) for c in range(2, 8)])  # 4 wait, 2 dropped
    assert p.producer.stats["dropped"] == 2
    # releases: a waiting press is cancelled with its release; a dropped press's release
    # evicts the oldest droppable waiting event
    p.producer.put([key(c, 0) for c in range(2, 8)])
    got = [e for e in p.drain() if isinstance(e, K.Key)]
    pressed: set[int] = set()
    for e in got:
        (pressed.add if e.pressed else pressed.discard)(e.keycode)
    assert pressed == set()
    s = p.producer.stats
    assert s["cancelled"] >= 1
    assert s["written"] + s["dropped"] + s["coalesced"] + 2 * s["cancelled"] == 51 + 12


def test_a_contact_up_is_never_lost() -> None:
    p = Page(backlog=2)
    p.producer.put([motion(0, 0)] * 51)
    down = K.MTouchPos(MT, K.XENKBD_MT_EV_DOWN, 0, 1, 1)
    syn = K.MTouch(MT, K.XENKBD_MT_EV_SYN, 0)
    p.producer.put([key(30, 1), key(31, 1)])  # fills the backlog
    p.producer.put([down, syn])  # dropped: no room
    p.producer.put([K.MTouch(MT, K.XENKBD_MT_EV_UP, 0)])  # kept: evicts a press
    assert any(isinstance(e, K.MTouch) and e.event_type == K.XENKBD_MT_EV_UP
               for e in p.producer.backlog)


def test_a_contact_whose_down_still_waits_is_cancelled_whole() -> None:
    p = Page(backlog=3)
    p.producer.put([motion(0, 0)] * 51)
    p.producer.put([K.MTouchPos(MT, K.XENKBD_MT_EV_DOWN, 1, 1, 1),
                    K.MTouchPos(MT, K.XENKBD_MT_EV_MOTION, 1, 2, 2), key(30, 1)])
    p.producer.put([K.MTouch(MT, K.XENKBD_MT_EV_UP, 1)])
    assert list(p.producer.backlog) == [key(30, 1)]
    assert p.producer.stats["cancelled"] == 1


def test_an_insane_consumer_index_reads_as_a_full_ring() -> None:
    p = Page(backlog=4)
    struct.pack_into("<I", p.mem, 0, 1000)  # in_cons far ahead of in_prod
    p.producer.put([key(c, 1) for c in range(2, 12)])
    assert p.producer.stats["written"] == 0 and p.producer.stats["insane"] >= 1
    assert len(p.producer.backlog) == 4 and p.producer.stats["dropped"] == 6


def test_translation_scales_and_converts() -> None:
    t = EventTranslator(KeyboardMode(abs_pointer=True, raw_pointer=True))
    assert t.translate(AbsInput(50, 100, 100, 100)) == [
        K.Position(K.XENKBD_TYPE_POS, 16384, 32767, 0)]
    assert t.translate(RelInput(-20000, 5)) == [K.Position(K.XENKBD_TYPE_POS, 0, 32767, 0)]
    r = EventTranslator(KeyboardMode(abs_pointer=False, width=800, height=600))
    assert r.translate(AbsInput(400, 300, 800, 600, wheel=-1)) == [
        K.Motion(K.XENKBD_TYPE_MOTION, 400, 300, -1)]
    assert r.translate(AbsInput(400, 300, 800, 600)) == []  # no move, no wheel: nothing
    assert r.translate(KeyInput(0x300, True)) == [] and r.stats["unsupported"] == 1
    assert r.translate(TouchInput("down", 0)) == [] and r.stats["unsupported"] == 2

"""The HID report descriptor parser and report translator (xenpv.protocols.hid).

Descriptors are the published ones of :mod:`xenpv.testing.usbhid` (HID 1.11 keyboard and
mouse, a usb-tablet shaped tablet, a two-finger touch screen) plus hostile ones.
"""

from __future__ import annotations

import time

import pytest

from xenpv.protocols.hid import (
    MAX_DESCRIPTOR,
    HidError,
    HidTranslator,
    decode_report,
    parse_report_descriptor,
)
from xenpv.protocols.keycodes import BTN_LEFT, BTN_RIGHT, NAMES, code_by_name, key_for_usage
from xenpv.testing.usbhid import KEYBOARD_REPORT, MOUSE_REPORT, TABLET_REPORT, TOUCH_REPORT


def test_keyboard_descriptor_is_the_boot_layout() -> None:
    d = parse_report_descriptor(KEYBOARD_REPORT)
    assert not d.uses_ids and d.applications == [0x00010006]
    r = d.reports[0]
    assert r.bits == 64  # modifiers, reserved, six keys (the LED output is not an input)
    mods, keys = r.fields
    assert (mods.offset, mods.size, mods.count, mods.variable) == (0, 1, 8, True)
    assert mods.usages[0] == 0x000700E0 and mods.usages[-1] == 0x000700E7
    assert (keys.offset, keys.size, keys.count, keys.variable) == (16, 8, 6, False)
    assert (keys.page, keys.umin, keys.umax, keys.logical_max) == (7, 0, 101, 101)


def test_keyboard_reports_become_presses_and_releases_in_a_sane_order() -> None:
    t = HidTranslator(parse_report_descriptor(KEYBOARD_REPORT))
    shift, a, b = NAMES["LEFTSHIFT"], NAMES["A"], NAMES["B"]
    assert t.translate(bytes([0x02, 0, 0x04, 0x05, 0, 0, 0, 0])) == [
        ("key", shift, True), ("key", a, True), ("key", b, True)]
    assert t.translate(bytes([0x02, 0, 0x05, 0, 0, 0, 0, 0])) == [("key", a, False)]
    # ErrorRollOver (too many keys): the state is kept, nothing is reported
    assert t.translate(bytes([0x02, 0, 1, 1, 1, 1, 1, 1])) == []
    assert t.stats["rollover"] == 1
    assert t.translate(bytes(8)) == [("key", b, False), ("key", shift, False)]


def test_mouse_buttons_motion_and_wheel() -> None:
    t = HidTranslator(parse_report_descriptor(MOUSE_REPORT))
    assert t.translate(bytes([0x03, 10, 0xF6, 0x01])) == [
        ("key", BTN_LEFT, True), ("key", BTN_RIGHT, True), ("rel", 10, -10, -1)]
    assert t.translate(bytes([0x00, 0, 0, 0xFF])) == [
        ("key", BTN_LEFT, False), ("key", BTN_RIGHT, False), ("rel", 0, 0, 1)]


def test_tablet_absolute_position_in_the_device_range() -> None:
    t = HidTranslator(parse_report_descriptor(TABLET_REPORT))
    assert t.translate(bytes([0x01, 0xFF, 0x7F, 0x00, 0x40, 0x00])) == [
        ("key", BTN_LEFT, True), ("abs", 0x7FFF, 0x4000, 0x7FFF, 0x7FFF, 0)]


def test_touch_screen_contacts_get_slots_and_frames() -> None:
    d = parse_report_descriptor(TOUCH_REPORT)
    assert d.uses_ids and set(d.reports) == {1} and d.reports[1].bits == 104
    t = HidTranslator(d)

    def report(*fingers: tuple[int, int, int, int]) -> bytes:
        body = b""
        for tip, cid, x, y in fingers:
            body += bytes([tip | (tip << 1), cid]) + x.to_bytes(2, "little") + \
                y.to_bytes(2, "little")
        body += bytes(6 * (2 - len(fingers)))
        return bytes([1]) + body + bytes([sum(f[0] for f in fingers)])

    R = (4095, 4095)
    assert t.translate(report((1, 40, 100, 200), (1, 41, 300, 400))) == [
        ("touch", "down", 0, 100, 200, *R), ("touch", "down", 1, 300, 400, *R),
        ("touch", "frame", 0, 0, 0, 1, 1)]
    assert t.translate(report((0, 40, 100, 200), (1, 41, 310, 400))) == [
        ("touch", "up", 0, 0, 0, 1, 1), ("touch", "move", 1, 310, 400, *R),
        ("touch", "frame", 0, 0, 0, 1, 1)]
    # a new contact reuses the free slot
    assert t.translate(report((1, 42, 5, 5), (1, 41, 310, 400)))[0] == (
        "touch", "down", 0, 5, 5, *R)


def test_usage_to_linux_codes() -> None:
    assert key_for_usage(0x04) == 30 and key_for_usage(0x27) == 11
    assert key_for_usage(0xE0) == 29 and key_for_usage(0x00) is None
    assert code_by_name("a") == 30 and code_by_name("KEY_ENTER") == 28
    assert code_by_name("btn_left") == BTN_LEFT and code_by_name("0x1e") == 30
    with pytest.raises(KeyError):
        code_by_name("0x300")


HOSTILE = {
    "empty": b"",
    "too long": b"\x00" * (MAX_DESCRIPTOR + 1),
    "truncated item": bytes.fromhex("0501 0906 a101 0507 19"),
    "unclosed collection": bytes.fromhex("05010906a101 7508 9501 8102"),
    "end without collection": bytes.fromhex("c0"),
    "nesting too deep": bytes.fromhex("a100" * 17 + "c0" * 17),
    "pop without push": bytes.fromhex("b4"),
    "push too deep": bytes.fromhex("a4" * 9),
    "report size 0": bytes.fromhex("7500 9501 8102"),
    "report size 33": bytes.fromhex("7521 9501 8102"),
    "huge report": bytes.fromhex("7520 96ff7f 8102"),
    "report ID 0": bytes.fromhex("8500 7508 9501 8102"),
    "no input report": bytes.fromhex("05010906a101 c0"),
    "field outside any ID": bytes.fromhex("7508 9501 8102 8501 8102"),
    "usage range too large": bytes.fromhex("1900 2affff 7501 9501 8102"),
    "too many usages": bytes.fromhex("0901" * 1100 + "7508 9501 8102"),
    "too many fields": bytes.fromhex("7508 9501" + "8102" * 300),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_descriptor_is_a_clean_error(name: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(HidError):
        parse_report_descriptor(HOSTILE[name])
    assert time.monotonic() - t0 < 1.0


def test_reports_for_undeclared_ids_and_short_reports_are_errors() -> None:
    d = parse_report_descriptor(TOUCH_REPORT)
    with pytest.raises(HidError, match="not declared"):
        decode_report(d, bytes([2]) + bytes(13))
    with pytest.raises(HidError, match="12 bytes, 104 bits"):
        decode_report(d, bytes([1]) + bytes(12))  # one byte short
    with pytest.raises(HidError):
        decode_report(d, b"")
    k = parse_report_descriptor(KEYBOARD_REPORT)
    with pytest.raises(HidError):
        decode_report(k, bytes(7))
    # a longer report: padding is ignored
    assert decode_report(k, bytes(9))[1][0] == [0] * 8


def test_long_items_are_skipped() -> None:
    d = parse_report_descriptor(bytes.fromhex("fe0201aabb") + MOUSE_REPORT)
    assert d.reports[0].bits == 32


def test_code_ranges_at_their_edges() -> None:
    """Buttons 1-8 map to BTN_MOUSE.., key codes 1..KEY_MAX are valid, pointer codes are
    BTN_MOUSE..BTN_TASK and BTN_TOUCH; an unknown name or code raises KeyError naming it."""
    from xenpv.protocols import keycodes as kc

    assert [kc.button_for_usage(u) for u in (0, 1, 8, 9)] == [None, kc.BTN_MOUSE, kc.BTN_MOUSE + 7, None]
    assert [kc.valid_code(c) for c in (0, 1, kc.KEY_MAX, kc.KEY_MAX + 1)] == [False, True, True, False]
    edges = (kc.BTN_MOUSE - 1, kc.BTN_MOUSE, kc.BTN_TASK, kc.BTN_TASK + 1, kc.BTN_TOUCH, kc.BTN_TOUCH + 1)
    assert [kc.is_pointer_code(c) for c in edges] == [False, True, True, False, True, False]
    assert code_by_name("0x1") == 1 and code_by_name(hex(kc.KEY_MAX)) == kc.KEY_MAX
    for bad in ("no-such-key", "0x0", str(kc.KEY_MAX + 1)):
        with pytest.raises(KeyError) as info:
            code_by_name(bad)
        assert info.value.args == (bad,)

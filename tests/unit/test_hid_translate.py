"""HID descriptors written item by item, and what their reports must translate to.

The descriptors here are assembled from HID 1.11's short items (§6.2.2: prefix byte =
tag << 4 | type << 2 | size code; main 0, global 1, local 2; Input flags bit 0 constant,
bit 1 variable, bit 2 relative) so that each one isolates one rule of the translator:

- values are sign-extended only when the logical minimum is negative (§6.2.2.7);
- an array field reports usage ``usage_min + value - logical_min`` for values inside the
  logical range, nothing for others, and usage 0 means "no key";
- ErrorRollOver (keyboard usage 1) in an array keeps the previous state and is counted;
- relative deltas of one usage in one report add up; an axis moves on its own; the wheel
  comes out negated (HID: positive = away from the user, i.e. up; kbdif's ``rel_z``,
  which the sources use: negative = up), and so do the wheels of an absolute pointer;
- an absolute position is reported from the logical minimum with the range's width, and
  only when both X and Y are present;
- a report without key fields leaves the pressed keys alone;
- a finger needs a tip switch, a contact id, X and Y, or it is skipped (and the fingers
  after it still count); a contact keeps its slot wherever it appears in the report; at
  most 16 contacts, a 17th is ignored while the others go on.
"""

from __future__ import annotations

import pytest

from xenpv.protocols.hid import (
    Field,
    HidError,
    HidTranslator,
    decode_report,
    parse_report_descriptor,
)

BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112  # linux/input-event-codes.h
KEY_A, KEY_LEFTSHIFT, KEY_COMPOSE = 30, 42, 127


def item(type_: int, tag: int, value: int | None = None, size: int | None = None) -> bytes:
    """One short item; ``value`` in the fewest bytes (or ``size`` bytes), little-endian."""
    if value is None:
        return bytes([tag << 4 | type_ << 2])
    if size is None:
        size = 1 if -0x80 <= value <= 0xFF else 2 if -0x8000 <= value <= 0xFFFF else 4
    code = {1: 1, 2: 2, 4: 3}[size]
    return bytes([tag << 4 | type_ << 2 | code]) + (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")


def page(p: int) -> bytes:
    return item(1, 0, p)


def lmin(v: int, size: int | None = None) -> bytes:
    return item(1, 1, v, size)


def lmax(v: int, size: int | None = None) -> bytes:
    return item(1, 2, v, size)


def rsize(n: int) -> bytes:
    return item(1, 7, n)


def rid(n: int) -> bytes:
    return item(1, 8, n)


def rcount(n: int) -> bytes:
    return item(1, 9, n)


def usage(u: int) -> bytes:
    return item(2, 0, u)


def umin(u: int) -> bytes:
    return item(2, 1, u)


def umax(u: int) -> bytes:
    return item(2, 2, u)


def inp(flags: int) -> bytes:
    return item(0, 8, flags)


def coll(kind: int) -> bytes:
    return item(0, 0xA, kind)


END = item(0, 0xC)
DATA_ARRAY, DATA_VAR, DATA_VAR_REL, CONST = 0x00, 0x02, 0x06, 0x01
DESKTOP, KEYBOARD, BUTTON, DIGITIZER, CONSUMER = 0x01, 0x07, 0x09, 0x0D, 0x0C
X, Y, WHEEL = 0x30, 0x31, 0x38


def app(usage_page: int, u: int, *body: bytes) -> bytes:
    return page(usage_page) + usage(u) + coll(1) + b"".join(body) + END


def test_signs_follow_the_logical_minimum() -> None:
    desc = parse_report_descriptor(app(
        DESKTOP, 0x05,
        page(0xFF00), usage(1), usage(2), item(1, 1), lmax(255), rsize(8),
        rcount(2), inp(DATA_VAR),          # min as an empty item: 0, values unsigned
        usage(3), lmin(-1), lmax(1), rsize(8), rcount(1), inp(DATA_VAR),
        usage(4), lmin(-127), lmax(127), rsize(8), rcount(1), inp(DATA_VAR),
        usage(5), lmin(-0x8000, 2), lmax(0x7FFF, 2), rsize(16), rcount(1), inp(DATA_VAR)))
    fields = desc.reports[0].fields
    assert [(f.logical_min, f.logical_max) for f in fields] == [
        (0, 255), (-1, 1), (-127, 127), (-0x8000, 0x7FFF)]
    report = bytes([0xFF, 0x80, 0xFF, 0x40]) + (0x8000).to_bytes(2, "little")
    assert decode_report(desc, report)[1] == [[255, 128], [-1], [64], [-0x8000]]
    report = bytes([0x7F, 0x01, 0x01, 0xC0]) + (0x7FFF).to_bytes(2, "little")
    assert decode_report(desc, report)[1] == [[127, 1], [1], [-64], [0x7FFF]]


def test_an_empty_report_of_a_device_with_ids_is_refused_by_name() -> None:
    desc = parse_report_descriptor(app(DESKTOP, 0x02, rid(1), page(BUTTON), umin(1), umax(3),
                                       lmin(0), lmax(1), rsize(1), rcount(8), inp(DATA_VAR)))
    with pytest.raises(HidError, match=r"^empty report$"):
        decode_report(desc, b"")


def keyboard(lmax_value: int = 101) -> bytes:
    return app(
        DESKTOP, 0x06,
        page(KEYBOARD), umin(0xE0), umax(0xE7), lmin(0), lmax(1), rsize(1), rcount(8),
        inp(DATA_VAR),
        rsize(8), rcount(1), inp(CONST),
        page(KEYBOARD), umin(0), umax(101), lmin(0), lmax(lmax_value), rsize(8), rcount(6),
        inp(DATA_ARRAY))


def test_keyboard_arrays_counters_and_range_edges() -> None:
    t = HidTranslator(parse_report_descriptor(keyboard(lmax_value=255)))
    assert t.stats == {"reports": 0, "unmapped": 0, "rollover": 0}
    # usage 0 in the empty slots is no key; 101 (the usage maximum) is Compose
    assert t.translate(bytes([0x02, 0, 4, 101, 0, 0, 0, 0])) == [
        ("key", KEY_LEFTSHIFT, True), ("key", KEY_A, True), ("key", KEY_COMPOSE, True)]
    # 102 is inside the logical range but past the usage maximum: no key
    assert t.translate(bytes([0, 0, 102, 0, 0, 0, 0, 0])) == [
        ("key", KEY_A, False), ("key", KEY_COMPOSE, False), ("key", KEY_LEFTSHIFT, False)]
    assert t.stats == {"reports": 2, "unmapped": 0, "rollover": 0}
    # ErrorUndefined (usage 3) has no key code: counted, each time
    assert t.translate(bytes([0, 0, 3, 3, 0, 0, 0, 0])) == []
    assert t.stats["unmapped"] == 2
    assert t.translate(bytes([0, 0, 4, 0, 0, 0, 0, 0])) == [("key", KEY_A, True)]
    for _ in range(2):  # rollover: the state stays, each one counted
        assert t.translate(bytes([0, 0, 1, 1, 1, 1, 1, 1])) == []
    assert t.stats == {"reports": 6, "unmapped": 2, "rollover": 2}
    assert t.translate(bytes(8)) == [("key", KEY_A, False)]


def test_button_array_maps_from_the_logical_minimum() -> None:
    """Buttons 1-3 reported as values 1..3 (logical min 1): 1 and 3, the range's ends,
    are buttons 1 and 3; 0 and 4 are outside the range."""
    t = HidTranslator(parse_report_descriptor(app(
        DESKTOP, 0x02, page(BUTTON), umin(1), umax(3), lmin(1), lmax(3), rsize(8), rcount(2),
        inp(DATA_ARRAY))))
    assert t.translate(bytes([1, 3])) == [("key", BTN_LEFT, True), ("key", BTN_MIDDLE, True)]
    assert t.translate(bytes([2, 0])) == [
        ("key", BTN_LEFT, False), ("key", BTN_MIDDLE, False), ("key", BTN_RIGHT, True)]
    assert t.translate(bytes([4, 0])) == [("key", BTN_RIGHT, False)]
    assert t.stats["unmapped"] == 0


def test_reports_without_key_fields_leave_the_keys_alone() -> None:
    """A keyboard (modifiers only, ID 1) and a mouse without buttons (ID 2) in one device."""
    t = HidTranslator(parse_report_descriptor(
        app(DESKTOP, 0x06, rid(1), page(KEYBOARD), umin(0xE0), umax(0xE7), lmin(0), lmax(1),
            rsize(1), rcount(8), inp(DATA_VAR))
        + app(DESKTOP, 0x02, rid(2), page(DESKTOP), usage(X), usage(Y), lmin(-127), lmax(127),
              rsize(8), rcount(2), inp(DATA_VAR_REL))))
    assert t.translate(bytes([1, 0x02])) == [("key", KEY_LEFTSHIFT, True)]
    assert t.translate(bytes([2, 1, 0])) == [("rel", 1, 0, 0)]
    assert t.translate(bytes([1, 0x00])) == [("key", KEY_LEFTSHIFT, False)]


def test_relative_axes_add_up_and_move_alone() -> None:
    t = HidTranslator(parse_report_descriptor(app(
        DESKTOP, 0x02, page(DESKTOP), usage(X), usage(X), usage(Y), usage(WHEEL),
        lmin(-127), lmax(127), rsize(8), rcount(4), inp(DATA_VAR_REL),
        page(CONSUMER), usage(0x30), lmin(0), lmax(1), rsize(8), rcount(1), inp(DATA_VAR_REL))))

    def rep(dx1: int, dx2: int, dy: int, w: int, power: int = 0) -> bytes:
        return bytes(v & 0xFF for v in (dx1, dx2, dy, w, power))

    assert t.translate(rep(5, 2, 0, 0)) == [("rel", 7, 0, 0)]
    assert t.translate(rep(0, 0, -3, 0)) == [("rel", 0, -3, 0)]
    assert t.translate(rep(0, 0, 0, 2)) == [("rel", 0, 0, -2)]
    assert t.translate(rep(0, 0, 0, 0)) == []
    # usage 0x30 of the consumer page (Power) is no X axis
    assert t.translate(rep(0, 0, 0, 0, power=1)) == []


def test_absolute_position_from_the_logical_minimum() -> None:
    t = HidTranslator(parse_report_descriptor(app(
        DESKTOP, 0x02, page(DESKTOP), usage(X), lmin(10), lmax(1010, 2), rsize(16), rcount(1),
        inp(DATA_VAR),
        usage(Y), lmin(-500, 2), lmax(500, 2), rsize(16), rcount(1), inp(DATA_VAR),
        usage(WHEEL), usage(WHEEL), lmin(-127), lmax(127), rsize(8), rcount(2), inp(DATA_VAR))))
    report = (510).to_bytes(2, "little") + (0).to_bytes(2, "little") + bytes([1, 2])
    assert t.translate(report) == [("abs", 500, 500, 1000, 1000, -3)]
    report = (10).to_bytes(2, "little") + (500).to_bytes(2, "little") + bytes([0xFF, 0])
    assert t.translate(report) == [("abs", 0, 1000, 1000, 1000, 1)]
    # X without Y (and Y without X): no position
    for axis in (X, Y):
        t = HidTranslator(parse_report_descriptor(app(
            DESKTOP, 0x02, page(BUTTON), umin(1), umax(1), lmin(0), lmax(1), rsize(8),
            rcount(1), inp(DATA_VAR),
            page(DESKTOP), usage(axis), lmin(0), lmax(100), rsize(8), rcount(1), inp(DATA_VAR))))
        assert t.translate(bytes([1, 50])) == [("key", BTN_LEFT, True)]


def finger(x_min: int, y_min: int, *, tip: bool = True, cid: bool = True, y: bool = True) -> bytes:
    """A finger collection: tip switch (1 bit + 7 padding), contact id (8), X and Y (16)."""
    body = b""
    body += page(DIGITIZER) + usage(0x42) + lmin(0) + lmax(1) + rsize(1) + rcount(1)
    body += inp(DATA_VAR if tip else CONST) + rsize(7) + rcount(1) + inp(CONST)
    body += page(DIGITIZER) + usage(0x51) + lmin(0) + lmax(127) + rsize(8) + rcount(1)
    body += inp(DATA_VAR if cid else CONST)
    body += page(DESKTOP) + usage(X) + lmin(x_min, 2) + lmax(x_min + 4095, 2) + rsize(16)
    body += rcount(1) + inp(DATA_VAR)
    body += page(DESKTOP) + usage(Y) + lmin(y_min, 2) + lmax(y_min + 2047, 2) + rsize(16)
    body += rcount(1) + inp(DATA_VAR if y else CONST)
    return page(DIGITIZER) + usage(0x22) + coll(2) + body + END


def contact(tip: int, cid: int, x: int, y: int) -> bytes:
    return bytes([tip, cid]) + x.to_bytes(2, "little") + y.to_bytes(2, "little")


FRAME = ("touch", "frame", 0, 0, 0, 1, 1)
R = (4095, 2047)


def test_touch_positions_slots_and_the_contact_limit() -> None:
    t = HidTranslator(parse_report_descriptor(app(
        DIGITIZER, 0x04, rid(1), finger(100, 200), finger(100, 200))))

    def rep(*fingers: bytes) -> bytes:
        return bytes([1]) + b"".join(fingers)

    # positions from the logical minimums, ranges as widths
    assert t.translate(rep(contact(1, 40, 100, 200), contact(1, 41, 4195, 2247))) == [
        ("touch", "down", 0, 0, 0, *R), ("touch", "down", 1, 4095, 2047, *R), FRAME]
    # the contacts swap places in the report: each keeps its slot
    assert t.translate(rep(contact(1, 41, 300, 400), contact(1, 40, 500, 600))) == [
        ("touch", "move", 1, 200, 200, *R), ("touch", "move", 0, 400, 400, *R), FRAME]
    assert t.translate(rep(contact(0, 41, 0, 0), contact(0, 40, 0, 0))) == [
        ("touch", "up", 1, 0, 0, 1, 1), ("touch", "up", 0, 0, 0, 1, 1), FRAME]
    # sixteen contacts fill the slots; a seventeenth is ignored, the other finger is not
    for k in range(8):
        out = t.translate(rep(contact(1, 2 * k, 100, 200), contact(1, 2 * k + 1, 100, 200)))
        assert [e[2] for e in out[:2]] == [2 * k, 2 * k + 1]
    assert t.translate(rep(contact(1, 99, 100, 200), contact(1, 3, 101, 201))) == [
        ("touch", "move", 3, 1, 1, *R), FRAME]


@pytest.mark.parametrize("missing", ["tip", "cid", "y"])
def test_an_incomplete_finger_is_skipped_and_the_next_still_counts(missing: str) -> None:
    broken = finger(0, 0, **{missing: False})
    t = HidTranslator(parse_report_descriptor(app(DIGITIZER, 0x04, broken, finger(0, 0))))
    assert t.translate(contact(1, 7, 10, 20) + contact(1, 8, 30, 40)) == [
        ("touch", "down", 0, 30, 40, *R), FRAME]


def test_keys_and_touches_of_one_report_are_both_reported() -> None:
    """Two application collections (a mouse's buttons, a touch screen) in one report."""
    t = HidTranslator(parse_report_descriptor(
        app(DESKTOP, 0x02, page(BUTTON), umin(1), umax(8), lmin(0), lmax(1), rsize(1),
            rcount(8), inp(DATA_VAR))
        + app(DIGITIZER, 0x04, finger(0, 0))))
    assert t.translate(bytes([1]) + contact(1, 5, 1, 2)) == [
        ("key", BTN_LEFT, True), ("touch", "down", 0, 1, 2, *R), FRAME]


# -- the descriptor's own rules (HID 1.11 §6.2.2 and the parser's documented bounds) ----------
#
# A descriptor is 1..4096 bytes; a short item's data is 0, 1, 2 or 4 bytes and must lie
# inside the descriptor; a long item (0xFE) is the prefix, a data-size byte, a tag byte
# and that many data bytes, and is skipped; global state before any global item is all
# zero (usage page 0, logical range 0..0, no report size, count or ID); an Input needs a
# report size of 1..32 bits, and a count of 0 declares nothing; at most 256 fields.

ONE_BUTTON = app(DESKTOP, 0x02, page(BUTTON), umin(1), umax(1), lmin(0), lmax(1), rsize(8),
                 rcount(1), inp(DATA_VAR))


def test_descriptor_length_bounds() -> None:
    filler = page(BUTTON)  # a global item that changes nothing after the last Input
    full = ONE_BUTTON + filler * ((4096 - len(ONE_BUTTON)) // 2)
    full += b"\x00" * (4096 - len(full))  # main item 0 of 0 bytes: Input-less, harmless
    assert len(full) == 4096 and parse_report_descriptor(full).reports[0].bits == 8
    with pytest.raises(HidError, match=r"^report descriptor of 4097 bytes \(1\.\.4096\)$"):
        parse_report_descriptor(full + b"\x00")
    with pytest.raises(HidError, match=r"^report descriptor of 0 bytes \(1\.\.4096\)$"):
        parse_report_descriptor(b"")


def test_items_must_lie_inside_the_descriptor() -> None:
    for size in (1, 2, 4):
        whole = item(1, 0, 0x01, size)  # a Usage Page of ``size`` data bytes
        assert len(whole) == 1 + size
        parse_report_descriptor(ONE_BUTTON + whole)  # exactly at the end: fine
        with pytest.raises(HidError, match=rf"^item at {len(ONE_BUTTON)} runs past the end$"):
            parse_report_descriptor(ONE_BUTTON + whole[:-1])
    # a 4-byte usage is page << 16 | usage whatever the usage page in force
    desc = parse_report_descriptor(app(
        DESKTOP, 0x02, page(BUTTON), item(2, 0, 0x00010030, 4), lmin(0), lmax(0x7FFF_FFFF, 4),
        rsize(32), rcount(1), inp(DATA_VAR_REL)))
    f = desc.reports[0].fields[0]
    assert f.usages == (0x00010030,) and f.logical_max == 0x7FFF_FFFF and f.size == 32
    assert HidTranslator(desc).translate((7).to_bytes(4, "little")) == [("rel", 7, 0, 0)]


def test_long_items_are_skipped_whole() -> None:
    # the data would be End Collection items (an error) if read as short items
    long_item = bytes([0xFE, 200, 0x10]) + bytes([0xC0]) * 200
    empty = bytes([0xFE, 0, 0x11])  # a long item without data may end the descriptor
    desc = parse_report_descriptor(page(DESKTOP) + long_item + ONE_BUTTON[2:] + empty)
    assert desc.reports[0].bits == 8
    # cut in its header, or in its data: the item runs past the end
    for cut in (1, 2, 3, 4, 202):
        with pytest.raises(HidError, match=r"^truncated long item$"):
            parse_report_descriptor(ONE_BUTTON + long_item[:cut])


def test_global_state_starts_at_zero() -> None:
    # no usage page, no logical range: page 0, 0..0, outside any collection
    desc = parse_report_descriptor(usage(0x30) + rsize(8) + rcount(1) + inp(DATA_VAR))
    f = desc.reports[0].fields[0]
    assert (f.usages, f.logical_min, f.logical_max, f.application, f.report_id, f.collection) == (
        (0x30,), 0, 0, 0, 0, 0)
    assert desc.applications == [] and desc.uses_ids is False
    # no report count: nothing declared
    desc = parse_report_descriptor(page(BUTTON) + usage(1) + rsize(8) + inp(DATA_VAR))
    assert desc.reports[0].fields == [] and desc.reports[0].bits == 0
    # no report size (or one beyond 32 bits): refused
    for size in (b"", rsize(0), rsize(33)):
        with pytest.raises(HidError, match=r"^report size \d+ x count 4$"):
            parse_report_descriptor(page(BUTTON) + usage(1) + size + rcount(4) + inp(DATA_VAR))
    parse_report_descriptor(page(BUTTON) + usage(1) + rsize(32) + rcount(4) + inp(DATA_VAR))


def test_at_most_256_fields() -> None:
    def fields(n: int) -> bytes:
        return page(BUTTON) + usage(1) + lmin(0) + lmax(1) + rsize(1) + rcount(1) + inp(DATA_VAR) * n

    assert len(parse_report_descriptor(fields(256)).reports[0].fields) == 256
    with pytest.raises(HidError, match=r"^too many fields$"):
        parse_report_descriptor(fields(257))


def test_descriptor_bounds_at_their_edges() -> None:
    """Report IDs 1..255; 8 pushes deep; 1024 usages per main item; collections 16 deep;
    a field of up to 8192 one-bit elements and reports of up to 8192 bits; every refusal
    with its text."""
    field = lmin(0) + lmax(1) + rsize(1) + rcount(1) + inp(DATA_VAR)
    for rid_value in (1, 255):
        desc = parse_report_descriptor(page(BUTTON) + usage(1) + rid(rid_value) + field)
        assert list(desc.reports) == [rid_value] and desc.reports[rid_value].report_id == rid_value
    for bad in (0, 256):
        with pytest.raises(HidError, match=rf"^report ID {bad}$"):
            parse_report_descriptor(page(BUTTON) + usage(1) + rid(bad) + field)
    push, pop = item(1, 0xA), item(1, 0xB)
    parse_report_descriptor(push * 8 + page(BUTTON) + usage(1) + field)
    with pytest.raises(HidError, match=r"^global push stack too deep$"):
        parse_report_descriptor(push * 9 + page(BUTTON) + usage(1) + field)
    with pytest.raises(HidError, match=r"^pop without push$"):
        parse_report_descriptor(push + pop + pop + page(BUTTON) + usage(1) + field)
    # push saves the global state, pop brings it back
    desc = parse_report_descriptor(page(BUTTON) + lmin(-5) + lmax(5) + rsize(8) + rcount(1)
                                   + push + lmin(0) + lmax(1) + rsize(1) + pop
                                   + usage(1) + inp(DATA_VAR))
    f = desc.reports[0].fields[0]
    assert (f.logical_min, f.logical_max, f.size, f.usages) == (-5, 5, 8, (0x00090001,))
    many = page(BUTTON) + usage(1) * 1024 + lmin(0) + lmax(1) + rsize(1) + rcount(1024)
    assert len(parse_report_descriptor(many + inp(DATA_VAR)).reports[0].fields[0].usages) == 1024
    with pytest.raises(HidError, match=r"^too many usages$"):
        parse_report_descriptor(page(BUTTON) + usage(1) * 1025 + field)
    nest = page(DESKTOP) + usage(2) + coll(1) + coll(0) * 15
    parse_report_descriptor(nest + page(BUTTON) + usage(1) + field + END * 16)
    with pytest.raises(HidError, match=r"^collections nested too deep$"):
        parse_report_descriptor(nest + coll(0) + page(BUTTON) + usage(1) + field + END * 17)
    with pytest.raises(HidError, match=r"^end collection without collection$"):
        parse_report_descriptor(page(BUTTON) + usage(1) + field + END)
    wide = page(BUTTON) + usage(1) + lmin(0) + lmax(1) + rsize(1)
    assert parse_report_descriptor(wide + rcount(8192) + inp(DATA_VAR)).reports[0].bits == 8192
    with pytest.raises(HidError, match=r"^report size 1 x count 8193$"):
        parse_report_descriptor(wide + rcount(8193) + inp(DATA_VAR))
    with pytest.raises(HidError, match=r"^report 0 longer than 8192 bits$"):
        parse_report_descriptor(wide + rcount(8192) + inp(DATA_VAR) + rcount(1) + inp(DATA_VAR))


def test_negative_logical_ranges_and_applications() -> None:
    """A range entirely below zero stays signed at both ends (1- and 2-byte items);
    only application collections (type 1) name an application, whatever usage precedes
    the others, and every field of a finger belongs to its application."""
    for size in (1, 2):
        desc = parse_report_descriptor(page(BUTTON) + usage(1) + lmin(-10, size) + lmax(-1, size)
                                       + rsize(8) + rcount(1) + inp(DATA_VAR))
        f = desc.reports[0].fields[0]
        assert (f.logical_min, f.logical_max) == (-10, -1), size
        assert decode_report(desc, bytes([0xFE]))[1] == [[-2]]
    desc = parse_report_descriptor(app(DIGITIZER, 0x04, finger(0, 0)))
    assert desc.applications == [0x000D0004]
    assert {f.application for f in desc.reports[0].fields} == {0x000D0004}


def test_field_usages_from_lists_and_ranges() -> None:
    """A variable field takes one usage per element: the Usage items if any (the last
    repeated), else the Usage Minimum..Maximum range (at most 1025 usages: maximum minus
    minimum up to 1024), else usage 0; an array field names its page and range by the
    range if given, else by its first and last Usage, else 0."""
    def var(body: bytes, count: int) -> Field:
        desc = parse_report_descriptor(page(BUTTON) + body + lmin(0) + lmax(1) + rsize(1)
                                       + rcount(count) + inp(DATA_VAR))
        return desc.reports[0].fields[0]

    p = BUTTON << 16
    assert var(umin(1) + umax(3), 5).usages == (p | 1, p | 2, p | 3, p | 3, p | 3)
    assert var(usage(5) + umin(1) + umax(2), 1).usages == (p | 5,)
    assert var(usage(5) + usage(6), 3).usages == (p | 5, p | 6, p | 6)
    assert var(b"", 1030).usages == (0,) * 1030
    assert len(var(umin(1) + umax(1025), 1).usages) == 1
    with pytest.raises(HidError, match=r"^usage range too large$"):
        var(umin(1) + umax(1026), 1)
    # a constant item declares padding: its usages, however many, are not looked at
    desc = parse_report_descriptor(page(BUTTON) + umin(0) + umax(2000) + rsize(8) + rcount(1)
                                   + inp(CONST) + usage(1) + lmin(0) + lmax(1) + rsize(8)
                                   + rcount(1) + inp(DATA_VAR))
    assert desc.reports[0].bits == 16 and desc.reports[0].fields[0].offset == 8

    def arr(body: bytes) -> Field:
        desc = parse_report_descriptor(page(KEYBOARD) + body + lmin(0) + lmax(101) + rsize(8)
                                       + rcount(2) + inp(DATA_ARRAY))
        return desc.reports[0].fields[0]

    f = arr(usage(4) + usage(9))
    assert (f.page, f.umin, f.umax, f.usages) == (KEYBOARD, 4, 9, ())
    f = arr(umin(0) + umax(101))
    assert (f.page, f.umin, f.umax) == (KEYBOARD, 0, 101)
    f = arr(b"")
    assert (f.page, f.umin, f.umax) == (0, 0, 0)


def test_whole_descriptor_refusals() -> None:
    field = page(BUTTON) + usage(1) + lmin(0) + lmax(1) + rsize(1) + rcount(1)
    with pytest.raises(HidError, match=r"^unclosed collection$"):
        parse_report_descriptor(page(DESKTOP) + usage(2) + coll(1) + field + inp(DATA_VAR))
    with pytest.raises(HidError, match=r"^no input report$"):
        parse_report_descriptor(field + item(0, 9, 0x02))  # an Output item only
    with pytest.raises(HidError, match=r"^fields outside any report ID in a descriptor that uses IDs$"):
        parse_report_descriptor(field + inp(DATA_VAR) + rid(1) + inp(DATA_VAR))

"""USB HID report descriptors and input reports (HID 1.11), sans-IO.

Theory of operation
-------------------
A HID device describes its reports with a *report descriptor*: a flat list of short
items (one prefix byte: data size in bits 0-1 -- 0, 1, 2 or 4 bytes --, type in bits 2-3
-- main, global, local --, tag in bits 4-7; long items 0xFE are skipped).  Global items
(usage page, logical min/max, report size/count/ID, push/pop) set a state that
persists; local items (usage, usage min/max) apply to the next main item only; main
items (Input, Output, Feature, Collection, End Collection) create fields or open and
close collections.  :func:`parse_report_descriptor` walks the items once, without
recursion (R16), and keeps the *input* fields of every report: bit offset, size, count,
usages (one per element for variable fields; a usage range for arrays), logical range,
the relative/absolute/constant flags, the application collection the field belongs to and
the enclosing logical/physical collection (the finger of a multi-touch report).

:func:`decode_report` cuts one input report into values (sign-extended where the
logical minimum is negative).  :class:`HidTranslator` turns the values into source
events (:mod:`xenpv.backends.hid.source` shapes, as plain tuples here to stay below the
driver layer -- :mod:`xenpv.backends.hid.usb` wraps them): keyboard usages to Linux key
codes (press/release by difference with the previous report; the ErrorRollOver report
keeps the previous state), buttons, relative X/Y/wheel, absolute X/Y in the device's
logical range, and multi-touch contacts (device contact ids mapped to slots
``0..contacts-1``; down, move, up, then a frame).

Hostile devices: every bound is explicit -- descriptor length
(:data:`MAX_DESCRIPTOR`), items, collection depth, push depth, fields, report size,
usages per field -- and any breach, a truncated item, an unbalanced collection, a report
for an undeclared ID or a report shorter than declared raises :class:`HidError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xenpv.protocols import ProtocolError
from xenpv.protocols.keycodes import button_for_usage, key_for_usage

__all__ = [
    "MAX_DESCRIPTOR",
    "Field",
    "HidError",
    "HidTranslator",
    "Report",
    "ReportDescriptor",
    "Translated",
    "decode_report",
    "parse_report_descriptor",
]

#: Bounds on what a device may describe.
MAX_DESCRIPTOR = 4096
MAX_FIELDS = 256
MAX_DEPTH = 16
MAX_PUSH = 8
MAX_REPORT_BITS = 8 * 1024
MAX_USAGES = 1024
MAX_CONTACTS = 16

# usage pages and usages
PAGE_DESKTOP = 0x01
PAGE_KEYBOARD = 0x07
PAGE_BUTTON = 0x09
PAGE_DIGITIZER = 0x0D
USAGE_X, USAGE_Y, USAGE_WHEEL = 0x30, 0x31, 0x38
USAGE_FINGER = 0x22
USAGE_TIP_SWITCH = 0x42
USAGE_CONTACT_ID = 0x51
USAGE_CONTACT_COUNT = 0x54
USAGE_WIDTH, USAGE_HEIGHT = 0x48, 0x49
KEY_ERROR_ROLLOVER = 0x01

#: Linux codes of the eight modifier keys (keyboard usages 0xE0 ... 0xE7).
_MODIFIERS = frozenset(c for c in (key_for_usage(u) for u in range(0xE0, 0xE8)) if c)

_MAIN_INPUT, _MAIN_OUTPUT, _MAIN_FEATURE, _MAIN_COLLECTION, _MAIN_END = 0x8, 0x9, 0xB, 0xA, 0xC


class HidError(ProtocolError):
    """A report descriptor or report the device sent breaks HID or our bounds."""


@dataclass(frozen=True)
class Field:
    """One input field: ``count`` elements of ``size`` bits from bit ``offset`` (after
    the report ID byte).  ``usages`` has one (page << 16 | usage) per element for a
    variable field; an array field reports usage numbers ``umin..umax`` of ``page``."""

    report_id: int
    offset: int
    size: int
    count: int
    variable: bool
    relative: bool
    constant: bool
    logical_min: int
    logical_max: int
    usages: tuple[int, ...]
    page: int
    umin: int
    umax: int
    application: int
    collection: int


@dataclass
class Report:
    """An input report: its fields and total size in bits."""

    report_id: int
    bits: int = 0
    fields: list[Field] = field(default_factory=list)


@dataclass
class ReportDescriptor:
    """The input reports of a device (key 0 when the device uses no report IDs)."""

    reports: dict[int, Report]
    uses_ids: bool
    applications: list[int]


def _signed(value: int, size: int) -> int:
    if size == 0:
        return 0
    bits = size * 8
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def parse_report_descriptor(data: bytes) -> ReportDescriptor:
    """Parse ``data``; raise :class:`HidError` for anything malformed or beyond bounds."""
    if not data or len(data) > MAX_DESCRIPTOR:
        raise HidError(f"report descriptor of {len(data)} bytes (1..{MAX_DESCRIPTOR})")
    glob: dict[str, int] = {"page": 0, "lmin": 0, "lmax": 0, "lmin_size": 0, "size": 0,
                            "count": 0, "id": 0}
    stack: list[dict[str, int]] = []
    usages: list[int] = []
    umin: int | None = None
    umax: int | None = None
    collections: list[int] = []  # stack of collection serials
    application = 0
    applications: list[int] = []
    serial = 0
    reports: dict[int, Report] = {}
    uses_ids = False
    nfields = 0
    i, n = 0, len(data)
    while i < n:
        prefix = data[i]
        if prefix == 0xFE:  # long item: size byte, tag byte, data
            if i + 2 >= n or i + 3 + data[i + 1] > n:
                raise HidError("truncated long item")
            i += 3 + data[i + 1]
            continue
        size = (0, 1, 2, 4)[prefix & 3]
        kind, tag = (prefix >> 2) & 3, prefix >> 4
        if i + 1 + size > n:
            raise HidError(f"item at {i} runs past the end")
        raw = int.from_bytes(data[i + 1 : i + 1 + size], "little")
        i += 1 + size
        if kind == 1:  # global
            if tag == 0:
                glob["page"] = raw & 0xFFFF
            elif tag == 1:
                glob["lmin"], glob["lmin_size"] = _signed(raw, size), size
            elif tag == 2:
                glob["lmax"] = raw if size == 0 else _signed(raw, size)
                glob["lmax_raw"], glob["lmax_size"] = raw, size
            elif tag == 7:
                glob["size"] = raw
            elif tag == 8:
                if not 0 < raw <= 255:
                    raise HidError(f"report ID {raw}")
                glob["id"], uses_ids = raw, True
            elif tag == 9:
                glob["count"] = raw
            elif tag == 0xA:
                if len(stack) >= MAX_PUSH:
                    raise HidError("global push stack too deep")
                stack.append(dict(glob))
            elif tag == 0xB:
                if not stack:
                    raise HidError("pop without push")
                glob = stack.pop()
        elif kind == 2:  # local
            full = raw if size == 4 else (glob["page"] << 16) | raw
            if tag == 0:
                if len(usages) >= MAX_USAGES:
                    raise HidError("too many usages")
                usages.append(full)
            elif tag == 1:
                umin = full
            elif tag == 2:
                umax = full
        elif kind == 0:  # main
            if tag == _MAIN_COLLECTION:
                if len(collections) >= MAX_DEPTH:
                    raise HidError("collections nested too deep")
                serial += 1
                if raw == 1 and usages:  # application collection
                    application = usages[0]
                    applications.append(application)
                collections.append(serial)
            elif tag == _MAIN_END:
                if not collections:
                    raise HidError("end collection without collection")
                collections.pop()
            elif tag in (_MAIN_INPUT, _MAIN_OUTPUT, _MAIN_FEATURE):
                rid, bits, count = glob["id"], glob["size"], glob["count"]
                if not (0 < bits <= 32) or count > MAX_REPORT_BITS:
                    raise HidError(f"report size {bits} x count {count}")
                report = reports.setdefault(rid, Report(rid)) if tag == _MAIN_INPUT else None
                if report is not None:
                    lmin = glob["lmin"]
                    lmax = glob["lmax"]
                    if lmin >= 0 and glob.get("lmax_size", 0) and lmax < 0:
                        lmax = glob["lmax_raw"]  # unsigned maximum (e.g. 0xFF with min 0)
                    variable = bool(raw & 2)
                    lo = umin if umin is not None else (usages[0] if usages else 0)
                    hi = umax if umax is not None else (usages[-1] if usages else 0)
                    if variable:
                        if umin is not None and umax is not None and not usages:
                            if umax - umin > MAX_USAGES:
                                raise HidError("usage range too large")
                            elem = list(range(umin, umax + 1))
                        else:
                            elem = list(usages)
                        elem = (elem + [elem[-1]] * count)[:count] if elem else [0] * min(
                            count, MAX_USAGES)
                        if len(elem) < count:
                            elem += [0] * (count - len(elem))
                    else:
                        elem = []
                    if count and not (raw & 1):
                        nfields += 1
                        if nfields > MAX_FIELDS:
                            raise HidError("too many fields")
                        report.fields.append(Field(
                            rid, report.bits, bits, count, variable, bool(raw & 4),
                            bool(raw & 1), lmin, lmax, tuple(elem), lo >> 16, lo & 0xFFFF,
                            hi & 0xFFFF, application,
                            collections[-1] if collections else 0))
                    report.bits += bits * count
                    if report.bits > MAX_REPORT_BITS:
                        raise HidError(f"report {rid} longer than {MAX_REPORT_BITS} bits")
            usages, umin, umax = [], None, None
    if collections:
        raise HidError("unclosed collection")
    if not reports:
        raise HidError("no input report")
    if uses_ids and 0 in reports:
        raise HidError("fields outside any report ID in a descriptor that uses IDs")
    return ReportDescriptor(reports, uses_ids, applications)


def decode_report(desc: ReportDescriptor, data: bytes) -> tuple[Report, list[list[int]]]:
    """The report and, per field, its element values; :class:`HidError` for an
    undeclared report ID or a report shorter than declared (longer: the tail is ignored,
    as hosts do for padding)."""
    if desc.uses_ids:
        if not data:
            raise HidError("empty report")
        rid, body = data[0], data[1:]
    else:
        rid, body = 0, data
    report = desc.reports.get(rid)
    if report is None:
        raise HidError(f"report ID {rid} was not declared")
    if len(body) * 8 < report.bits:
        raise HidError(f"report {rid}: {len(body)} bytes, {report.bits} bits declared")
    whole = int.from_bytes(body, "little")
    out = []
    for f in report.fields:
        mask = (1 << f.size) - 1
        vals = []
        for k in range(f.count):
            v = (whole >> (f.offset + k * f.size)) & mask
            if f.logical_min < 0 and v & (1 << (f.size - 1)):
                v -= 1 << f.size
            vals.append(v)
        out.append(vals)
    return report, out


#: A translated event: ("key", code, pressed) | ("rel", dx, dy, wheel) |
#: ("abs", x, y, x_max, y_max, wheel) | ("touch", kind, slot, x, y, x_max, y_max)
Translated = tuple[object, ...]


class HidTranslator:
    """Input reports of one interface to source events (see the module docstring)."""

    def __init__(self, desc: ReportDescriptor) -> None:
        """Nothing pressed, no contact down."""
        self.desc = desc
        self.keys: set[int] = set()
        self.slots: dict[int, int] = {}  # device contact id -> slot
        self.stats = {"reports": 0, "unmapped": 0, "rollover": 0}

    def translate(self, data: bytes) -> list[Translated]:
        """The events of one report (raises :class:`HidError` for a bad report)."""
        report, values = decode_report(self.desc, data)
        self.stats["reports"] += 1
        down: set[int] = set()
        rel = [0, 0, 0]
        absolute: dict[int, tuple[int, Field]] = {}
        wheel = 0
        fingers: dict[int, dict[int, tuple[int, Field]]] = {}
        key_fields = False
        for f, vals in zip(report.fields, values, strict=True):
            if f.constant:
                continue
            if f.application >> 16 == PAGE_DIGITIZER:
                if f.variable:  # a touch surface: fields grouped by finger collection
                    finger = fingers.setdefault(f.collection, {})
                    for u, v in zip(f.usages, vals, strict=False):
                        finger.setdefault(u, (v, f))
                continue
            if f.variable:
                for u, v in zip(f.usages, vals, strict=False):
                    page, usage = u >> 16, u & 0xFFFF
                    if page == PAGE_KEYBOARD:
                        key_fields = True
                        if v:
                            self._press(down, key_for_usage(usage))
                    elif page == PAGE_BUTTON:
                        key_fields = True
                        if v:
                            self._press(down, button_for_usage(usage))
                    elif page == PAGE_DESKTOP and usage in (USAGE_X, USAGE_Y, USAGE_WHEEL):
                        if f.relative:
                            rel[(USAGE_X, USAGE_Y, USAGE_WHEEL).index(usage)] += v
                        elif usage == USAGE_WHEEL:
                            wheel += v
                        else:
                            absolute[usage] = (v, f)
            elif f.page in (PAGE_KEYBOARD, PAGE_BUTTON):
                key_fields = True
                pressed = [f.umin + v - f.logical_min for v in vals
                           if f.logical_min <= v <= f.logical_max]
                if f.page == PAGE_KEYBOARD and KEY_ERROR_ROLLOVER in pressed:
                    self.stats["rollover"] += 1
                    return []  # phantom state: keep what was pressed
                for usage in pressed:
                    if usage and usage <= f.umax:
                        self._press(down, key_for_usage(usage) if f.page == PAGE_KEYBOARD
                                    else button_for_usage(usage))
        out: list[Translated] = []
        if key_fields:  # releases first; modifiers pressed before and released after keys
            for code in sorted(self.keys - down, key=lambda c: (c in _MODIFIERS, c)):
                out.append(("key", code, False))
            for code in sorted(down - self.keys, key=lambda c: (c not in _MODIFIERS, c)):
                out.append(("key", code, True))
            self.keys = down
        if rel[0] or rel[1] or rel[2]:
            out.append(("rel", rel[0], rel[1], -rel[2]))
        if USAGE_X in absolute and USAGE_Y in absolute:
            (x, fx), (y, fy) = absolute[USAGE_X], absolute[USAGE_Y]
            out.append(("abs", x - fx.logical_min, y - fy.logical_min,
                        fx.logical_max - fx.logical_min, fy.logical_max - fy.logical_min,
                        -wheel))
        if fingers:
            out += self._touch(fingers)
        return out

    def _press(self, down: set[int], code: int | None) -> None:
        if code is None:
            self.stats["unmapped"] += 1
        else:
            down.add(code)

    def _touch(self, fingers: dict[int, dict[int, tuple[int, Field]]]) -> list[Translated]:
        out: list[Translated] = []
        for finger in fingers.values():
            tip = finger.get((PAGE_DIGITIZER << 16) | USAGE_TIP_SWITCH)
            cid = finger.get((PAGE_DIGITIZER << 16) | USAGE_CONTACT_ID)
            fx = finger.get((PAGE_DESKTOP << 16) | USAGE_X)
            fy = finger.get((PAGE_DESKTOP << 16) | USAGE_Y)
            if tip is None or cid is None or fx is None or fy is None:
                continue
            contact = cid[0]
            x, xf = fx
            y, yf = fy
            xr, yr = xf.logical_max - xf.logical_min, yf.logical_max - yf.logical_min
            pos = (x - xf.logical_min, y - yf.logical_min, xr, yr)
            if tip[0]:
                slot = self.slots.get(contact)
                if slot is None:
                    free = sorted(set(range(MAX_CONTACTS)) - set(self.slots.values()))
                    if not free:
                        continue
                    slot = self.slots[contact] = free[0]
                    out.append(("touch", "down", slot, *pos))
                else:
                    out.append(("touch", "move", slot, *pos))
            elif contact in self.slots:
                out.append(("touch", "up", self.slots.pop(contact), 0, 0, 1, 1))
        if out:
            out.append(("touch", "frame", 0, 0, 0, 1, 1))
        return out

"""Virtual keyboard/pointer protocol (``xen/io/kbdif.h``): page layout and events.

Theory of operation
-------------------
One shared page: four u32 indexes at offset 0, an *in* ring (backend to frontend) of 51
40-byte event slots at 1024, and an *out* ring of 25 slots at 3072 (no out events are
defined).  Slot ``i`` is ``offset + (i % LEN) * 40`` -- modulo, not a mask, because 51 and
25 are not powers of two.  Every event starts with a ``type`` byte; each type has its own
layout inside the 40 bytes (all other bytes zero).  :func:`parse_in_event` copies one slot
out once and decodes it by type; unknown types come back as :class:`UnknownEvent` (the
frontend skips them), and :func:`validate_in_event` is the strict check (known type, known
multi-touch sub-type, coordinates within the advertised ranges -- hostile scenario 28).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from xenpv.errors import LocalError
from xenpv.protocols import ProtocolError
from xenpv.protocols.layout import Buffer, Field, Layout, Record, c_struct, pad

# io/kbdif.h: event types
XENKBD_TYPE_MOTION = 1
XENKBD_TYPE_RESERVED = 2
XENKBD_TYPE_KEY = 3
XENKBD_TYPE_POS = 4
XENKBD_TYPE_MTOUCH = 5

# io/kbdif.h: multi-touch event sub-types
XENKBD_MT_EV_DOWN = 0
XENKBD_MT_EV_UP = 1
XENKBD_MT_EV_MOTION = 2
XENKBD_MT_EV_SYN = 3
XENKBD_MT_EV_SHAPE = 4
XENKBD_MT_EV_ORIENT = 5

# io/kbdif.h: page geometry
XENKBD_IN_EVENT_SIZE = 40
XENKBD_OUT_EVENT_SIZE = 40
XENKBD_IN_RING_SIZE = 2048
XENKBD_IN_RING_LEN = XENKBD_IN_RING_SIZE // XENKBD_IN_EVENT_SIZE
XENKBD_IN_RING_OFFS = 1024
XENKBD_OUT_RING_SIZE = 1024
XENKBD_OUT_RING_LEN = XENKBD_OUT_RING_SIZE // XENKBD_OUT_EVENT_SIZE
XENKBD_OUT_RING_OFFS = XENKBD_IN_RING_OFFS + XENKBD_IN_RING_SIZE

# io/kbdif.h: xenstore keys (device type "vkbd")
XENKBD_DRIVER_NAME = "vkbd"
XENKBD_FIELD_FEAT_DSBL_KEYBRD = "feature-disable-keyboard"
XENKBD_FIELD_FEAT_DSBL_POINTER = "feature-disable-pointer"
XENKBD_FIELD_FEAT_ABS_POINTER = "feature-abs-pointer"
XENKBD_FIELD_FEAT_RAW_POINTER = "feature-raw-pointer"
XENKBD_FIELD_FEAT_MTOUCH = "feature-multi-touch"
XENKBD_FIELD_REQ_ABS_POINTER = "request-abs-pointer"
XENKBD_FIELD_REQ_RAW_POINTER = "request-raw-pointer"
XENKBD_FIELD_REQ_MTOUCH = "request-multi-touch"
XENKBD_FIELD_RING_GREF = "page-gref"
XENKBD_FIELD_EVT_CHANNEL = "event-channel"
XENKBD_FIELD_WIDTH = "width"
XENKBD_FIELD_HEIGHT = "height"
XENKBD_FIELD_MT_WIDTH = "multi-touch-width"
XENKBD_FIELD_MT_HEIGHT = "multi-touch-height"
XENKBD_FIELD_MT_NUM_CONTACTS = "multi-touch-num-contacts"
XENKBD_FIELD_UNIQUE_ID = "unique-id"
XENKBD_FIELD_RING_REF = "page-ref"

#: Linux kbdfront's pointer range when the backend gives no width/height.
DEFAULT_WIDTH = 800
DEFAULT_HEIGHT = 600
#: Absolute range in raw pointer mode.
RAW_POINTER_MAX = 0x7FFF


@dataclass(frozen=True)
class KbdMode:
    """What one kbdif connection carries: the backend's offer intersected with the
    frontend's requests (both halves compute it from the same keys)."""

    abs_pointer: bool = False
    raw_pointer: bool = False
    multi_touch: tuple[int, int, int] | None = None
    keyboard: bool = True
    pointer: bool = True
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    unique_id: str = ""

    @property
    def abs_range(self) -> tuple[int, int]:
        """Largest POS coordinates (raw mode: ``RAW_POINTER_MAX`` both)."""
        if self.raw_pointer:
            return RAW_POINTER_MAX, RAW_POINTER_MAX
        return self.width, self.height


PAGE_LAYOUT = c_struct(
    "xenkbd_page",
    [Field("in_cons", "I"), Field("in_prod", "I"), Field("out_cons", "I"), Field("out_prod", "I")],
)

_E = XENKBD_IN_EVENT_SIZE
MOTION_LAYOUT = c_struct(
    "xenkbd_motion",
    [Field("type", "B"), pad(3), Field("rel_x", "i"), Field("rel_y", "i"), Field("rel_z", "i")],
    pad_to=_E,
)
KEY_LAYOUT = c_struct(
    "xenkbd_key",
    [Field("type", "B"), Field("pressed", "B"), pad(2), Field("keycode", "I")],
    pad_to=_E,
)
POSITION_LAYOUT = c_struct(
    "xenkbd_position",
    [Field("type", "B"), pad(3), Field("abs_x", "i"), Field("abs_y", "i"), Field("rel_z", "i")],
    pad_to=_E,
)
_MT_HEAD = [Field("type", "B"), Field("event_type", "B"), Field("contact_id", "B"), pad(5)]
MTOUCH_POS_LAYOUT = c_struct(
    "xenkbd_mtouch.pos",
    [*_MT_HEAD, Field("abs_x", "i", c="u.pos.abs_x"), Field("abs_y", "i", c="u.pos.abs_y")],
    pad_to=_E,
)
MTOUCH_SHAPE_LAYOUT = c_struct(
    "xenkbd_mtouch.shape",
    [*_MT_HEAD, Field("major", "I", c="u.shape.major"), Field("minor", "I", c="u.shape.minor")],
    pad_to=_E,
)
MTOUCH_ORIENT_LAYOUT = c_struct(
    "xenkbd_mtouch.orientation",
    [*_MT_HEAD, Field("orientation", "h", c="u.orientation")],
    pad_to=_E,
)
MTOUCH_LAYOUT = c_struct("xenkbd_mtouch.plain", _MT_HEAD, pad_to=_E)
#: Just the type byte of a 40-byte slot: batch view to dispatch on ``type``.
EVENT_TYPE_DTYPE = Layout("xenkbd_in_event", [Field("type", "B")], pad_to=_E).dtype


@dataclass(frozen=True)
class KbdPage(Record):
    """The four ring indexes at the start of the page."""

    LAYOUT: ClassVar[Layout] = PAGE_LAYOUT
    in_cons: int
    in_prod: int
    out_cons: int
    out_prod: int


@dataclass(frozen=True)
class Motion(Record):
    """``XENKBD_TYPE_MOTION``: relative pointer movement (``rel_z`` = wheel)."""

    LAYOUT: ClassVar[Layout] = MOTION_LAYOUT
    type: int
    rel_x: int
    rel_y: int
    rel_z: int = 0


@dataclass(frozen=True)
class Key(Record):
    """``XENKBD_TYPE_KEY``: key or button (Linux input code) pressed (1) or released (0)."""

    LAYOUT: ClassVar[Layout] = KEY_LAYOUT
    type: int
    pressed: int
    keycode: int


@dataclass(frozen=True)
class Position(Record):
    """``XENKBD_TYPE_POS``: absolute pointer position (``rel_z`` = wheel)."""

    LAYOUT: ClassVar[Layout] = POSITION_LAYOUT
    type: int
    abs_x: int
    abs_y: int
    rel_z: int = 0


@dataclass(frozen=True)
class MTouchPos(Record):
    """``XENKBD_TYPE_MTOUCH`` with ``XENKBD_MT_EV_DOWN`` or ``XENKBD_MT_EV_MOTION``."""

    LAYOUT: ClassVar[Layout] = MTOUCH_POS_LAYOUT
    type: int
    event_type: int
    contact_id: int
    abs_x: int
    abs_y: int


@dataclass(frozen=True)
class MTouchShape(Record):
    """``XENKBD_MT_EV_SHAPE``: contact ellipse axes in pixels."""

    LAYOUT: ClassVar[Layout] = MTOUCH_SHAPE_LAYOUT
    type: int
    event_type: int
    contact_id: int
    major: int
    minor: int


@dataclass(frozen=True)
class MTouchOrient(Record):
    """``XENKBD_MT_EV_ORIENT``: clockwise degrees of the major axis from +Y (-180..180)."""

    LAYOUT: ClassVar[Layout] = MTOUCH_ORIENT_LAYOUT
    type: int
    event_type: int
    contact_id: int
    orientation: int


@dataclass(frozen=True)
class MTouch(Record):
    """``XENKBD_MT_EV_UP`` / ``XENKBD_MT_EV_SYN`` (no payload), or an unknown sub-type."""

    LAYOUT: ClassVar[Layout] = MTOUCH_LAYOUT
    type: int
    event_type: int
    contact_id: int


@dataclass(frozen=True)
class UnknownEvent:
    """An event of a type this module does not decode (frontends skip these)."""

    type: int
    raw: bytes


InEvent = Motion | Key | Position | MTouchPos | MTouchShape | MTouchOrient | MTouch | UnknownEvent

_MT_CLASSES: dict[int, type[MTouchPos] | type[MTouchShape] | type[MTouchOrient] | type[MTouch]] = {
    XENKBD_MT_EV_DOWN: MTouchPos,
    XENKBD_MT_EV_MOTION: MTouchPos,
    XENKBD_MT_EV_SHAPE: MTouchShape,
    XENKBD_MT_EV_ORIENT: MTouchOrient,
    XENKBD_MT_EV_UP: MTouch,
    XENKBD_MT_EV_SYN: MTouch,
}
_CLASSES: dict[int, type[Motion] | type[Key] | type[Position]] = {
    XENKBD_TYPE_MOTION: Motion,
    XENKBD_TYPE_KEY: Key,
    XENKBD_TYPE_POS: Position,
}


def in_slot_offset(idx: int) -> int:
    """Page offset of in-ring slot for free-running index ``idx`` (modulo 51)."""
    return XENKBD_IN_RING_OFFS + (idx % XENKBD_IN_RING_LEN) * XENKBD_IN_EVENT_SIZE


def out_slot_offset(idx: int) -> int:
    """Page offset of out-ring slot for free-running index ``idx`` (modulo 25)."""
    return XENKBD_OUT_RING_OFFS + (idx % XENKBD_OUT_RING_LEN) * XENKBD_OUT_EVENT_SIZE


def parse_in_event(buf: Buffer, offset: int = 0) -> InEvent:
    """Copy one 40-byte event out once and decode it by ``type`` (and multi-touch sub-type)."""
    mv = memoryview(buf).cast("B")
    if offset < 0 or offset + XENKBD_IN_EVENT_SIZE > len(mv):
        raise LocalError(f"kbd event: buffer too short at {offset}")
    raw = bytes(mv[offset : offset + XENKBD_IN_EVENT_SIZE])
    kind = raw[0]
    if kind == XENKBD_TYPE_MTOUCH:
        return _MT_CLASSES.get(raw[1], MTouch).parse(raw)
    cls = _CLASSES.get(kind)
    return cls.parse(raw) if cls is not None else UnknownEvent(kind, raw)


def validate_in_event(
    ev: InEvent,
    *,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    num_contacts: int | None = None,
) -> None:
    """Strict check of an in-ring event; raise :class:`ProtocolError` for anything out of range.

    Known type; key state 0/1; absolute coordinates within ``0..width`` / ``0..height``;
    known multi-touch sub-type; contact id below ``num_contacts`` (when given);
    orientation within -180..180.
    """
    if isinstance(ev, UnknownEvent):
        raise ProtocolError(f"kbd event type {ev.type} unknown")
    if isinstance(ev, Key):
        if ev.pressed not in (0, 1):
            raise ProtocolError(f"kbd key event pressed={ev.pressed}")
        return
    if isinstance(ev, Position | MTouchPos):
        if not (0 <= ev.abs_x <= width and 0 <= ev.abs_y <= height):
            raise ProtocolError(f"kbd position ({ev.abs_x}, {ev.abs_y}) outside {width}x{height}")
    if isinstance(ev, MTouchPos | MTouchShape | MTouchOrient | MTouch):
        if ev.event_type not in _MT_CLASSES:
            raise ProtocolError(f"kbd multi-touch sub-type {ev.event_type} unknown")
        if num_contacts is not None and ev.contact_id >= num_contacts:
            raise ProtocolError(f"kbd contact id {ev.contact_id} >= {num_contacts}")
    if isinstance(ev, MTouchOrient) and not -180 <= ev.orientation <= 180:
        raise ProtocolError(f"kbd orientation {ev.orientation} outside -180..180")

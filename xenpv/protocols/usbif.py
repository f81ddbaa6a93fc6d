"""USB protocol (``xen/io/usbif.h``): urb and conn rings, pipe bits, validation.

Two single-page rings share one event channel: the *urb* ring (148-byte requests, 16-byte
responses, 16 slots) carries transfers; the *conn* ring (2-byte requests, 4-byte responses,
512 slots) lets the backend report plug/unplug on root ports 1..31.  A urb's ``pipe`` word
packs port, unlink flag, direction, device, endpoint and transfer type (:class:`Pipe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from xenpv.protocols import ProtocolError
from xenpv.protocols.layout import XEN_PAGE_SIZE, Field, Layout, Record, RingLayout, c_struct

# io/usbif.h: enum usb_spec_version
USB_VER_UNKNOWN = 0
USB_VER_USB11 = 1
USB_VER_USB20 = 2
USB_VER_USB30 = 3

# io/usbif.h: pipe bits
USBIF_PIPE_PORT_MASK = 0x0000001F
USBIF_PIPE_UNLINK = 0x00000020
USBIF_PIPE_DIR = 0x00000080
USBIF_PIPE_DEV_MASK = 0x0000007F
USBIF_PIPE_DEV_SHIFT = 8
USBIF_PIPE_EP_MASK = 0x0000000F
USBIF_PIPE_EP_SHIFT = 15
USBIF_PIPE_TYPE_MASK = 0x00000003
USBIF_PIPE_TYPE_SHIFT = 30
USBIF_PIPE_TYPE_ISOC = 0
USBIF_PIPE_TYPE_INT = 1
USBIF_PIPE_TYPE_CTRL = 2
USBIF_PIPE_TYPE_BULK = 3

# io/usbif.h: limits, flags, statuses, speeds
USBIF_MAX_SEGMENTS_PER_REQUEST = 16
USBIF_MAX_PORTNR = 31
USBIF_RING_SIZE = 4096
USBIF_SHORT_NOT_OK = 0x0001
USBIF_STATUS_OK = 0
USBIF_STATUS_NODEV = -19
USBIF_STATUS_INVAL = -22
USBIF_STATUS_STALL = -32
USBIF_STATUS_IOERROR = -71
USBIF_STATUS_BABBLE = -75
USBIF_STATUS_SHUTDOWN = -108
USBIF_SPEED_NONE = 0
USBIF_SPEED_LOW = 1
USBIF_SPEED_FULL = 2
USBIF_SPEED_HIGH = 3

# xenstore keys (device type "qusb")
DEVICE_TYPE = "qusb"
KEY_URB_RING_REF = "urb-ring-ref"
KEY_CONN_RING_REF = "conn-ring-ref"
KEY_EVENT_CHANNEL = "event-channel"
KEY_PROTOCOL = "protocol"
KEY_NUM_PORTS = "num-ports"
KEY_USB_VER = "usb-ver"


def port_key(port: int) -> str:
    """Backend key naming the physical device on root port ``port`` (``port/<n>``)."""
    return f"port/{port}"


SEGMENT_LAYOUT = c_struct(
    "usbif_request_segment",
    [Field("gref", "I"), Field("offset", "H"), Field("length", "H")],
)
URB_REQUEST_LAYOUT = c_struct(
    "usbif_urb_request",
    [
        Field("id", "H"),
        Field("nr_buffer_segs", "H"),
        Field("pipe", "I"),
        Field("transfer_flags", "H"),
        Field("buffer_length", "H"),
        Field("u", "s", 8, c="u.ctrl"),
        Field("seg", "", USBIF_MAX_SEGMENTS_PER_REQUEST, sub=SEGMENT_LAYOUT),
    ],
)
URB_RESPONSE_LAYOUT = c_struct(
    "usbif_urb_response",
    [
        Field("id", "H"),
        Field("start_frame", "H"),
        Field("status", "i"),
        Field("actual_length", "i"),
        Field("error_count", "i"),
    ],
)
CONN_REQUEST_LAYOUT = c_struct("usbif_conn_request", [Field("id", "H")])
CONN_RESPONSE_LAYOUT = c_struct(
    "usbif_conn_response",
    [Field("id", "H"), Field("portnum", "B"), Field("speed", "B")],
)
#: The type-specific 8 bytes read as isochronous parameters (``u.isoc``).
ISOC_LAYOUT = Layout(
    "usbif_urb_request.u.isoc",
    [
        Field("interval", "H", c="u.isoc.interval"),
        Field("start_frame", "H", c="u.isoc.start_frame"),
        Field("number_of_packets", "H", c="u.isoc.number_of_packets"),
        Field("nr_frame_desc_segs", "H", c="u.isoc.nr_frame_desc_segs"),
    ],
)

URB_RING = RingLayout("usbif_urb", URB_REQUEST_LAYOUT.size, URB_RESPONSE_LAYOUT.size)
CONN_RING = RingLayout("usbif_conn", CONN_REQUEST_LAYOUT.size, CONN_RESPONSE_LAYOUT.size)
USB_URB_RING_SIZE = URB_RING.nr_ents()
USB_CONN_RING_SIZE = CONN_RING.nr_ents()
#: Batch views over ring slots (itemsize = slot size).
URB_REQUEST_DTYPE = URB_REQUEST_LAYOUT.dtype_for(URB_RING.slot_size)
URB_RESPONSE_DTYPE = URB_RESPONSE_LAYOUT.dtype_for(URB_RING.slot_size)
CONN_REQUEST_DTYPE = CONN_REQUEST_LAYOUT.dtype_for(CONN_RING.slot_size)
CONN_RESPONSE_DTYPE = CONN_RESPONSE_LAYOUT.dtype_for(CONN_RING.slot_size)


def _frame_desc_segs(pipe: int, u: bytes) -> int:
    if (pipe >> USBIF_PIPE_TYPE_SHIFT) & USBIF_PIPE_TYPE_MASK != USBIF_PIPE_TYPE_ISOC:
        return 0
    return int(u[6]) | int(u[7]) << 8


@dataclass(frozen=True)
class UsbSegment(Record):
    """``struct usbif_request_segment``: ``length`` bytes at ``offset`` of granted page ``gref``."""

    LAYOUT: ClassVar[Layout] = SEGMENT_LAYOUT
    gref: int
    offset: int
    length: int


@dataclass(frozen=True)
class UrbRequest(Record):
    """``struct usbif_urb_request``.

    ``seg`` holds the segments the request names: ``nr_buffer_segs`` buffer segments, then
    for isochronous pipes ``u.isoc.nr_frame_desc_segs`` frame-descriptor segments (at most
    16 in all).  ``u`` is the raw type-specific union (control: the 8-byte setup packet).
    """

    LAYOUT: ClassVar[Layout] = URB_REQUEST_LAYOUT
    id: int
    nr_buffer_segs: int
    pipe: int
    transfer_flags: int
    buffer_length: int
    u: bytes = bytes(8)
    seg: tuple[UsbSegment, ...] = ()

    @classmethod
    def from_raw(cls, raw: tuple[Any, ...]) -> Self:
        """Build from raw values, keeping only the segments ``nr_buffer_segs`` names."""
        rid, nsegs, pipe, flags, length, u, segs = raw
        used = min(nsegs + _frame_desc_segs(pipe, u), USBIF_MAX_SEGMENTS_PER_REQUEST)
        return cls(rid, nsegs, pipe, flags, length, u, tuple(UsbSegment(*s) for s in segs[:used]))

    @property
    def frame_desc_segs(self) -> int:
        """Frame-descriptor segments after the buffer segments (isochronous pipes only)."""
        return _frame_desc_segs(self.pipe, self.u)

    def isoc(self) -> tuple[int, int, int, int]:
        """``u`` read as isochronous parameters: interval, start_frame, packets, desc segs."""
        interval, start, packets, descs = ISOC_LAYOUT.unpack_from(self.u)
        return interval, start, packets, descs


@dataclass(frozen=True)
class UrbResponse(Record):
    """``struct usbif_urb_response``."""

    LAYOUT: ClassVar[Layout] = URB_RESPONSE_LAYOUT
    id: int
    start_frame: int
    status: int
    actual_length: int
    error_count: int


@dataclass(frozen=True)
class ConnRequest(Record):
    """``struct usbif_conn_request``: a buffer id posted by the frontend."""

    LAYOUT: ClassVar[Layout] = CONN_REQUEST_LAYOUT
    id: int


@dataclass(frozen=True)
class ConnResponse(Record):
    """``struct usbif_conn_response``: port ``portnum`` now has a device of ``speed`` (0 = gone)."""

    LAYOUT: ClassVar[Layout] = CONN_RESPONSE_LAYOUT
    id: int
    portnum: int
    speed: int


@dataclass(frozen=True)
class Pipe:
    """The fields of a urb ``pipe`` word (io/usbif.h ``usbif_pipe*`` macros)."""

    port: int
    unlink: bool
    direction_in: bool
    device: int
    endpoint: int
    type: int

    @classmethod
    def decode(cls, pipe: int) -> Pipe:
        """Split a pipe word into its fields."""
        return cls(
            pipe & USBIF_PIPE_PORT_MASK,
            bool(pipe & USBIF_PIPE_UNLINK),
            bool(pipe & USBIF_PIPE_DIR),
            (pipe >> USBIF_PIPE_DEV_SHIFT) & USBIF_PIPE_DEV_MASK,
            (pipe >> USBIF_PIPE_EP_SHIFT) & USBIF_PIPE_EP_MASK,
            (pipe >> USBIF_PIPE_TYPE_SHIFT) & USBIF_PIPE_TYPE_MASK,
        )

    def encode(self) -> int:
        """The pipe word of these fields."""
        return (
            (self.port & USBIF_PIPE_PORT_MASK)
            | (USBIF_PIPE_UNLINK if self.unlink else 0)
            | (USBIF_PIPE_DIR if self.direction_in else 0)
            | (self.device & USBIF_PIPE_DEV_MASK) << USBIF_PIPE_DEV_SHIFT
            | (self.endpoint & USBIF_PIPE_EP_MASK) << USBIF_PIPE_EP_SHIFT
            | (self.type & USBIF_PIPE_TYPE_MASK) << USBIF_PIPE_TYPE_SHIFT
        )


def validate_port(port: int, num_ports: int = USBIF_MAX_PORTNR) -> None:
    """A root port number must be 1..``num_ports`` (at most 31)."""
    if not 1 <= port <= min(num_ports, USBIF_MAX_PORTNR):
        raise ProtocolError(f"usb port {port} outside 1..{min(num_ports, USBIF_MAX_PORTNR)}")


def validate_urb_request(req: UrbRequest, num_ports: int = USBIF_MAX_PORTNR) -> None:
    """Backend check of a urb.

    Port in range; at most 16 segments, each inside its page; buffer segments holding no
    more than ``buffer_length``.  Unlink requests carry no segments.
    """
    validate_port(req.pipe & USBIF_PIPE_PORT_MASK, num_ports)
    if req.pipe & USBIF_PIPE_UNLINK:
        return
    nsegs = req.nr_buffer_segs + req.frame_desc_segs
    if nsegs > USBIF_MAX_SEGMENTS_PER_REQUEST:
        raise ProtocolError(f"usb urb {req.id}: {nsegs} segments > {USBIF_MAX_SEGMENTS_PER_REQUEST}")
    total = 0
    for k, s in enumerate(req.seg):
        if s.offset + s.length > XEN_PAGE_SIZE:
            raise ProtocolError(f"usb urb {req.id}: segment {s.offset}+{s.length} crosses the page")
        if k < req.nr_buffer_segs:
            total += s.length
    if total > req.buffer_length:
        raise ProtocolError(f"usb urb {req.id}: segments hold {total} > buffer_length {req.buffer_length}")


def validate_conn_response(rsp: ConnResponse, num_ports: int = USBIF_MAX_PORTNR) -> None:
    """Frontend check of a conn response: port in range, known speed."""
    validate_port(rsp.portnum, num_ports)
    if rsp.speed not in (USBIF_SPEED_NONE, USBIF_SPEED_LOW, USBIF_SPEED_FULL, USBIF_SPEED_HIGH):
        raise ProtocolError(f"usb port {rsp.portnum}: unknown speed {rsp.speed}")

"""kbdif, usbif, console and xenstore ring checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError, PeerError
from xenpv.protocols import ProtocolError, console, kbdif, usbif, xsring
from xenpv.protocols.layout import RingLayout, ring_nr_ents

# -- kbdif -----------------------------------------------------------------------------------


def test_scenario_28_kbd_events_out_of_range() -> None:
    kbdif.validate_in_event(kbdif.Position(kbdif.XENKBD_TYPE_POS, 800, 600, 0))
    kbdif.validate_in_event(kbdif.Key(kbdif.XENKBD_TYPE_KEY, 0, 30))
    bad = [
        kbdif.Position(kbdif.XENKBD_TYPE_POS, 801, 0, 0),
        kbdif.Position(kbdif.XENKBD_TYPE_POS, -1, 0, 0),
        kbdif.Key(kbdif.XENKBD_TYPE_KEY, 2, 30),
        kbdif.UnknownEvent(kbdif.XENKBD_TYPE_RESERVED, bytes(40)),
        kbdif.MTouch(kbdif.XENKBD_TYPE_MTOUCH, 9, 0),
        kbdif.MTouchOrient(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_ORIENT, 0, 181),
        kbdif.MTouchPos(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_DOWN, 10, 1, 1),
    ]
    for ev in bad:
        with pytest.raises(ProtocolError):
            kbdif.validate_in_event(ev, num_contacts=10)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(min_size=40, max_size=40))
def test_hostile_kbd_slots_only_raise_peer_errors(raw: bytes) -> None:
    ev = kbdif.parse_in_event(raw)
    try:
        kbdif.validate_in_event(ev, width=1024, height=768, num_contacts=4)
    except PeerError:
        return
    assert not isinstance(ev, kbdif.UnknownEvent)


def test_kbd_geometry() -> None:
    assert kbdif.XENKBD_IN_RING_LEN == 51 and kbdif.XENKBD_OUT_RING_LEN == 25
    assert kbdif.in_slot_offset(50) == 1024 + 50 * 40
    assert kbdif.in_slot_offset(0xFFFFFFFF) == 1024 + (0xFFFFFFFF % 51) * 40
    assert kbdif.out_slot_offset(25) == 3072
    assert kbdif.EVENT_TYPE_DTYPE.itemsize == 40
    with pytest.raises(LocalError):
        kbdif.parse_in_event(bytes(39))


# -- usbif -----------------------------------------------------------------------------------


def test_pipe_bits() -> None:
    pipe = usbif.Pipe(port=3, unlink=False, direction_in=True, device=5, endpoint=2, type=usbif.USBIF_PIPE_TYPE_BULK)
    word = pipe.encode()
    assert word == 3 | 0x80 | 5 << 8 | 2 << 15 | 3 << 30
    assert usbif.Pipe.decode(word) == pipe


@settings(max_examples=100, deadline=None)
@given(word=st.integers(0, 0xFFFFFFFF))
def test_pipe_decode_encode_keeps_defined_bits(word: int) -> None:
    defined = 0x1F | 0x20 | 0x80 | 0x7F << 8 | 0xF << 15 | 3 << 30
    assert usbif.Pipe.decode(word).encode() == word & defined


def test_usb_validation() -> None:
    usbif.validate_port(1)
    usbif.validate_port(31)
    for bad in (0, 32, 5):
        with pytest.raises(ProtocolError):
            usbif.validate_port(bad, num_ports=4)
    seg = usbif.UsbSegment(8, 0, 512)
    req = usbif.UrbRequest(1, 1, usbif.Pipe(2, False, True, 1, 1, 3).encode(), 0, 512, bytes(8), (seg,))
    usbif.validate_urb_request(req, num_ports=4)
    with pytest.raises(ProtocolError, match=r"^usb urb 1: segment 4000\+512 crosses the page$"):
        usbif.validate_urb_request(
            usbif.UrbRequest(1, 1, req.pipe, 0, 512, bytes(8), (usbif.UsbSegment(8, 4000, 512),))
        )
    with pytest.raises(ProtocolError, match=r"^usb urb 1: segments hold 512 > buffer_length 100$"):
        usbif.validate_urb_request(usbif.UrbRequest(1, 1, req.pipe, 0, 100, bytes(8), (seg,)))
    with pytest.raises(ProtocolError):  # 17 segments
        usbif.validate_urb_request(usbif.UrbRequest(1, 17, req.pipe, 0, 512, bytes(8), (seg,)))
    with pytest.raises(ProtocolError):  # port 0
        usbif.validate_urb_request(usbif.UrbRequest(1, 1, req.pipe & ~0x1F, 0, 512, bytes(8), (seg,)))
    usbif.validate_conn_response(usbif.ConnResponse(1, 3, usbif.USBIF_SPEED_HIGH))
    with pytest.raises(ProtocolError):
        usbif.validate_conn_response(usbif.ConnResponse(1, 3, 4))
    assert (usbif.USB_URB_RING_SIZE, usbif.USB_CONN_RING_SIZE) == (16, 512)
    assert usbif.port_key(3) == "port/3"


def test_usb_isoc_request_keeps_frame_descriptor_segments() -> None:
    pipe = usbif.Pipe(1, False, True, 1, 1, usbif.USBIF_PIPE_TYPE_ISOC).encode()
    u = bytes([1, 0, 0, 0, 8, 0, 2, 0])  # interval 1, 8 packets, 2 descriptor segments
    segs = tuple(usbif.UsbSegment(k, 0, 64) for k in range(5))
    req = usbif.UrbRequest(1, 3, pipe, 0, 192, u, segs)
    again = usbif.UrbRequest.parse(req.pack())
    assert again == req and again.frame_desc_segs == 2 and again.isoc() == (1, 0, 8, 2)
    usbif.validate_urb_request(again)


# -- console and xenstore ring ---------------------------------------------------------------


def test_console_indexes() -> None:
    idx = console.ConsoleIndexes(in_cons=5, in_prod=10, out_cons=0xFFFFFFF0, out_prod=0x10)
    assert idx.out_pending() == 0x20 and idx.in_space() == 1019
    assert console.ConsoleIndexes(0, 2000, 0, 3000).out_pending() == 0  # scenario 27: ignored
    assert console.ConsoleIndexes(0, 2000, 0, 0).in_space() == 0
    assert console.XENCONS_INTERFACE_SIZE == 3088 and console.XENCONS_INTERFACE_SIZE_UPSTREAM == 3092


def test_xenstore_ring_used() -> None:
    assert xsring.ring_used(10, 5) == 5
    assert xsring.ring_used(3, 0xFFFFFFFE) == 5
    assert xsring.ring_used(1024, 0) == 1024
    with pytest.raises(ProtocolError) as info:  # scenario 25: in_prod - in_cons > 1024
        xsring.ring_used(1025, 0)
    assert str(info.value) == "xenstore ring index corrupt: prod 1025 cons 0"


def test_ring_geometry_helper() -> None:
    assert ring_nr_ents(4096, 112) == 32
    assert ring_nr_ents(64, 8) == 0 and ring_nr_ents(100, 64) == 0
    assert RingLayout("conn", 2, 4).slot_size == 4
    with pytest.raises(LocalError):
        ring_nr_ents(4096, 0)


def test_ring_geometry_edges() -> None:
    """One-byte slots (the smallest), a ring no bigger than its header, page counts."""
    assert ring_nr_ents(64, 1) == 0 and ring_nr_ents(65, 1) == 1 and ring_nr_ents(40, 1) == 0
    assert ring_nr_ents(100, 1) == 32 and ring_nr_ents(4096, 1) == 2048
    for bad in (0, -1):
        with pytest.raises(LocalError, match=f"slot size must be positive, got {bad}"):
            ring_nr_ents(4096, bad)
    ring = RingLayout("r", 1, 1)
    assert ring.nr_ents() == 2048 and ring.nr_ents(2) == 4096 and ring.nr_ents(1) == 2048
    with pytest.raises(LocalError, match="r: a ring needs at least one page, got 0"):
        ring.nr_ents(0)


def test_usb_conn_responses_and_kbd_out_slots_at_their_edges() -> None:
    """A conn response's port is checked against the frontend's port count, its speed
    against the four known; out-ring slot k of the keyboard page lies at 3072 + 40 * k."""
    usbif.validate_conn_response(usbif.ConnResponse(1, 4, usbif.USBIF_SPEED_HIGH), num_ports=4)
    usbif.validate_conn_response(usbif.ConnResponse(1, 31, 0))
    for port, ports in ((5, 4), (0, 4), (32, 31)):
        with pytest.raises(ProtocolError, match=f"usb port {port} outside 1..{ports}"):
            usbif.validate_conn_response(usbif.ConnResponse(1, port, 0), num_ports=ports)
    with pytest.raises(ProtocolError, match="usb port 2: unknown speed 4"):
        usbif.validate_conn_response(usbif.ConnResponse(1, 2, 4))
    assert kbdif.XENKBD_OUT_RING_LEN == 25 and kbdif.XENKBD_OUT_RING_OFFS == 3072
    assert [kbdif.out_slot_offset(i) for i in (0, 1, 24, 25, 26)] == [3072, 3112, 4032, 3072, 3112]


def test_usb_isochronous_urbs_count_frame_descriptor_segments() -> None:
    """Buffer and frame-descriptor segments together: 9 + 7 = 16 is accepted, 10 + 7 = 17
    refused, even though each kind alone is far below the limit."""
    isoc = usbif.Pipe(2, False, True, 1, 1, 0).encode()
    u = bytes(6) + (7).to_bytes(2, "little")
    seg = usbif.UsbSegment(8, 0, 8)
    ok = usbif.UrbRequest(1, 9, isoc, 0, 512, u, (seg,) * 16)
    assert ok.frame_desc_segs == 7
    usbif.validate_urb_request(ok, num_ports=4)
    with pytest.raises(ProtocolError, match=r"^usb urb 1: 17 segments > 16$"):
        usbif.validate_urb_request(usbif.UrbRequest(1, 10, isoc, 0, 512, u, (seg,) * 17))
    # the count is a little-endian u16 at u[6:8], and only an isochronous pipe has one
    assert usbif.UrbRequest(1, 1, isoc, 0, 512, bytes(7) + b"\x01", (seg,)).frame_desc_segs == 256
    bulk = usbif.Pipe(2, False, True, 1, 1, 3).encode()
    assert usbif.UrbRequest(1, 1, bulk, 0, 512, u, (seg,)).frame_desc_segs == 0


def test_byte_ring_fill_at_the_edges() -> None:
    """A full ring holds ``size`` readable bytes and no space; one more is corrupt (0, 0);
    the indexes wrap at 2^32."""
    from xenpv.protocols.layout import byte_ring_avail, byte_ring_space

    for size in (1024, 2048):
        assert (byte_ring_avail(size, 0, size), byte_ring_space(size, 0, size)) == (size, 0)
        assert (byte_ring_avail(size - 1, 0, size), byte_ring_space(size - 1, 0, size)) == (size - 1, 1)
        assert (byte_ring_avail(size + 1, 0, size), byte_ring_space(size + 1, 0, size)) == (0, 0)
        assert byte_ring_avail(size - 5, 2**32 - 5, size) == size


def test_kbd_event_refusals_say_what_is_wrong() -> None:
    """Each in-ring refusal names the offending value; an unknown event type keeps its type
    and raw bytes; a short buffer is a local error naming the offset."""
    raw = bytes([9]) + bytes(range(1, 40))
    unknown = kbdif.parse_in_event(raw)
    assert unknown == kbdif.UnknownEvent(9, raw)
    cases = [
        (unknown, "kbd event type 9 unknown"),
        (kbdif.Key(kbdif.XENKBD_TYPE_KEY, 2, 30), "kbd key event pressed=2"),
        (kbdif.Position(kbdif.XENKBD_TYPE_POS, 10, 801), r"kbd position \(10, 801\) outside 800x600"),
        (kbdif.MTouch(kbdif.XENKBD_TYPE_MTOUCH, 9, 0), "kbd multi-touch sub-type 9 unknown"),
        (kbdif.MTouchOrient(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_ORIENT, 0, 181),
         "kbd orientation 181 outside -180..180"),
    ]  # fmt: skip
    for ev, text in cases:
        with pytest.raises(ProtocolError, match=f"^{text}$"):
            kbdif.validate_in_event(ev, width=800, height=600)
    contact = kbdif.MTouchPos(kbdif.XENKBD_TYPE_MTOUCH, kbdif.XENKBD_MT_EV_DOWN, 4, 1, 1)
    with pytest.raises(ProtocolError, match=r"^kbd contact id 4 >= 4$"):
        kbdif.validate_in_event(contact, num_contacts=4)
    with pytest.raises(LocalError, match=r"^kbd event: buffer too short at 8$"):
        kbdif.parse_in_event(bytes(40), 8)

"""kbdif, usbif, console, xenstore ring, grant, event-channel and xenstore-number checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError, PeerError
from xenpv.protocols import ProtocolError, console, evtchn, grant, ioctl, kbdif, usbif, xsring
from xenpv.protocols.layout import RingLayout, parse_xs_uint, ring_nr_ents

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
    with pytest.raises(ProtocolError):  # segment crosses its page
        usbif.validate_urb_request(
            usbif.UrbRequest(1, 1, req.pipe, 0, 512, bytes(8), (usbif.UsbSegment(8, 4000, 512),))
        )
    with pytest.raises(ProtocolError):  # more data than buffer_length
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
    with pytest.raises(ProtocolError):  # scenario 25: in_prod - in_cons > 1024
        xsring.ring_used(1025, 0)


# -- grants, event channels, xenstore numbers ------------------------------------------------


def test_grant_helpers() -> None:
    assert grant.gntst_name(grant.GNTST_eagain) == "eagain"
    assert grant.gntst_name(-99) == "unknown(-99)"
    ok = grant.GnttabCopy(8, 1, 0, 0x1000, grant.DOMID_SELF, 100, 3996, grant.GNTCOPY_source_gref)
    assert grant.check_copy(ok) == grant.GNTST_okay
    bad = grant.GnttabCopy(8, 1, 1, 0x1000, grant.DOMID_SELF, 0, 4096, grant.GNTCOPY_source_gref)
    assert grant.check_copy(bad) == grant.GNTST_bad_copy_arg
    assert grant.GrantEntryV1(grant.GTF_permit_access | grant.GTF_readonly, 1, 0x1234).pack() == bytes(
        [5, 0, 1, 0, 0x34, 0x12, 0, 0]
    )


@pytest.mark.parametrize("value", ["abc", "-1", str(1 << 40), "", " 8", "8 ", "0x8", "1_0", "\uff18"])
def test_scenario_18_bad_ring_refs_and_ports(value: str) -> None:
    with pytest.raises(ProtocolError):
        grant.parse_grant_ref(value)
    with pytest.raises(ProtocolError):
        evtchn.parse_port(value)


def test_numbers_from_xenstore() -> None:
    assert grant.parse_grant_ref("4294967295") == 0xFFFFFFFF
    assert grant.parse_grant_ref(b"8") == 8
    assert evtchn.parse_port("17") == 17
    with pytest.raises(ProtocolError):
        evtchn.parse_port("0")
    with pytest.raises(ProtocolError):
        evtchn.parse_port(str(1 << 17))
    with pytest.raises(ProtocolError):
        grant.validate_grant_ref(600, table_size=512)
    evtchn.validate_port(4095)
    for bad in (0, 4096):
        with pytest.raises(ProtocolError):
            evtchn.validate_port(bad)
    assert parse_xs_uint("007", "x", 10) == 7
    with pytest.raises(ProtocolError):
        parse_xs_uint("1" * 21, "x", 1 << 80)


def test_ring_geometry_helper() -> None:
    assert ring_nr_ents(4096, 112) == 32
    assert ring_nr_ents(64, 8) == 0 and ring_nr_ents(100, 64) == 0
    assert RingLayout("conn", 2, 4).slot_size == 4
    with pytest.raises(LocalError):
        ring_nr_ents(4096, 0)


#: xen-protocols.md §0.3 (Linux, x86-64): number and argument size of each ioctl.
IOCTL_TABLE = {
    "IOCTL_GNTDEV_MAP_GRANT_REF": (0x00184700, 24),
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": (0x00104701, 16),
    "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR": (0x00184702, 24),
    "IOCTL_GNTDEV_SET_MAX_GRANTS": (0x00044703, 4),
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": (0x00104707, 16),
    "IOCTL_GNTDEV_GRANT_COPY": (0x00104708, 16),
    "IOCTL_GNTALLOC_ALLOC_GREF": (0x00184705, 24),
    "IOCTL_GNTALLOC_DEALLOC_GREF": (0x00104706, 16),
    "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY": (0x00104707, 16),
    "IOCTL_EVTCHN_BIND_VIRQ": (0x00044500, 4),
    "IOCTL_EVTCHN_BIND_INTERDOMAIN": (0x00084501, 8),
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT": (0x00044502, 4),
    "IOCTL_EVTCHN_UNBIND": (0x00044503, 4),
    "IOCTL_EVTCHN_NOTIFY": (0x00044504, 4),
    "IOCTL_EVTCHN_RESET": (0x00004505, 0),
    "IOCTL_EVTCHN_RESTRICT_DOMID": (0x00024506, 2),
    "IOCTL_EVTCHN_BIND_STATIC": (0x00044507, 4),
}


@pytest.mark.parametrize("name", list(IOCTL_TABLE))
def test_ioctl_numbers_match_the_reference_table(name: str) -> None:
    # BIND_STATIC is newer than Xen 4.17's copy of the header, so this table is its check;
    # the others are also compared with the compiled kernel headers in test_layouts_c.
    number, size = IOCTL_TABLE[name]
    assert getattr(ioctl, name) == number
    assert (number >> 16) & 0x3FFF == size and number >> 30 == 0


def test_ioc_encoding() -> None:
    assert ioctl._IOC(ioctl._IOC_READ | ioctl._IOC_WRITE, "G", 1, 8) == 0xC0084701
    with pytest.raises(LocalError):
        ioctl._IOC(ioctl._IOC_NONE, "G", 256, 0)

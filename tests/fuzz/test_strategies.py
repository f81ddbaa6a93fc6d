"""The layout strategies cover every protocol layout and produce what the layouts accept."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import PeerError
from xenpv.fuzz.strategies import all_layouts, layout_bytes, layout_values, records, slot_bytes
from xenpv.protocols import blkif, kbdif, netif, usbif

LAYOUTS = all_layouts()


def test_every_protocol_module_contributes_layouts() -> None:
    prefixes = {name.split(".")[0] for name in LAYOUTS}
    assert {"blkif", "netif", "kbdif", "usbif", "vchan", "xsring", "console", "grant"} <= prefixes
    assert "blkif.request[x86_32-abi]" in LAYOUTS


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_layout_values_round_trip(name: str, data: st.DataObject) -> None:
    layout = LAYOUTS[name]
    values = data.draw(layout_values(layout))
    raw = layout.pack(values)
    assert len(raw) == layout.size
    assert layout.pack(layout.unpack_from(raw)) == raw


@settings(max_examples=60, deadline=None)
@given(req=records(blkif.BlkifRequest))
def test_blkif_requests_validate_to_a_verdict(req: blkif.BlkifRequest) -> None:
    parsed = blkif.parse_request(req.pack())
    try:
        blkif.validate_request(parsed, disk_sectors=1 << 20)
    except PeerError:
        pass


@settings(max_examples=60, deadline=None)
@given(slots=st.lists(layout_bytes(netif.TX_REQUEST_LAYOUT), min_size=1, max_size=24))
def test_netif_chains_of_well_formed_slots_parse_or_are_refused(slots: list[bytes]) -> None:
    try:
        netif.parse_tx_packet(b"".join(slots), len(slots))
    except PeerError:
        pass


@settings(max_examples=60, deadline=None)
@given(ev=slot_bytes(kbdif.XENKBD_IN_EVENT_SIZE), urb=records(usbif.UrbRequest))
def test_kbd_and_usb_validation_only_raise_peer_errors(ev: bytes, urb: usbif.UrbRequest) -> None:
    for check in (lambda: kbdif.validate_in_event(kbdif.parse_in_event(ev)),
                  lambda: usbif.validate_urb_request(usbif.UrbRequest.parse(urb.pack()))):
        try:
            check()
        except PeerError:
            pass

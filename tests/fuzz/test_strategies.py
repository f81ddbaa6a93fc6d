"""The layout strategies cover every protocol layout; validators give the spec's verdict on them.

Every outcome is checked: an accepted input against the acceptance oracle
(:mod:`xenpv.fuzz.oracles`), a refusal for its error class, request id and status, and,
where the oracle states the whole rule, that the spec really is broken."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.fuzz import oracles
from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.strategies import all_layouts, layout_bytes, layout_values, records, slot_bytes
from xenpv.protocols import ProtocolError, blkif, kbdif, netif, usbif

LAYOUTS = all_layouts()
DISK = 1 << 20


def test_every_protocol_module_contributes_layouts() -> None:
    prefixes = {name.split(".")[0] for name in LAYOUTS}
    assert {"blkif", "netif", "kbdif", "usbif", "vchan", "xsring", "console"} <= prefixes
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


def _holds(oracle: Callable[[], None]) -> bool:
    try:
        oracle()
    except InvariantViolation:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(req=records(blkif.BlkifRequest), abi=st.sampled_from(list(blkif.ABI)))
def test_blkif_requests_validate_to_the_spec_verdict(req: blkif.BlkifRequest, abi: blkif.ABI) -> None:
    raw = req.pack(abi)
    parsed = blkif.parse_request(raw, 0, abi)
    spec_ok = _holds(lambda: oracles.blkif_request(raw, abi, parsed, disk_sectors=DISK))
    try:
        blkif.validate_request(parsed, disk_sectors=DISK)
    except blkif.BlkifRequestError as e:
        assert (e.id, e.operation) == (parsed.id, parsed.operation)
        unknown = parsed.operation not in (0, 1, 2, 3, 5)  # indirect is not offered here
        assert e.status == (blkif.BLKIF_RSP_EOPNOTSUPP if unknown else blkif.BLKIF_RSP_ERROR)
        # refused: the spec must be broken too, except that an empty flush/barrier whose
        # (unused) sector_number lies past the disk is refused as well (stricter, harmless)
        empty = parsed.operation in (2, 3) and parsed.nr_segments == 0 and parsed.sector_number >= DISK
        assert not spec_ok or empty, f"valid request refused: {e}"
    else:
        assert spec_ok, "accepted a request that breaks the spec"


@settings(max_examples=200, deadline=None)
@given(slots=st.lists(layout_bytes(netif.TX_REQUEST_LAYOUT), min_size=1, max_size=24))
def test_netif_chains_of_well_formed_slots_parse_or_are_refused(slots: list[bytes]) -> None:
    blob = b"".join(slots)
    try:
        pkt = netif.parse_tx_packet(blob, len(slots))
    except netif.NetifPacketError as e:
        assert 1 <= e.slots <= len(slots) and len(e.ids) >= 1
    except netif.NetifFatalError:
        pass  # the frontend is disabled: nothing of the chain is used
    else:
        oracles.netif_tx_packet(blob, len(slots), pkt, max_slots=netif.XEN_NETIF_NR_SLOTS_MIN,
                                fatal_slots=netif.FATAL_SKB_SLOTS_DEFAULT)


@settings(max_examples=200, deadline=None)
@given(ev=slot_bytes(kbdif.XENKBD_IN_EVENT_SIZE), urb=records(usbif.UrbRequest))
def test_kbd_and_usb_validation_gives_the_spec_verdict(ev: bytes, urb: usbif.UrbRequest) -> None:
    raw_urb = urb.pack()
    checks = [
        (lambda: kbdif.validate_in_event(kbdif.parse_in_event(ev)),
         lambda: oracles.kbdif_event(ev, width=800, height=600, num_contacts=None)),
        (lambda: usbif.validate_urb_request(usbif.UrbRequest.parse(raw_urb)),
         lambda: oracles.usbif_urb_request(raw_urb, usbif.USBIF_MAX_PORTNR)),
    ]
    for validate, oracle in checks:
        try:
            validate()
        except ProtocolError:
            assert not _holds(oracle), "refused an input the spec allows"
        else:
            oracle()

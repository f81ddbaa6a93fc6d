"""vchan ring placement, the server's size choice and the client's order validation."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError
from xenpv.protocols import ProtocolError, vchan


@pytest.mark.parametrize(
    ("read_min", "write_min", "orders"),
    [
        (0, 0, (10, 11)),
        (1024, 2048, (10, 11)),
        (2048, 1024, (11, 10)),
        (1025, 1024, (11, 10)),
        (2048, 2048, (11, 12)),
        (100, 5000, (11, 13)),
        (5000, 100, (13, 11)),
        (4096, 4096, (12, 12)),
        (1 << 20, 4097, (20, 13)),
        (1 << 20, 1 << 20, (20, 20)),
        # one byte past each threshold
        (1024, 2049, (11, 12)),
        (2049, 1024, (12, 11)),
        (2049, 4096, (12, 12)),
        (4096, 2049, (12, 12)),
        (4096, 2048, (12, 11)),
    ],
)
def test_server_size_choice(read_min: int, write_min: int, orders: tuple[int, int]) -> None:
    assert vchan.choose_orders(read_min, write_min) == orders
    vchan.validate_orders(*orders)


@settings(max_examples=300, deadline=None)
@given(read_min=st.integers(0, 1 << 20), write_min=st.integers(0, 1 << 20))
def test_chosen_orders_fit_and_are_valid(read_min: int, write_min: int) -> None:
    left, right = vchan.choose_orders(read_min, write_min)
    assert (1 << left) >= read_min and (1 << right) >= write_min
    vchan.validate_orders(left, right)
    lp, rp = vchan.ring_placement(left, right)
    # in-page rings do not overlap each other, the header or the grant list
    grants_end = vchan.VCHAN_GRANTS_OFFSET + 4 * vchan.nr_grants(left, right)
    spans = sorted((p.offset, p.offset + p.size) for p in (lp, rp) if p.offset is not None)
    for start, end in spans:
        assert start >= grants_end and end <= 4096
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert rp.first_grant == lp.pages


def test_size_choice_rejects_oversize() -> None:
    with pytest.raises(LocalError, match=r"^vchan ring sizes must be 0\.\.1048576, got 1048577, 0$"):
        vchan.choose_orders((1 << 20) + 1, 0)


def test_order_refusals_name_the_ring_and_the_grant_list_limit() -> None:
    """Each refusal names the ring (left/right) and the bound; the grant list must end
    before an in-page ring: an order-20 ring (256 grants, ending at 1048) does not fit
    before the order-10 ring at 1024, but does before the order-11 one at 2048."""
    with pytest.raises(ProtocolError, match=r"^vchan left order 9 outside 10\.\.20$"):
        vchan.validate_orders(9, 11)
    with pytest.raises(ProtocolError, match=r"^vchan right order 21 outside 10\.\.20$"):
        vchan.validate_orders(12, 21)
    with pytest.raises(ProtocolError, match=r"^vchan rings both use the in-page order 11$"):
        vchan.validate_orders(11, 11)
    for orders in ((10, 20), (20, 10)):
        with pytest.raises(ProtocolError, match=r"^vchan grant list ends at 1048, beyond 1024$"):
            vchan.validate_orders(*orders)
    for orders in ((11, 20), (20, 11), (10, 19), (20, 20)):
        vchan.validate_orders(*orders)


@pytest.mark.parametrize(
    ("left", "right"),
    [(9, 11), (10, 21), (0, 0), (10, 10), (11, 11), (65535, 12), (21, 10)],
)
def test_scenario_26_bad_orders_are_rejected(left: int, right: int) -> None:
    with pytest.raises(ProtocolError):
        vchan.validate_orders(left, right)


def test_placement_and_grants() -> None:
    lp, rp = vchan.ring_placement(10, 11)
    assert (lp.offset, lp.pages, rp.offset, rp.pages) == (1024, 0, 2048, 0)
    lp, rp = vchan.ring_placement(13, 11)
    assert (lp.offset, lp.pages, lp.first_grant, rp.offset) == (None, 2, 0, 2048)
    lp, rp = vchan.ring_placement(12, 14)
    assert lp == vchan.RingPlacement(order=12, size=4096, offset=None, pages=1, first_grant=0)
    assert rp == vchan.RingPlacement(order=14, size=16384, offset=None, pages=4, first_grant=1)
    page = bytearray(4096)
    struct.pack_into("<5I", page, vchan.VCHAN_GRANTS_OFFSET, 8, 9, 10, 11, 12)
    assert vchan.parse_grants(page, 13, 12) == ((8, 9), (10,))
    assert vchan.nr_grants(12, 14) == 5
    with pytest.raises(ProtocolError):
        vchan.parse_grants(page, 30, 12)


def test_scenario_26_insane_indexes_read_as_zero() -> None:
    assert vchan.ring_avail(100, 50, 1024) == 50
    assert vchan.ring_avail(5000, 0, 1024) == 0
    assert vchan.ring_avail(3, 0xFFFFFFFF, 1024) == 4  # across the 2**32 wrap
    assert vchan.ring_space(100, 50, 1024) == 974
    assert vchan.ring_space(0, 5000, 1024) == 0
    assert vchan.ring_space(2000, 0, 1024) == 0


def test_interface_snapshot_and_bits() -> None:
    hdr = vchan.VchanInterface(1, 2, 3, 4, 10, 11, vchan.VCHAN_CLI_WAITING, vchan.VCHAN_SRV_ALIVE,
                               vchan.VCHAN_NOTIFY_WRITE, 0)
    data = hdr.pack()
    assert len(data) == 24 and data[20:24] == bytes([2, 1, 1, 0])
    assert vchan.VchanInterface.parse(data + bytes(100)) == hdr
    assert (vchan.VCHAN_NOTIFY_WRITE, vchan.VCHAN_NOTIFY_READ) == (1, 2)

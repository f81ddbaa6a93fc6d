"""The driver base's platform work: resources undone in one place, the quarantine, the
typed seam (capabilities by isinstance, grant(notify=), the handle's own dispatcher)."""

from __future__ import annotations

import pytest

from xenpv.drivers import DeviceResources, FrontChannel, GrantQuarantine
from xenpv.platforms.base import (
    GrantTable,
    GuestFrames,
    PreparedCopies,
    ReservedGrants,
    ResourceExhausted,
    UnmapNotify,
)
from xenpv.platforms.dispatch import PortDispatcher
from xenpv.platforms.loopback.harness import InProcessMachine


def assert_nothing_held(m: InProcessMachine) -> None:
    left = {k: v for k, v in m.outstanding().items() if v and k != "handles"}
    assert not left, f"still held: {left}"


def test_half_done_setup_is_undone_in_one_place() -> None:
    """The port table is full after the pages were shared: the pages go back too."""
    m = InProcessMachine(max_ports=2)
    try:
        fe = m.domain(1)
        m.domain(2)
        with pytest.raises(ResourceExhausted):
            for _ in range(8):
                fe.events.alloc_unbound(2)  # until the port table is full
        with pytest.raises(ResourceExhausted):
            FrontChannel.create(fe, 2, slot_size=64, order=2)
        assert m.outstanding()["grants"] == 0
    finally:
        m.close()


def test_release_quarantines_a_still_mapped_share_and_reap_ends_it() -> None:
    m = InProcessMachine()
    try:
        fe, be = m.domain(1), m.domain(2)
        res = DeviceResources(fe.grants, fe.events)
        pages = res.grant(2, 2)
        port = res.alloc_unbound(2)
        mapping = be.grants.map(1, pages.refs)
        be_port = be.events.bind_interdomain(1, port)
        res.release()
        assert res.released and len(res.quarantine) == 1
        assert res.quarantine.quarantined_total == 1
        assert m.outstanding()["ports"] == 1  # ours is gone; the backend's stays bound
        assert res.quarantine.reap() == 1
        be.grants.unmap(mapping)
        be.events.unbind(be_port)
        assert res.quarantine.reap() == 0
        res.release()  # idempotent
        assert_nothing_held(m)
    finally:
        m.close()


def test_one_quarantine_shared_by_two_owners_is_retried_by_either() -> None:
    m = InProcessMachine()
    try:
        fe, be = m.domain(1), m.domain(2)
        q = GrantQuarantine(fe.grants)
        a = FrontChannel.create(fe, 2, slot_size=64, quarantine=q)
        mapping = be.grants.map(1, a.refs)
        a.close()
        assert len(q) == 1
        be.grants.unmap(mapping)
        b = FrontChannel.create(fe, 2, slot_size=64, quarantine=q)
        b.close()  # its release retries the whole quarantine
        assert len(q) == 0
        assert_nothing_held(m)
    finally:
        m.close()


def test_optional_features_are_interfaces_checked_with_isinstance() -> None:
    m = InProcessMachine()
    try:
        gt = m.domain(1).grants
        assert isinstance(gt, GrantTable)
        assert isinstance(gt, ReservedGrants) and isinstance(gt, GuestFrames)
        assert isinstance(gt, PreparedCopies)
        assert not isinstance(object(), ReservedGrants)
    finally:
        m.close()


def test_grant_takes_notify_on_the_loopback_platform() -> None:
    """``grant(notify=)``: when the granting domain dies, the byte is cleared in the
    peer's mapping and the peer's port is signalled (what vchan's control page needs)."""
    m = InProcessMachine()
    try:
        fe, be = m.domain(1), m.domain(2)
        port = be.events.alloc_unbound(1)
        fe_port = fe.events.bind_interdomain(2, port)
        pages = fe.grants.grant(2, 1, notify=UnmapNotify(5, clear_byte=True, port=fe_port))
        pages.mem[5] = 1
        mapping = be.grants.map(1, pages.refs)
        assert mapping.mem[5] == 1
        while (got := be.events.pending(0)) is not None:
            be.events.unmask(got)
        fe.close()  # the granting domain dies
        assert be.events.pending(2.0) == port
        assert mapping.mem[5] == 0
        be.grants.unmap(mapping)
        be.events.unbind(port)
    finally:
        m.close()


def test_each_event_handle_owns_its_dispatcher() -> None:
    m = InProcessMachine()
    try:
        a, b = m.domain(1).events, m.domain(1).events
        assert a.dispatcher is a.dispatcher and a.dispatcher is not b.dispatcher
        assert PortDispatcher.attach(a) is a.dispatcher
        assert a.dispatcher.events is a
        assert not hasattr(PortDispatcher, "_registry")
    finally:
        m.close()

"""The loopback hypervisor core and in-process platform: accounting, faults, edge cases."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import numpy as np
import pytest

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    EventChannels,
    EvtchnState,
    GrantInUse,
    GrantTable,
    MappedGrants,
    Platform,
    SharedPages,
    UnmapNotify,
)
from xenpv.platforms.loopback import core
from xenpv.platforms.loopback.core import Hypervisor
from xenpv.platforms.loopback.inprocess import InProcessPlatform

PAGE = 4096


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    h = Hypervisor(max_grants=64, max_ports=16)
    h.create_domain(1)
    h.create_domain(2)
    yield h
    h.close()


@pytest.fixture
def pair(hv: Hypervisor) -> Iterator[tuple[InProcessPlatform, InProcessPlatform]]:
    a, b = InProcessPlatform(hv, 0), InProcessPlatform(hv, 1)
    yield a, b
    a.close()
    b.close()
    hv.assert_released()


def test_platform_objects_satisfy_the_interface_protocols(
    pair: tuple[InProcessPlatform, InProcessPlatform],
) -> None:
    a, b = pair
    assert isinstance(a, Platform)
    assert isinstance(a.grants, GrantTable) and isinstance(a.events, EventChannels)
    pages = b.grants.grant(0, 1)
    m = a.grants.map(1, pages.refs)
    assert isinstance(pages, SharedPages) and isinstance(m, MappedGrants)
    a.grants.unmap(m)
    b.grants.end_access(pages)


def test_numpy_views_share_the_granted_bytes(
    pair: tuple[InProcessPlatform, InProcessPlatform],
) -> None:
    a, b = pair
    pages = b.grants.grant(0, 2)
    m = a.grants.map(1, pages.refs, writable=False)
    words = pages.array(np.uint32)
    words[1024] = 0xDEADBEEF  # first word of the second page
    ro = m.array(np.uint32)
    assert ro[1024] == 0xDEADBEEF
    assert not ro.flags.writeable
    del words, ro
    a.grants.unmap(m)
    b.grants.end_access(pages)


def test_released_memory_reads_zero_instead_of_crashing(
    pair: tuple[InProcessPlatform, InProcessPlatform],
) -> None:
    a, b = pair
    pages = b.grants.grant(0, 1)
    pages.mem[0:4] = b"data"
    m = a.grants.map(1, pages.refs)
    view = m.array()
    a.grants.unmap(m)
    assert view[:4].tolist() == [0, 0, 0, 0]  # scrubbed, not grant memory any more
    b.grants.end_access(pages)


def test_double_release_is_a_local_error(pair: tuple[InProcessPlatform, InProcessPlatform]) -> None:
    a, b = pair
    pages = b.grants.grant(0, 1)
    m = a.grants.map(1, pages.refs)
    a.grants.unmap(m)
    with pytest.raises(LocalError):
        a.grants.unmap(m)
    with pytest.raises(LocalError):
        a.grants.end_access(pages)  # not this handle's share
    b.grants.end_access(pages)
    with pytest.raises(LocalError):
        b.grants.end_access(pages)


def test_refs_are_never_reserved_and_reused_last(hv: Hypervisor) -> None:
    h = hv.open_handle(1)
    first = hv.share(h, 0, 4, writable=True)
    assert min(first.refs) >= 8
    hv.end_access(h, first.refs)
    second = hv.share(h, 0, 4, writable=True)
    assert not set(first.refs) & set(second.refs)  # FIFO free list: no immediate reuse
    hv.close_handle(h)
    hv.assert_released()


def test_reserved_console_ref_can_be_shared_once(hv: Hypervisor) -> None:
    h = hv.open_handle(1)
    s = hv.share(h, 0, 1, writable=True, reserved=0)
    assert s.refs == (0,)
    with pytest.raises(PlatformError) as busy:
        hv.share(h, 0, 1, writable=True, reserved=0)
    assert busy.value.errno == errno.EBUSY
    with pytest.raises(PlatformError) as bad:
        hv.share(h, 0, 1, writable=True, reserved=5)
    assert bad.value.errno == errno.EINVAL
    m = hv.map(hv.open_handle(0), [(1, 0)], writable=True)
    assert m.entries[0].ref == 0
    hv.close_handle(m.owner)
    hv.end_access(h, [0])
    assert 0 not in hv.domain(1)._free_refs
    hv.close_handle(h)
    hv.assert_released()


def test_stats_count_grants_mappings_ports(hv: Hypervisor) -> None:
    g, m = hv.open_handle(1), hv.open_handle(0)
    s = hv.share(g, 0, 3, writable=True)
    hv.map(m, [(1, r) for r in s.refs], writable=False)
    p = hv.alloc_unbound(g, 0)
    st = hv.stats(1)
    assert (st.grants, st.ports, st.shares, st.handles) == (3, 1, 1, 1)
    assert hv.stats(0).mappings == 1
    assert hv.status(m, 1, p.port) == (EvtchnState.unbound, 0, 0)
    with pytest.raises(PlatformError) as denied:
        hv.status(g, 0, 1)
    assert denied.value.errno == errno.EPERM
    with pytest.raises(AssertionError):
        hv.assert_released()
    hv.close_handle(g)  # the share ends deferred: still mapped
    assert hv.stats(1).grants_revoking == 3
    hv.close_handle(m)
    hv.assert_released()


def test_destroyed_domain_leaves_mapped_grants_until_unmapped(hv: Hypervisor) -> None:
    g, m = hv.open_handle(2), hv.open_handle(0)
    s = hv.share(g, 0, 1, writable=True)
    mapping = hv.map(m, [(2, s.refs[0])], writable=True)
    hv.destroy_domain(2)
    assert hv.outstanding()["zombies"] == 1
    os.pwrite(mapping.entries[0].segment.fd, b"x", 0)  # memory still there for the mapper
    hv.unmap(m, mapping.handle_id)
    hv.close_handle(m)
    hv.assert_released()
    hv.create_domain(2)  # the domid can be reused with a fresh table
    assert hv.stats(2).grants == 0


def test_notify_port_outlives_unbind_until_the_notification_fires(hv: Hypervisor) -> None:
    ev_a, ev_b = hv.open_handle(0), hv.open_handle(1)
    gnt_a, gnt_b = hv.open_handle(0), hv.open_handle(1)
    pb = hv.alloc_unbound(ev_b, 0)
    pa = hv.bind_interdomain(ev_a, 1, pb.port)
    os.eventfd_read(pa.inbox)
    s = hv.share(gnt_b, 0, 1, writable=True)
    m = hv.map(gnt_a, [(1, s.refs[0])], writable=True)
    hv.set_notify(gnt_a, m.handle_id, 0, core.NOTIFY_SEND_EVENT, pa.port)
    hv.close_handle(ev_a)  # the event handle goes first ...
    assert hv.status(ev_b, 1, pb.port)[0] == EvtchnState.interdomain
    hv.close_handle(gnt_a)  # ... the notification still reaches the peer
    assert os.eventfd_read(pb.inbox) == 1
    assert hv.status(ev_b, 1, pb.port)[0] == EvtchnState.unbound
    hv.close_handle(ev_b)
    hv.close_handle(gnt_b)
    hv.assert_released()


def test_fault_drop_and_duplicate_notifications(hv: Hypervisor) -> None:
    ha, hb = hv.open_handle(0), hv.open_handle(1)
    pb = hv.alloc_unbound(hb, 0)
    pa = hv.bind_interdomain(ha, 1, pb.port)
    hv.fault(core.FAULT_DROP_NOTIFY, 0, arg=1)
    hv.notify(ha, pa.port)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(pb.inbox)
    hv.fault(core.FAULT_DUPLICATE_NOTIFY, 0, arg=1)
    hv.notify(ha, pa.port)
    assert os.eventfd_read(pb.inbox) == 2
    with pytest.raises(PlatformError):
        hv.fault(99, 0)
    hv.close_handle(ha)
    hv.close_handle(hb)
    hv.assert_released()


def test_clear_byte_needs_a_writable_mapping(
    pair: tuple[InProcessPlatform, InProcessPlatform],
) -> None:
    a, b = pair
    pages = b.grants.grant(0, 1, writable=False)
    m = a.grants.map(1, pages.refs, writable=False)
    with pytest.raises(PlatformError):
        a.grants.set_unmap_notify(m, UnmapNotify(0, clear_byte=True))
    with pytest.raises(PlatformError):
        a.grants.set_unmap_notify(m, UnmapNotify(PAGE, clear_byte=False, port=None))
    a.grants.unmap(m)
    b.grants.end_access(pages)


def test_grant_in_use_reports_the_busy_refs(
    pair: tuple[InProcessPlatform, InProcessPlatform],
) -> None:
    a, b = pair
    pages = b.grants.grant(0, 3)
    m = a.grants.map(1, pages.refs[1:2])
    with pytest.raises(GrantInUse) as info:
        b.grants.end_access(pages)
    assert info.value.refs == (pages.refs[1],)
    a.grants.unmap(m)
    b.grants.end_access(pages)


def test_restricted_handle_binds_only_to_its_domain(hv: Hypervisor) -> None:
    h0, h1, h2 = hv.open_handle(0), hv.open_handle(1), hv.open_handle(2)
    p1 = hv.alloc_unbound(h1, 0)
    p2 = hv.alloc_unbound(h2, 0)
    hv.restrict(h0, 2)
    with pytest.raises(PlatformError):
        hv.bind_interdomain(h0, 1, p1.port)
    hv.bind_interdomain(h0, 2, p2.port)
    for h in (h0, h1, h2):
        hv.close_handle(h)
    hv.assert_released()


def test_domain_table_rules(hv: Hypervisor) -> None:
    with pytest.raises(PlatformError) as exists:
        hv.create_domain(1)
    assert exists.value.errno == errno.EEXIST
    with pytest.raises(PlatformError):
        hv.create_domain(0x7FF0)
    with pytest.raises(PlatformError):
        hv.destroy_domain(0)
    with pytest.raises(PlatformError) as gone:
        hv.open_handle(42)
    assert gone.value.errno == errno.ESRCH


def test_prepared_copy_revalidates_after_grant_changes(
    pair: tuple[InProcessPlatform, InProcessPlatform],
) -> None:
    from xenpv.platforms.base import GntSt, GrantCopy, GrantPtr, LocalPtr, prepare_copy

    a, b = pair
    pages = b.grants.grant(0, 2)
    pages.mem[0:PAGE] = b"a" * PAGE
    pages.mem[PAGE : 2 * PAGE] = b"b" * PAGE
    out = bytearray(2 * PAGE)
    segs = [
        GrantCopy(GrantPtr(1, r, 0), LocalPtr(out, i * PAGE), PAGE)
        for i, r in enumerate(pages.refs)
    ]
    run = prepare_copy(a.grants, segs)
    assert run() == [GntSt.okay, GntSt.okay]
    assert bytes(out) == b"a" * PAGE + b"b" * PAGE  # one merged run, both pages
    pages.mem[0:1] = b"z"
    assert run() == [GntSt.okay, GntSt.okay] and out[0:1] == b"z"
    b.grants.end_access(pages)  # the grants go: the plan must notice
    out[:] = bytes(2 * PAGE)
    assert run() == [GntSt.bad_gntref, GntSt.bad_gntref]
    assert bytes(out) == bytes(2 * PAGE)
    run.release()  # type: ignore[attr-defined]
    out.extend(b"x")  # no view left on the buffer


def test_maptrack_and_handles_are_bounded() -> None:
    hv = Hypervisor(max_grants=64, max_ports=16, max_maptrack=4, max_handles=3)
    try:
        hv.create_domain(1)
        g, m = hv.open_handle(1), hv.open_handle(0)
        s = hv.share(g, 0, 3, writable=True)
        hv.map(m, [(1, r) for r in s.refs], writable=True)
        with pytest.raises(PlatformError) as full:
            hv.map(m, [(1, s.refs[0]), (1, s.refs[1])], writable=True)
        assert full.value.errno == errno.ENOSPC
        hv.map(m, [(1, s.refs[0])], writable=True)  # exactly at the bound
        hv.open_handle(1)
        hv.open_handle(1)
        with pytest.raises(PlatformError) as handles:
            hv.open_handle(1)
        assert handles.value.errno == errno.ENOSPC
    finally:
        hv.close()
    hv.assert_released()


def test_scenario_16_notification_storm_is_one_delivery(
    pair: tuple[InProcessPlatform, InProcessPlatform],
) -> None:
    """A peer flooding a port costs the receiver one delivery per unmask, not one per event."""
    a, b = pair
    pb = b.events.alloc_unbound(0)
    pa = a.events.bind_interdomain(1, pb)
    assert a.events.pending(1) == pa
    a.events.unmask(pa)
    for _ in range(20_000):
        b.events.notify(pb)
    assert a.events.pending(1) == pa
    assert a.events.pending(0) is None  # masked: the storm stays queued as one event
    a.events.unmask(pa)
    assert a.events.pending(0.05) is None  # drained at delivery: nothing left


def test_virq_dom_exc_reaches_dom0_on_shutdown_and_destroy(hv: Hypervisor) -> None:
    dom0, dom1 = InProcessPlatform(hv, 0), InProcessPlatform(hv, 1)
    try:
        port = dom0.events.bind_virq(core.VIRQ_DOM_EXC)
        guest_port = dom1.events.bind_virq(core.VIRQ_DOM_EXC)  # bound, but never delivered
        assert dom0.events.pending(0) is None
        assert hv.status(hv.open_handle(0), 0, port) == (EvtchnState.virq, core.VIRQ_DOM_EXC, 0)
        # a virq is bound once per domain; only DOM_EXC exists; past NR_VIRQS is invalid
        for virq, code in ((core.VIRQ_DOM_EXC, errno.EEXIST), (2, errno.ENOSYS),
                           (core.NR_VIRQS, errno.EINVAL)):
            with pytest.raises(PlatformError) as exc:
                dom0.events.bind_virq(virq)
            assert exc.value.errno == code
        with pytest.raises(PlatformError) as exc:
            dom0.events.notify(port)  # EVTCHNOP_send on a virq port
        assert exc.value.errno == errno.EINVAL
        hv.shutdown_domain(2, core.SHUTDOWN_CRASH)
        assert hv.domains[2].shutdown_reason == core.SHUTDOWN_CRASH
        assert dom0.events.pending(1) == port
        dom0.events.unmask(port)
        hv.shutdown_domain(2, 0)  # a second shutdown changes nothing and fires nothing
        assert hv.domains[2].shutdown_reason == core.SHUTDOWN_CRASH
        assert dom0.events.pending(0) is None
        hv.destroy_domain(2)
        assert dom0.events.pending(1) == port
        assert dom1.events.pending(0) is None
        dom0.events.unmask(port)
        with pytest.raises(PlatformError) as exc:
            hv.shutdown_domain(0, 0)
        assert exc.value.errno == errno.EPERM
        # unbinding frees the virq for a new binding
        dom0.events.unbind(port)
        assert core.VIRQ_DOM_EXC not in hv.domains[0].virqs
        port = dom0.events.bind_virq(core.VIRQ_DOM_EXC)
        dom1.events.unbind(guest_port)
    finally:
        dom0.close()
        dom1.close()
    assert core.VIRQ_DOM_EXC not in hv.domains[0].virqs  # closing the handle unbinds it
    assert hv.domains[0].uuid.int == 0 and hv.domains[1].uuid.int != 0

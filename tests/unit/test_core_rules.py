"""The loopback hypervisor's isolation rules, driven in-process at both edges of each bound.

Every check states the rule independently (the expected errno or ``GNTST_*`` status and
what must be left unchanged), so a core that is off by one or refuses with the wrong
code fails here.  This also reaches the functions only the daemon calls in normal runs
(guest frames, foreign mapping, lending ports), so mutation testing covers them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    DOMID_SELF,
    GNTTAB_NR_RESERVED_ENTRIES,
    PAGE_SIZE,
    EvtchnState,
    GntSt,
    GrantCopy,
    GrantInUse,
    GrantPtr,
    LocalPtr,
    MapError,
    NoSuchDomain,
    PortError,
    ResourceExhausted,
)
from xenpv.platforms.loopback import core
from xenpv.platforms.loopback.core import Hypervisor, SharePtr

FIRST_REF = GNTTAB_NR_RESERVED_ENTRIES  # refs below this are never handed out
RESERVED_DOMID = 0x7FF0  # DOMID_FIRST_RESERVED: no domain may have it or above


def refused(fn: Callable[[], Any], exc: type[BaseException], code: int) -> Any:
    """Run ``fn``; it must raise ``exc`` with errno ``code``; returns the exception."""
    with pytest.raises(exc) as info:
        fn()
    assert getattr(info.value, "errno", None) == code, (info.value, code)
    assert isinstance(info.value.args[0], str) and info.value.args[0], info.value.args
    return info.value


def map_refused(fn: Callable[[], Any], code: int, index: int, status: int) -> None:
    e = refused(fn, MapError, code)
    assert (e.index, e.status) == (index, status)


def pending(fd: int) -> int:
    """Read and clear an eventfd counter (0 if nothing is pending)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    h = Hypervisor(max_grants=FIRST_REF + 8, max_ports=6, max_maptrack=6)
    h.create_domain(1)
    h.create_domain(2)
    yield h
    h.close()


def test_domain_table_and_shutdown_bounds() -> None:
    hv = Hypervisor(max_grants=FIRST_REF + 1, max_ports=2)
    try:
        for bad in (-1, RESERVED_DOMID):
            refused(lambda bad=bad: hv.create_domain(bad), PlatformError, errno.EINVAL)
        d = hv.create_domain(RESERVED_DOMID - 1)
        assert d.name == f"dom{RESERVED_DOMID - 1}" and not d.privileged
        assert hv.create_domain(5, "five").name == "five"
        refused(lambda: hv.create_domain(5), PlatformError, errno.EEXIST)
        refused(lambda: hv.destroy_domain(0), PlatformError, errno.EPERM)
        refused(lambda: hv.destroy_domain(9), NoSuchDomain, errno.ESRCH)
        refused(lambda: hv.shutdown_domain(0, 0), PlatformError, errno.EPERM)
        for bad in (-1, core.SHUTDOWN_MAX + 1):
            refused(lambda bad=bad: hv.shutdown_domain(5, bad), PlatformError, errno.EINVAL)
        assert hv.domain(5).shutdown_reason is None
        hv.shutdown_domain(5, core.SHUTDOWN_MAX)
        hv.shutdown_domain(5, 0)  # a second shutdown keeps the first reason
        assert hv.domain(5).shutdown_reason == core.SHUTDOWN_MAX
        hv.shutdown_domain(RESERVED_DOMID - 1, 0)
        assert hv.domain(RESERVED_DOMID - 1).shutdown_reason == 0
        with pytest.raises(LocalError):  # table sizes
            Hypervisor(max_grants=FIRST_REF, max_ports=2)
        with pytest.raises(LocalError):
            Hypervisor(max_grants=FIRST_REF + 1, max_ports=1)
    finally:
        hv.close()
    hv.assert_released()


def test_share_rules_refs_and_table_bounds(hv: Hypervisor) -> None:
    h1 = hv.open_handle(1)
    for bad in (0, -1, core.MAX_BATCH + 1):
        refused(lambda bad=bad: hv.share(h1, 2, bad, writable=True), PlatformError, errno.EINVAL)
    for bad in (1, -1, RESERVED_DOMID):  # itself, negative, reserved ids
        refused(lambda bad=bad: hv.share(h1, bad, 1, writable=True), PlatformError, errno.EINVAL)
    refused(lambda: hv.share(h1, 7, 1, writable=True), NoSuchDomain, errno.ESRCH)
    # reserved refs: only 0 and 1, one page, once
    for bad in (-1, 2, FIRST_REF):
        refused(
            lambda bad=bad: hv.share(h1, 0, 1, writable=True, reserved=bad),
            PlatformError,
            errno.EINVAL,
        )
    refused(lambda: hv.share(h1, 0, 2, writable=True, reserved=0), PlatformError, errno.EINVAL)
    assert hv.share(h1, 0, 1, writable=True, reserved=0).refs == (0,)
    assert hv.share(h1, 0, 1, writable=True, reserved=1).refs == (1,)
    refused(lambda: hv.share(h1, 0, 1, writable=True, reserved=1), PlatformError, errno.EBUSY)
    assert hv.stats(1).grants == 2
    # the table holds exactly max_grants - 8 ordinary refs, handed out from 8 upwards
    s = hv.share(h1, 2, 7, writable=True)
    assert s.refs == tuple(range(FIRST_REF, FIRST_REF + 7))
    assert all(e.grantee == 2 and not e.readonly for e in s.entries)
    last = hv.share(h1, 2, 1, writable=False)
    assert last.refs == (FIRST_REF + 7,) and last.entries[0].readonly
    refused(lambda: hv.share(h1, 2, 1, writable=True), ResourceExhausted, errno.ENOSPC)
    assert hv.stats(1).grants == 10
    # freed refs come back last (FIFO), reserved ones never enter the free list
    assert hv.end_access(h1, [FIRST_REF + 2, 0]) == 2
    assert hv.end_access(h1, [FIRST_REF]) == 1
    assert hv.share(h1, 2, 2, writable=True).refs == (FIRST_REF + 2, FIRST_REF)
    assert hv.share(h1, 0, 1, writable=True, reserved=0).refs == (0,)
    hv.close_handle(h1)
    assert hv.stats(1).grants == 0 and hv.stats(1).fds == 0


def test_share_of_a_full_batch_and_a_failed_segment_returns_its_refs() -> None:
    hv = Hypervisor(max_grants=FIRST_REF + core.MAX_BATCH, max_ports=2, max_fds=1 + 2 * 3)
    try:
        hv.create_domain(1)
        h = hv.open_handle(1)  # 1 fd: the connection
        full = hv.share(h, 0, core.MAX_BATCH, writable=True)
        assert len(full.refs) == core.MAX_BATCH
        assert hv.end_access(h, full.refs[:2]) == 2
        small = hv.share(h, 0, 1, writable=True)  # 1 + 3 + 3 fds: the quota exactly
        assert hv.stats(1).fds == 7
        refused(lambda: hv.share(h, 0, 1, writable=True), ResourceExhausted, errno.ENOSPC)
        assert hv.stats(1).fds == 7 and hv.stats(1).grants == core.MAX_BATCH - 1
        # the refused share gave its ref back in front: the next share gets it
        hv.end_access(h, small.refs)
        nxt = hv.share(h, 0, 1, writable=True)
        assert nxt.refs == (FIRST_REF + 1,)
        refused(lambda: hv.open_handle(1), ResourceExhausted, errno.ENOSPC)
        hv.close_handle(h)
        assert hv.stats(1).fds == 0
        # dom0 has no descriptor quota; a frame batch takes up to MAX_BATCH frames
        h0s = [hv.open_handle(0) for _ in range(9)]
        frames = hv.alloc_frames(h0s[0], core.MAX_BATCH)
        assert len(frames.refs) == core.MAX_BATCH
        seals = fcntl.fcntl(frames.entries[0].segment.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SEAL  # frames are writable: sealed against new seals
        hg = hv.open_handle(1)
        (gfn,) = hv.alloc_frames(hg, 1).refs
        whole = hv.foreign_map(h0s[1], 1, [gfn] * core.MAX_BATCH, writable=False)
        hv.unmap(h0s[1], whole.handle_id)
        hv.close_handle(hg)
        hv.unmap(h0s[0], frames.handle_id)
        assert hv.stats(0).fds == 9
        for h0 in h0s:
            hv.close_handle(h0)
    finally:
        hv.close()


def test_map_rules_statuses_index_and_all_or_nothing(hv: Hypervisor) -> None:
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    rw = hv.share(h1, 2, 2, writable=True)
    ro = hv.share(h1, 2, 1, writable=False)
    other = hv.share(h1, 0, 1, writable=True)  # granted to dom0, not dom2
    a, b = rw.refs
    (r,) = ro.refs
    for bad in ([], [(1, a)] * (core.MAX_BATCH + 1)):
        refused(lambda bad=bad: hv.map(h2, bad, writable=False), PlatformError, errno.EINVAL)
    map_refused(
        lambda: hv.map(h2, [(1, a), (7, a)], writable=True), errno.ESRCH, 1, GntSt.bad_domain
    )
    map_refused(lambda: hv.map(h2, [(2, a)], writable=True), errno.ESRCH, 0, GntSt.bad_domain)
    map_refused(
        lambda: hv.map(h2, [(1, a), (DOMID_SELF, a)], writable=True),
        errno.ESRCH,
        1,
        GntSt.bad_domain,
    )
    map_refused(
        lambda: hv.map(h2, [(1, a), (1, b), (1, other.refs[0])], writable=False),
        errno.ENOENT,
        2,
        GntSt.bad_gntref,
    )
    map_refused(lambda: hv.map(h2, [(1, 3)], writable=False), errno.ENOENT, 0, GntSt.bad_gntref)
    map_refused(
        lambda: hv.map(h2, [(1, a), (1, r)], writable=True), errno.EPERM, 1, GntSt.permission_denied
    )
    # nothing of a refused batch stays mapped
    assert all(e.mappers == 0 for e in rw.entries + ro.entries)
    assert hv.domain(2).maptrack == 0 and hv.stats(2).mappings == 0
    assert not ro.entries[0].segment.readonly_sealed
    # a read-only grant maps read-only (and seals its memory); a writable one either way
    m_ro = hv.map(h2, [(1, r)], writable=False)
    assert ro.entries[0].segment.readonly_sealed and not rw.entries[0].segment.readonly_sealed
    m_rw = hv.map(h2, [(1, a), (1, b)], writable=True)
    m_again = hv.map(h2, [(1, a)], writable=False)
    assert [e.mappers for e in rw.entries] == [2, 1]
    assert hv.domain(2).maptrack == 4 and hv.stats(2).mappings == 3
    assert m_ro.handle_id != m_rw.handle_id != m_again.handle_id
    # the maptrack bound (6): 2 more fit exactly, then nothing
    map_refused(lambda: hv.map(h2, [(1, a)] * 3, writable=False), errno.ENOSPC, 0, GntSt.no_space)
    last = hv.map(h2, [(1, a), (1, b)], writable=False)
    map_refused(lambda: hv.map(h2, [(1, a)], writable=False), errno.ENOSPC, 0, GntSt.no_space)
    assert hv.domain(2).maptrack == 6
    for m in (last, m_again, m_rw, m_ro):
        hv.unmap(h2, m.handle_id)
    assert hv.domain(2).maptrack == 0
    assert all(e.mappers == 0 for e in rw.entries + ro.entries)
    refused(lambda: hv.unmap(h2, m_rw.handle_id), PlatformError, errno.ENOENT)
    # a page of a partly ended multi-page share can no longer be mapped; a revoking one neither
    hv.end_access(h1, [a])
    map_refused(lambda: hv.map(h2, [(1, b)], writable=False), errno.ENOENT, 0, GntSt.bad_gntref)
    m = hv.map(h2, [(1, r)], writable=False)
    assert hv.end_access(h1, [r], defer=True) == 0
    map_refused(lambda: hv.map(h2, [(1, r)], writable=False), errno.ENOENT, 0, GntSt.bad_gntref)
    hv.unmap(h2, m.handle_id)
    assert hv.stats(1).grants == 2  # b and other
    hv.close_handle(h1)
    hv.close_handle(h2)
    assert hv.stats(1).grants == 0


def test_end_access_rules_and_deferred_release(hv: Hypervisor) -> None:
    h1, h1b, h2 = hv.open_handle(1), hv.open_handle(1), hv.open_handle(2)
    s = hv.share(h1, 2, 3, writable=True)
    x, y, z = s.refs
    refused(lambda: hv.end_access(h1b, [x]), PlatformError, errno.ENOENT)  # another handle's
    refused(lambda: hv.end_access(h1, [3]), PlatformError, errno.ENOENT)
    refused(lambda: hv.end_access(h1, [x, 99]), PlatformError, errno.ENOENT)
    assert hv.stats(1).grants == 3
    m = hv.map(h2, [(1, y)], writable=True)
    hv.hold_mapped(1, z)
    e = refused(lambda: hv.end_access(h1, [x, y, z]), GrantInUse, errno.EBUSY)
    assert e.refs == (y, z)
    assert not any(en.revoking or en.freed for en in s.entries)  # strict: nothing ended
    assert hv.end_access(h1, [x, y, z], defer=True) == 1
    st = hv.stats(1)
    assert (st.grants, st.grants_revoking, st.shares) == (2, 2, 0)
    refused(lambda: hv.end_access(h1, [y], defer=True), PlatformError, errno.ENOENT)
    hv.unmap(h2, m.handle_id)  # the last mapping of y goes: y is freed
    assert hv.stats(1).grants == 1 and s.entries[1].freed
    hv.release_hold(1, z)
    assert hv.stats(1).grants == 0
    # one call may end the refs of several shares: each share goes once all of it ended
    sa, sb = hv.share(h1, 2, 1, writable=True), hv.share(h1, 2, 2, writable=True)
    assert hv.stats(1).shares == 2
    assert hv.end_access(h1, [*sa.refs, sb.refs[0]]) == 2
    assert hv.stats(1).shares == 1 and (sa.ended, sb.ended) == (1, 1)
    assert hv.end_access(h1, [sb.refs[1]]) == 1 and hv.stats(1).shares == 0
    # unmapping a share id ends the share, deferred while mapped
    s2 = hv.share(h1, 2, 1, writable=True)
    m2 = hv.map(h2, [(1, s2.refs[0])], writable=False)
    hv.unmap(h1, s2.handle_id)
    assert hv.stats(1).grants_revoking == 1 and hv.stats(1).shares == 0
    hv.close_handle(h2)  # the grantee's death unmaps: the entry goes
    assert hv.stats(1).grants == 0
    del m2
    refused(lambda: hv.unmap(h1, 999), PlatformError, errno.ENOENT)
    hv.close_handle(h1)
    refused(lambda: hv.end_access(h1, []), PlatformError, errno.EBADF)
    refused(lambda: hv.share(h1, 2, 1, writable=True), PlatformError, errno.EBADF)
    refused(lambda: hv.map(h1, [(2, 8)], writable=True), PlatformError, errno.EBADF)
    hv.close_handle(h1b)


def test_faults_hold_release_and_unknown(hv: Hypervisor) -> None:
    h1 = hv.open_handle(1)
    (ref,) = hv.share(h1, 2, 1, writable=True).refs
    refused(lambda: hv.hold_mapped(1, ref + 1), PlatformError, errno.ENOENT)
    refused(lambda: hv.release_hold(1, ref + 1), PlatformError, errno.ENOENT)
    refused(lambda: hv.fault(99, 1), PlatformError, errno.EINVAL)
    refused(lambda: hv.fault(core.FAULT_HOLD_MAPPED, 9, ref), NoSuchDomain, errno.ESRCH)
    console = hv.share(h1, 2, 1, writable=True, reserved=0)
    hv.fault(core.FAULT_HOLD_MAPPED, 1)  # the ref defaults to 0
    assert console.entries[0].holds == 1
    hv.fault(core.FAULT_RELEASE_HOLD, 1)
    assert console.entries[0].holds == 0
    hv.end_access(h1, [0])
    hv.release_hold(1, ref)  # nothing held: a no-op, holds never go negative
    assert hv.domain(1).grants[ref].holds == 0
    hv.hold_mapped(1, ref)
    hv.hold_mapped(1, ref)
    refused(lambda: hv.end_access(h1, [ref]), GrantInUse, errno.EBUSY)
    assert hv.end_access(h1, [ref], defer=True) == 0
    hv.release_hold(1, ref)
    assert hv.stats(1).grants_revoking == 1
    hv.release_hold(1, ref)
    assert hv.stats(1).grants == 0
    # notification faults: drop the next N sends, or send twice; both bump generations
    h2 = hv.open_handle(2)
    p1 = hv.alloc_unbound(h1, 2)
    p2 = hv.bind_interdomain(h2, 1, p1.port)
    pending(p2.inbox)
    gen = hv.domain(1).gen[p1.port]
    hv.fault(core.FAULT_DROP_NOTIFY, 1, arg=2)
    assert hv.domain(1).gen[p1.port] == gen + 1
    for _ in range(2):
        assert hv.notify(h1, p1.port) is p2
    assert pending(p2.inbox) == 0
    hv.notify(h1, p1.port)
    assert pending(p2.inbox) == 1
    hv.fault(core.FAULT_DUPLICATE_NOTIFY, 1, arg=1)
    hv.notify(h1, p1.port)
    assert pending(p2.inbox) == 2
    hv.fault(core.FAULT_DUPLICATE_NOTIFY, 1, arg=0)
    hv.notify(h1, p1.port)
    assert pending(p2.inbox) == 1
    hv.close_handle(h1)
    hv.close_handle(h2)


def test_set_notify_rules_and_firing(hv: Hypervisor) -> None:
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    s = hv.share(h1, 2, 2, writable=True)
    ro = hv.share(h1, 2, 1, writable=False)
    m = hv.map(h2, [(1, r) for r in s.refs], writable=True)
    mro = hv.map(h2, ro.refs and [(1, ro.refs[0])], writable=False)
    p2 = hv.alloc_unbound(h2, 1)
    p1 = hv.bind_interdomain(h1, 2, p2.port)
    pending(p1.inbox)
    pending(p2.inbox)
    hid = m.handle_id
    refused(lambda: hv.set_notify(h2, 99, 0, 1, 0), PlatformError, errno.ENOENT)
    h1b = hv.open_handle(1)
    refused(lambda: hv.set_notify(h1b, hid, 0, 1, 0), PlatformError, errno.ENOENT)  # not its own
    hv.close_handle(h1b)
    for bad in (4, 8, -1):
        refused(lambda bad=bad: hv.set_notify(h2, hid, 0, bad, 0), PlatformError, errno.EINVAL)
    for bad in (-1, 2 * PAGE_SIZE):
        refused(lambda bad=bad: hv.set_notify(h2, hid, bad, 1, 0), PlatformError, errno.EINVAL)
    refused(lambda: hv.set_notify(h2, mro.handle_id, 0, 1, 0), PlatformError, errno.EINVAL)
    refused(lambda: hv.set_notify(h2, hid, 0, 2, 5), PlatformError, errno.EINVAL)  # no such port
    refused(lambda: hv.set_notify(h2, hid, 0, 2, 0), PlatformError, errno.EINVAL)
    assert m.notify is None and p2.notify_refs == 0
    hv.set_notify(h2, mro.handle_id, PAGE_SIZE - 1, 2, p2.port)  # event only: read-only is fine
    assert p2.notify_refs == 1
    hv.set_notify(h2, mro.handle_id, 0, 0, 0)  # replacing drops the old port reference
    assert p2.notify_refs == 0
    hv.set_notify(h2, hid, 2 * PAGE_SIZE - 1, 3, p2.port)
    last = s.entries[1].segment
    last.mm[2 * PAGE_SIZE - 1] = 0xAA
    last.mm[2 * PAGE_SIZE - 2] = 0xBB
    hv.unbind(h2, p2.port)  # kept open for the notification
    assert p2.detached and hv.status(h1, 1, p1.port)[0] == EvtchnState.interdomain
    hv.unmap(h2, hid)
    assert last.mm[2 * PAGE_SIZE - 1] == 0 and last.mm[2 * PAGE_SIZE - 2] == 0xBB
    assert pending(p1.inbox) == 1
    assert hv.status(h1, 1, p1.port)[:1] == (EvtchnState.unbound,)  # p2 closed after firing
    assert hv.stats(2).ports == 0
    # a share's own notification (no Mapping: clear-byte allowed on a read-only share)
    hv.set_notify(h1, ro.handle_id, 5, 1, 0)
    ro.entries[0].segment.mm[5] = 7
    hv.unmap(h2, mro.handle_id)
    hv.end_access(h1, ro.refs)
    hv.close_handle(h1)
    hv.close_handle(h2)


def test_notify_fires_once_on_deferred_end_and_not_for_other_pages(hv: Hypervisor) -> None:
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    s = hv.share(h1, 2, 2, writable=True)
    p2 = hv.alloc_unbound(h2, 1)
    p1 = hv.bind_interdomain(h1, 2, p2.port)
    pending(p1.inbox)
    pending(p2.inbox)
    seg = s.entries[0].segment
    seg.mm[PAGE_SIZE + 3] = 9
    hv.set_notify(h1, s.handle_id, PAGE_SIZE + 3, 3, p1.port)
    assert p1.notify_refs == 1
    m = hv.map(h2, [(1, s.refs[1])], writable=False)
    hv.end_access(h1, [s.refs[0]])  # the other page: nothing fires
    assert seg.mm[PAGE_SIZE + 3] == 9 and pending(p2.inbox) == 0
    hv.end_access(h1, [s.refs[1]], defer=True)  # the notified page: fires now, once
    assert seg.mm[PAGE_SIZE + 3] == 0 and pending(p2.inbox) == 1 and p1.notify_refs == 0
    hv.unmap(h2, m.handle_id)
    assert pending(p2.inbox) == 0 and hv.stats(1).grants == 0
    hv.close_handle(h1)
    hv.close_handle(h2)


def _copy(hv: Hypervisor, h: Any, src: Any, dst: Any, n: int) -> int:
    (st,) = hv.copy(h, [GrantCopy(src, dst, n)])
    return st


def test_copy_grant_sides_bounds_and_permissions(hv: Hypervisor) -> None:
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    rw = hv.share(h1, 2, 1, writable=True)
    ro = hv.share(h1, 2, 1, writable=False)
    to0 = hv.share(h1, 0, 1, writable=True)
    g, r = rw.refs[0], ro.refs[0]
    rwseg = rw.entries[0].segment
    rwseg.mm[:PAGE_SIZE] = bytes(range(256)) * 16
    ro.entries[0].segment.mm[:PAGE_SIZE] = b"\x5a" * PAGE_SIZE
    buf = bytearray(PAGE_SIZE + 1)
    L = LocalPtr
    assert _copy(hv, h2, GrantPtr(1, g, 0), L(buf), PAGE_SIZE) == GntSt.okay
    assert bytes(buf[:PAGE_SIZE]) == bytes(rwseg.mm[:PAGE_SIZE]) and buf[PAGE_SIZE] == 0
    assert _copy(hv, h2, GrantPtr(1, g, 0), L(buf), PAGE_SIZE + 1) == GntSt.bad_copy_arg
    assert _copy(hv, h2, GrantPtr(1, g, 0), L(buf), -1) == GntSt.bad_copy_arg
    assert _copy(hv, h2, GrantPtr(1, g, 0), L(buf), 0) == GntSt.okay
    assert _copy(hv, h2, GrantPtr(1, g, PAGE_SIZE - 3), L(buf, 1), 3) == GntSt.okay
    assert bytes(buf[1:4]) == bytes(rwseg.mm[PAGE_SIZE - 3 : PAGE_SIZE])
    assert _copy(hv, h2, GrantPtr(1, g, PAGE_SIZE - 3), L(buf), 4) == GntSt.bad_copy_arg
    assert _copy(hv, h2, GrantPtr(1, g, -1), L(buf), 1) == GntSt.bad_copy_arg
    assert _copy(hv, h2, L(buf), GrantPtr(1, g, PAGE_SIZE - 2), 3) == GntSt.bad_copy_arg
    assert _copy(hv, h2, L(buf), GrantPtr(1, g, -1), 1) == GntSt.bad_copy_arg
    assert _copy(hv, h2, GrantPtr(7, g), L(buf), 1) == GntSt.bad_domain
    assert _copy(hv, h2, L(buf), GrantPtr(7, g), 1) == GntSt.bad_domain
    assert _copy(hv, h2, GrantPtr(1, to0.refs[0]), L(buf), 1) == GntSt.bad_gntref
    assert _copy(hv, h2, GrantPtr(1, 3), L(buf), 1) == GntSt.bad_gntref
    assert _copy(hv, h2, L(buf), GrantPtr(1, r), 1) == GntSt.permission_denied
    assert _copy(hv, h2, GrantPtr(1, r), GrantPtr(1, g, 10), 2) == GntSt.okay
    assert bytes(rwseg.mm[10:12]) == b"\x5a\x5a"
    # the granter copying its own grant through DOMID_SELF is not the grantee: refused
    assert _copy(hv, h1, GrantPtr(DOMID_SELF, g), L(buf), 1) == GntSt.bad_gntref
    # local sides: bounds at both edges, a read-only destination buffer
    small = bytearray(8)
    assert _copy(hv, h2, L(small, 4), GrantPtr(1, g, 100), 4) == GntSt.okay
    assert _copy(hv, h2, L(small, 5), GrantPtr(1, g, 100), 4) == GntSt.bad_copy_arg
    assert _copy(hv, h2, L(small, -1), GrantPtr(1, g, 100), 1) == GntSt.bad_copy_arg
    assert _copy(hv, h2, GrantPtr(1, g), L(small, 4), 4) == GntSt.okay
    assert _copy(hv, h2, GrantPtr(1, g), L(small, 5), 4) == GntSt.bad_copy_arg
    assert _copy(hv, h2, GrantPtr(1, g), L(small, -1), 1) == GntSt.bad_copy_arg
    assert _copy(hv, h2, GrantPtr(1, g), L(bytes(8)), 1) == GntSt.bad_copy_arg
    assert _copy(hv, h2, L(bytes([3, 4])), GrantPtr(1, g, 200), 2) == GntSt.okay
    assert bytes(rwseg.mm[200:202]) == b"\x03\x04"
    assert _copy(hv, h2, "nonsense", L(small), 1) == GntSt.general_error  # type: ignore[arg-type]
    assert _copy(hv, h2, L(small), "nonsense", 1) == GntSt.general_error  # type: ignore[arg-type]
    # a revoking grant can no longer be copied
    m = hv.map(h2, [(1, g)], writable=False)
    hv.end_access(h1, [g], defer=True)
    assert _copy(hv, h2, GrantPtr(1, g), L(buf), 1) == GntSt.bad_gntref
    hv.unmap(h2, m.handle_id)
    hv.close_handle(h1)
    hv.close_handle(h2)


def test_copy_batches_merge_runs_and_match_a_byte_model(hv: Hypervisor) -> None:
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    s = hv.share(h1, 2, 2, writable=True)
    a, b = s.refs
    seg = s.entries[0].segment
    seg.mm[: 2 * PAGE_SIZE] = bytes((i * 7) % 251 for i in range(2 * PAGE_SIZE))
    model = bytearray(seg.mm[: 2 * PAGE_SIZE])
    out = bytearray(300)
    segs = [
        GrantCopy(GrantPtr(1, a, 0), LocalPtr(out, 0), 100),
        GrantCopy(GrantPtr(1, a, 100), LocalPtr(out, 100), 50),  # contiguous: merged
        GrantCopy(GrantPtr(1, a, 0), LocalPtr(out, 150), PAGE_SIZE + 1),  # refused alone
        GrantCopy(GrantPtr(1, b, 10), LocalPtr(out, 150), 50),  # not contiguous at the source
        GrantCopy(GrantPtr(1, b, 60), LocalPtr(out, 201), 20),  # gap at the destination
        GrantCopy(LocalPtr(b"xyz"), GrantPtr(1, a, PAGE_SIZE - 3), 3),
    ]
    plan = hv.prepare_copy(h2, segs)
    assert plan() == [0, 0, GntSt.bad_copy_arg, 0, 0, 0]
    want = bytearray(300)
    want[0:150] = model[0:150]
    want[150:200] = model[PAGE_SIZE + 10 : PAGE_SIZE + 60]
    want[201:221] = model[PAGE_SIZE + 60 : PAGE_SIZE + 80]
    assert out == want
    assert bytes(seg.mm[PAGE_SIZE - 3 : PAGE_SIZE]) == b"xyz"
    seg.mm[5] = 0xEE  # run again: the plan copies the current bytes
    assert plan()[0] == 0 and out[5] == 0xEE
    hv.end_access(h1, [b])  # grant tables changed: revalidated
    assert plan() == [0, 0, GntSt.bad_copy_arg, GntSt.bad_gntref, GntSt.bad_gntref, 0]
    plan.release()
    hv.close_handle(h2)
    refused(plan, PlatformError, errno.EBADF)
    refused(lambda: hv.copy(h2, []), PlatformError, errno.EBADF)
    refused(lambda: hv.prepare_copy(h2, []), PlatformError, errno.EBADF)
    hv.close_handle(h1)


def test_copy_own_pages_rules(hv: Hypervisor) -> None:
    h1, h1b, h2 = hv.open_handle(1), hv.open_handle(1), hv.open_handle(2)
    s = hv.share(h1, 2, 3, writable=True)
    seg = s.entries[0].segment
    seg.mm[: 3 * PAGE_SIZE] = bytes(i % 253 for i in range(3 * PAGE_SIZE))
    g = hv.share(h2, 1, 1, writable=True)
    gseg = g.entries[0].segment
    sid = s.handle_id
    buf = bytearray(2 * PAGE_SIZE)
    L = LocalPtr
    # a window across pages of one multi-page share is fine, up to the share's end
    assert _copy(hv, h1, SharePtr(sid, PAGE_SIZE - 10), L(buf), 20) == GntSt.okay
    assert bytes(buf[:20]) == bytes(seg.mm[PAGE_SIZE - 10 : PAGE_SIZE + 10])
    assert _copy(hv, h1, SharePtr(sid, 2 * PAGE_SIZE - 10), L(buf), 20) == GntSt.okay
    assert _copy(hv, h1, SharePtr(sid, 2 * PAGE_SIZE), L(buf), PAGE_SIZE) == GntSt.okay
    assert _copy(hv, h1, SharePtr(sid, 2 * PAGE_SIZE + 1), L(buf), PAGE_SIZE) == GntSt.bad_copy_arg
    assert _copy(hv, h1, SharePtr(sid, -1), L(buf), 1) == GntSt.bad_copy_arg
    assert _copy(hv, h1, SharePtr(sid, 0), L(buf), -1) == GntSt.bad_copy_arg
    assert _copy(hv, h1, L(b"own"), SharePtr(sid, 3 * PAGE_SIZE - 3), 3) == GntSt.okay
    assert bytes(seg.mm[3 * PAGE_SIZE - 3 : 3 * PAGE_SIZE]) == b"own"
    # another handle's share (same domain or not) and unknown ids name nothing
    assert _copy(hv, h1b, SharePtr(sid, 0), L(buf), 1) == GntSt.bad_page
    h2b = hv.open_handle(2)
    assert _copy(hv, h2b, SharePtr(sid, 0), L(buf), 1) == GntSt.bad_page
    hv.close_handle(h2b)
    assert _copy(hv, h1, SharePtr(99, 0), L(buf), 1) == GntSt.bad_page
    # own page to grant and back
    assert _copy(hv, h1, SharePtr(sid, 5), SharePtr(sid, PAGE_SIZE + 5), 3) == GntSt.okay
    assert bytes(seg.mm[PAGE_SIZE + 5 : PAGE_SIZE + 8]) == bytes(seg.mm[5:8])
    assert _copy(hv, h1, SharePtr(sid, 0), GrantPtr(2, g.refs[0], 7), 4) == GntSt.okay
    assert bytes(gseg.mm[7:11]) == bytes(seg.mm[0:4])
    # an ended page: refused whether it starts the window or is crossed into
    m = hv.map(h2, [(1, s.refs[2])], writable=False)
    hv.end_access(h1, [s.refs[1]])
    assert _copy(hv, h1, SharePtr(sid, PAGE_SIZE), L(buf), 1) == GntSt.bad_page
    assert _copy(hv, h1, SharePtr(sid, PAGE_SIZE - 1), L(buf), 2) == GntSt.bad_page
    assert _copy(hv, h1, SharePtr(sid, 2 * PAGE_SIZE - 1), L(buf), 2) == GntSt.bad_page
    assert _copy(hv, h1, SharePtr(sid, PAGE_SIZE - 1), L(buf), 1) == GntSt.okay
    assert _copy(hv, h1, SharePtr(sid, 2 * PAGE_SIZE), L(buf), 1) == GntSt.okay
    # a window crossing into the share's last page, and one that stops a page short of
    # an ended page
    s3 = hv.share(h1, 2, 3, writable=True)
    hv.end_access(h1, [s3.refs[2]])
    assert _copy(hv, h1, SharePtr(s3.handle_id, PAGE_SIZE - 10), L(buf), 20) == GntSt.okay
    # only the pages the window touches count: page 0 ended, pages 1-2 still fine
    s4 = hv.share(h1, 2, 4, writable=True)
    hv.end_access(h1, [s4.refs[0]])
    assert s4.segments() == [s4.entries[0].segment]
    assert _copy(hv, h1, SharePtr(s4.handle_id, 2 * PAGE_SIZE - 1), L(buf), 2) == GntSt.okay
    # a revoking page likewise
    hv.end_access(h1, [s.refs[2]], defer=True)
    assert _copy(hv, h1, SharePtr(sid, 2 * PAGE_SIZE), L(buf), 1) == GntSt.bad_page
    assert _copy(hv, h1, SharePtr(sid, PAGE_SIZE - 1), L(buf), 1) == GntSt.okay
    hv.unmap(h2, m.handle_id)
    # guest frames are one memfd each: a window stays inside one frame
    f = hv.alloc_frames(h1, 2)
    fid = f.handle_id
    fseg0, fseg1 = (e.segment for e in f.entries)
    assert fseg0 is not fseg1
    assert _copy(hv, h1, L(b"ab"), SharePtr(fid, PAGE_SIZE - 2), 2) == GntSt.okay
    assert bytes(fseg0.mm[PAGE_SIZE - 2 : PAGE_SIZE]) == b"ab"
    assert _copy(hv, h1, L(b"abc"), SharePtr(fid, PAGE_SIZE - 2), 3) == GntSt.bad_copy_arg
    assert _copy(hv, h1, L(b"c"), SharePtr(fid, PAGE_SIZE), 1) == GntSt.okay
    assert fseg1.mm[0] == ord("c")
    hv.close_handle(h1)
    hv.close_handle(h1b)
    hv.close_handle(h2)


def test_guest_frames_grant_frame_and_foreign_map(hv: Hypervisor) -> None:
    h0, h1, h2 = hv.open_handle(0), hv.open_handle(1), hv.open_handle(2)
    for bad in (0, -1, core.MAX_BATCH + 1):
        refused(lambda bad=bad: hv.alloc_frames(h1, bad), PlatformError, errno.EINVAL)
    f = hv.alloc_frames(h1, 3)
    assert f.refs == (core.FIRST_GFN, core.FIRST_GFN + 1, core.FIRST_GFN + 2)
    assert [e.page for e in f.entries] == [0, 0, 0] and all(e.frame for e in f.entries)
    assert f.writable and all(e.grantee == 0 and not e.readonly for e in f.entries)
    assert f.segments() == [e.segment for e in f.entries]  # one memfd per frame
    # the frame table holds max_grants (16) frames: 13 more fit, then none
    refused(lambda: hv.alloc_frames(h1, 14), ResourceExhausted, errno.ENOSPC)
    g2 = hv.alloc_frames(h1, 13)
    assert g2.refs[0] == core.FIRST_GFN + 3
    refused(lambda: hv.alloc_frames(h1, 1), ResourceExhausted, errno.ENOSPC)
    hv.unmap(h1, g2.handle_id)
    g3 = hv.alloc_frames(h1, 1)
    assert g3.refs == (core.FIRST_GFN + 16,)  # gfns are never reused
    gfn = f.refs[1]
    # grant_frame: a live frame of the caller's domain, to another existing domain
    refused(lambda: hv.grant_frame(h1, 0x1234, 2), PlatformError, errno.EINVAL)
    refused(lambda: hv.grant_frame(h2, gfn, 1), PlatformError, errno.EINVAL)  # not dom2's
    for bad in (1, -1, RESERVED_DOMID):
        refused(lambda bad=bad: hv.grant_frame(h1, gfn, bad), PlatformError, errno.EINVAL)
    refused(lambda: hv.grant_frame(h1, gfn, 7), NoSuchDomain, errno.ESRCH)
    for bad in (2, -1):
        refused(
            lambda bad=bad: hv.grant_frame(h1, gfn, 2, reserved=bad), PlatformError, errno.EINVAL
        )
    gr = hv.grant_frame(h1, gfn, 2, reserved=1)
    refused(lambda: hv.grant_frame(h1, gfn, 2, reserved=1), PlatformError, errno.EBUSY)
    gr2 = hv.grant_frame(h1, gfn, 0)
    assert gr.refs == (1,) and gr2.refs == (FIRST_REF,)
    assert (
        gr.domid == 2 and gr.writable and not gr.entries[0].readonly and gr.entries[0].grantee == 2
    )
    assert gr.segments() == [f.entries[1].segment]
    fseg = f.entries[1].segment
    assert gr.entries[0].segment is fseg and fseg.refs_live == 3
    m2 = hv.map(h2, [(1, 1)], writable=True)
    fseg.mm[0] = 0x42
    assert m2.segment_at(0)[0].mm[0] == 0x42
    # foreign_map: dom0 only, frames of a live other domain, all or nothing
    refused(lambda: hv.foreign_map(h2, 1, [gfn], writable=True), PlatformError, errno.EPERM)
    for bad in ([], [gfn] * (core.MAX_BATCH + 1)):
        refused(
            lambda bad=bad: hv.foreign_map(h0, 1, bad, writable=True), PlatformError, errno.EINVAL
        )
    map_refused(
        lambda: hv.foreign_map(h0, 7, [gfn], writable=True), errno.ESRCH, 0, GntSt.bad_domain
    )
    map_refused(
        lambda: hv.foreign_map(h0, DOMID_SELF, [gfn], writable=True),
        errno.ESRCH,
        0,
        GntSt.bad_domain,
    )
    map_refused(
        lambda: hv.foreign_map(h0, 0, [gfn], writable=True), errno.ESRCH, 0, GntSt.bad_domain
    )
    map_refused(
        lambda: hv.foreign_map(h0, 1, [gfn, 0x99], writable=True), errno.EINVAL, 1, GntSt.bad_page
    )
    map_refused(  # a freed frame
        lambda: hv.foreign_map(h0, 1, [g2.refs[0]], writable=True), errno.EINVAL, 0, GntSt.bad_page
    )
    assert f.entries[1].mappers == 0 and hv.domain(0).maptrack == 0
    fm = hv.foreign_map(h0, 1, [f.refs[0], gfn], writable=True)
    assert [e.mappers for e in f.entries] == [1, 1, 0] and hv.domain(0).maptrack == 2
    assert fm.segment_at(PAGE_SIZE)[0] is fseg
    # the maptrack bound counts foreign maps too (6): 4 more fit exactly
    map_refused(
        lambda: hv.foreign_map(h0, 1, [gfn] * 5, writable=False), errno.ENOSPC, 0, GntSt.no_space
    )
    fm4 = hv.foreign_map(h0, 1, [gfn] * 4, writable=False)
    hv.unmap(h0, fm4.handle_id)
    # freeing frames while dom0 maps them: deferred; the grant keeps the memory
    hv.unmap(h1, f.handle_id)
    assert hv.outstanding()["frames"] == 3  # two still mapped (revoking) + g3
    map_refused(
        lambda: hv.foreign_map(h0, 1, [gfn], writable=True), errno.EINVAL, 0, GntSt.bad_page
    )
    refused(lambda: hv.grant_frame(h1, gfn, 2), PlatformError, errno.EINVAL)
    hv.unmap(h0, fm.handle_id)
    assert hv.outstanding()["frames"] == 1 and fseg.fd >= 0  # grants still refer to it
    hv.unmap(h2, m2.handle_id)
    hv.end_access(h1, [1, FIRST_REF])
    assert fseg.fd == -1
    hv.close_handle(h1)
    assert hv.outstanding()["frames"] == 0
    hv.close_handle(h0)
    hv.close_handle(h2)


def test_destroyed_domain_releases_everything_but_mapped_grants(hv: Hypervisor) -> None:
    h0, h1, h2 = hv.open_handle(0), hv.open_handle(1), hv.open_handle(2)
    virq = hv.bind_virq(h0, core.VIRQ_DOM_EXC)
    pending(virq.inbox)
    s = hv.share(h1, 2, 2, writable=True)
    f = hv.alloc_frames(h1, 2)
    p1 = hv.alloc_unbound(h1, 2)
    p2 = hv.bind_interdomain(h2, 1, p1.port)
    m = hv.map(h2, [(1, s.refs[0])], writable=True)
    fm = hv.foreign_map(h0, 1, [f.refs[1]], writable=False)
    gen = hv.grant_gen
    seen: list[tuple[int, bool]] = []
    hv.on_domain_destroyed.append(lambda d: seen.append((d.domid, d.dying)))
    gen_fd = hv.domain(1).gen_fd
    # the generation page is sealed: clients get it read-only, no reopening can write it
    assert fcntl.fcntl(gen_fd, fcntl.F_GET_SEALS) == (
        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | core.F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
    )
    hv.destroy_domain(1)
    assert seen == [(1, True)]
    assert hv.grant_gen > gen and pending(virq.inbox) == 1
    refused(lambda: hv.domain(1), NoSuchDomain, errno.ESRCH)
    assert h1.closed and hv.outstanding()["zombies"] == 1
    assert hv.status(h2, 2, p2.port) == (EvtchnState.unbound, 1, 0)
    o = hv.outstanding()
    assert (o["grants"], o["frames"]) == (1, 1)  # only what others still map
    assert _copy(hv, h2, GrantPtr(1, s.refs[0]), LocalPtr(bytearray(1)), 1) == GntSt.bad_domain
    hv.unmap(h2, m.handle_id)
    assert hv.outstanding()["zombies"] == 1
    hv.unmap(h0, fm.handle_id)
    assert hv.outstanding()["zombies"] == 0 and hv.outstanding()["grants"] == 0
    hv.create_domain(1)  # the id can be reused, with a fresh table
    assert hv.stats(1).grants == 0
    hv.close_handle(h0)
    hv.close_handle(h2)


def test_port_rules_numbering_and_status(hv: Hypervisor) -> None:
    h0, h1, h1b, h2 = (hv.open_handle(d) for d in (0, 1, 1, 2))
    refused(lambda: hv.alloc_unbound(h1, 7), NoSuchDomain, errno.ESRCH)
    u = hv.alloc_unbound(h1, DOMID_SELF)  # DOMID_SELF: offered to dom1 itself
    assert u.port == 1 and hv.status(h1, DOMID_SELF, 1) == (EvtchnState.unbound, 1, 0)
    o = hv.alloc_unbound(h1, 2)
    assert o.port == 2
    refused(lambda: hv.bind_interdomain(h2, 1, u.port), PortError, errno.EINVAL)  # not offered
    refused(lambda: hv.bind_interdomain(h2, 1, 5), PortError, errno.EINVAL)
    refused(lambda: hv.bind_interdomain(h2, 7, 1), NoSuchDomain, errno.ESRCH)
    gen1 = hv.domain(1).gen[o.port]
    b = hv.bind_interdomain(h2, 1, o.port)
    assert b.port == 1 and pending(b.inbox) == 1 and pending(o.inbox) == 0
    assert hv.domain(1).gen[o.port] == gen1 + 1
    refused(lambda: hv.bind_interdomain(h0, 1, o.port), PortError, errno.EINVAL)  # bound now
    refused(lambda: hv.bind_interdomain(h2, 1, o.port), PortError, errno.EINVAL)
    assert hv.status(h1, 1, o.port) == (EvtchnState.interdomain, 2, 1)
    assert hv.status(h0, 2, 1) == (EvtchnState.interdomain, 1, o.port)
    assert hv.status(h0, 1, 5) == (EvtchnState.closed, 0, 0)
    refused(lambda: hv.status(h2, 1, o.port), PlatformError, errno.EPERM)
    refused(lambda: hv.status(h0, 7, 1), NoSuchDomain, errno.ESRCH)
    # sending: to the remote inbox only; unbound is a no-op; only the owning handle
    assert hv.notify(h1, o.port) is b and pending(b.inbox) == 1 and pending(o.inbox) == 0
    assert hv.notify(h1, u.port) is None
    refused(lambda: hv.notify(h1b, o.port), PortError, errno.EINVAL)
    refused(lambda: hv.unbind(h1b, o.port), PortError, errno.EINVAL)
    refused(lambda: hv.port_of(h1b, o.port), PortError, errno.EINVAL)
    assert hv.port_of(h1, o.port) is o
    # the port table (max_ports 6: ports 1-5), lowest free first
    more = [hv.alloc_unbound(h1b, 0).port for _ in range(3)]
    assert more == [3, 4, 5]
    refused(lambda: hv.alloc_unbound(h1, 0), ResourceExhausted, errno.ENOSPC)
    assert hv.stats(1).ports == 5 and hv.stats(1).fds == 2 + 5
    hv.unbind(h1b, 4)
    hv.unbind(h1, u.port)
    assert hv.alloc_unbound(h1, 0).port == 1 and hv.alloc_unbound(h1, 0).port == 4
    # closing one end puts the other back to unbound, offered to the closer's domain
    gen2 = hv.domain(2).gen[b.port]
    hv.unbind(h1, o.port)
    assert hv.status(h2, 2, b.port) == (EvtchnState.unbound, 1, 0)
    assert hv.domain(2).gen[b.port] == gen2 + 1
    assert hv.status(h1, 1, o.port) == (EvtchnState.closed, 0, 0)
    assert hv.notify(h2, b.port) is None
    # restriction: irreversible, to one domain
    hv.restrict(h0, 2)
    hv.restrict(h0, 2)
    refused(lambda: hv.restrict(h0, 1), PortError, errno.EINVAL)
    o2 = hv.alloc_unbound(h1, 0)
    refused(lambda: hv.bind_interdomain(h0, 1, o2.port), PortError, errno.EPERM)
    o3 = hv.alloc_unbound(h2, 0)
    assert hv.bind_interdomain(h0, 2, o3.port).remote is o3
    for h in (h0, h1, h1b, h2):
        hv.close_handle(h)
    refused(lambda: hv.alloc_unbound(h1, 0), PlatformError, errno.EBADF)
    refused(lambda: hv.notify(h1, 1), PlatformError, errno.EBADF)
    refused(lambda: hv.unbind(h1, 1), PlatformError, errno.EBADF)
    assert hv.stats(1).ports == 0 and hv.stats(1).fds == 0


def test_virq_rules(hv: Hypervisor) -> None:
    h0, h1 = hv.open_handle(0), hv.open_handle(1)
    for bad in (-1, core.NR_VIRQS):
        refused(lambda bad=bad: hv.bind_virq(h1, bad), PortError, errno.EINVAL)
    for other in (0, core.NR_VIRQS - 1, core.VIRQ_DOM_EXC + 1):
        refused(lambda other=other: hv.bind_virq(h1, other), PortError, errno.ENOSYS)
    v1 = hv.bind_virq(h1, core.VIRQ_DOM_EXC)
    refused(lambda: hv.bind_virq(h1, core.VIRQ_DOM_EXC), PortError, errno.EEXIST)
    assert hv.status(h1, 1, v1.port) == (EvtchnState.virq, core.VIRQ_DOM_EXC, 0)
    refused(lambda: hv.notify(h1, v1.port), PortError, errno.EINVAL)
    v0 = hv.bind_virq(h0, core.VIRQ_DOM_EXC)
    hv.shutdown_domain(2, core.SHUTDOWN_CRASH)
    assert pending(v0.inbox) == 1 and pending(v1.inbox) == 0  # dom0 only
    hv.shutdown_domain(2, 0)
    assert pending(v0.inbox) == 0
    hv.unbind(h1, v1.port)
    assert hv.bind_virq(h1, core.VIRQ_DOM_EXC).port == v1.port  # bindable again
    hv.close_handle(h0)
    hv.close_handle(h1)


def test_lent_ports_go_home(hv: Hypervisor) -> None:
    home, taker, other = hv.open_handle(1), hv.open_handle(1), hv.open_handle(2)
    p = hv.alloc_unbound(home, 0)
    refused(lambda: hv.lend_port(p, other), PortError, errno.EBUSY)  # another domain
    gen = hv.domain(1).gen[p.port]
    hv.lend_port(p, taker)
    assert p.owner is taker and p.home is home and p.port in taker.ports
    assert p.port not in home.ports and hv.domain(1).gen[p.port] == gen + 1
    refused(lambda: hv.lend_port(p, home), PortError, errno.EBUSY)  # lent already
    hv.unbind(taker, p.port)  # goes back, stays open
    assert p.owner is home and p.home is None and p.port in home.ports
    assert hv.domain(1).gen[p.port] == gen + 2 and hv.stats(1).ports == 1
    hv.lend_port(p, taker)
    hv.close_handle(taker)  # the borrower's death returns it too
    assert p.owner is home and hv.stats(1).ports == 1
    taker2 = hv.open_handle(1)
    hv.lend_port(p, taker2)
    hv.close_handle(home)  # home gone: the port closes with its borrower
    hv.close_handle(taker2)
    assert hv.stats(1).ports == 0
    # a detached port (kept for a notification) cannot be lent
    h2 = hv.open_handle(2)
    s = hv.share(h2, 1, 1, writable=True)
    q = hv.alloc_unbound(h2, 1)
    hv.set_notify(h2, s.handle_id, 0, 2, q.port)
    hv.unbind(h2, q.port)
    refused(lambda: hv.lend_port(q, h2), PortError, errno.EBUSY)
    closed = hv.open_handle(2)
    hv.close_handle(closed)
    refused(lambda: hv.lend_port(q, closed), PlatformError, errno.EBADF)
    hv.close_handle(h2)
    hv.close_handle(other)
    assert hv.stats(2).ports == 0


def test_handle_table_bound_and_close_order() -> None:
    hv = Hypervisor(max_grants=FIRST_REF + 4, max_ports=4, max_handles=2)
    try:
        hv.create_domain(1)
        refused(lambda: hv.open_handle(9), NoSuchDomain, errno.ESRCH)
        h, h2 = hv.open_handle(1), hv.open_handle(1)
        refused(lambda: hv.open_handle(1), ResourceExhausted, errno.ENOSPC)
        closed: list[int] = []
        h.on_close.append(lambda: closed.append(1))
        hv.close_handle(h)
        hv.close_handle(h)  # idempotent
        assert closed == [1] and hv.stats(1).handles == 1
        h3 = hv.open_handle(1)
        assert h3.id > h2.id > h.id
    finally:
        hv.close()
    hv.assert_released()


def test_released_plan_runs_again_and_segments_close_once() -> None:
    hv = Hypervisor(max_grants=FIRST_REF + 2, max_ports=2)
    try:
        assert hv.xenstore_rings == {} and hv.grant_gen == 0
        assert hv.domain(0).name == "Domain-0" and hv.domain(0).privileged
        d0 = hv.domain(0)
        d0.gen[1] = 0xFFFFFFFF  # generations are u32 and wrap
        d0.bump(1)
        assert d0.gen[1] == 0
        h0 = hv.open_handle(0)
        hv.create_domain(1)
        s = hv.share(h0, 1, 1, writable=True)
        assert hv.grant_gen == 1  # one share: the plan's rebuild must not trust a stale id
        h1 = hv.open_handle(1)
        out = bytearray(4)
        plan = hv.prepare_copy(h1, [GrantCopy(GrantPtr(0, s.refs[0]), LocalPtr(out), 4)])
        plan.release()  # before it ever ran
        seg = s.entries[0].segment
        seg.mm[:4] = b"abcd"
        assert plan() == [0] and out == b"abcd"
        plan.release()
        seg.mm[:4] = b"wxyz"
        assert plan() == [0] and out == b"wxyz"  # rebuilt after release
        plan.release()
        plan.release()  # twice: nothing left to release
        # a writable share's memfd: size sealed, and no further seals (no one can make the
        # granter's pages read-only under it); a read-only one is sealed when first mapped
        fixed = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        assert fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS) == fixed | fcntl.F_SEAL_SEAL
        ro = hv.share(h0, 1, 1, writable=False)
        rseg = ro.entries[0].segment
        assert fcntl.fcntl(rseg.fd, fcntl.F_GET_SEALS) == fixed
        hv.unmap(h1, hv.map(h1, [(0, ro.refs[0])], writable=False).handle_id)
        sealed = fixed | core.F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
        assert fcntl.fcntl(rseg.fd, fcntl.F_GET_SEALS) == sealed
        with pytest.raises(OSError):
            os.write(rseg.ro_fd, b"x")
        hv.end_access(h0, ro.refs)
        rseg.close()  # idempotent with the read-only descriptor gone too
        assert rseg.fd == -1 and rseg._ro_fd == -1
        hv.end_access(h0, s.refs)
        assert seg.fd == -1
        seg.close()  # idempotent
        assert seg.fd == -1
        o = hv.outstanding()
        assert (o["handles"], o["frames"], o["grants"]) == (2, 0, 0)
        hv.close_handle(h1)
        assert hv.outstanding()["handles"] == 1
        hv.close_handle(h0)
    finally:
        hv.close()


def test_dom0s_descriptor_reserve_refuses_guests_only() -> None:
    """Below RLIMIT_NOFILE, the last FD_RESERVE descriptors are dom0's: a guest's port or
    pages landing there are refused with nothing charged or allocated; dom0's are not."""
    hv = Hypervisor(max_grants=FIRST_REF + 4, max_ports=4)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        hv.create_domain(1)
        h0, h1, h1b = hv.open_handle(0), hv.open_handle(1), hv.open_handle(1)
        probe = os.dup(0)
        os.close(probe)
        # the next descriptor is `probe`: put it just inside the reserve, then just outside
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + core.FD_RESERVE, hard))
        refused(lambda: hv.alloc_unbound(h1, 0), ResourceExhausted, errno.ENOSPC)
        refused(lambda: hv.share(h1, 0, 1, writable=True), ResourceExhausted, errno.ENOSPC)
        st = hv.stats(1)
        assert (st.fds, st.ports, st.grants) == (2, 0, 0)
        p0 = hv.alloc_unbound(h0, 1)  # dom0 may use its reserve
        hv.unbind(h0, p0.port)
        # no descriptor left at all (EMFILE): refused the same way, dom0 included
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
        refused(lambda: hv.alloc_unbound(h1, 0), ResourceExhausted, errno.ENOSPC)
        refused(lambda: hv.share(h1, 0, 1, writable=True), ResourceExhausted, errno.ENOSPC)
        refused(lambda: hv.alloc_unbound(h0, 1), ResourceExhausted, errno.ENOSPC)
        st = hv.stats(1)
        assert (st.fds, st.ports, st.grants) == (2, 0, 0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + core.FD_RESERVE + 1, hard))
        p = hv.alloc_unbound(h1, 0)
        assert p.port == 1 and hv.stats(1).fds == 3
        hv.unbind(h1, p.port)
        assert hv.stats(1).fds == 2
        hv.close_handle(h0)
        hv.close_handle(h1)
        hv.close_handle(h1b)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        hv.close()


def test_stale_plan_and_zombies_at_close() -> None:
    """A plan built before its grant ended is rebuilt whatever changed the tables since
    (here a frame grant), and closing the machine frees a dead domain's mapped grants."""
    hv = Hypervisor(max_grants=FIRST_REF + 4, max_ports=2)
    try:
        hv.create_domain(1)
        h0, h1 = hv.open_handle(0), hv.open_handle(1)
        s = hv.share(h1, 0, 1, writable=True)
        out = bytearray(1)
        plan = hv.prepare_copy(h0, [GrantCopy(GrantPtr(1, s.refs[0]), LocalPtr(out), 1)])
        assert plan() == [0]
        plan.release()
        assert plan() == [0]
        hv.end_access(h1, s.refs)
        (gfn,) = hv.alloc_frames(h1, 1).refs
        hv.grant_frame(h1, gfn, 0)
        assert plan() == [GntSt.bad_gntref]
        plan.release()
        m = hv.share(h1, 0, 1, writable=True)
        hv.map(h0, [(1, m.refs[0])], writable=True)
        held = hv.share(h1, 0, 1, writable=True)
        hv.hold_mapped(1, held.refs[0])  # pinned by no handle: still there at close
        hv.destroy_domain(1)
        assert hv.outstanding()["zombies"] == 1 and hv.outstanding()["grants"] == 2
    finally:
        hv.close()
    assert hv.outstanding() == dict.fromkeys(
        ("grants", "frames", "mappings", "ports", "handles", "zombies"), 0
    )


def test_documented_default_table_sizes() -> None:
    """docs/loopback-protocol.md: by default refs 8..4095 are usable (4088 per domain)
    and a domain maps at most 16384 pages (maptrack; then ENOSPC, GNTST no_space)."""
    hv = Hypervisor()
    try:
        # and 1024 ports per domain (1..1023), 256 control connections per domain, at
        # most 4096 descriptors held for an unprivileged domain
        assert (hv.max_ports, hv.max_handles, hv.max_fds) == (1024, 256, 4096)
        for bad in ({"max_grants": FIRST_REF}, {"max_ports": 1}):  # no usable entry
            with pytest.raises(LocalError) as info:
                Hypervisor(**bad)
            assert isinstance(info.value.args[0], str) and info.value.args[0]
        hv.create_domain(1)
        hv.create_domain(2)
        h1, h2 = hv.open_handle(1), hv.open_handle(2)
        shares = [hv.share(h1, 2, n, writable=True) for n in (1024, 1024, 1024, 1016)]
        assert sorted(r for s in shares for r in s.refs) == list(range(FIRST_REF, 4096))
        refused(lambda: hv.share(h1, 2, 1, writable=True), ResourceExhausted, errno.ENOSPC)
        ref = shares[0].refs[0]
        maps = [hv.map(h2, [(1, ref)] * 1024, writable=False) for _ in range(16)]
        map_refused(lambda: hv.map(h2, [(1, ref)], writable=False), errno.ENOSPC, 0, GntSt.no_space)
        for m in maps:
            hv.unmap(h2, m.handle_id)
        for s in shares:
            hv.end_access(h1, s.refs)
    finally:
        hv.close()
    hv.assert_released()


def test_copy_merges_only_runs_contiguous_in_one_object_on_both_sides(hv: Hypervisor) -> None:
    h1 = hv.open_handle(1)
    s = hv.share(h1, 2, 1, writable=True)
    t = hv.share(h1, 2, 1, writable=True)
    s.entries[0].segment.mm[:PAGE_SIZE] = bytes((i * 13 + 1) % 251 for i in range(PAGE_SIZE))
    t.entries[0].segment.mm[:PAGE_SIZE] = bytes((i * 5 + 3) % 241 for i in range(PAGE_SIZE))
    source = {s.handle_id: bytes(s.entries[0].segment.mm[:PAGE_SIZE])}
    source[t.handle_id] = bytes(t.entries[0].segment.mm[:PAGE_SIZE])
    S, T = s.handle_id, t.handle_id
    # (source share, source offset, destination buffer, destination offset) x 2, 50 bytes
    # each, and the memcpy count the plan may use: runs contiguous in the same object on
    # both sides are one memcpy, anything else is copied on its own
    cases = [
        (((S, 0, "a", 0), (S, 50, "a", 50)), 1),  # contiguous on both sides
        (((S, 0, "a", 0), (S, 50, "b", 50)), 2),  # same offsets, another destination
        (((S, 0, "a", 0), (T, 50, "a", 50)), 2),  # same offsets, another source
        (((S, 0, "a", 100), (S, 50, "a", 50)), 2),  # the destination goes back
        (((S, 100, "a", 0), (S, 50, "a", 50)), 2),  # the source goes back
        (((S, 0, "a", 0), (S, 100, "a", 50)), 2),  # the source skips one run's length
    ]
    for pair, memcpys in cases:
        bufs = {"a": bytearray(300), "b": bytearray(300)}
        want = {k: bytearray(300) for k in bufs}
        segs = []
        for sid, so, d, do in pair:
            segs.append(GrantCopy(SharePtr(sid, so), LocalPtr(bufs[d], do), 50))
            want[d][do : do + 50] = source[sid][so : so + 50]  # each segment on its own
        plan = hv.prepare_copy(h1, segs)
        assert plan() == [GntSt.okay, GntSt.okay], pair
        assert bufs == want, pair
        assert len(plan._ops) == memcpys, pair  # the documented cost of a plan
        plan.release()
    # a zero-length window of a share is a valid (empty) copy
    assert hv.copy(h1, [GrantCopy(SharePtr(S, 0), LocalPtr(bytearray(1)), 0)]) == [GntSt.okay]
    hv.close_handle(h1)


def test_plan_revalidates_after_every_kind_of_grant_table_change() -> None:
    """A copy plan is rebuilt after any grant-table change: each change gives the tables
    a generation they never had before, so a stale plan cannot look current."""
    changes: list[Callable[[Hypervisor, Any], Any]] = [
        lambda hv, h1: hv.share(h1, 2, 1, writable=True),
        lambda hv, h1: hv.grant_frame(h1, hv.alloc_frames(h1, 1).refs[0], 2),
        lambda hv, h1: hv.destroy_domain(3),  # a domain holding nothing
    ]
    for change in changes:
        hv = Hypervisor(max_grants=FIRST_REF + 8, max_ports=6, max_maptrack=6)
        try:
            for d in (1, 2, 3):
                hv.create_domain(d)
            h1, h2 = hv.open_handle(1), hv.open_handle(2)
            s = hv.share(h1, 2, 1, writable=True)
            assert (s.domid, s.writable) == (2, True)
            s.entries[0].segment.mm[0] = 0x77
            m = hv.map(h2, [(1, s.refs[0])], writable=False)
            out = bytearray(1)
            plan = hv.prepare_copy(h2, [GrantCopy(GrantPtr(1, s.refs[0]), LocalPtr(out), 1)])
            assert plan() == [GntSt.okay] and out[0] == 0x77
            hv.end_access(h1, s.refs, defer=True)  # mapped: revoking, no longer copyable
            change(hv, h1)
            out[0] = 0
            assert plan() == [GntSt.bad_gntref] and out[0] == 0
            plan.release()
            hv.unmap(h2, m.handle_id)
        finally:
            hv.close()


def test_segment_that_cannot_be_sized_closes_its_descriptor(hv: Hypervisor) -> None:
    """Pages that cannot be allocated for a reason other than exhaustion: a platform
    error carrying the system's errno, no descriptor kept, nothing charged."""
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        core.Segment(-1, "xenpv-test-bad-size")
    assert len(os.listdir("/proc/self/fd")) == before
    dom = hv.domain(1)
    fds = dom.fds
    refused(
        lambda: hv._new_segment(dom, -1, "xenpv-test-bad-size", writable=True),
        PlatformError,
        errno.EINVAL,
    )
    assert dom.fds == fds and len(os.listdir("/proc/self/fd")) == before


def test_share_notify_fired_then_later_pages_end_and_leftovers_are_listed(
    hv: Hypervisor,
) -> None:
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    s = hv.share(h1, 2, 3, writable=True)
    p2 = hv.alloc_unbound(h2, 1)
    p1 = hv.bind_interdomain(h1, 2, p2.port)
    pending(p2.inbox)
    hv.set_notify(h1, s.handle_id, 0, core.NOTIFY_SEND_EVENT, p1.port)
    assert hv.end_access(h1, [s.refs[0]]) == 1 and pending(p2.inbox) == 1  # fired
    assert hv.end_access(h1, [s.refs[1]]) == 1 and pending(p2.inbox) == 0  # not again
    hv.set_notify(h1, s.handle_id, 2 * PAGE_SIZE, core.NOTIFY_SEND_EVENT, p1.port)
    hv.set_notify(h1, s.handle_id, 2 * PAGE_SIZE + 1, core.NOTIFY_SEND_EVENT, p1.port)
    assert p1.notify_refs == 1  # replaced, not added
    with pytest.raises(AssertionError) as info:
        hv.assert_released()
    assert "grants" in str(info.value) and "ports" in str(info.value)
    assert hv.end_access(h1, [s.refs[2]]) == 1 and pending(p2.inbox) == 1
    hv.close_handle(h1)
    hv.close_handle(h2)
    hv.assert_released()


def test_share_window_ending_one_byte_before_a_page_end(hv: Hypervisor) -> None:
    h1 = hv.open_handle(1)
    s = hv.share(h1, 2, 2, writable=True)
    s3 = hv.share(h1, 2, 3, writable=True)
    hv.end_access(h1, [s3.refs[2]])
    buf = bytearray(PAGE_SIZE)
    for share in (s, s3):  # [PAGE-1, 2*PAGE-1): pages 0 and 1 only
        (st,) = hv.copy(
            h1, [GrantCopy(SharePtr(share.handle_id, PAGE_SIZE - 1), LocalPtr(buf), PAGE_SIZE)]
        )
        assert st == GntSt.okay
    hv.close_handle(h1)


def test_failed_frame_batch_gives_back_its_descriptors() -> None:
    hv = Hypervisor(max_grants=FIRST_REF + 8, max_ports=2, max_fds=1 + 2 * core.SEGMENT_FDS)
    try:
        hv.create_domain(1)
        h = hv.open_handle(1)
        with pytest.raises(ResourceExhausted):
            hv.alloc_frames(h, 3)  # the third frame is past the quota
        assert hv.stats(1).fds == 1 and hv.outstanding()["frames"] == 0
        f = hv.alloc_frames(h, 2)  # the quota is whole again
        assert f.refs == (core.FIRST_GFN, core.FIRST_GFN + 1)  # no gfn was used up
        hv.close_handle(h)
        hv.assert_released()
    finally:
        hv.close()


def test_frames_grant_frame_ids_reserved_console_and_maptrack(hv: Hypervisor) -> None:
    h0, h1, h2 = hv.open_handle(0), hv.open_handle(1), hv.open_handle(2)
    f = hv.alloc_frames(h1, 2)
    assert f.domid == 0  # guest frames: dom0 is the one that may map them
    g0 = hv.grant_frame(h1, f.refs[0], 2, reserved=0)  # GNTTAB_RESERVED_CONSOLE
    g1 = hv.grant_frame(h1, f.refs[1], 2, reserved=1)  # GNTTAB_RESERVED_XENSTORE
    assert g0.refs == (0,) and g1.refs == (1,)
    ids = (f.handle_id, g0.handle_id, g1.handle_id)
    assert len(set(ids)) == 3  # unique, and u32 (the daemon's replies carry them as such)
    assert all(0 <= i < 1 << 32 for i in ids)
    hv.unmap(h1, g0.handle_id)
    hv.unmap(h1, g1.handle_id)
    assert hv.stats(1).grants == 0
    # foreign maps add up in dom0's maptrack (6 entries)
    m1 = hv.foreign_map(h0, 1, [f.refs[0]] * 3, writable=True)
    m2 = hv.foreign_map(h0, 1, [f.refs[1]] * 2, writable=False)
    assert hv.domain(0).maptrack == 5
    with pytest.raises(MapError) as info:
        hv.foreign_map(h0, 1, [f.refs[0]] * 2, writable=False)
    assert (info.value.errno, info.value.status) == (errno.ENOSPC, GntSt.no_space)
    # a writable foreign mapping takes a clear-byte notification and clears the byte
    hv.set_notify(h0, m1.handle_id, PAGE_SIZE + 9, core.NOTIFY_CLEAR_BYTE, 0)
    seg = f.entries[0].segment
    seg.mm[9] = 0x31
    hv.unmap(h0, m1.handle_id)
    assert seg.mm[9] == 0
    hv.unmap(h0, m2.handle_id)
    assert hv.domain(0).maptrack == 0
    # deferred frame free: the frame share's entries end when dom0 unmaps
    m3 = hv.foreign_map(h0, 1, [f.refs[0]], writable=False)
    hv.unmap(h1, f.handle_id)
    assert hv.outstanding()["frames"] == 1
    hv.unmap(h0, m3.handle_id)
    assert hv.outstanding()["frames"] == 0
    hv.close_handle(h0)
    hv.close_handle(h1)
    hv.close_handle(h2)
    hv.assert_released()


def test_mapping_fds_event_only_notify_keeps_the_byte_shared_port_counts(hv: Hypervisor) -> None:
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    s = hv.share(h1, 2, 2, writable=True)
    seg = s.entries[0].segment
    seg.mm[3] = 0x5A
    seg.mm[PAGE_SIZE + 3] = 0x5B
    m1 = hv.map(h2, [(1, s.refs[0])], writable=True)
    m2 = hv.map(h2, [(1, s.refs[1])], writable=True)
    # (fd, page) per page, through a read-only descriptor where asked
    ((rofd, page),) = m2.pages(True)
    ((rwfd, _),) = m2.pages(False)
    assert page == 1
    assert fcntl.fcntl(rofd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert fcntl.fcntl(rwfd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    p2 = hv.alloc_unbound(h2, 1)
    p1 = hv.bind_interdomain(h1, 2, p2.port)
    pending(p1.inbox)
    pending(p2.inbox)
    # two notifications (event only) on writable mappings, the same port
    hv.set_notify(h2, m1.handle_id, 3, core.NOTIFY_SEND_EVENT, p2.port)
    hv.set_notify(h2, m2.handle_id, 3, core.NOTIFY_SEND_EVENT, p2.port)
    assert p2.notify_refs == 2
    hv.unbind(h2, p2.port)  # kept open while either notification refers to it
    hv.unmap(h2, m1.handle_id)
    assert seg.mm[3] == 0x5A  # event only: the byte stays
    assert pending(p1.inbox) == 1
    assert hv.status(h1, 1, p1.port)[0] == EvtchnState.interdomain
    hv.unmap(h2, m2.handle_id)
    assert seg.mm[PAGE_SIZE + 3] == 0x5B and pending(p1.inbox) == 1
    assert hv.status(h1, 1, p1.port)[0] == EvtchnState.unbound  # closed after the last
    hv.close_handle(h1)
    hv.close_handle(h2)


def test_returned_port_is_usable_by_its_home(hv: Hypervisor) -> None:
    home, taker, peer = hv.open_handle(1), hv.open_handle(1), hv.open_handle(2)
    p = hv.alloc_unbound(home, 2)
    q = hv.bind_interdomain(peer, 1, p.port)
    pending(p.inbox)
    pending(q.inbox)  # bind leaves the new port pending
    hv.lend_port(p, taker)
    hv.unbind(taker, p.port)  # back home
    assert hv.port_of(home, p.port) is p
    assert hv.notify(home, p.port) is q and pending(q.inbox) == 1
    hv.unbind(home, p.port)
    assert hv.status(peer, 2, q.port)[0] == EvtchnState.unbound
    for h in (home, taker, peer):
        hv.close_handle(h)


def test_fault_defaults_turn_faults_off(hv: Hypervisor) -> None:
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    p2 = hv.alloc_unbound(h2, 1)
    p1 = hv.bind_interdomain(h1, 2, p2.port)
    pending(p1.inbox)
    pending(p2.inbox)
    hv.fault(core.FAULT_DROP_NOTIFY, 1)  # arg defaults to 0: drop nothing
    hv.notify(h1, p1.port)
    assert pending(p2.inbox) == 1
    hv.fault(core.FAULT_DUPLICATE_NOTIFY, 1, arg=1)
    hv.notify(h1, p1.port)
    assert pending(p2.inbox) == 2
    hv.fault(core.FAULT_DUPLICATE_NOTIFY, 1)  # default: duplication off
    hv.notify(h1, p1.port)
    assert pending(p2.inbox) == 1
    with pytest.raises(PlatformError):
        hv.fault(99, 1)
    hv.close_handle(h1)
    hv.close_handle(h2)


def test_non_contiguous_local_buffer_is_the_callers_error(hv: Hypervisor) -> None:
    h1 = hv.open_handle(1)
    s = hv.share(h1, 2, 1, writable=True)
    strided = memoryview(bytearray(16))[::2]
    with pytest.raises(LocalError) as info:
        hv.copy(h1, [GrantCopy(SharePtr(s.handle_id, 0), LocalPtr(strided), 4)])
    msg = info.value.args[0]
    assert isinstance(msg, str) and "contiguous" in msg
    hv.close_handle(h1)


def test_bind_interdomain_to_domid_self(hv: Hypervisor) -> None:
    """A domain may connect two of its own ports, naming itself DOMID_SELF."""
    h1 = hv.open_handle(1)
    a = hv.alloc_unbound(h1, DOMID_SELF)
    b = hv.bind_interdomain(h1, DOMID_SELF, a.port)
    pending(a.inbox)
    pending(b.inbox)
    assert hv.status(h1, 1, b.port) == (EvtchnState.interdomain, 1, a.port)
    assert hv.notify(h1, b.port) is a and pending(a.inbox) == 1
    hv.close_handle(h1)


def test_generation_page_creation_hooks_and_flags() -> None:
    """A domain's port-generation page holds one u32 per port (docs/loopback-protocol.md:
    ``max_ports`` x u32, at least a page); the creation and destruction hooks get the
    domain itself; a new domain is running, not dying (DOMAIN_LIST / DOMAIN_INFO flags)."""
    from xenpv.platforms.loopback import proto
    from xenpv.platforms.loopback.daemon import _domain_flags

    for ports in (2, 1024, 1025, 5000):
        hv = Hypervisor(max_grants=FIRST_REF + 1, max_ports=ports)
        try:
            dom = hv.create_domain(1)
            size = max(4 * ports, PAGE_SIZE)
            assert os.fstat(dom.gen_fd).st_size == size and len(dom.gen) == size // 4
            if ports == 5000:  # the highest port's generation is in the page
                dom.bump(ports - 1)
                assert dom.gen[ports - 1] == 1
        finally:
            hv.close()
        hv.assert_released()
    hv = Hypervisor(max_grants=FIRST_REF + 1, max_ports=2)
    try:
        created: list[core.Domain] = []
        destroyed: list[core.Domain] = []
        hv.on_domain_created.append(created.append)
        hv.on_domain_destroyed.append(destroyed.append)
        dom = hv.create_domain(3)
        assert created == [dom] and dom is hv.domain(3)
        assert _domain_flags(dom) == proto.DOMFLAG_RUNNING
        assert _domain_flags(hv.domain(0)) == proto.DOMFLAG_RUNNING | proto.DOMFLAG_PRIVILEGED
        hv.shutdown_domain(3, 0)
        assert _domain_flags(dom) == proto.DOMFLAG_RUNNING | proto.DOMFLAG_SHUTDOWN
        hv.destroy_domain(3)
        assert destroyed == [dom] and dom.dying
    finally:
        hv.close()
    hv.assert_released()


def test_full_tables_and_a_failed_eventfd_leave_nothing_taken(
        hv: Hypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full grant table or port table says which domain and how many entries it has
    (what an operator needs to size them); an eventfd that cannot be made gives the
    port number back and the descriptor charge: EMFILE/ENFILE/ENOMEM as a full table
    (ENOSPC), anything else as a platform error with its own errno."""
    h1 = hv.open_handle(1)
    share = hv.share(h1, 2, 8, writable=True)
    e = refused(lambda: hv.share(h1, 2, 1, writable=True), ResourceExhausted, errno.ENOSPC)
    assert "dom1" in str(e) and "(8 of 8 refs in use)" in str(e)
    hv.end_access(h1, share.refs)
    fds = hv.domain(1).fds
    for code, exc, want in ((errno.EMFILE, ResourceExhausted, errno.ENOSPC),
                            (errno.ENOMEM, ResourceExhausted, errno.ENOSPC),
                            (errno.EINVAL, PlatformError, errno.EINVAL),
                            (errno.ENODEV, PlatformError, errno.ENODEV)):
        def fail(*_: object, code: int = code) -> int:
            raise OSError(code, os.strerror(code))

        with monkeypatch.context() as m:
            m.setattr(core.os, "eventfd", fail)
            e = refused(lambda: hv.alloc_unbound(h1, 2), exc, want)
        assert "eventfd" in str(e) and os.strerror(code) in str(e)
        assert hv.domain(1).fds == fds and not hv.domain(1).ports
    ports = [hv.alloc_unbound(h1, 2) for _ in range(5)]
    assert [p.port for p in ports] == [1, 2, 3, 4, 5]  # every number came back
    e = refused(lambda: hv.alloc_unbound(h1, 2), ResourceExhausted, errno.ENOSPC)
    assert "dom1: all 5 ports in use" in str(e)
    for p in ports:
        hv.unbind(h1, p.port)


def test_closing_one_end_puts_the_other_back_to_unbound_for_a_new_peer(
    hv: Hypervisor,
) -> None:
    """event_channel.h: when one end of an interdomain channel closes, the other end is
    unbound again (still for the same remote domain), so the peer may bind to it anew -
    as a frontend reconnecting to a backend's port does."""
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    p1 = hv.alloc_unbound(h1, 2)
    p2 = hv.bind_interdomain(h2, 1, p1.port)
    hv.unbind(h2, p2.port)
    assert p1.remote is None and p1.state == core.EvtchnState.unbound
    again = hv.bind_interdomain(h2, 1, p1.port)
    assert again.remote is p1 and p1.remote is again
    assert hv.notify(h2, again.port) is p1 and pending(p1.inbox) == 1
    hv.close_handle(h1)
    hv.close_handle(h2)

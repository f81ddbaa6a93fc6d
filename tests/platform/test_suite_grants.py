"""Grant-table semantics every platform mode must give (written against the interfaces)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    COPY_PIECE,
    GntSt,
    GrantCopy,
    GrantInUse,
    GrantPtr,
    GuestFrames,
    LocalPtr,
    MapError,
    PieceCopies,
    UnmapNotify,
    copy_pieces,
    prepare_copy,
)

PAGE = 4096


def test_shared_pages_are_zeroed_and_map_roundtrips_both_ways(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pages = b.grants.grant(0, 3)
    assert len(pages.refs) == 3 and all(r >= 8 for r in pages.refs)
    m = a.grants.map(1, pages.refs)
    assert bytes(m.mem[0 : 3 * PAGE]) == bytes(3 * PAGE)
    m.mem[PAGE - 2 : PAGE + 2] = b"span"  # contiguous across the page boundary
    assert bytes(pages.mem[PAGE - 2 : PAGE + 2]) == b"span"
    pages.mem[2 * PAGE + 7 : 2 * PAGE + 10] = b"xyz"
    assert bytes(m.mem[2 * PAGE + 7 : 2 * PAGE + 10]) == b"xyz"
    a.grants.unmap(m)
    b.grants.end_access(pages)


def test_map_in_a_different_order_is_contiguous_in_that_order(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pages = b.grants.grant(0, 2)
    pages.mem[0:1] = b"A"
    pages.mem[PAGE : PAGE + 1] = b"B"
    m = a.grants.map(1, [pages.refs[1], pages.refs[0]])
    assert bytes(m.mem[0:1]) == b"B" and bytes(m.mem[PAGE : PAGE + 1]) == b"A"
    a.grants.unmap(m)
    b.grants.end_access(pages)


def test_isolation_mapping_a_ref_not_granted_to_you_fails(machine: Any) -> None:
    a, b, c = machine.domain(0), machine.domain(1), machine.domain(2)
    to_c = b.grants.grant(2, 1)
    with pytest.raises(MapError) as info:
        a.grants.map(1, to_c.refs)
    assert info.value.status == GntSt.bad_gntref and info.value.index == 0
    m = c.grants.map(1, to_c.refs)  # the real grantee can
    c.grants.unmap(m)
    b.grants.end_access(to_c)


# (ref 1 is left out: where a domain builder made the domain's xenstore page, dom0 may
# map it there, as dom0's xenstored does; tests/integration/test_xs_ring.py covers it)
@pytest.mark.parametrize("ref", [0, 7, 100_000, 2**32 - 1])
def test_reserved_and_out_of_range_refs_cannot_be_mapped(machine: Any, ref: int) -> None:
    a, _b = machine.domain(0), machine.domain(1)
    with pytest.raises(MapError) as info:
        a.grants.map(1, [ref])
    assert info.value.status == GntSt.bad_gntref


def test_partial_map_failure_leaves_nothing_mapped(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pages = b.grants.grant(0, 4)
    batch = [*pages.refs[:2], 5, *pages.refs[2:]]  # ref 5 (#2) is reserved
    with pytest.raises(MapError) as info:
        a.grants.map(1, batch)
    assert info.value.index == 2
    # nothing of the batch stayed mapped: ending access succeeds at once
    b.grants.end_access(pages)


def test_isolation_readonly_grant_cannot_be_written(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pages = b.grants.grant(0, 1, writable=False)
    pages.mem[0:5] = b"hello"
    with pytest.raises(MapError) as info:
        a.grants.map(1, pages.refs, writable=True)
    assert info.value.status == GntSt.permission_denied
    m = a.grants.map(1, pages.refs, writable=False)
    assert bytes(m.mem[0:5]) == b"hello"
    with pytest.raises(TypeError):
        m.mem[0:1] = b"X"
    assert bytes(pages.mem[0:5]) == b"hello"
    a.grants.unmap(m)
    b.grants.end_access(pages)


def test_end_access_refused_while_mapped_and_page_not_reused(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pages = b.grants.grant(0, 1)
    m = a.grants.map(1, pages.refs)
    m.mem[0:6] = b"secret"
    with pytest.raises(GrantInUse) as info:
        b.grants.end_access(pages)
    assert info.value.errno == errno.EBUSY
    # nothing was ended: the grant still works both ways
    assert bytes(pages.mem[0:6]) == b"secret"
    # a new grant never gets the quarantined page or ref
    fresh = b.grants.grant(0, 1)
    assert fresh.refs[0] != pages.refs[0]
    fresh.mem[0:6] = b"canary"
    assert bytes(m.mem[0:6]) == b"secret"
    a.grants.unmap(m)
    b.grants.end_access(pages)
    b.grants.end_access(fresh)


def test_hold_mapped_fault_makes_end_access_fail(machine: Any) -> None:
    b = machine.domain(1)
    pages = b.grants.grant(0, 2)
    machine.hold_mapped(1, pages.refs[1])
    try:
        with pytest.raises(GrantInUse):
            b.grants.end_access(pages)
    finally:
        machine.release_hold(1, pages.refs[1])
    b.grants.end_access(pages)


def test_grant_table_exhaustion_is_a_clear_error_and_leaks_nothing(machine: Any) -> None:
    b = machine.domain(1)
    held = []
    with pytest.raises(PlatformError) as info:
        for _ in range(10_000):
            held.append(b.grants.grant(0, 8))
    assert info.value.errno == errno.ENOSPC
    assert len(held) >= 1
    for pages in held:
        b.grants.end_access(pages)
    again = b.grants.grant(0, 8)  # the table is usable again
    b.grants.end_access(again)


def test_grant_copy_checks_bounds_permissions_and_grantee(machine: Any) -> None:
    a, b, c = machine.domain(0), machine.domain(1), machine.domain(2)
    rw = b.grants.grant(0, 1)
    ro = b.grants.grant(0, 1, writable=False)
    other = b.grants.grant(2, 1)
    rw.mem[100:104] = b"ping"
    out = bytearray(8)
    src = bytearray(b"PONG")
    status = a.grants.copy(
        [
            GrantCopy(GrantPtr(1, rw.refs[0], 100), LocalPtr(out, 2), 4),
            GrantCopy(LocalPtr(src), GrantPtr(1, rw.refs[0], 4092), 4),
            GrantCopy(LocalPtr(src), GrantPtr(1, rw.refs[0], 4093), 4),
            GrantCopy(LocalPtr(src), GrantPtr(1, ro.refs[0], 0), 4),
            GrantCopy(GrantPtr(1, other.refs[0], 0), LocalPtr(out), 4),
            GrantCopy(GrantPtr(9, rw.refs[0], 0), LocalPtr(out), 4),
            GrantCopy(GrantPtr(1, ro.refs[0], 0), LocalPtr(out, 6), 2),
        ]
    )
    assert status == [
        GntSt.okay,
        GntSt.okay,
        GntSt.bad_copy_arg,
        GntSt.permission_denied,
        GntSt.bad_gntref,
        GntSt.bad_domain,
        GntSt.okay,
    ]
    assert bytes(out[2:6]) == b"ping"
    assert bytes(rw.mem[4092:4096]) == b"PONG"
    assert bytes(ro.mem[0:4]) == bytes(4)
    del c
    for pages in (rw, ro, other):
        b.grants.end_access(pages)


def _bound_pair(a: Any, b: Any) -> tuple[int, int]:
    """Port on ``b`` offered to ``a``'s domain, bound by ``a``; both pendings consumed."""
    pb = b.events.alloc_unbound(a.domid)
    pa = a.events.bind_interdomain(b.domid, pb)
    assert a.events.pending(5) == pa
    a.events.unmask(pa)
    return pa, pb


def test_unmap_notify_clears_byte_and_signals_on_unmap(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pa, pb = _bound_pair(a, b)
    pages = b.grants.grant(0, 2)
    m = a.grants.map(1, pages.refs, notify=UnmapNotify(PAGE + 9, clear_byte=True, port=pa))
    m.mem[PAGE + 9 : PAGE + 10] = b"\x01"
    assert b.events.pending(0) is None
    a.grants.unmap(m)
    assert b.events.pending(5) == pb
    assert bytes(pages.mem[PAGE + 9 : PAGE + 10]) == b"\x00"
    b.grants.end_access(pages)


def test_share_notify_fires_when_the_share_ends(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pa, pb = _bound_pair(a, b)
    pages = b.grants.grant(0, 1)
    b.grants.set_unmap_notify(pages, UnmapNotify(3, clear_byte=True, port=pb))
    b.grants.end_access(pages)
    assert a.events.pending(5) == pa


def test_process_death_fires_unmap_notify_and_unbinds(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    b_port, _a_port = _bound_pair(b, a)  # b binds a port a offered
    pages = a.grants.grant(1, 1)
    pages.mem[0:1] = b"\x01"
    mine = b.grants.grant(0, 1)
    keep = a.grants.map(1, mine.refs)
    mine.mem[0:4] = b"live"
    b.grants.map(0, pages.refs, notify=UnmapNotify(0, clear_byte=True, port=b_port))
    machine.kill(b)
    assert a.events.pending(10) is not None  # the notification of b's mapping
    assert bytes(pages.mem[0:1]) == b"\x00"
    # pages b shared stay valid while a still maps them (deferred revocation)
    assert bytes(keep.mem[0:4]) == b"live"
    a.grants.unmap(keep)
    a.grants.end_access(pages)


def test_repeated_copy_notices_ended_grants(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pages = b.grants.grant(0, 2)
    pages.mem[0:4] = b"one!"
    out = bytearray(2 * PAGE)
    segs = [
        GrantCopy(GrantPtr(1, r, 0), LocalPtr(out, i * PAGE), PAGE)
        for i, r in enumerate(pages.refs)
    ]
    run = prepare_copy(a.grants, segs)
    assert run() == [GntSt.okay, GntSt.okay] and bytes(out[0:4]) == b"one!"
    pages.mem[0:4] = b"two!"
    assert run() == [GntSt.okay, GntSt.okay] and bytes(out[0:4]) == b"two!"
    b.grants.end_access(pages)
    out[:] = bytes(2 * PAGE)
    assert run() == [GntSt.bad_gntref, GntSt.bad_gntref]
    assert bytes(out) == bytes(2 * PAGE)
    release = getattr(run, "release", None)
    if release is not None:
        release()


def test_copy_pieces_into_own_frames_and_private_buffers(machine: Any) -> None:
    """Every platform copies compact (ref, offset, length, place) pieces out of one
    domain's grants (``PieceCopies``): into a private buffer, and into its own frames
    where it has them (named, not carried, on the loopback client; a piece crossing
    such a frame's page still lands, carried); a bad grant fails only its piece; a piece
    crossing its grant's page or running past the buffer is refused before anything is
    copied."""
    a, b, c = machine.domain(0), machine.domain(1), machine.domain(2)
    del c  # domain 2 exists: a grant to it is one a copy of dom0's may not use
    assert isinstance(a.grants, PieceCopies)
    pages = b.grants.grant(0, 3)
    other = b.grants.grant(2, 1)
    pattern = bytes(range(256)) * (3 * PAGE // 256)
    pages.mem[0:3 * PAGE] = pattern
    frames = a.grants.alloc_frames(4) if isinstance(a.grants, GuestFrames) else None
    dests: list[Any] = [bytearray(4 * PAGE)] + ([frames.mem] if frames is not None else [])
    r0, r1, r2 = pages.refs
    for dest in dests:
        dest[:] = bytes(4 * PAGE)
        pieces = b"".join([COPY_PIECE.pack(r1, 0, PAGE, 2 * PAGE),
                           COPY_PIECE.pack(r0, 10, 100, 100),
                           COPY_PIECE.pack(r2, 4000, 96, 0),
                           COPY_PIECE.pack(other.refs[0], 0, 4, 300)])
        got = copy_pieces(a.grants, 1, pieces + bytes(5), 4, dest)
        assert list(got) == [GntSt.okay, GntSt.okay, GntSt.okay, GntSt.bad_gntref]
        crossing = COPY_PIECE.pack(r0, 0, 200, PAGE - 100)  # crosses a page of dest
        assert list(copy_pieces(a.grants, 1, crossing, 1, dest)) == [GntSt.okay]
        assert bytes(dest[2 * PAGE:3 * PAGE]) == pattern[PAGE:2 * PAGE]
        assert bytes(dest[100:200]) == pattern[10:110]
        assert bytes(dest[0:96]) == pattern[2 * PAGE + 4000:3 * PAGE]
        assert bytes(dest[300:304]) == bytes(4)
        assert bytes(dest[PAGE - 100:PAGE + 100]) == pattern[0:200]
        assert list(copy_pieces(a.grants, 1, b"", 0, dest)) == []
        before = bytes(dest)
        for bad in (COPY_PIECE.pack(r0, 4000, 200, 0),  # crosses the grant's page
                    COPY_PIECE.pack(r0, 0, 100, 4 * PAGE - 50)):  # past the buffer
            with pytest.raises(LocalError):
                copy_pieces(a.grants, 1, COPY_PIECE.pack(r1, 0, 8, 0) + bad, 2, dest)
        with pytest.raises(LocalError):  # fewer records than counted
            copy_pieces(a.grants, 1, COPY_PIECE.pack(r1, 0, 8, 0), 2, dest)
        with pytest.raises(LocalError):  # not a domain id (never truncated to one)
            copy_pieces(a.grants, 0x10001, COPY_PIECE.pack(r1, 0, 8, 0), 1, dest)
        assert bytes(dest) == before
    if frames is not None:
        a.grants.free_frames(frames)
    for p in (pages, other):
        b.grants.end_access(p)

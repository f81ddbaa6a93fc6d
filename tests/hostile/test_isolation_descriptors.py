"""A grantee only ever receives descriptors covering pages granted to it.

hostile-inputs.md scenario 5 (a hostile frontend hands out refs; the backend must see
"no access outside the granted 4K page") and scenario 14 (a hostile peer scans every
byte it can reach for leftovers): a peer that keeps and inspects every descriptor the
emulator sends it must not reach a page that was never granted to it.  In one process
the descriptors are those the hypervisor hands to a mapping (``Mapping.pages``); across
processes, those a raw control connection receives in the map reply.

The descriptors are checked by what they can reach: their size (the memfd's pages) and
their whole content (no canary written to a page that was not granted), and a write
beyond the granted page must fail.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.platforms.base import GntSt, MapError
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ControlConnection
from xenpv.platforms.loopback.core import Hypervisor
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.platforms.loopback.proto import Op

PAGE = 4096
CANARY = b"NEVER-GRANTED-CANARY"


def assert_reaches_only(fds: list[int], pages_per_fd: list[int]) -> None:
    """Each descriptor is exactly as large as the granted pages it carries, holds no
    canary, and cannot be written beyond them."""
    for fd, pages in zip(fds, pages_per_fd, strict=True):
        size = os.fstat(fd).st_size
        assert size == pages * PAGE, f"descriptor reaches {size // PAGE} pages, {pages} granted"
        assert CANARY not in os.pread(fd, size + 4 * PAGE, 0)
        try:
            written = os.pwrite(fd, b"x", size)
        except OSError:
            written = 0  # sealed against growth, or read-only: good
        assert written == 0, "a write beyond the granted pages succeeded"


# ---------------------------------------------------------------- in one process


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    h = Hypervisor()
    h.create_domain(1)
    h.create_domain(2)
    try:
        yield h
    finally:
        h.close()


def test_scenario_05_granted_frame_mapping_reaches_only_that_frame_inprocess(
    hv: Hypervisor,
) -> None:
    """dom1 allocates two frames in one call and grants only the first to dom2: the
    mapping dom2 gets reaches that frame, never the second one."""
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    frames = hv.alloc_frames(h1, 2)
    seg, off = frames.segment_at(PAGE)
    os.pwrite(seg.fd, CANARY, off)  # dom1's private second frame
    hv.grant_frame(h1, frames.refs[0], 2)
    (granted,) = [e for e in hv.domains[1].grants.values()]
    m = hv.map(h2, [(1, granted.ref)], writable=True)
    pages = m.pages(readonly_fds=False)
    assert_reaches_only([fd for fd, _ in pages], [1])
    assert [page for _, page in pages] == [0]


def test_scenario_14_foreign_map_reaches_only_the_mapped_frames_inprocess(
    hv: Hypervisor,
) -> None:
    """dom0 foreign-maps one frame of a two-frame allocation: its descriptor does not
    reach the other frame (which may be freed while the first is still mapped)."""
    h0, h1 = hv.open_handle(0), hv.open_handle(1)
    frames = hv.alloc_frames(h1, 2)
    seg, off = frames.segment_at(PAGE)
    os.pwrite(seg.fd, CANARY, off)
    m = hv.foreign_map(h0, 1, [frames.refs[0]], writable=True)
    assert_reaches_only([fd for fd, _ in m.pages(readonly_fds=False)], [1])


def test_scenario_05_partly_ended_share_cannot_be_mapped_anew_inprocess(
    hv: Hypervisor,
) -> None:
    """A share's pages live in one memfd: once the granter ended some of them, a new
    mapping of the others would receive a descriptor reaching the ended pages."""
    h1, h2 = hv.open_handle(1), hv.open_handle(2)
    share = hv.share(h1, 2, 2, writable=True)
    hv.end_access(h1, [share.refs[1]])
    seg, off = share.segment_at(PAGE)
    os.pwrite(seg.fd, CANARY, off)  # the granter reuses its ended page
    with pytest.raises(MapError) as info:
        hv.map(h2, [(1, share.refs[0])], writable=True)
    assert (info.value.index, info.value.status) == (0, GntSt.bad_gntref)
    # a whole share is still mapped through its one descriptor
    whole = hv.share(h1, 2, 2, writable=True)
    m = hv.map(h2, [(1, r) for r in whole.refs], writable=True)
    assert_reaches_only(sorted({fd for fd, _ in m.pages(readonly_fds=False)}), [2])


# ---------------------------------------------------------------- across processes


@pytest.fixture(scope="module")
def rundir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("lb-desc")
    proc = start_daemon(d, domains=(1, 2))
    try:
        yield d
    finally:
        stop_daemon(proc)


def _conn(rundir: Path, domid: int) -> ControlConnection:
    return ControlConnection(rundir / f"dom{domid}" / "control", timeout=10.0)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _map_reply(out: bytes, fds: list[int]) -> list[int]:
    """Pages each descriptor of a GNT_MAP/FOREIGN_MAP reply carries (from its table)."""
    _handle, count, nfds = proto.U32x3.unpack_from(out)
    assert nfds == len(fds)
    table = struct.unpack_from(f"<{2 * count}I", out, proto.U32x3.size)
    return [sum(1 for i in range(count) if table[2 * i] == k) for k in range(nfds)]


def test_scenario_05_granted_frame_map_reply_carries_only_that_frame(rundir: Path) -> None:
    """Across processes: the grantee's map reply must not carry the descriptor of the
    whole two-frame allocation."""
    guest, peer = _conn(rundir, 1), _conn(rundir, 2)
    try:
        out, fds = guest.call(Op.FRAME_ALLOC, proto.U32.pack(2))
        gfns = struct.unpack_from("<2I", out, 8)
        assert len(fds) == 2  # one memfd per frame
        os.pwrite(fds[1], CANARY, 0)  # the guest's private second frame
        _close(fds)
        req = proto.GRANT_FRAME_REQ.pack(gfns[0], proto.ANY_REF, 2, proto.SHARE_WRITABLE)
        out, fds = guest.call(Op.GNT_GRANT_FRAME, req)
        _close(fds)
        _handle, ref, _page = proto.U32x3.unpack_from(out)
        for flags in (proto.MAP_WRITABLE, 0):
            req = proto.U32x2.pack(flags, 1) + proto.U32x2.pack(1, ref)
            out, fds = peer.call(Op.GNT_MAP, req)
            try:
                assert_reaches_only(fds, _map_reply(out, fds))
            finally:
                _close(fds)
    finally:
        peer.close()
        guest.close()


def test_scenario_14_foreign_map_reply_carries_only_the_mapped_frames(rundir: Path) -> None:
    """dom0's FOREIGN_MAP of one frame reaches that frame only (the shim's
    libxenforeignmemory places exactly these descriptors)."""
    guest, dom0 = _conn(rundir, 1), _conn(rundir, 0)
    try:
        out, fds = guest.call(Op.FRAME_ALLOC, proto.U32.pack(3))
        gfns = struct.unpack_from("<3I", out, 8)
        os.pwrite(fds[1], CANARY, 0)
        _close(fds)
        req = proto.U32x3.pack(1, proto.MAP_WRITABLE, 2) + struct.pack("<2I", gfns[2], gfns[0])
        out, fds = dom0.call(Op.FOREIGN_MAP, req)
        try:
            assert_reaches_only(fds, _map_reply(out, fds))
        finally:
            _close(fds)
    finally:
        dom0.close()
        guest.close()


def test_scenario_05_partly_ended_share_is_not_mapped_anew_across_processes(
    rundir: Path,
) -> None:
    """A granter ends one page of a two-page share: mapping the other page fails rather
    than handing the grantee the memfd of both."""
    guest, peer = _conn(rundir, 1), _conn(rundir, 2)
    try:
        out, fds = guest.call(Op.GNT_SHARE, proto.SHARE_REQ.pack(2, proto.SHARE_WRITABLE, 2))
        refs = struct.unpack_from("<2I", out, 8)
        os.pwrite(fds[0], CANARY, PAGE)
        _close(fds)
        guest.call(Op.GNT_END, proto.U32x2.pack(0, 1) + proto.U32.pack(refs[1]))
        with pytest.raises(MapError) as info:
            peer.call(Op.GNT_MAP, proto.U32x2.pack(0, 1) + proto.U32x2.pack(1, refs[0]))
        assert info.value.status == GntSt.bad_gntref
    finally:
        peer.close()
        guest.close()


def test_frame_alloc_beyond_one_reply_of_descriptors_is_refused(rundir: Path) -> None:
    """One descriptor per frame: an allocation needing more than MAX_FDS is E2BIG, and
    nothing is allocated."""
    guest = _conn(rundir, 1)
    try:
        with pytest.raises(Exception) as info:
            guest.call(Op.FRAME_ALLOC, proto.U32.pack(proto.MAX_FDS + 1))
        assert getattr(info.value, "errno", None) == 7  # E2BIG
        out, _ = guest.call(Op.STATS, proto.U32.pack(1))
        assert proto.STATS_REPLY.unpack(out)[4] == 0  # no share left behind
    finally:
        guest.close()

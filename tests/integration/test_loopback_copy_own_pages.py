"""Cross-process grant copy whose local side lies in the caller's own pages.

The loopback client names such a side (share, offset) instead of sending its bytes, and
the daemon copies memfd page to memfd page.  Checked here: the bytes arrive both ways,
mixed with sides that still travel as bytes, with one status per segment; the request
and reply carry no byte of an own-page side; and a reference to pages the caller does
not hold (another handle's or domain's share, an ended or unknown one, a window outside
the share or across two guest frames) is refused per segment and reaches nothing
(an isolation property: hostile-inputs.md R5 and the isolation rules).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.platforms.base import GntSt, GrantCopy, GrantPtr, LocalPtr
from xenpv.platforms.loopback import client, proto
from xenpv.platforms.loopback.client import ClientGrantTable
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.platforms.loopback.proto import Op

PAGE = 4096


@pytest.fixture(scope="module")
def rundir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run = tmp_path_factory.mktemp("owncopy") / "run"
    proc = start_daemon(run, domains=(1, 2))
    try:
        yield run
    finally:
        stop_daemon(proc)


def _table(rundir: Path, domid: int) -> ClientGrantTable:
    return ClientGrantTable(rundir / f"dom{domid}" / "control", timeout=10.0)


class _Wire:
    """Records the size of every GNT_COPY request and reply of one table."""

    def __init__(self, table: ClientGrantTable) -> None:
        self.sizes: list[tuple[int, int]] = []
        conn = table.connection
        real = conn.call

        def call(op: int, payload: bytes = b"") -> tuple[bytes, list[int]]:
            out, fds = real(op, payload)
            if op == Op.GNT_COPY:
                self.sizes.append((len(payload), len(out)))
            return out, fds

        conn.call = call  # type: ignore[method-assign]


def test_own_pages_copy_both_ways_without_their_bytes_on_the_socket(rundir: Path) -> None:
    t1, t2 = _table(rundir, 1), _table(rundir, 2)
    try:
        g = t2.grant(1, 2)  # dom2's pages dom1 copies from and into
        g.mem[0:PAGE] = bytes(range(256)) * 16
        own = t1.grant(2, 3)  # dom1's own share (one memfd: a window may cross pages)
        frames = t1.alloc_frames(2)  # dom1's own frames (one memfd each)
        own.mem[2 * PAGE : 2 * PAGE + 5] = b"share"
        frames.mem[PAGE + 10 : PAGE + 16] = b"frame!"
        plain = bytearray(64)
        plain_src = bytearray(b"bytes over the socket")
        wire = _Wire(t1)
        segs = [
            # grant -> own share, across a page of the share
            GrantCopy(GrantPtr(2, g.refs[0], 0), LocalPtr(own.mem, PAGE - 100), 300),
            # own share -> grant
            GrantCopy(LocalPtr(own.mem, 2 * PAGE), GrantPtr(2, g.refs[1], 0), 5),
            # grant -> own frame, own frame -> grant
            GrantCopy(GrantPtr(2, g.refs[0], 256), LocalPtr(frames.mem, 16), 64),
            GrantCopy(LocalPtr(frames.mem, PAGE + 10), GrantPtr(2, g.refs[1], 100), 6),
            # plain local buffers keep the byte path
            GrantCopy(GrantPtr(2, g.refs[0], 0), LocalPtr(plain, 0), 64),
            GrantCopy(LocalPtr(plain_src), GrantPtr(2, g.refs[1], 200), len(plain_src)),
            # a window across two guest frames: sent as bytes (still correct)
            GrantCopy(GrantPtr(2, g.refs[0], 0), LocalPtr(frames.mem, PAGE - 8), 16),
            # own -> own (both local) and a failing segment between them
            GrantCopy(LocalPtr(own.mem, 2 * PAGE), LocalPtr(frames.mem, 2000), 5),
            GrantCopy(GrantPtr(2, 4000, 0), LocalPtr(own.mem, 0), 8),
        ]
        status = t1.copy(segs)
        assert status == [GntSt.okay] * 8 + [GntSt.bad_gntref]
        assert bytes(own.mem[PAGE - 100 : PAGE + 200]) == bytes(g.mem[0:300])
        assert bytes(g.mem[PAGE : PAGE + 5]) == b"share"
        assert bytes(frames.mem[16:80]) == bytes(g.mem[256:320])
        assert bytes(g.mem[PAGE + 100 : PAGE + 106]) == b"frame!"
        assert bytes(plain) == bytes(g.mem[0:64])
        assert bytes(g.mem[PAGE + 200 : PAGE + 200 + len(plain_src)]) == plain_src
        assert bytes(frames.mem[PAGE - 8 : PAGE + 8]) == bytes(g.mem[0:16])
        assert bytes(frames.mem[2000:2005]) == b"share"
        assert bytes(own.mem[0:8]) == bytes(8)  # the failed segment wrote nothing
        # only the plain source (21), the frame-crossing destination (16) and the plain
        # destination (64) travelled
        head = 8 + proto.COPY_SEG.size * len(segs)
        assert wire.sizes == [(head + len(plain_src), 8 + 4 * len(segs) + 64 + 16)]

        # a prepared copy into own pages repeats with requests and replies of headers only
        run = t1.prepare_copy([GrantCopy(GrantPtr(2, g.refs[0], 0), LocalPtr(own.mem, 0), PAGE),
                               GrantCopy(LocalPtr(frames.mem, 0), GrantPtr(2, g.refs[1], 0),
                                         PAGE)])
        for k in range(3):
            g.mem[0:4] = b"run%d" % k
            frames.mem[0:4] = b"frm%d" % k
            assert run() == [GntSt.okay, GntSt.okay]
            assert bytes(own.mem[0:4]) == b"run%d" % k
            assert bytes(g.mem[PAGE : PAGE + 4]) == b"frm%d" % k
        assert wire.sizes[-3:] == [(8 + 2 * proto.COPY_SEG.size, 8 + 8)] * 3

        # copies made again of the same records (a net backend's staged segments) reuse
        # their encodings, made anew once the own pages changed; the bytes are the same
        reused = [GrantCopy(GrantPtr(2, g.refs[0], 0), LocalPtr(own.mem, 8), 16)]
        for k in range(3):
            g.mem[0:16] = b"again%03d" % k * 2
            assert t1.copy(reused) == [GntSt.okay]
            assert bytes(own.mem[8:24]) == b"again%03d" % k * 2
            assert t1._named[id(reused[0])][0] is reused[0]
            if k == 1:
                extra = t1.alloc_frames(1)  # own pages change
        assert t1._named_gen == t1._own_gen and len(t1._named) == 1
        assert wire.sizes[-1] == (8 + proto.COPY_SEG.size, 8 + 4)
        # the encodings kept are bounded: past the bound they start again
        bound, client.NAMED_KEPT = client.NAMED_KEPT, 2
        try:
            many = [GrantCopy(GrantPtr(2, g.refs[0], k), LocalPtr(own.mem, 100 + k), 1)
                    for k in range(5)]
            assert t1.copy(many) == [GntSt.okay] * 5 and len(t1._named) <= 2
        finally:
            client.NAMED_KEPT = bound
        t1.free_frames(extra)
        t1.end_access(own)
        t1.free_frames(frames)
        t2.end_access(g)
    finally:
        t1.close()
        t2.close()


def _own_seg(src_own: tuple[int, int, int] | None, dst_own: tuple[int, int, int] | None,
             length: int, *, src_grant: tuple[int, int] | None = None,
             dst_grant: tuple[int, int] | None = None, extra_flags: int = 0) -> bytes:
    """One raw GNT_COPY segment: an own side is (share handle id, page, offset)."""
    flags = extra_flags
    s = d = (0, 0, 0)
    if src_own is not None:
        flags |= proto.GNTCOPY_source_own
        s = src_own
    if src_grant is not None:
        flags |= proto.GNTCOPY_source_gref
        s = (src_grant[1], src_grant[0], 0)
    if dst_own is not None:
        flags |= proto.GNTCOPY_dest_own
        d = dst_own
    if dst_grant is not None:
        flags |= proto.GNTCOPY_dest_gref
        d = (dst_grant[1], dst_grant[0], 0)
    return proto.COPY_SEG.pack(*s, *d, length, flags, 0)


def test_isolation_own_page_references_reach_only_the_callers_pages(rundir: Path) -> None:
    t1, t1b, t2 = _table(rundir, 1), _table(rundir, 1), _table(rundir, 2)
    try:
        g = t2.grant(1, 1)  # a grant dom1 may write: where leaked bytes would land
        foreign = [t2.grant(1, 1) for _ in range(4)]  # dom2's own shares (ids 2..5)
        for f in foreign:
            f.mem[0:6] = b"secret"
        sibling = [t1b.grant(2, 1) for _ in range(5)]  # another dom1 connection's (ids 1..5)
        for s in sibling:
            s.mem[0:6] = b"hidden"
        own = t1.grant(2, 2)
        frames = t1.alloc_frames(2)
        ended = t1.grant(2, 1)
        ended_id = ended.handle_id
        t1.end_access(ended)
        mine = {own.handle_id, frames.handle_id, ended_id}
        alien = max(f.handle_id for f in foreign)
        assert alien not in mine and max(s.handle_id for s in sibling) == alien
        to_g = (2, g.refs[0])
        segs = [
            _own_seg((alien, 0, 0), None, 6, dst_grant=to_g),  # another domain's / handle's
            _own_seg((9999, 0, 0), None, 6, dst_grant=to_g),  # unknown
            _own_seg((ended_id, 0, 0), None, 6, dst_grant=to_g),  # ended
            _own_seg(None, (alien, 0, 0), 6, src_grant=to_g),  # foreign as a destination
            _own_seg((own.handle_id, 0, 0), None, 6, dst_grant=to_g,
                     extra_flags=proto.GNTCOPY_source_gref),  # both kinds at once
            _own_seg((own.handle_id, 0, PAGE), None, 6, dst_grant=to_g),  # offset past a page
            _own_seg((own.handle_id, 1, PAGE - 2), None, 6, dst_grant=to_g),  # past the share
            _own_seg((frames.handle_id, 0, PAGE - 2), None, 6, dst_grant=to_g),  # two frames
            _own_seg((own.handle_id, 0, 0), None, PAGE + 1, dst_grant=to_g),  # over a page
            _own_seg((own.handle_id, 1, 0), None, 6, dst_grant=to_g),  # a valid one
        ]
        own.mem[PAGE : PAGE + 6] = b"mine!!"
        req = proto.U32x2.pack(len(segs), 0) + b"".join(segs)
        out, _ = t1.connection.call(Op.GNT_COPY, req)
        status = list(struct.unpack_from(f"<{len(segs)}i", out, 8))
        assert status == [GntSt.bad_page] * 4 + [GntSt.general_error] + \
            [GntSt.bad_copy_arg] * 4 + [GntSt.okay]
        assert len(out) == 8 + 4 * len(segs)  # no data came back
        assert bytes(g.mem[0:6]) == b"mine!!"
        for f in foreign:
            assert bytes(f.mem[0:6]) == b"secret"
        for s in sibling:
            assert bytes(s.mem[0:6]) == b"hidden"
        for t, runs in ((t2, [g, *foreign]), (t1b, sibling), (t1, [own])):
            for r in runs:
                t.end_access(r)
        t1.free_frames(frames)
    finally:
        for t in (t1, t1b, t2):
            t.close()


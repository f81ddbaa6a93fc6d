"""Hostile grant-copy requests cannot make the loopback daemon allocate or keep memory.

hostile-inputs.md scenario 5 (a hostile peer hands out bad grant refs and lengths) under
R5 (every peer-supplied length checked against both bounds: at most a page per segment,
the total within one message) and R11 (nothing a peer sends grows a queue or cache
without bound).  A request's lengths are validated before the daemon allocates anything,
and nothing is kept for a request with a failed segment (both GNT_COPY engines, the
readable and the compiled one).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.errors import PlatformError
from xenpv.platforms.base import GntSt
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ControlConnection
from xenpv.platforms.loopback.daemon import LoopbackDaemon, _Connection
from xenpv.platforms.loopback.gntcopy import PyCopyEngine, copy_engine
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.platforms.loopback.proto import Op

PAGE = 4096


def copy_request(count: int, length: int, *, ref: int = 0, flags: int = 0) -> bytes:
    """``count`` segments of ``length`` bytes from grant ``ref`` of dom2 (or local) into
    local destinations (source data, when local, filled with zeros)."""
    seg = proto.COPY_SEG.pack(ref, 2, 0, 0, 0, 0, length, flags, 0)
    data = b"" if flags & proto.GNTCOPY_source_gref else bytes(count * length)
    return proto.U32x2.pack(count, 0) + seg * count + data


@pytest.fixture(params=["python", "compiled"])
def daemon(tmp_path: Path, request: pytest.FixtureRequest
           ) -> Iterator[tuple[LoopbackDaemon, _Connection]]:
    """A daemon and one connection of dom1, served by each GNT_COPY engine in turn."""
    d = LoopbackDaemon(tmp_path, xenstore=False)
    d.hv.create_domain(1)
    d.hv.create_domain(2)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = _Connection(d, a, d.hv.open_handle(1))
    conn.copier = copy_engine(d.hv, conn.handle, compiled=request.param == "compiled")
    try:
        yield d, conn
    finally:
        conn.close()
        b.close()
        d.hv.close()


def test_scenario_05_huge_copy_lengths_allocate_nothing_inprocess(
    daemon: tuple[LoopbackDaemon, _Connection],
) -> None:
    """1000 segments of 65535 bytes each (65 MB of destination data claimed in a 24 KB
    request): refused with E2BIG before any buffer is sized from the lengths."""
    d, conn = daemon
    hostile = copy_request(1000, 0xFFFF, ref=8, flags=proto.GNTCOPY_source_gref)
    tracemalloc.start()
    try:
        status, payload, _fds, _close = d.dispatch_now(conn, Op.GNT_COPY, hostile)  # type: ignore[misc]
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"the daemon allocated {peak} bytes for a hostile copy"
    assert status == -errno.E2BIG and not payload
    assert conn.copier.kept == 0


def test_scenario_05_failed_copy_segments_are_not_cached_inprocess(
    daemon: tuple[LoopbackDaemon, _Connection],
) -> None:
    """A request that fits but whose segments all fail (bad ref, over a page) gets one
    status per segment and leaves nothing cached on the connection."""
    d, conn = daemon
    for req in (
        copy_request(16, 64, ref=12345, flags=proto.GNTCOPY_source_gref),
        copy_request(4, PAGE + 1, ref=8, flags=proto.GNTCOPY_source_gref),
    ):
        status, payload, _fds, _close = d.dispatch_now(conn, Op.GNT_COPY, req)  # type: ignore[misc]
        assert status == 0
        count, _ = proto.U32x2.unpack_from(payload)
        codes = struct.unpack_from(f"<{count}i", payload, 8)
        assert all(c in (GntSt.bad_gntref, GntSt.bad_copy_arg) for c in codes), codes
        assert conn.copier.kept == 0


def test_successful_copies_are_still_cached_and_a_later_failure_zeroes_the_reply(
    daemon: tuple[LoopbackDaemon, _Connection],
) -> None:
    """The repeated-copy fast path stays: a successful request is kept, and when the
    grant goes away the reused reply carries zero bytes for the failed segment."""
    d, conn = daemon
    h2 = d.hv.open_handle(2)
    share = d.hv.share(h2, 1, 1, writable=True)
    seg, off = share.segment_at(0)
    os.pwrite(seg.fd, b"granted!", off)
    req = copy_request(1, 8, ref=share.refs[0], flags=proto.GNTCOPY_source_gref)
    for _ in range(2):
        status, payload, _fds, _close = d.dispatch_now(conn, Op.GNT_COPY, req)  # type: ignore[misc]
        assert status == 0 and bytes(payload[12:]) == b"granted!"
        assert conn.copier.kept
    d.hv.end_access(h2, share.refs)
    status, payload, _fds, _close = d.dispatch_now(conn, Op.GNT_COPY, req)  # type: ignore[misc]
    assert struct.unpack_from("<i", payload, 8)[0] == GntSt.bad_gntref
    assert bytes(payload[12:]) == bytes(8)
    assert conn.copier.kept == 0
    d.hv.close_handle(h2)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_scenario_05_hostile_copies_leave_the_daemon_memory_bounded(tmp_path: Path) -> None:
    """Across processes: eight control connections each send a valid-size copy whose
    segments all fail, then one claiming 32 MB of destination data.  The daemon's
    resident memory stays within a few MB (it used to keep 32 MB per connection)."""
    proc = start_daemon(tmp_path / "run", domains=(1, 2))
    conns: list[ControlConnection] = []
    try:
        probe = ControlConnection(tmp_path / "run" / "dom1" / "control")
        conns.append(probe)
        probe.call(Op.GNT_COPY, copy_request(1, 8, ref=8, flags=proto.GNTCOPY_source_gref))
        before = _rss_kib(proc.pid)
        huge = copy_request(500, 0xFFFF, ref=8, flags=proto.GNTCOPY_source_gref)
        failing = copy_request(20, PAGE, ref=99, flags=proto.GNTCOPY_source_gref)
        for _ in range(8):
            c = ControlConnection(tmp_path / "run" / "dom1" / "control")
            conns.append(c)
            out, _ = c.call(Op.GNT_COPY, failing)
            assert set(struct.unpack_from("<20i", out, 8)) == {GntSt.bad_gntref}
            with pytest.raises(PlatformError) as info:
                c.call(Op.GNT_COPY, huge)
            assert info.value.errno == errno.E2BIG
        grown = _rss_kib(proc.pid) - before
        assert grown < 16 * 1024, f"daemon RSS grew by {grown} KiB"
        # dom0 is still answered
        dom0 = ControlConnection(tmp_path / "run" / "dom0" / "control")
        conns.append(dom0)
        out, _ = dom0.call(Op.DOMAIN_LIST)
        assert proto.U32.unpack_from(out)[0] == 3
    finally:
        for c in conns:
            c.close()
        stop_daemon(proc)


class _BuggyEngine(PyCopyEngine):
    """Fault injection: an engine whose copy hits a bug (not a PlatformError)."""

    def run(self, payload: bytes) -> bytearray:
        raise RuntimeError("injected engine bug")


@pytest.mark.parametrize("engine", ["python", "compiled", "buggy"])
def test_pipelined_requests_on_the_framing_fast_path(tmp_path: Path, engine: str) -> None:
    """A client that sends several requests before reading: each is answered, in order,
    whether its engine framed it (GNT_COPY: a copy, a refusal with E2BIG, an engine bug
    answered EIO) or the general path did (DOMAIN_LIST); then a GNT_COPY whose length
    field disagrees with its message drops the connection.  Descriptors a client sends
    along are closed (the first request carries two)."""

    async def main() -> list[bytes]:
        d = LoopbackDaemon(tmp_path, xenstore=False)
        d.hv.create_domain(1)
        d.hv.create_domain(2)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        b.setblocking(False)
        conn = _Connection(d, a, d.hv.open_handle(1))
        if engine == "buggy":
            conn.copier = _BuggyEngine(d.hv, conn.handle)
        else:
            conn.copier = copy_engine(d.hv, conn.handle, compiled=engine == "compiled")
        h2 = d.hv.open_handle(2)
        share = d.hv.share(h2, 1, 1, writable=True)
        seg, off = share.segment_at(0)
        os.pwrite(seg.fd, b"pipelined", off)
        good = copy_request(1, 9, ref=share.refs[0], flags=proto.GNTCOPY_source_gref)
        huge = copy_request(500, 0xFFFF, ref=8, flags=proto.GNTCOPY_source_gref)
        r, w = os.pipe()
        os.set_blocking(r, False)
        b.sendmsg([proto.encode_request(Op.GNT_COPY, 1, good)], proto.ancdata_for([w, w]))
        os.close(w)
        for seq, (op, payload) in enumerate([(Op.DOMAIN_LIST, b""), (Op.GNT_COPY, huge),
                                             (Op.GNT_COPY, good)], 2):
            b.send(proto.encode_request(op, seq, payload))
        b.send(proto.REQUEST.pack(Op.GNT_COPY, 5, len(good) + 1) + good)
        loop = asyncio.get_running_loop()
        conn.start()
        try:
            replies = [await asyncio.wait_for(loop.sock_recv(b, proto.MAX_MESSAGE), 10)
                       for _ in range(5)]
            # the write end sent along was closed: the pipe reads its end
            assert os.read(r, 1) == b""
            return replies
        finally:
            conn.close()
            b.close()
            os.close(r)
            d.hv.close_handle(h2)
            d.hv.close()

    replies = asyncio.run(main())
    assert replies[4] == b""  # the misframed request ended the connection
    decoded = [proto.decode_reply(r) for r in replies[:4]]
    assert [(op, seq) for op, seq, _, _ in decoded] == [
        (Op.GNT_COPY, 1), (Op.DOMAIN_LIST, 2), (Op.GNT_COPY, 3), (Op.GNT_COPY, 4)]
    statuses = [status for _, _, status, _ in decoded]
    assert statuses[1] == 0 and proto.U32.unpack_from(decoded[1][3])[0] == 3
    if engine == "buggy":
        assert statuses == [-errno.EIO, 0, -errno.EIO, -errno.EIO]
        return
    assert statuses == [0, 0, -errno.E2BIG, 0]
    for i in (0, 3):
        assert decoded[i][3] == proto.U32x2.pack(1, 0) + bytes(4) + b"pipelined"
    assert decoded[2][3] == b""

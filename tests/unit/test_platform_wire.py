"""Control-protocol framing (sans-IO) and the contiguous page mapper."""

from __future__ import annotations

import os
import socket

import pytest

from xenpv.errors import PlatformError
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.memory import Region, map_fd

PAGE = 4096


def test_request_and_reply_frames_roundtrip() -> None:
    msg = proto.encode_request(proto.Op.GNT_MAP, 7, b"abc")
    assert msg[:12] == proto.REQUEST.pack(4, 7, 3)
    assert proto.decode_request(msg) == (4, 7, b"abc")
    rep = proto.encode_reply(4, 7, -22, b"xy")
    assert proto.decode_reply(rep) == (4, 7, -22, b"xy")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01\x00\x00",
        proto.REQUEST.pack(1, 1, 5) + b"1234",
        proto.REQUEST.pack(1, 1, 0) + b"x",
    ],
)
def test_unframeable_requests_are_protocol_violations(frame: bytes) -> None:
    with pytest.raises(proto.ProtocolViolation):
        proto.decode_request(frame)


def test_descriptors_travel_as_one_scm_rights_message() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        a.sendmsg([b"m"], proto.ancdata_for([r, w]))
        data, anc, _flags, _ = b.recvmsg(64, proto.CMSG_SPACE)
        fds = proto.fds_from_ancdata(anc)
        assert data == b"m" and len(fds) == 2
        os.write(fds[1], b"z")
        assert os.read(r, 1) == b"z"
        for fd in fds:
            os.close(fd)
        assert proto.ancdata_for([]) == []
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def _memfd(pages: int, fill: bytes) -> int:
    fd = os.memfd_create("t")
    os.ftruncate(fd, pages * PAGE)
    for i in range(pages):
        os.pwrite(fd, fill * 4 + bytes([i]), i * PAGE)
    return fd


def test_region_places_pages_of_several_fds_contiguously() -> None:
    a, b = _memfd(3, b"A"), _memfd(2, b"B")
    try:
        r = Region([(a, 2), (b, 0), (a, 0), (a, 1)], writable=True)
        heads = [bytes(r.mem[i * PAGE : i * PAGE + 5]) for i in range(4)]
        assert heads == [b"AAAA\x02", b"BBBB\x00", b"AAAA\x00", b"AAAA\x01"]
        r.mem[PAGE - 1 : PAGE + 1] = b"xy"  # across a page (and an fd) boundary
        assert os.pread(a, 1, 3 * PAGE - 1) == b"x" and os.pread(b, 1, 0) == b"y"
        r.release()
        r.release()  # idempotent
        assert bytes(r.mem[0:5]) == bytes(5)  # scrubbed: no longer the fds' memory
        assert os.pread(a, 5, 2 * PAGE) == b"AAAA\x02"
    finally:
        os.close(a)
        os.close(b)


def test_readonly_region_and_readonly_fd() -> None:
    fd = _memfd(1, b"R")
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        with pytest.raises(PlatformError):
            Region([(ro, 0)], writable=True)
        r = map_fd(ro, 1, writable=False)
        assert bytes(r.mem[0:4]) == b"RRRR"
        with pytest.raises(TypeError):
            r.mem[0:1] = b"w"
        r.release()
        with pytest.raises(PlatformError):
            Region([], writable=False)
    finally:
        os.close(ro)
        os.close(fd)


def test_a_forked_child_cannot_use_the_parents_control_connection(tmp_path: object) -> None:
    from pathlib import Path

    from xenpv.errors import LocalError
    from xenpv.platforms.loopback.client import ControlConnection
    from xenpv.platforms.loopback.harness import start_daemon, stop_daemon

    d = Path(str(tmp_path)) / "run"
    proc = start_daemon(d)
    conn = ControlConnection(d / "dom0" / "control")
    try:
        pid = os.fork()
        if pid == 0:  # child: must refuse, not interleave on the parent's socket
            try:
                conn.call(proto.Op.DOMAIN_LIST)
            except LocalError:
                os._exit(0)
            except BaseException:
                os._exit(2)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        conn.call(proto.Op.DOMAIN_LIST)  # the parent's connection still works
    finally:
        conn.close()
        stop_daemon(proc)

"""Isolation at the descriptor and socket level of the loopback daemon, and hostile clients."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from xenpv.errors import PlatformError
from xenpv.platforms.base import PlatformGone
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ClientPlatform, ControlConnection
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.platforms.loopback.proto import Op

PAGE = 4096


@pytest.fixture(scope="module")
def daemon_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("isolation") / "run"
    proc = start_daemon(d, domains=(1, 2), max_grants=64, max_ports=16)
    try:
        yield d
    finally:
        assert stop_daemon(proc) == 0


@pytest.fixture
def rundir(daemon_dir: Path) -> Iterator[Path]:
    """The module's daemon; after each test no domain may hold anything any more."""
    yield daemon_dir
    ctl = _conn(daemon_dir, 0)
    try:
        deadline = time.monotonic() + 5
        while True:
            held = [
                proto.STATS_REPLY.unpack(ctl.call(Op.STATS, proto.U32.pack(d))[0])[:6]
                for d in (0, 1, 2)
            ]
            # dom0's own STATS connection is the one handle left
            if held == [(0, 0, 0, 0, 0, 1), (0,) * 6, (0,) * 6]:
                break
            assert time.monotonic() < deadline, held
            time.sleep(0.02)
    finally:
        ctl.close()


def _conn(rundir: Path, domid: int, timeout: float = 10.0) -> ControlConnection:
    return ControlConnection(rundir / f"dom{domid}" / "control", timeout=timeout)


def _share(conn: ControlConnection, domid: int, count: int, writable: bool) -> tuple[int, ...]:
    out, fds = conn.call(Op.GNT_SHARE, proto.SHARE_REQ.pack(domid, int(writable), count))
    for fd in fds:
        os.close(fd)
    return struct.unpack_from(f"<{count}I", out, 8)


def _map(conn: ControlConnection, domid: int, refs: tuple[int, ...], writable: bool) -> list[int]:
    req = proto.U32x2.pack(int(writable), len(refs)) + b"".join(
        proto.U32x2.pack(domid, r) for r in refs
    )
    _out, fds = conn.call(Op.GNT_MAP, req)
    return fds


@contextmanager
def _granted_fds(
    rundir: Path, count: int, *, writable: bool, map_count: int | None = None, extra: int = 0
) -> Iterator[list[int]]:
    """dom1 shares ``count`` pages with dom0 (and ``extra`` with dom2); dom0 maps the
    first ``map_count`` of them; yields the descriptors dom0 received."""
    granter, mapper = _conn(rundir, 1), _conn(rundir, 0)
    try:
        refs = _share(granter, 0, count, writable=writable)
        if extra:
            _share(granter, 2, extra, writable=True)
        fds = _map(mapper, 1, refs[: map_count or count], writable=writable)
        try:
            yield fds
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        mapper.close()
        granter.close()


def test_isolation_readonly_grant_fd_refuses_prot_write(rundir: Path) -> None:
    with _granted_fds(rundir, 2, writable=False) as fds:
        assert len(fds) == 1  # one descriptor for the pages of one share
        fd = fds[0]
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(PermissionError):
            mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", 0)
        assert info.value.errno == errno.EBADF
        ro = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
        assert ro[:4] == bytes(4)
        ro.close()


def test_isolation_readonly_grant_fd_cannot_be_reopened_for_writing(rundir: Path) -> None:
    """An O_RDONLY memfd can be reopened O_RDWR through /proc: the seals must still hold."""
    with _granted_fds(rundir, 1, writable=False) as fds:
        rw = os.open(f"/proc/self/fd/{fds[0]}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(rw, b"x", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(rw, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.ftruncate(rw, 0)
        finally:
            os.close(rw)


def test_isolation_writable_grant_fd_cannot_resize_the_pages(rundir: Path) -> None:
    """A grantee shrinking the memfd would turn every other mapper's access into SIGBUS."""
    with _granted_fds(rundir, 2, writable=True) as fds:
        for size in (0, PAGE, 64 * PAGE):
            with pytest.raises(PermissionError):
                os.ftruncate(fds[0], size)
        assert os.fstat(fds[0]).st_size == 2 * PAGE


def test_isolation_descriptors_reach_only_the_granted_share(rundir: Path) -> None:
    with _granted_fds(rundir, 3, writable=True, map_count=1, extra=5) as fds:
        assert [os.fstat(fd).st_size for fd in fds] == [3 * PAGE]


def test_isolation_a_socket_acts_only_as_its_domain(rundir: Path) -> None:
    guest = _conn(rundir, 1)
    try:
        assert guest.domid == 1 and not guest.privileged
        for op, payload in (
            (Op.DOMAIN_CREATE, proto.U32.pack(7)),
            (Op.DOMAIN_DESTROY, proto.U32.pack(2)),
            (Op.FAULT, proto.U32x4.pack(1, 0, 8, 0)),
            (Op.STATS, proto.U32.pack(0)),
            (Op.EVT_STATUS, proto.U32x2.pack(2, 1)),
        ):
            with pytest.raises(PlatformError) as info:
                guest.call(op, payload)
            assert info.value.errno == errno.EPERM, op
    finally:
        guest.close()


def test_isolation_saturated_inbox_breaks_nothing(rundir: Path) -> None:
    """A hostile peer writes the largest value into the victim's inbox (its outbox):
    notifications still read as pending and teardown still completes."""
    victim = ClientPlatform.for_domain(rundir, 0)
    hostile = _conn(rundir, 1)
    try:
        port = victim.events.alloc_unbound(1)
        out, fds = hostile.call(Op.EVT_BIND_INTERDOMAIN, proto.U32x2.pack(0, port))
        hport, _gen = proto.U32x2.unpack(out)
        inbox, outbox = fds
        os.write(outbox, (2**64 - 2).to_bytes(8, "little"))  # counter at its maximum
        page = victim.grants.grant(1, 1)
        req = proto.U32x2.pack(1, 1) + proto.U32x2.pack(0, page.refs[0])
        mout, mfds = hostile.call(Op.GNT_MAP, req)
        for fd in mfds:
            os.close(fd)
        handle_id = proto.U32x3.unpack_from(mout)[0]
        hostile.call(Op.GNT_SET_NOTIFY, proto.U32x4.pack(handle_id, 0, hport, 3))
        hostile.call(Op.EVT_NOTIFY, proto.U32.pack(hport))  # the daemon's write: EAGAIN
        assert victim.events.pending(5) == port
        hostile.close()  # teardown signals the saturated inbox again: must not break
        os.close(inbox)
        os.close(outbox)
        deadline = time.monotonic() + 5
        while victim.grants.stats(0)[0] and time.monotonic() < deadline:
            try:
                victim.grants.end_access(page)
            except PlatformError:
                time.sleep(0.02)
        assert victim.grants.stats(0)[:4] == (0, 0, 0, 1)
    finally:
        hostile.close()
        victim.close()


def test_isolation_hostile_client_frames_drop_only_its_connection(rundir: Path) -> None:
    other = _conn(rundir, 2)
    try:
        bad_frames = [
            b"\x01\x00",  # shorter than a header
            proto.REQUEST.pack(Op.HELLO, 1, 100) + b"x",  # len disagrees with the message
            proto.REQUEST.pack(0xFFFF, 1, 0),  # unknown op: -ENOSYS, connection stays
            proto.REQUEST.pack(Op.GNT_MAP, 1, 8) + proto.U32x2.pack(0, 10_000),  # count lies
            proto.REQUEST.pack(Op.GNT_COPY, 1, 8) + proto.U32x2.pack(2**31, 0),
        ]
        for frame in bad_frames:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect(str(rundir / "dom1" / "control"))
            r, w = os.pipe()  # descriptors from a client are refused (closed by the daemon)
            s.sendmsg([frame], proto.ancdata_for([r, w]))
            os.close(r)
            os.close(w)
            reply = s.recv(proto.MAX_MESSAGE)
            if reply:
                _op, _seq, status, _ = proto.decode_reply(reply)
                assert status < 0
            s.close()
        out, _ = other.call(Op.DOMAIN_LIST)  # the daemon and other domains are fine
        assert proto.U32.unpack_from(out)[0] == 3
    finally:
        other.close()


def test_isolation_client_that_never_reads_replies_is_dropped(rundir: Path) -> None:
    other = _conn(rundir, 2)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(rundir / "dom1" / "control"))
    s.setblocking(False)
    msg = proto.encode_request(Op.STATS, 0, proto.U32.pack(1))
    dropped = False
    deadline = time.monotonic() + 20
    try:
        while not dropped and time.monotonic() < deadline:
            try:
                s.send(msg)
            except BlockingIOError:
                time.sleep(0.01)
                # the daemon keeps serving others while this client floods it
                other.call(Op.STATS, proto.U32.pack(2))
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
        assert dropped
    finally:
        s.close()
        other.close()


def test_dead_daemon_gives_clients_a_clear_error_never_a_hang(tmp_path: Path) -> None:
    d = tmp_path / "run"
    proc = start_daemon(d, domains=(1,))
    try:
        p = ClientPlatform.for_domain(d, 1, timeout=10.0)
        pages = p.grants.grant(0, 1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # PlatformGone (not the ETIMEDOUT a hang would end in after the 10 s timeout)
        with pytest.raises(PlatformGone):
            p.grants.grant(0, 1)
        with pytest.raises(PlatformGone):
            p.events.alloc_unbound(0)
        pages.mem[0:1] = b"x"  # local memory stays usable, nothing crashes
        p.close()
        with pytest.raises(PlatformGone):
            ClientPlatform.for_domain(d, 1)
    finally:
        stop_daemon(proc)


def test_stopped_daemon_times_out_instead_of_hanging(tmp_path: Path) -> None:
    d = tmp_path / "run"
    proc = start_daemon(d, domains=(1,))
    conn = ControlConnection(d / "dom1" / "control", timeout=0.5)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        with pytest.raises(PlatformError) as info:
            conn.call(Op.STATS, proto.U32.pack(1))
        assert info.value.errno == errno.ETIMEDOUT
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        conn.close()
        stop_daemon(proc)

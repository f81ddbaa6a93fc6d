"""The loopback daemon's descriptors: bounded per domain, and no spin when they run out.

hostile-inputs.md R11 (bound everything a peer can grow: here the descriptors the daemon
holds for a domain through shares, frames, ports and connections), R10/R11 (log volume
and work stay bounded while the daemon is starved) and scenario 21's requirement that
"other domains' operations keep succeeding": whatever a guest does, dom0 is answered.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from xenpv.platforms.base import ResourceExhausted
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ControlConnection
from xenpv.platforms.loopback.core import FD_RESERVE, SEGMENT_FDS, Hypervisor
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.platforms.loopback.proto import Op

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process consumed so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> list[int]:
    """The process's open descriptors."""
    return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[int, Path, IO[bytes]]]:
    log = open(tmp_path / "daemon.log", "w+b")
    proc = start_daemon(tmp_path / "run", domains=(1,), stderr=log)
    try:
        yield proc.pid, tmp_path / "run", log
    finally:
        stop_daemon(proc)
        log.close()


def _conn(rundir: Path, domid: int) -> ControlConnection:
    return ControlConnection(rundir / f"dom{domid}" / "control", timeout=10.0)


def test_out_of_descriptors_the_control_socket_backs_off(
    daemon: tuple[int, Path, IO[bytes]],
) -> None:
    """With no descriptor left, connections pending on the control sockets neither
    spin the daemon (CPU seconds over a window) nor flood its log (warnings counted);
    once descriptors are back, the pending dom0 connection is served."""
    pid, rundir, log = daemon
    dom0 = _conn(rundir, 0)  # opened while there is room
    limit = max(open_fds(pid)) + 1
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    pending: list[socket.socket] = []
    try:
        # fill any hole below the limit, then leave connections pending on dom0 and dom1
        for domid in (0, 0, 0, 0, 1, 1):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(str(rundir / f"dom{domid}" / "control"))
            pending.append(s)
        time.sleep(0.2)
        start = cpu_seconds(pid)
        time.sleep(2.0)
        used = cpu_seconds(pid) - start
        log.flush()
        lines = [
            line for line in Path(log.name).read_bytes().splitlines() if b"accept" in line
        ]
        assert 1 <= len(lines) <= 3, f"{len(lines)} accept warnings"
        assert used < 0.25, f"the daemon used {used:.2f} CPU-s in 2 s while starved"
        # dom0's existing connection is still answered meanwhile
        out, _ = dom0.call(Op.DOMAIN_LIST)
        assert proto.U32.unpack_from(out)[0] == 2
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for s in pending:
            s.close()
    fresh = _conn(rundir, 0)  # accepted again after the pause
    try:
        assert fresh.domid == 0
    finally:
        fresh.close()
        dom0.close()


def test_a_guest_cannot_make_the_daemon_hold_unbounded_descriptors(
    daemon: tuple[int, Path, IO[bytes]],
) -> None:
    """A guest sharing one page at a time and allocating frames in batches runs into its
    descriptor quota (ENOSPC) long before the daemon's limit; dom0 still shares."""
    pid, rundir, _log = daemon
    before = len(open_fds(pid))
    guest = _conn(rundir, 1)
    try:
        shares = 0
        with pytest.raises(ResourceExhausted):
            for _ in range(5000):
                _out, fds = guest.call(Op.GNT_SHARE, proto.SHARE_REQ.pack(0, 1, 1))
                for fd in fds:
                    os.close(fd)
                shares += 1
        with pytest.raises(ResourceExhausted):
            guest.call(Op.FRAME_ALLOC, proto.U32.pack(8))
        with pytest.raises(ResourceExhausted):
            # what is left of the quota is less than one share (the domain builder's
            # xenstore page and port take a few): at most that many ports more
            for _ in range(SEGMENT_FDS):
                _out, fds = guest.call(Op.EVT_ALLOC_UNBOUND, proto.U32.pack(0))
                for fd in fds:
                    os.close(fd)
        assert shares <= 4096 // SEGMENT_FDS
        held = len(open_fds(pid)) - before
        assert held <= 4096 + 16, f"the daemon holds {held} descriptors for one guest"
        dom0 = _conn(rundir, 0)
        try:
            _out, fds = dom0.call(Op.GNT_SHARE, proto.SHARE_REQ.pack(1, 1, 1))
            for fd in fds:
                os.close(fd)
            _out, fds = dom0.call(Op.EVT_ALLOC_UNBOUND, proto.U32.pack(1))
            for fd in fds:
                os.close(fd)
        finally:
            dom0.close()
    finally:
        guest.close()


def test_guests_leave_dom0_its_reserve_of_descriptors(
    daemon: tuple[int, Path, IO[bytes]],
) -> None:
    """The daemon is near its descriptor limit: the guest is refused (ENOSPC, or its
    connection closed) while FD_RESERVE descriptors are left, and dom0 still connects,
    shares and allocates ports."""
    pid, rundir, _log = daemon
    guest = _conn(rundir, 1)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (max(open_fds(pid)) + FD_RESERVE + 40, hard))
    try:
        with pytest.raises(ResourceExhausted):
            for _ in range(200):
                _out, fds = guest.call(Op.GNT_SHARE, proto.SHARE_REQ.pack(0, 1, 1))
                for fd in fds:
                    os.close(fd)
        dom0 = _conn(rundir, 0)
        try:
            for _ in range(8):
                _out, fds = dom0.call(Op.GNT_SHARE, proto.SHARE_REQ.pack(1, 1, 1))
                for fd in fds:
                    os.close(fd)
            out, _ = dom0.call(Op.DOMAIN_LIST)
            assert proto.U32.unpack_from(out)[0] == 2
        finally:
            dom0.close()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        guest.close()


def test_descriptor_quota_inprocess_is_exact_and_released() -> None:
    """In process: shares, frames, ports and handles are charged to their domain, the
    quota refuses without leaking, and closing everything returns the count to zero;
    dom0 has no quota."""
    hv = Hypervisor(max_fds=40)
    hv.create_domain(1)
    try:
        h = hv.open_handle(1)
        dom = hv.domains[1]
        assert dom.fds == 1
        hv.share(h, 0, 4, writable=True)
        hv.alloc_frames(h, 2)
        hv.alloc_unbound(h, 0)
        assert dom.fds == 1 + 3 * SEGMENT_FDS + 1
        with pytest.raises(ResourceExhausted) as info:
            while True:
                hv.share(h, 0, 1, writable=True)
        assert info.value.errno == errno.ENOSPC
        assert dom.fds <= 40
        grants = len(dom.grants)
        with pytest.raises(ResourceExhausted):
            hv.alloc_frames(h, 5)
        assert len(dom.grants) == grants and dom.fds <= 40  # nothing half-done
        h0 = hv.open_handle(0)
        for _ in range(20):  # dom0: no quota
            hv.share(h0, 1, 1, writable=True)
        hv.close_handle(h)
        assert dom.fds == 0
        hv.close_handle(h0)
    finally:
        hv.close()

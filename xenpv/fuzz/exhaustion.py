"""A hostile guest trying to exhaust the loopback daemon (target ``loopback:exhaustion``).

Theory of operation
-------------------
One ``xenpv loopback up`` process (dom0 and a guest dom1) is started per campaign.  Each
input is a plan of up to :data:`MAX_OPS` operations that dom1 plays against it through
its own sockets, each aimed at one resource of the daemon (hostile-inputs.md R5, R11,
scenarios 5, 21 and 23):

* many control connections (beyond the 256 handles of a domain), some saying HELLO;
* floods of shares, of guest-frame allocations (up to 300 frames a call) and of ports,
  each until the daemon refuses;
* grant copies with huge segment counts and lengths, local or grant sides;
* raw control messages: lengths that disagree with the message, oversized messages,
  unknown operations, random payloads;
* many xenstore connections on the guest's socket, some announcing a 4 GiB payload;
* pipelined xenstore READs of one path with different bytes after the NUL (a cache
  keyed by the raw payload grows with every one of them).

The invariant, checked while the guest's connections are open and again after they are
closed: the daemon is alive; it holds at most :data:`FD_BOUND` descriptors more than
at the start while the guest is connected (the guest's descriptor quota, its xenstore
connections and some slack), and at most :data:`FD_SLACK` more once the guest's
connections are gone and released; its resident memory grew by at most
:data:`RSS_BOUND`; and dom0 is still answered on fresh connections (HELLO, a share to
the guest and its end, DOMAIN_LIST on the control socket; a WRITE and a READ on the
xenstore socket), each within 5 s.

The xenstore plans rely on the embedded xenstored bounding its per-connection read cache
and the connections per domain; the target reports a violation if it does not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from xenpv.errors import PlatformError
from xenpv.fuzz.external import probe_write_read
from xenpv.fuzz.hostile import InvariantViolation, violation
from xenpv.fuzz.source import ByteSource
from xenpv.platforms.base import PlatformGone
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.proto import Op
from xenpv.xenstore import wire

__all__ = ["FD_BOUND", "FD_SLACK", "MAX_OPS", "RSS_BOUND", "DaemonExhaustion"]

MAX_OPS = 8
#: descriptors the daemon may hold for one guest (its quota) plus its xenstore connections
#: (the embedded xenstored's per-domain connection quota) plus slack
FD_BOUND = 4096 + 64 + 64
#: descriptors more than at the start once the guest's connections are released
FD_SLACK = 16
#: resident memory growth allowed over the campaign (allocator slack, caches)
RSS_BOUND = 128 << 20
#: most sockets one input may hold open in this process
MAX_SOCKETS = 700
_OPS = [int(op) for op in Op] + [0, 99, 0xFFFFFFFF]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class DaemonExhaustion:
    """The ``loopback:exhaustion`` target: a callable per input holding one daemon."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="xenpv-fuzz-lb-")
        self.rundir = Path(self._tmp.name) / "run"
        self.proc: Any = None
        self.base_fds = 0
        self.base_rss = 0
        self._socks: list[socket.socket] = []
        self._conns: list[Any] = []  # the guest's control connections of this input
        self._seq = 0

    # ------------------------------------------------------------------ daemon
    def start(self) -> None:
        """Start the daemon with dom1 and take the baseline after a first dom0 probe."""
        from xenpv.platforms.loopback.harness import start_daemon

        self.proc = start_daemon(self.rundir, domains=(1,), stderr=subprocess.DEVNULL)
        self._probe_dom0()
        self._wait_released()
        self.base_fds = _fds(self.proc.pid)
        self.base_rss = _rss(self.proc.pid)

    def close(self) -> None:
        """Stop the daemon and remove its run directory (idempotent)."""
        self._drop_sockets()
        proc, self.proc = self.proc, None
        if proc is not None:
            from xenpv.platforms.loopback.harness import stop_daemon

            stop_daemon(proc)
        self._tmp.cleanup()

    def _path(self, domid: int, kind: str) -> str:
        return str(self.rundir / f"dom{domid}" / kind)

    def _control(self, domid: int) -> Any:
        from xenpv.platforms.loopback.client import ControlConnection

        return ControlConnection(self._path(domid, "control"), timeout=5.0)

    def _alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            self.proc = None  # the next input starts a fresh daemon
            raise InvariantViolation(f"the loopback daemon died (status {code})")

    # ------------------------------------------------------------------ invariant
    def _probe_dom0(self) -> None:
        """dom0 is answered on fresh connections: control and xenstore."""
        try:
            ctl = self._control(0)
            try:
                _out, fds = ctl.call(Op.GNT_SHARE, proto.SHARE_REQ.pack(1, 1, 1))
                refs = struct.unpack_from("<I", _out, 8)
                for fd in fds:
                    os.close(fd)
                ctl.call(Op.GNT_END, proto.U32x2.pack(0, 1) + proto.U32.pack(refs[0]))
                out, _ = ctl.call(Op.DOMAIN_LIST)
                if proto.U32.unpack_from(out)[0] != 2:
                    raise InvariantViolation("DOMAIN_LIST lost a domain")
            finally:
                ctl.close()
        except PlatformError as exc:
            self._alive()
            raise violation("dom0's control connection was not served", exc) from None
        self._probe_xenstore()

    def _probe_xenstore(self) -> None:
        self._seq += 2
        value = f"probe-{self._seq}".encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5.0)
                s.connect(self._path(0, "xenstore"))
                probe_write_read(s, self._seq, b"/fuzz", value)
        except OSError as exc:
            self._alive()
            raise violation("dom0's xenstore connection was not served", exc) from None

    def _wait_released(self, timeout: float = 10.0) -> None:
        """Wait until the daemon holds nothing for dom1 (its connections closed)."""
        deadline = time.monotonic() + timeout
        ctl = self._control(0)
        try:
            while True:
                out, _ = ctl.call(Op.STATS, proto.U32.pack(1))
                held = proto.STATS_REPLY.unpack(out)[:6]
                if held == (0,) * 6:
                    return
                if time.monotonic() > deadline:
                    raise InvariantViolation(f"dom1's resources not released: {held}")
                time.sleep(0.01)
        finally:
            ctl.close()

    def _check_bounds(self, fd_bound: int) -> None:
        self._alive()
        pid = self.proc.pid
        fds = _fds(pid) - self.base_fds
        if fds > fd_bound:
            raise InvariantViolation(f"the daemon holds {fds} descriptors more (bound {fd_bound})")
        rss = _rss(pid) - self.base_rss
        if rss > RSS_BOUND:
            raise InvariantViolation(f"the daemon's memory grew by {rss >> 20} MiB")

    # ------------------------------------------------------------------ hostile plans
    def _sock(self, kind: int, domid: int, what: str) -> socket.socket | None:
        if len(self._socks) >= MAX_SOCKETS:
            return None
        s = socket.socket(socket.AF_UNIX, kind)
        s.settimeout(0.5)
        try:
            s.connect(self._path(domid, what))
        except OSError:
            s.close()
            return None
        self._socks.append(s)
        return s

    def _drop_sockets(self) -> None:
        for s in self._socks:
            s.close()
        self._socks.clear()
        for c in self._conns:
            c.close()
        self._conns.clear()

    def _guest_call(self, conn: Any, op: int, payload: bytes) -> bool:
        """One request of the guest; False once the daemon refused or dropped it."""
        try:
            _out, fds = conn.call(op, payload)
        except PlatformGone:
            return False
        except PlatformError as exc:
            if exc.errno == errno.ETIMEDOUT:
                raise InvariantViolation(f"the daemon did not answer op {op} in time") from None
            return False
        for fd in fds:
            os.close(fd)
        return True

    def _connections(self, src: ByteSource) -> None:
        for _ in range(1 + src.below(320)):
            s = self._sock(socket.SOCK_SEQPACKET, 1, "control")
            if s is not None and src.boolean():
                with contextlib.suppress(OSError):
                    s.send(proto.encode_request(Op.HELLO, 1, proto.U32.pack(proto.VERSION)))

    def _guest(self) -> Any:
        """A new control connection of dom1, or None if the daemon does not take it now
        (backlog full, connection quota): the refusal is the allowed outcome."""
        try:
            conn = self._control(1)
        except (OSError, PlatformError):
            return None
        self._conns.append(conn)  # kept (with all it holds) until the input ends
        return conn

    def _flood(self, src: ByteSource) -> None:
        conn = self._guest()
        if conn is None:
            return
        kind = src.below(3)
        n = 1 + src.below(5000)
        if kind == 0:
            op, req = Op.GNT_SHARE, proto.SHARE_REQ.pack(0, src.below(2), 1 + src.below(4))
        elif kind == 1:
            op, req = Op.FRAME_ALLOC, proto.U32.pack(1 + src.below(300))
        else:
            op, req = Op.EVT_ALLOC_UNBOUND, proto.U32.pack(0)
        for _ in range(n):  # until the daemon refuses (its quota), or n
            if not self._guest_call(conn, op, req):
                break
        self._check_bounds(FD_BOUND)

    def _copy(self, src: ByteSource) -> None:
        count = src.below(5462)
        length = src.u16()
        flags = src.below(4)
        seg = proto.COPY_SEG.pack(8 + src.below(64), src.choice((0, 1, 0x7FF0)), src.u16(),
                                  8 + src.below(64), 0, 0, length, flags, 0)
        body = proto.U32x2.pack(count, 0) + seg * count
        room = proto.MAX_MESSAGE - proto.REQUEST.size - len(body)
        if room > 0 and not flags & proto.GNTCOPY_source_gref:
            body += bytes(min(room, src.below(1 << 17)))
        body = body[: proto.MAX_MESSAGE - proto.REQUEST.size]
        conn = self._guest()
        if conn is not None:
            self._guest_call(conn, Op.GNT_COPY, body)
            self._check_bounds(FD_BOUND)

    def _raw(self, src: ByteSource) -> None:
        s = self._sock(socket.SOCK_SEQPACKET, 1, "control")
        if s is None:
            return
        for _ in range(1 + src.below(8)):
            op = src.choice(_OPS)
            size = src.choice((0, 12, 4096, proto.MAX_MESSAGE - 12, proto.MAX_MESSAGE, 200000))
            payload = src.take(min(size, 64)).ljust(size, b"\xff")
            length = src.choice((len(payload), 0xFFFFFFFF, len(payload) + 1, src.u32()))
            with contextlib.suppress(OSError):
                s.send(proto.REQUEST.pack(op, src.u32(), length) + payload)

    def _xs_connections(self, src: ByteSource) -> None:
        for _ in range(1 + src.below(200)):
            s = self._sock(socket.SOCK_STREAM, 1, "xenstore")
            if s is not None and src.boolean():
                with contextlib.suppress(OSError):
                    s.send(struct.pack("<IIII", wire.XsType.READ, 1, 0, 0xFFFFFFFF) + b"x" * 64)

    def _xs_cache_busting(self, src: ByteSource) -> None:
        s = self._sock(socket.SOCK_STREAM, 1, "xenstore")
        if s is None:
            return
        salt = src.u32()
        batch = bytearray()
        for i in range(1 + src.below(3000)):
            tail = struct.pack("<II", salt, i) * (1 + i % 64)
            batch += wire.encode(wire.XsType.READ, i, 0, b"domid\0" + tail[:4000])
            if len(batch) > 1 << 16:
                if not self._send_drain(s, bytes(batch)):
                    return
                batch.clear()
        self._send_drain(s, bytes(batch))

    def _send_drain(self, s: socket.socket, data: bytes) -> bool:
        """Send ``data``, reading replies meanwhile (a guest that does read them)."""
        view = memoryview(data)
        deadline = time.monotonic() + 5.0
        s.setblocking(False)
        try:
            while view and time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    while s.recv(1 << 20):
                        pass
                try:
                    view = view[s.send(view) :]
                except BlockingIOError:
                    time.sleep(0.001)
        except OSError:
            return False  # dropped by the server: allowed
        return not view

    # ------------------------------------------------------------------ one input
    def __call__(self, data: bytes) -> None:
        """Play one hostile plan, then check the invariant."""
        if self.proc is None:
            self.start()
        src = ByteSource(data)
        plans = [self._connections, self._flood, self._flood, self._copy, self._raw,
                 self._xs_connections, self._xs_cache_busting]
        try:
            for _ in range(MAX_OPS):
                if src.remaining <= 0:
                    break
                src.choice(plans)(src)
            self._check_bounds(FD_BOUND)
            self._probe_dom0()  # while the guest still holds its connections
        finally:
            self._drop_sockets()
        self._wait_released()
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self._check_bounds(FD_SLACK)
                break
            except InvariantViolation:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # xenstore connections close asynchronously
        self._probe_dom0()

"""A hostile xenstore client against a server that is not ours: any process behind a socket.

Theory of operation
-------------------
:func:`hostile_xs_chunks` turns fuzz input into what a hostile guest writes on its
xenstore connection: well-formed requests of any type (known, removed, unknown) with chosen
ids and transaction ids and paths under its home, and raw bytes (bad and half headers,
lengths up to 0xFFFFFFFF).  The in-process target ``xenstore:wire`` feeds them to the
embedded store; :class:`XenstoredProcess` feeds them to a *server process* instead.

The process is the victim: a command line with the placeholders ``{dom0}`` (the
privileged socket) and ``{guest}`` (a socket whose connections act as domain 5), started
once per campaign (default: ``python -m xenpv xenstored --socket {dom0} --domain
5={guest}``; any other xenstored with the same socket convention can stand in).  Per input:

1. connect to the guest socket and write the hostile chunks, reading whatever comes back
   (bounded: at most 1 MiB, 2 s in all); the server may drop the connection at any point
   (that is the peer-error path for a server);
2. the invariant: the process is still alive, and a *separate* dom0 connection still gets
   correct answers (a WRITE then a READ of a probe node, with a 5 s timeout: no hang, no
   corrupted state, other domains unaffected).

A dead process or a failed/slow probe raises :class:`~xenpv.fuzz.hostile.InvariantViolation`.
"""

from __future__ import annotations

import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.source import ByteSource
from xenpv.xenstore import wire

__all__ = ["DEFAULT_COMMAND", "XenstoredProcess", "hostile_xs_chunks"]

XS_TYPES = [int(t) for t in wire.XsType] + [99, 0xFFFF]
DEFAULT_COMMAND = f"{shlex.quote(sys.executable)} -m xenpv xenstored --socket {{dom0}} --domain 5={{guest}}"


def hostile_xs_chunks(src: ByteSource, limit: int = 64) -> Iterator[tuple[int, bytes]]:
    """``(who, bytes)`` pairs a hostile guest (who 0) or dom0 (who 1) writes, from the input."""
    for _ in range(limit):
        if src.remaining <= 0:
            return
        who = src.below(2)
        if src.boolean():  # a structured message with a chosen type and payload
            payload = src.take(src.below(80))
            if src.boolean():
                payload = b"/local/domain/5/" + payload.replace(b"\0", b"a")[:20] + b"\0" + payload
            raw = struct.pack("<IIII", src.choice(XS_TYPES), src.u32(),
                              src.choice((0, 1, 2, src.u32())), len(payload)) + payload
        else:
            raw = src.take(1 + src.below(64))  # raw bytes: bad headers, half headers
        yield who, raw


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the fuzzing process goes (libFuzzer exits abruptly)."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # linux/prctl.h
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def _recv_all(sock: socket.socket, deadline: float, cap: int = 1 << 20) -> bytes:
    """Read until the peer closes, ``cap`` bytes, or ``deadline`` (monotonic)."""
    out = bytearray()
    while len(out) < cap:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(min(left, 0.05))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            break
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def probe_write_read(s: socket.socket, req_id: int, path: bytes, value: bytes) -> None:
    """WRITE ``value`` to ``path`` and READ it back on connection ``s`` (5 s in all):
    :class:`InvariantViolation` on a wrong answer, ``OSError`` on a socket failure."""
    s.sendall(wire.encode(wire.XsType.WRITE, req_id, 0, path + b"\0" + value))
    s.sendall(wire.encode(wire.XsType.READ, req_id + 1, 0, path + b"\0"))
    dec = wire.Decoder()
    got: list[wire.Message] = []
    deadline = time.monotonic() + 5.0
    while len(got) < 2:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65536)
        if not chunk:
            break
        dec.feed(chunk)
        got += [m for m in dec if m.type != wire.XsType.WATCH_EVENT]
    if len(got) < 2 or got[0].payload != wire.OK or got[1].payload != value:
        raise InvariantViolation(f"dom0 probe got wrong answers after hostile input: {got!r}")


class XenstoredProcess:
    """A xenstore server process attacked by a hostile guest connection (callable per input)."""

    def __init__(self, command: str | None = None, *, start_timeout: float = 20.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="xenpv-fuzz-xs-")
        self.dom0 = os.path.join(self._tmp.name, "dom0.sock")
        self.guest = os.path.join(self._tmp.name, "dom5.sock")
        text = (command or DEFAULT_COMMAND).format(dom0=self.dom0, guest=self.guest,
                                                   rundir=self._tmp.name)
        self.argv = shlex.split(text)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.req_id = 0
        self.inputs = 0

    def start(self) -> None:
        """Start the server (removing sockets a dead one left behind) and wait for both."""
        for path in (self.dom0, self.guest):
            if os.path.exists(path):
                os.unlink(path)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.start_timeout
        while not (os.path.exists(self.dom0) and os.path.exists(self.guest)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise InvariantViolation(f"xenstore server did not come up: {self.argv}")
            time.sleep(0.02)

    def _connect(self, path: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5.0)
        s.connect(path)
        return s

    def _probe(self) -> None:
        """dom0 writes and reads back a probe node on its own connection."""
        self.req_id = (self.req_id + 1) & 0xFFFFFFFF
        value = f"probe-{self.inputs}".encode()
        path = b"/fuzz/probe"
        try:
            with self._connect(self.dom0) as s:
                probe_write_read(s, self.req_id, path, value)
        except OSError as e:
            raise InvariantViolation(f"dom0 probe failed after hostile input: {e!r}") from None

    def __call__(self, data: bytes) -> None:
        """One hostile guest session, then the liveness and correctness probe."""
        if self.proc is None:
            self.start()
        assert self.proc is not None
        self.inputs += 1
        src = ByteSource(data)
        deadline = time.monotonic() + 2.0
        try:
            with self._connect(self.guest) as s:
                for _who, raw in hostile_xs_chunks(src):
                    try:
                        s.sendall(raw)
                    except OSError:
                        break  # dropped by the server: the allowed outcome
                    if time.monotonic() > deadline:
                        break
                s.shutdown(socket.SHUT_WR)
                _recv_all(s, deadline)
        except OSError as e:
            if self.proc.poll() is None and not isinstance(e, ConnectionRefusedError):
                pass  # the server refused or dropped the guest: fine while it lives
        self._check_alive(0.0)
        try:
            self._probe()
        except InvariantViolation:
            self._check_alive(1.0)  # a probe failing because the server is dying: say so
            raise

    def _check_alive(self, grace: float) -> None:
        """Raise if the server process has exited (waiting up to ``grace`` seconds)."""
        assert self.proc is not None
        try:
            code = self.proc.wait(grace) if grace else self.proc.poll()
        except subprocess.TimeoutExpired:
            return
        if code is not None:
            self.proc = None  # the next input starts a fresh server
            raise InvariantViolation(f"xenstore server process died (status {code}) on hostile input")

    def close(self) -> None:
        """Stop the server and remove its sockets (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._tmp.cleanup()

"""A hostile vchan client against a vchan server *process* (target ``vchan:process``).

Theory of operation
-------------------
The victim is any program that acts as a vchan server in a domain of the loopback
emulator and forwards the vchan to a local Unix socket: by default ``xenpv vchan-proxy -m
server``, or Debian's ``vchan-socket-proxy`` (``{vchan_socket_proxy}`` in the command
names it from the peers tree).  The command line has the placeholders ``{domid}`` (the
client domain), ``{path}`` (the vchan's xenstore path) and ``{socket}`` (the local socket
the server connects to for each vchan client).  It runs under the environment of
``xenpv loopback env`` as domain :data:`SERVER` of a loopback daemon
(:class:`~xenpv.testing.vchan.VchanLab`), started once per campaign and again after it
exits.

The hostile peer is domain :data:`CLIENT` in this process, speaking through the emulator
as a libxenvchan client would: it reads ``ring-ref`` and ``event-channel`` from xenstore,
binds the event channel and maps the control page (with the unmap notification on
``cli_live``).  Then the input decides, for up to :data:`MAX_OPS` operations: which of
the four ring indexes to store and what (small, near, huge values), any byte of the
header (``cli_live``, ``srv_live``, the notify bytes, the orders), bytes into the two
in-page rings (io/libxenvchan.h: orders 10 and 11 at offsets 1024 and 2048), an honest
write or read of ``k`` bytes, event notifications, bytes from the local side into the
victim's socket (so the victim writes into the ring whose consumer index the hostile
client owns), and pauses.  Finally it unmaps the page and unbinds the port, as a client
leaving does.

For a foreign process only observable behaviour counts.  The invariant per input:

* the victim does not die by a signal (a crash); exiting with a status is allowed (it may
  give up on a broken peer), but then the emulator must hold nothing of it
  (``assert_released``) and the next input starts it again;
* it does not hang: within :data:`HANG_S` seconds it either exits or notices that the
  hostile client left (closes the local connection it opened for it), and then, again
  within :data:`HANG_S`, serves an honest client that comes and goes (connects its local
  side for it and closes it when that client leaves);
* while it runs, the grants it holds stay bounded (:data:`MAX_GRANTS`: no per-client leak).

:meth:`VchanProcess.close` ends the victim (SIGTERM), and checks that it exits and that
the emulator then holds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

from xenpv.errors import PeerError, PlatformError
from xenpv.fuzz.external import _die_with_parent
from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.source import ByteSource
from xenpv.platforms.base import UnmapNotify
from xenpv.protocols.vchan import (
    KEY_EVENT_CHANNEL,
    KEY_RING_REF,
    VCHAN_CLI_CONNECTED,
    VCHAN_CLI_LIVE_OFFSET,
    VCHAN_CLI_WAITING,
    VCHAN_IN_PAGE_OFFSETS,
    VCHAN_LEFT_CONS_OFFSET,
    VCHAN_LEFT_PROD_OFFSET,
    VCHAN_NOTIFY_WRITE,
    VCHAN_RIGHT_CONS_OFFSET,
    VCHAN_RIGHT_PROD_OFFSET,
    VCHAN_SRV_ALIVE,
    VCHAN_SRV_LIVE_OFFSET,
    VCHAN_SRV_NOTIFY_OFFSET,
)

__all__ = ["CLIENT", "DEFAULT_COMMAND", "HANG_S", "MAX_GRANTS", "MAX_OPS", "SERVER", "VchanProcess"]

SERVER, CLIENT = 1, 2
MAX_OPS = 32
#: Seconds the victim has, after the hostile client left, to exit or serve an honest one.
HANG_S = 10.0
#: Grants the victim may hold between clients (control page plus what it keeps around).
MAX_GRANTS = 16
DEFAULT_COMMAND = (f"{shlex.quote(sys.executable)} -m xenpv vchan-proxy -m server "
                   "{domid} {path} {socket}")
PATH = f"/local/domain/{SERVER}/data/vchan/{CLIENT}/fuzz"

# io/libxenvchan.h with orders 10/11 inside the control page: the server reads left
# (the client's writes) and writes right.
LEFT_OFF, LEFT_SIZE = VCHAN_IN_PAGE_OFFSETS[10], 1 << 10
RIGHT_OFF, RIGHT_SIZE = VCHAN_IN_PAGE_OFFSETS[11], 1 << 11
INDEXES = (VCHAN_LEFT_CONS_OFFSET, VCHAN_LEFT_PROD_OFFSET, VCHAN_RIGHT_CONS_OFFSET,
           VCHAN_RIGHT_PROD_OFFSET)


def _u32(mem: Any, off: int) -> int:
    return int(struct.unpack_from("<I", mem, off)[0])


def _put32(mem: Any, off: int, value: int) -> None:
    struct.pack_into("<I", mem, off, value & 0xFFFFFFFF)


class _Local:
    """The local side: the socket the victim connects to per vchan client."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.ended = 0

    def pump(self, send: bytes = b"") -> None:
        """Accept waiting connections, drain what they sent, send ``send`` on the newest."""
        with contextlib.suppress(BlockingIOError):
            while True:
                conn, _ = self.sock.accept()
                conn.setblocking(False)
                self.conns.append(conn)
                self.accepted += 1
        for conn in list(self.conns):
            try:
                while conn.recv(65536):
                    pass
            except BlockingIOError:
                continue
            except OSError:
                pass
            self.conns.remove(conn)  # closed by the victim
            self.ended += 1
            conn.close()
        if send and self.conns:
            with contextlib.suppress(OSError):
                self.conns[-1].send(send)

    def drop(self) -> None:
        """Close every accepted connection."""
        for conn in self.conns:
            conn.close()
        self.conns.clear()

    def close(self) -> None:
        """Close everything."""
        self.drop()
        self.sock.close()


class VchanProcess:
    """The ``vchan:process`` target: a victim vchan server process (callable per input)."""

    def __init__(self, command: str | None = None, *, start_timeout: float = 30.0,
                 hang_s: float = HANG_S) -> None:
        self.command = command or DEFAULT_COMMAND
        self.start_timeout = start_timeout
        self.hang_s = hang_s
        self.lab: Any = None
        self.platform: Any = None
        self.local: _Local | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.keys: tuple[int, int] | None = None
        self.inputs = 0

    # -- set-up ----------------------------------------------------------------------
    def _setup(self) -> None:
        from xenpv.testing.vchan import VchanLab

        self.lab = VchanLab((SERVER, CLIENT), max_grants=512, max_ports=64)
        self.platform = self.lab.platform(CLIENT)
        self.local = _Local(os.path.join(self.lab.rundir, "fuzz-local.sock"))

    def _argv(self) -> list[str]:
        assert self.local is not None
        fields = {"domid": str(CLIENT), "path": PATH, "socket": self.local.sock.getsockname()}
        if "{vchan_socket_proxy}" in self.command:
            from xenpv import peers

            fields["vchan_socket_proxy"] = str(peers.find("vchan-socket-proxy"))
        return shlex.split(self.command.format(**fields))

    def _start(self) -> None:
        if self.lab is None:
            self._setup()
        self.proc = self.lab.spawn(SERVER, self._argv(), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   preexec_fn=_die_with_parent)
        self.keys = self._wait_fresh(self.start_timeout)

    # -- observation -----------------------------------------------------------------
    def _read_keys(self) -> tuple[int, int] | None:
        async def read() -> tuple[int, int] | None:
            xs = await self.platform.xenstore()
            try:
                ref = await xs.read(f"{PATH}/{KEY_RING_REF}")
                port = await xs.read(f"{PATH}/{KEY_EVENT_CHANNEL}")
            except Exception:
                return None  # not (or no longer) published
            finally:
                await xs.close()
            try:
                return int(ref), int(port)
            except ValueError:
                return None

        return asyncio.run(read())

    def _is_fresh(self, keys: tuple[int, int]) -> bool:
        """The published control page is a new one waiting for a client."""
        try:
            m = self.platform.grants.map(SERVER, [keys[0]], writable=False)
        except PlatformError:
            return False
        try:
            mem = m.mem
            return bool(mem[VCHAN_SRV_LIVE_OFFSET] == VCHAN_SRV_ALIVE
                        and mem[VCHAN_CLI_LIVE_OFFSET] == VCHAN_CLI_WAITING)
        finally:
            self.platform.grants.unmap(m)

    def _wait_fresh(self, timeout: float) -> tuple[int, int] | None:
        """At start: wait for the published vchan (its keys) or the victim's exit (None)."""
        assert self.proc is not None and self.local is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                return None
            keys = self._read_keys()
            if keys is not None and self._is_fresh(keys):
                return keys
            if time.monotonic() > deadline:
                raise InvariantViolation(f"vchan server process published no vchan in "
                                         f"{timeout:g} s: {self.proc.args!r}")
            time.sleep(0.02)

    def _until(self, cond: Any, what: str) -> bool:
        """Wait up to ``hang_s`` for ``cond()`` (True) or the victim's exit (False)."""
        assert self.proc is not None and self.local is not None
        deadline = time.monotonic() + self.hang_s
        while True:
            self.local.pump()
            if cond():
                return True
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self._stop()  # the next input starts a fresh one
                raise InvariantViolation(f"vchan server process hangs: {what} within {self.hang_s:g} s "
                                         f"after a hostile client")
            time.sleep(0.005)

    def _probe(self) -> bool:
        """An honest client comes and goes: the victim must serve it (connect its local
        side) and see it leave (close the local side).  False: the victim exited."""
        assert self.local is not None
        keys = self._read_keys()
        if keys is None:
            return self._until(lambda: False, "the vchan stays unpublished")
        gt, events = self.platform.grants, self.platform.events
        try:
            port = events.bind_interdomain(SERVER, keys[1])
            ctrl = gt.map(SERVER, [keys[0]], writable=True,
                          notify=UnmapNotify(VCHAN_CLI_LIVE_OFFSET, clear_byte=True, port=port))
        except PlatformError:
            with contextlib.suppress(UnboundLocalError, PlatformError):
                events.unbind(port)
            return self._until(lambda: False, "its published vchan cannot be mapped")
        local = self.local
        accepted, ended = local.accepted, local.ended
        try:
            events.unmask(port)
            ctrl.mem[VCHAN_CLI_LIVE_OFFSET] = VCHAN_CLI_CONNECTED
            ctrl.mem[VCHAN_SRV_NOTIFY_OFFSET] = VCHAN_NOTIFY_WRITE
            events.notify(port)
            if not self._until(lambda: local.accepted > accepted, "serve an honest client"):
                return False
        finally:
            with contextlib.suppress(PlatformError):
                gt.unmap(ctrl)
            with contextlib.suppress(PlatformError):
                events.unbind(port)
        return self._until(lambda: local.ended - ended >= local.accepted - accepted and
                           not local.conns, "notice the honest client leave")

    def _stop(self) -> None:
        """Kill a stuck victim (its leftovers are the daemon's to release)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if self.local is not None:
            self.local.drop()

    def _check_exit(self) -> None:
        """After the victim exited: no crash, and the emulator holds nothing of it."""
        assert self.proc is not None
        code = self.proc.wait(10)
        self.proc = None
        if code < 0:
            raise InvariantViolation(
                f"vchan server process killed by signal {signal.Signals(-code).name} "
                f"on hostile input")
        try:
            self.lab.assert_released(5.0)
        except AssertionError as e:
            raise InvariantViolation(f"vchan server process exited ({code}) leaving {e}") from None

    # -- one input -------------------------------------------------------------------
    def __call__(self, data: bytes) -> None:
        """One hostile client session, then the liveness probe and the leak checks."""
        if self.proc is None or self.keys is None:
            self._start()
            if self.keys is None:  # exited before any client came
                self._check_exit()
                raise InvariantViolation(f"vchan server process exited at start: {self._argv()}")
        assert self.proc is not None and self.local is not None
        self.inputs += 1
        keys = self._read_keys() or self.keys
        self._session(ByteSource(data), *keys)
        # the victim must notice the hostile client leave (close the local side it opened
        # for it) before the honest one comes: a client that comes back at once would look
        # to it like the same connection (cli_live never seen 0)
        local = self.local
        if not self._until(lambda: not local.conns, "notice the hostile client leave") \
                or not self._probe():
            self._check_exit()
            return
        self.local.drop()
        grants = self.lab.outstanding().get("grants", 0)
        if grants > MAX_GRANTS:
            raise InvariantViolation(f"vchan server process holds {grants} grants between clients")

    def _session(self, src: ByteSource, ring_ref: int, remote_port: int) -> None:
        gt, events = self.platform.grants, self.platform.events
        assert self.local is not None
        try:
            port = events.bind_interdomain(SERVER, remote_port)
        except PlatformError:
            return  # the vchan went away meanwhile: nothing to attack
        ctrl = None
        try:
            events.unmask(port)
            ctrl = gt.map(SERVER, [ring_ref], writable=True,
                          notify=UnmapNotify(VCHAN_CLI_LIVE_OFFSET, clear_byte=True, port=port))
            mem = ctrl.mem
            mem[VCHAN_CLI_LIVE_OFFSET] = src.choice((VCHAN_CLI_CONNECTED,) * 3 + (0, 2, 0xFF))
            mem[VCHAN_SRV_NOTIFY_OFFSET] = VCHAN_NOTIFY_WRITE
            events.notify(port)
            for _ in range(MAX_OPS):
                if src.remaining <= 0:
                    break
                self._op(src, mem, port)
                self.local.pump()
                if self.proc is not None and self.proc.poll() is not None:
                    break
            self.local.pump()
        except (PlatformError, PeerError):
            pass  # the victim revoked or closed something under us: fine
        finally:
            if ctrl is not None:
                with contextlib.suppress(PlatformError):
                    gt.unmap(ctrl)  # the unmap notification clears cli_live, signals
            with contextlib.suppress(PlatformError):
                events.unbind(port)

    def _op(self, src: ByteSource, mem: Any, port: int) -> None:
        op = src.below(9)
        if op == 0:  # store an index: small, near the current value, or anything
            off = src.choice(INDEXES)
            how = src.below(3)
            value = src.u8() if how == 0 else _u32(mem, off) + src.u16() - 0x8000 if how == 1 else src.u32()
            _put32(mem, off, value)
        elif op == 1:  # any header byte: cli_live, srv_live, notify bytes, the orders
            mem[16 + src.below(8)] = src.u8()
        elif op == 2:  # bytes into either ring
            off = LEFT_OFF + src.below(LEFT_SIZE + RIGHT_SIZE)
            chunk = src.take(src.below(64))[: 4096 - off]
            mem[off : off + len(chunk)] = chunk
        elif op == 3:  # an honest write of k bytes into the left ring
            k = src.below(LEFT_SIZE + 1)
            prod = _u32(mem, VCHAN_LEFT_PROD_OFFSET)
            for i in range(k):
                mem[LEFT_OFF + (prod + i) % LEFT_SIZE] = (prod + i) & 0xFF
            _put32(mem, VCHAN_LEFT_PROD_OFFSET, prod + k)
            self.platform.events.notify(port)
        elif op == 4:  # an honest read: consume what the server produced (or k of it)
            cons, prod = _u32(mem, VCHAN_RIGHT_CONS_OFFSET), _u32(mem, VCHAN_RIGHT_PROD_OFFSET)
            avail = (prod - cons) & 0xFFFFFFFF
            k = avail if src.boolean() else src.below(RIGHT_SIZE + 1)
            _put32(mem, VCHAN_RIGHT_CONS_OFFSET, cons + k)
            self.platform.events.notify(port)
        elif op == 5:
            self.platform.events.notify(port)
        elif op == 6:  # the local side sends, so the victim writes the ring we consume
            assert self.local is not None
            self.local.pump(src.take(1 + src.below(255)) * (1 + src.below(16)))
        else:  # let the victim run
            time.sleep(0.001 * src.below(10))

    def close(self) -> None:
        """End the victim (SIGTERM) and the daemon; idempotent.  A victim that does not
        exit on SIGTERM, or leaves grants behind after exiting, is a violation."""
        problem = None
        proc, self.proc = self.proc, None
        if self.local is not None:
            self.local.drop()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                problem = f"vchan server process ignored SIGTERM: {proc.args!r}"
        if problem is None and self.lab is not None and proc is not None:
            try:
                self.lab.assert_released(5.0)
            except AssertionError as e:
                problem = f"after the vchan server process ended: {e}"
        if self.local is not None:
            self.local.close()
            self.local = None
        if self.lab is not None:
            lab, self.lab = self.lab, None
            lab.close()  # kills whatever is left
        if problem is not None:
            raise InvariantViolation(problem)

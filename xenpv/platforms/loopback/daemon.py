"""``xenpv loopback up``: the loopback emulator daemon (hypervisor + xenstored).

Theory of operation
-------------------
One asyncio process owns a :class:`~xenpv.platforms.loopback.core.Hypervisor` and, when
the embedded xenstore server is available, a ``XenstoredServer``.  For every domain it
listens on ``RUNDIR/dom<N>/control`` (SOCK_SEQPACKET, docs/loopback-protocol.md) and
``RUNDIR/dom<N>/xenstore`` (the xenstore wire protocol, acting as domain N).

Each accepted control connection becomes one hypervisor :class:`Handle` served by one
task: receive a request, run it against the hypervisor, send the reply (with descriptors
as SCM_RIGHTS).  When the connection ends for any reason — the client closed it, its
process died, it violated the framing, it did not read its replies, or its domain was
destroyed — the handle is closed, which releases everything it held exactly like the
death of a real domain's process (mappings dropped and their unmap notifications fired,
shares ended, ports closed).

Notifications between domains never pass through here on the hot path: clients write the
peer's inbox eventfd directly (see the protocol document); the daemon only hands out the
descriptors and bumps the per-port generation when a channel's remote end changes.

Domains get the home a toolstack gives them (``/local/domain/N`` with ``domid``, ``name``,
``data/``, ``device/``, ``control/``, ``error/``) written through a dom0 xenstore client,
then ``introduce_domain`` fires ``@introduceDomain``; destroying a domain removes its home
and calls ``release_domain`` (``@releaseDomain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import shutil
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from xenpv.errors import PlatformError
from xenpv.pidlock import PidLock
from xenpv.platforms.base import (
    DOMID_SELF,
    PAGE_SIZE,
    MapError,
    ResourceExhausted,
)
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.builder import (
    adopt_xenstore_ring,
    build_xenstore_ring,
    ring_holdings,
)
from xenpv.platforms.loopback.core import (
    Domain,
    Handle,
    Hypervisor,
    Mapping,
    Segment,
)
from xenpv.platforms.loopback.gntcopy import copy_engine
from xenpv.platforms.loopback.home import write_domain_home
from xenpv.platforms.loopback.inprocess import InProcessPlatform
from xenpv.platforms.loopback.proto import Op
from xenpv.platforms.loopback.xsd import OURS, choose

log = logging.getLogger("xenpv.loopback")

#: seconds a listener stops accepting after the process ran out of descriptors or memory
ACCEPT_PAUSE = 1.0
#: at most one "cannot accept" warning per this many seconds (the rest are counted)
ACCEPT_WARN_INTERVAL = 10.0
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Reply = tuple[int, bytes | bytearray, list[int], list[int]]  # status, payload, fds, to close


def control_path(rundir: str | os.PathLike[str], domid: int) -> Path:
    """``RUNDIR/dom<N>/control``."""
    return Path(rundir) / f"dom{domid}" / "control"


def xenstore_path(rundir: str | os.PathLike[str], domid: int) -> Path:
    """``RUNDIR/dom<N>/xenstore``."""
    return Path(rundir) / f"dom{domid}" / "xenstore"


def _unpack(st: Any, payload: bytes, *, exact: bool = True) -> tuple[Any, ...]:
    if len(payload) < st.size or (exact and len(payload) != st.size):
        raise PlatformError("request payload has the wrong size", errno.EINVAL)
    return tuple(st.unpack_from(payload))


def _ok(
    payload: bytes | bytearray = b"", fds: list[int] | None = None, close: list[int] | None = None
) -> Reply:
    return 0, payload, fds or [], close or []


class _Connection:
    """One control connection = one hypervisor handle.

    Requests are read and answered from a reader callback (no task switch per request).
    Only domain creation and destruction await (xenstore); while one of those runs, the
    connection stops reading, so requests stay strictly in order."""

    def __init__(self, daemon: LoopbackDaemon, sock: socket.socket, handle: Handle) -> None:
        self.daemon = daemon
        self.sock = sock
        self.handle = handle
        self.task: asyncio.Task[None] | None = None  # an awaiting request, if any
        self.copier = copy_engine(daemon.hv, handle)  # GNT_COPY (keeps views: release)
        self.closed = False
        self._reading = False
        handle.on_close.append(self.close)  # domain destroyed: the connection dies with it

    def start(self) -> None:
        """Start serving requests."""
        self._resume()

    def _resume(self) -> None:
        if not self.closed and not self._reading:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False

    def _readable(self) -> None:
        """Serve one request.  One per wake-up: the loop watches the socket level-
        triggered and calls again while more wait, where a second receive would mostly
        end in EAGAIN (an exception) for a client waiting for its reply."""
        # one receive buffer for the whole daemon: a request is consumed before the next
        # is read (an awaited one is copied out first)
        rbuf = self.daemon.rbuf
        try:
            try:  # GNT_COPY, the hot one: received, framed, run and answered by its engine
                n = self.copier.serve(self.sock, rbuf)
            except (OSError, proto.ProtocolViolation):
                raise
            except Exception as exc:  # a bug in the engine: the request is in rbuf
                seq = proto.REQUEST.unpack_from(rbuf)[1]
                self._send(Op.GNT_COPY, seq, self.daemon._error_reply(self, Op.GNT_COPY, exc))
                return
            if n < 0:  # answered, or nothing to read
                return
            if n == 0:
                self.close()  # EOF: the client is gone
                return
            op, seq, payload = proto.decode_request(bytes(rbuf[:n]))
            reply = self.daemon.dispatch_now(self, op, payload)
            if isinstance(reply, tuple):
                self._send(op, seq, reply)
                return
            self._pause()
            self.task = asyncio.get_running_loop().create_task(self._finish(op, seq, reply))
        except proto.ProtocolViolation as exc:
            log.info("dom%d: dropping control connection: %s", self.handle.domain.domid, exc)
            self.close()
        except OSError as exc:  # reset, or a client that does not read its replies
            log.debug("dom%d: control connection ends: %s", self.handle.domain.domid, exc)
            self.close()

    async def _finish(self, op: int, seq: int, pending: Awaitable[Reply]) -> None:
        try:
            reply = await pending
            if not self.closed:
                self._send(op, seq, reply)
        except asyncio.CancelledError:
            return
        except OSError:
            self.close()
            return
        self.task = None
        if not self.closed:
            self._resume()
            self._readable()

    def _send(self, op: int, seq: int, reply: Reply) -> None:
        status, out, out_fds, to_close = reply
        parts: list[Any] = [proto.REPLY.pack(op, seq, status, len(out)), out]
        if proto.REPLY.size + len(out) > proto.MAX_MESSAGE:
            parts, out_fds = [proto.encode_reply(op, seq, -errno.E2BIG)], []
        try:
            # header and payload gathered by the kernel: a large payload is not copied
            self.sock.sendmsg(parts, proto.ancdata_for(out_fds))
        finally:
            for fd in to_close:
                os.close(fd)

    def close(self) -> None:
        """Release the handle (everything it holds) and the socket (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._pause()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.daemon.connections.discard(self)
        self.copier.release()
        self.daemon.hv.close_handle(self.handle)
        self.sock.close()


class LoopbackDaemon:
    """The daemon: hypervisor, xenstore server and the per-domain sockets."""

    def __init__(
        self,
        rundir: str | os.PathLike[str],
        *,
        max_grants: int = 4096,
        max_ports: int = 1024,
        max_fds: int = 4096,
        xenstore: bool = True,
        quotas: Any = None,
        xenstored: str = OURS,
    ) -> None:
        """``quotas``: the embedded xenstored's :class:`~xenpv.xenstore.store.Quotas`;
        ``max_fds``: descriptors the daemon holds for one unprivileged domain;
        ``xenstored``: which xenstored is dom0's (:mod:`~xenpv.platforms.loopback.xsd`:
        ``ours`` is embedded, another name must have a registered implementation)."""
        self.rundir = Path(rundir)
        self._lock = PidLock(self.rundir / "daemon.lock", f"run directory {self.rundir}")
        self._quotas = quotas
        self.hv = Hypervisor(max_grants=max_grants, max_ports=max_ports, max_fds=max_fds)
        self._accept_warned = -ACCEPT_WARN_INTERVAL  # loop time of the last warning
        self._accept_suppressed = 0
        self.connections: set[_Connection] = set()
        #: the control connections' receive buffer (one message at a time, in the loop)
        self.rbuf = bytearray(proto.MAX_MESSAGE)
        self._listeners: dict[int, socket.socket] = {}
        #: Dom0's xenstored when it is not ours (None: the embedded one, or none).
        self.external_xenstored = choose(xenstored) if xenstore else None
        self._want_xenstore = xenstore and self.external_xenstored is None
        self.xenstored: Any = None
        self._xs_dom0: Any = None
        self._dom0_platform: Any = None
        self._stopped = asyncio.Event()
        self._handlers: dict[int, Callable[[_Connection, bytes], Any]] = {
            Op.HELLO: self._hello,
            Op.GNT_SHARE: self._gnt_share,
            Op.GNT_END: self._gnt_end,
            Op.GNT_MAP: self._gnt_map,
            Op.GNT_UNMAP: self._gnt_unmap,
            Op.GNT_SET_NOTIFY: self._gnt_set_notify,
            Op.GNT_COPY: self._gnt_copy,
            Op.EVT_ALLOC_UNBOUND: self._evt_alloc_unbound,
            Op.EVT_BIND_INTERDOMAIN: self._evt_bind_interdomain,
            Op.EVT_UNBIND: self._evt_unbind,
            Op.EVT_NOTIFY: self._evt_notify,
            Op.EVT_RESTRICT: self._evt_restrict,
            Op.EVT_STATUS: self._evt_status,
            Op.DOMAIN_LIST: self._domain_list,
            Op.DOMAIN_CREATE: self._domain_create,
            Op.DOMAIN_DESTROY: self._domain_destroy,
            Op.STATS: self._stats,
            Op.FAULT: self._fault,
            Op.GNT_SHARE_RESERVED: self._gnt_share_reserved,
            Op.FRAME_ALLOC: self._frame_alloc,
            Op.FOREIGN_MAP: self._foreign_map,
            Op.GNT_GRANT_FRAME: self._gnt_grant_frame,
            Op.XS_RING: self._xs_ring,
            Op.EVT_BIND_VIRQ: self._evt_bind_virq,
            Op.DOMAIN_SHUTDOWN: self._domain_shutdown,
            Op.DOMAIN_INFO: self._domain_info,
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self, domains: dict[int, str] | None = None) -> None:
        """Create the rundir, dom0's endpoints and the requested domains.

        Raises :class:`~xenpv.pidlock.InUseError` (and changes nothing) if a live daemon
        owns the rundir; the sockets of one that is gone are replaced.
        """
        self.rundir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        if self._want_xenstore:
            try:
                from xenpv.xenstore.server import XenstoredServer
            except ImportError:
                log.warning("embedded xenstore server not available: grants and events only")
            else:
                # dom0's own handles on the hypervisor: INTRODUCE maps guests' xenstore
                # pages and binds their ports through them
                self._dom0_platform = InProcessPlatform(self.hv, 0)
                # spin as `xenpv xenstored` does by default: a sequential guest's next
                # request (over its ring or a socket) is then taken without a wake-up
                self.xenstored = XenstoredServer(
                    quotas=self._quotas, state_file=None, platform=self._dom0_platform,
                    spin_us=50.0,
                )
                # permissions name live domains only, as on Xen (C xenstored asks the
                # hypervisor through xc_domain_getinfo)
                self.xenstored.store.domain_exists = self.hv.domains.__contains__
        await self._open_endpoints(self.hv.domains[0])
        dom0_socket = None
        if self.external_xenstored is not None:
            await self.external_xenstored.start(self.rundir)
            dom0_socket = self.external_xenstored.socket_path(0)
        elif self.xenstored is not None:
            dom0_socket = str(xenstore_path(self.rundir, 0))
        if dom0_socket is not None:
            # the toolstack's connection: homes, INTRODUCE, clean-up after a destroy
            from xenpv.xenstore.client import connect

            self._xs_dom0 = await connect(dom0_socket)
            await self._write_home(self.hv.domains[0])
        for domid, name in sorted((domains or {}).items()):
            await self.create_domain(domid, name)
        (self.rundir / "daemon.pid").write_text(f"{os.getpid()}\n")

    async def _open_endpoints(self, dom: Domain) -> None:
        path = control_path(self.rundir, dom.domid)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lsock.bind(str(path))
        lsock.listen(64)
        lsock.setblocking(False)
        self._listeners[dom.domid] = lsock
        asyncio.get_running_loop().add_reader(lsock.fileno(), self._accept, dom.domid)
        if self.xenstored is not None:
            xs = xenstore_path(self.rundir, dom.domid)
            with contextlib.suppress(FileNotFoundError):
                xs.unlink()
            await self.xenstored.listen(str(xs), dom.domid)

    def _accept(self, domid: int) -> None:
        lsock = self._listeners.get(domid)
        if lsock is None:
            return
        for _ in range(16):
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    # The pending connection keeps the listener readable: stop watching it
                    # for a while instead of spinning (the xenstore accept path does so too).
                    self._pause_accept(domid, lsock, exc)
                else:
                    log.info("accept on dom%d: %s", domid, exc)
                return
            sock.setblocking(False)
            try:
                dom = self.hv.domain(domid)
                self.hv.check_headroom(dom, sock.fileno())
                handle = self.hv.open_handle(domid)
            except PlatformError as exc:
                log.debug("dom%d: connection refused: %s", domid, exc)
                sock.close()
                continue
            conn = _Connection(self, sock, handle)
            self.connections.add(conn)
            conn.start()

    def _pause_accept(self, domid: int, lsock: socket.socket, exc: OSError) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(lsock.fileno())
        loop.call_later(ACCEPT_PAUSE, self._resume_accept, domid, lsock)
        now = loop.time()
        if now - self._accept_warned >= ACCEPT_WARN_INTERVAL:
            more = (
                f" ({self._accept_suppressed} more since the last warning)"
                if self._accept_suppressed
                else ""
            )
            log.warning(
                "cannot accept control connections (dom%d): %s; pausing %.1f s%s",
                domid,
                exc.strerror or exc,
                ACCEPT_PAUSE,
                more,
            )
            self._accept_warned = now
            self._accept_suppressed = 0
        else:
            self._accept_suppressed += 1

    def _resume_accept(self, domid: int, lsock: socket.socket) -> None:
        if self._listeners.get(domid) is lsock and lsock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(lsock.fileno(), self._accept, domid)

    def _close_endpoints(self, domid: int) -> None:
        lsock = self._listeners.pop(domid, None)
        if lsock is not None:
            asyncio.get_running_loop().remove_reader(lsock.fileno())
            lsock.close()
        shutil.rmtree(self.rundir / f"dom{domid}", ignore_errors=True)

    async def _write_home(self, dom: Domain) -> None:
        if self._xs_dom0 is not None:
            await write_domain_home(self._xs_dom0, dom.domid, dom.name)

    async def create_domain(self, domid: int, name: str | None = None) -> Domain:
        """Create a domain with its endpoints and xenstore home; ``@introduceDomain``."""
        dom = self.hv.create_domain(domid, name)
        try:
            # the home exists before @introduceDomain fires
            await self._write_home(dom)
            # the domain builder's xenstore page and port, introduced as a toolstack does
            ring = build_xenstore_ring(self.hv, domid)
            if self.external_xenstored is not None:
                await self.external_xenstored.introduce(domid, ring.gfn, ring.port)
            elif self._xs_dom0 is not None:
                await self._xs_dom0.introduce(domid, ring.gfn, ring.port)
            await self._open_endpoints(dom)
            if self.xenstored is not None:
                self.xenstored.introduce_domain(domid)
        except BaseException:
            self._close_endpoints(domid)
            self.hv.destroy_domain(domid)
            raise
        log.info("created dom%d (%s)", domid, dom.name)
        return dom

    async def destroy_domain(self, domid: int) -> None:
        """Tear a domain down like a dead one; ``@releaseDomain``."""
        self.hv.destroy_domain(domid)
        if self.xenstored is not None:
            # its xenstore socket stops accepting now, not when the daemon exits
            await self.xenstored.unlisten(str(xenstore_path(self.rundir, domid)))
        self._close_endpoints(domid)
        if self._xs_dom0 is not None:
            with contextlib.suppress(Exception):
                await self._xs_dom0.rm(f"/local/domain/{domid}")
        if self.xenstored is not None:
            self.xenstored.release_domain(domid)
        if self.external_xenstored is not None:
            await self.external_xenstored.release(domid)
        log.info("destroyed dom%d", domid)

    async def serve_forever(self) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT when installed)."""
        await self._stopped.wait()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return."""
        self._stopped.set()

    async def close(self) -> None:
        """Close every connection and endpoint, stop xenstore, remove the sockets."""
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for domid in list(self._listeners):
            self._close_endpoints(domid)
        if self._xs_dom0 is not None:
            with contextlib.suppress(Exception):
                await self._xs_dom0.close()
        if self.xenstored is not None:
            await self.xenstored.close()
        if self.external_xenstored is not None:
            await self.external_xenstored.close()
        if self._dom0_platform is not None:
            self._dom0_platform.close()
        self.hv.close()
        if self._lock.held:  # (the pid file of a live daemon that refused us stays)
            with contextlib.suppress(FileNotFoundError):
                (self.rundir / "daemon.pid").unlink()
            self._lock.release()

    # ------------------------------------------------------------------ dispatch
    def dispatch_now(self, conn: _Connection, op: int, payload: bytes) -> Reply | Awaitable[Reply]:
        """Run one request: the reply ``(status, payload, fds, fds_to_close)``, or an
        awaitable of it for the few operations that must wait (domain create/destroy)."""
        handler = self._handlers.get(op)
        if handler is None:
            return -errno.ENOSYS, b"", [], []
        try:
            result = handler(conn, payload)
        except Exception as exc:
            return self._error_reply(conn, op, exc)
        if asyncio.iscoroutine(result):
            return self._awaited(conn, op, result)
        return result

    async def _awaited(self, conn: _Connection, op: int, pending: Awaitable[Reply]) -> Reply:
        try:
            return await pending
        except Exception as exc:
            return self._error_reply(conn, op, exc)

    def _error_reply(self, conn: _Connection, op: int, exc: Exception) -> Reply:
        if isinstance(exc, MapError):
            return -(exc.errno or errno.EINVAL), proto.MAP_FAIL.pack(exc.index, exc.status), [], []
        if isinstance(exc, PlatformError):
            return -(exc.errno or errno.EINVAL), b"", [], []
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_PAUSE_ERRNOS:
            # out of descriptors or memory in the middle of a request: the caller's limit
            return -errno.ENOSPC, b"", [], []
        # a bug in the daemon must not kill every domain
        log.error("dom%d: op %d failed", conn.handle.domain.domid, op, exc_info=exc)
        return -errno.EIO, b"", [], []

    async def dispatch(self, conn: _Connection, op: int, payload: bytes) -> Reply:
        """Run one request to completion (see :meth:`dispatch_now`)."""
        reply = self.dispatch_now(conn, op, payload)
        if isinstance(reply, tuple):
            return reply
        return await reply

    def _require_priv(self, conn: _Connection) -> None:
        if not conn.handle.domain.privileged:
            raise PlatformError("only dom0 may do this", errno.EPERM)

    # ------------------------------------------------------------------ ops
    def _hello(self, conn: _Connection, payload: bytes) -> Reply:
        (version,) = _unpack(proto.U32, payload)
        if version != proto.VERSION:
            raise PlatformError(f"protocol version {version} unsupported", errno.EPROTO)
        dom = conn.handle.domain
        ro = os.open(f"/proc/self/fd/{dom.gen_fd}", os.O_RDONLY | os.O_CLOEXEC)
        out = proto.HELLO_REPLY.pack(
            proto.VERSION, dom.domid, int(dom.privileged), dom.max_grants, dom.max_ports, PAGE_SIZE
        )
        return _ok(out, [ro], [ro])

    def _gnt_share(self, conn: _Connection, payload: bytes) -> Reply:
        domid, flags, count = _unpack(proto.SHARE_REQ, payload)
        return self._share_reply(conn, domid, count, flags, None)

    def _gnt_share_reserved(self, conn: _Connection, payload: bytes) -> Reply:
        ref, domid, flags = _unpack(proto.SHARE_RESERVED_REQ, payload)
        return self._share_reply(conn, domid, 1, flags, ref)

    def _share_reply(
        self, conn: _Connection, domid: int, count: int, flags: int, reserved: int | None
    ) -> Reply:
        share = self.hv.share(
            conn.handle,
            domid,
            count,
            writable=bool(flags & proto.SHARE_WRITABLE),
            reserved=reserved,
        )
        out = proto.U32x2.pack(share.handle_id, count) + b"".join(
            proto.U32.pack(r) for r in share.refs
        )
        return _ok(out, [seg.fd for seg in share.segments()])

    def _refs_after(
        self, payload: bytes, head: Any, item: Any
    ) -> tuple[tuple[Any, ...], list[Any]]:
        fields = _unpack(head, payload, exact=False)
        count = fields[-1]
        if len(payload) != head.size + count * item.size:
            raise PlatformError("request payload has the wrong size", errno.EINVAL)
        items = [item.unpack_from(payload, head.size + i * item.size) for i in range(count)]
        return fields, items

    def _gnt_end(self, conn: _Connection, payload: bytes) -> Reply:
        (flags, _count), items = self._refs_after(payload, proto.U32x2, proto.U32)
        ended = self.hv.end_access(
            conn.handle, [r for (r,) in items], defer=bool(flags & proto.END_DEFER)
        )
        return _ok(proto.U32.pack(ended))

    def _gnt_map(self, conn: _Connection, payload: bytes) -> Reply:
        (flags, _count), items = self._refs_after(payload, proto.U32x2, proto.U32x2)
        writable = bool(flags & proto.MAP_WRITABLE)
        m = self.hv.map(conn.handle, [(d, r) for d, r in items], writable=writable)
        return self._mapping_reply(conn, m, writable)

    def _foreign_map(self, conn: _Connection, payload: bytes) -> Reply:
        (domid, flags, _count), items = self._refs_after(payload, proto.U32x3, proto.U32)
        writable = bool(flags & proto.MAP_WRITABLE)
        m = self.hv.foreign_map(conn.handle, domid, [g for (g,) in items], writable=writable)
        return self._mapping_reply(conn, m, writable)

    def _mapping_reply(self, conn: _Connection, m: Mapping, writable: bool) -> Reply:
        fd_index: dict[int, int] = {}
        fds: list[int] = []
        table = []
        try:
            for e in m.entries:
                seg: Segment = e.segment
                idx = fd_index.get(id(seg))
                if idx is None:
                    idx = fd_index[id(seg)] = len(fds)
                    fds.append(seg.fd if writable else seg.ro_fd)  # ro_fd may open one
                table.append(proto.U32x2.pack(idx, e.page))
        except OSError as exc:
            self.hv.unmap(conn.handle, m.handle_id)
            raise ResourceExhausted(f"cannot open a read-only descriptor: {exc}") from exc
        if len(fds) > proto.MAX_FDS:
            self.hv.unmap(conn.handle, m.handle_id)
            raise PlatformError("mapping needs too many descriptors", errno.E2BIG)
        out = proto.U32x3.pack(m.handle_id, len(m.entries), len(fds)) + b"".join(table)
        return _ok(out, fds)

    def _frame_alloc(self, conn: _Connection, payload: bytes) -> Reply:
        (count,) = _unpack(proto.U32, payload)
        if count > proto.MAX_FDS:  # one descriptor per frame must fit one reply
            raise PlatformError(f"{count} frames need too many descriptors", errno.E2BIG)
        share = self.hv.alloc_frames(conn.handle, count)
        out = proto.U32x2.pack(share.handle_id, count) + struct.pack(f"<{count}I", *share.refs)
        return _ok(out, [seg.fd for seg in share.segments()])

    def _gnt_grant_frame(self, conn: _Connection, payload: bytes) -> Reply:
        gfn, ref, domid, flags = _unpack(proto.GRANT_FRAME_REQ, payload)
        if not flags & proto.SHARE_WRITABLE:
            raise PlatformError("a granted frame is writable", errno.EINVAL)
        share = self.hv.grant_frame(
            conn.handle, gfn, domid, reserved=None if ref == proto.ANY_REF else ref
        )
        (entry,) = share.entries
        out = proto.U32x3.pack(share.handle_id, entry.ref, entry.page)
        return _ok(out, [entry.segment.fd])

    def _xs_ring(self, conn: _Connection, payload: bytes) -> Reply:
        if payload:
            raise PlatformError("XS_RING takes no payload", errno.EINVAL)
        ring, port = adopt_xenstore_ring(self.hv, conn.handle)
        (entry,) = ring.frames.entries
        out = proto.U32x3.pack(port.port, ring.gfn, entry.page)
        return _ok(out, [entry.segment.fd, port.inbox])

    def _gnt_unmap(self, conn: _Connection, payload: bytes) -> Reply:
        (handle_id,) = _unpack(proto.U32, payload)
        self.hv.unmap(conn.handle, handle_id)
        return _ok()

    def _gnt_set_notify(self, conn: _Connection, payload: bytes) -> Reply:
        handle_id, offset, port, action = _unpack(proto.U32x4, payload)
        self.hv.set_notify(conn.handle, handle_id, offset, action, port)
        return _ok()

    def _gnt_copy(self, conn: _Connection, payload: bytes) -> Reply:
        return _ok(conn.copier.run(payload))

    def _evt_alloc_unbound(self, conn: _Connection, payload: bytes) -> Reply:
        (remote,) = _unpack(proto.U32, payload)
        p = self.hv.alloc_unbound(conn.handle, remote)
        return _ok(proto.U32.pack(p.port), [p.inbox])

    def _evt_bind_interdomain(self, conn: _Connection, payload: bytes) -> Reply:
        remote, rport = _unpack(proto.U32x2, payload)
        p = self.hv.bind_interdomain(conn.handle, remote, rport)
        assert p.remote is not None
        return _ok(proto.U32x2.pack(p.port, p.domain.gen[p.port]), [p.inbox, p.remote.inbox])

    def _evt_bind_virq(self, conn: _Connection, payload: bytes) -> Reply:
        (virq,) = _unpack(proto.U32, payload)
        p = self.hv.bind_virq(conn.handle, virq)
        return _ok(proto.U32.pack(p.port), [p.inbox])

    def _evt_unbind(self, conn: _Connection, payload: bytes) -> Reply:
        (port,) = _unpack(proto.U32, payload)
        self.hv.unbind(conn.handle, port)
        return _ok()

    def _evt_notify(self, conn: _Connection, payload: bytes) -> Reply:
        (port,) = _unpack(proto.U32, payload)
        r = self.hv.notify(conn.handle, port)
        dom = conn.handle.domain
        gen = dom.gen[port]
        if r is None or dom.notify_drop or dom.notify_duplicate:
            # no outbox while a notification fault is active: the client stays on this path
            return _ok(proto.U32x2.pack(gen, 0))
        return _ok(proto.U32x2.pack(gen, 1), [r.inbox])

    def _evt_restrict(self, conn: _Connection, payload: bytes) -> Reply:
        (domid,) = _unpack(proto.U32, payload)
        self.hv.restrict(conn.handle, domid)
        return _ok()

    def _evt_status(self, conn: _Connection, payload: bytes) -> Reply:
        domid, port = _unpack(proto.U32x2, payload)
        return _ok(proto.U32x3.pack(*self.hv.status(conn.handle, domid, port)))

    def _domain_list(self, conn: _Connection, payload: bytes) -> Reply:
        if payload:
            raise PlatformError("DOMAIN_LIST takes no payload", errno.EINVAL)
        doms = sorted(self.hv.domains.values(), key=lambda d: d.domid)
        out = proto.U32.pack(len(doms))
        for d in doms:
            out += proto.U32x2.pack(d.domid, _domain_flags(d))
        return _ok(out)

    def _domain_info(self, conn: _Connection, payload: bytes) -> Reply:
        if payload:
            raise PlatformError("DOMAIN_INFO takes no payload", errno.EINVAL)
        doms = sorted(self.hv.domains.values(), key=lambda d: d.domid)
        out = bytearray(proto.U32.pack(len(doms)))
        for d in doms:
            reason = d.shutdown_reason or 0
            out += proto.DOMAIN_INFO_ENTRY.pack(d.domid, _domain_flags(d), reason, d.uuid.bytes)
        return _ok(out)

    def _domain_shutdown(self, conn: _Connection, payload: bytes) -> Reply:
        domid, reason = _unpack(proto.U32x2, payload)
        if domid == DOMID_SELF:
            domid = conn.handle.domain.domid
        if domid != conn.handle.domain.domid:
            self._require_priv(conn)
        self.hv.shutdown_domain(domid, reason)
        return _ok()

    async def _domain_create(self, conn: _Connection, payload: bytes) -> Reply:
        self._require_priv(conn)
        (domid,) = _unpack(proto.U32, payload, exact=False)
        raw = payload[4:]
        if len(raw) > proto.NAME_MAX or b"\0" in raw:
            raise PlatformError("bad domain name", errno.EINVAL)
        name = raw.decode("utf-8", "replace") or None
        if domid == 0:
            raise PlatformError("dom0 exists", errno.EINVAL)
        await self.create_domain(domid, name)
        return _ok()

    async def _domain_destroy(self, conn: _Connection, payload: bytes) -> Reply:
        self._require_priv(conn)
        (domid,) = _unpack(proto.U32, payload)
        if domid == 0:
            raise PlatformError("dom0 cannot be destroyed", errno.EPERM)
        await self.destroy_domain(domid)
        return _ok()

    def _stats(self, conn: _Connection, payload: bytes) -> Reply:
        (domid,) = _unpack(proto.U32, payload)
        if domid != conn.handle.domain.domid:
            self._require_priv(conn)
        s = self.hv.stats(domid)
        watches = self.xenstored.watch_count(domid) if self.xenstored is not None else 0
        # what the domain's processes hold: the xenstore ring is the domain's own
        x = ring_holdings(self.hv, domid)
        if domid == 0 and self._dom0_platform is not None:
            x["handles"] += 2  # the embedded xenstored's own grant and event handles
        fields = (s.grants - x["grants"], s.grants_revoking, s.mappings - x["mappings"],
                  s.ports - x["ports"], s.shares - x["shares"], s.handles - x["handles"],
                  watches)
        return _ok(proto.STATS_REPLY.pack(*fields))

    def _fault(self, conn: _Connection, payload: bytes) -> Reply:
        self._require_priv(conn)
        kind, domid, ref, arg = _unpack(proto.U32x4, payload)
        self.hv.fault(kind, domid, ref, arg)
        return _ok()


def _domain_flags(d: Domain) -> int:
    """DOMAIN_LIST / DOMAIN_INFO flags of a live domain."""
    flags = proto.DOMFLAG_RUNNING | (proto.DOMFLAG_PRIVILEGED if d.privileged else 0)
    flags |= proto.DOMFLAG_DYING if d.dying else 0
    flags |= proto.DOMFLAG_SHUTDOWN if d.shutdown_reason is not None else 0
    return flags


def _raise_fd_limit() -> None:
    """Every share holds a memfd in the daemon: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_daemon(
    rundir: str | os.PathLike[str],
    domains: dict[int, str] | None = None,
    *,
    max_grants: int = 4096,
    max_ports: int = 1024,
    max_fds: int = 4096,
    ready: Callable[[LoopbackDaemon], None] | None = None,
    quotas: Any = None,
    xenstored: str = OURS,
) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT, then shut down cleanly.

    ``max_fds`` bounds the descriptors the daemon holds for one unprivileged domain;
    ``xenstored`` names dom0's xenstored (:mod:`~xenpv.platforms.loopback.xsd`)."""
    _raise_fd_limit()
    daemon = LoopbackDaemon(
        rundir, max_grants=max_grants, max_ports=max_ports, max_fds=max_fds, quotas=quotas,
        xenstored=xenstored,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    try:
        await daemon.start(domains)
        if ready is not None:
            ready(daemon)
        await daemon.serve_forever()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await daemon.close()

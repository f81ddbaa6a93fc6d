"""The loopback platform across processes: a domain process talking to the daemon.

Theory of operation
-------------------
Each handle (grant table, event channels) is one SOCK_SEQPACKET connection to
``RUNDIR/dom<N>/control``; the socket is the process's identity as domain N.  Requests
are sent one at a time and each waits for its reply with a timeout, so a dead daemon
gives :class:`~xenpv.platforms.base.PlatformGone` (or ``ETIMEDOUT``) and never a hang.
Descriptors arrive as SCM_RIGHTS; the client maps them (read-only descriptors for
read-only grants) and closes them, so the process only ever holds memory granted to it.

Event notification takes the fast path of docs/loopback-protocol.md §4.8: the outbox (the
remote inbox eventfd) is cached with the port's generation; the daemon's generation page
is mapped read-only and checked before each direct write, and the daemon is asked again
only when the channel's remote end changed.

If this process dies, the daemon sees the connections close and releases everything
they held: mappings (their unmap notifications fire), shares, ports.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    BasePlatform,
    GrantCopy,
    GrantInUse,
    GrantPtr,
    GuestXenstoreRing,
    LocalPtr,
    MapError,
    MappedGrants,
    NoSuchDomain,
    PlatformGone,
    PortError,
    ResourceExhausted,
    SharedPages,
    UnmapNotify,
    copy_pieces_as_segments,
)
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.env import ENV_SOCKET, ENV_XENSTORED_PATH
from xenpv.platforms.loopback.events import EpollEvents
from xenpv.platforms.loopback.gntcopy import encode_pieces
from xenpv.platforms.loopback.inprocess import _ring_release, notify_args, with_notify
from xenpv.platforms.loopback.memory import (
    PAGE_SIZE,
    MappedRegion,
    Region,
    SharedRegion,
    buffer_address,
    owned_run,
)
from xenpv.platforms.loopback.proto import Op

_ONE = (1).to_bytes(8, "little")
DEFAULT_TIMEOUT = 30.0

__all__ = [
    "ENV_SOCKET",
    "ClientEvents",
    "ClientGrantTable",
    "ClientPlatform",
    "ControlConnection",
]


def _error(op: int, status: int, payload: bytes) -> PlatformError:
    err = -status
    text = f"{Op(op).name if op in Op._value2member_map_ else op}: {os.strerror(err)}"
    if op in (Op.GNT_MAP, Op.FOREIGN_MAP) and len(payload) == proto.MAP_FAIL.size:
        index, gntst = proto.MAP_FAIL.unpack(payload)
        return MapError(f"{text} (ref #{index}, GNTST {gntst})", err, index, gntst)
    if err == errno.ENOSPC:
        return ResourceExhausted(text)
    if err == errno.EBUSY and op == Op.GNT_END:
        return GrantInUse(text)
    if err == errno.ESRCH:
        return NoSuchDomain(text)
    if op in (Op.EVT_BIND_INTERDOMAIN, Op.EVT_UNBIND, Op.EVT_NOTIFY, Op.EVT_RESTRICT):
        return PortError(text, err)
    return PlatformError(text, err)


class ControlConnection:
    """One control connection (one handle) to the daemon, acting as one domain."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._seq = 0
        self._pid = os.getpid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise PlatformGone(f"no loopback daemon at {self.path}: {exc}") from exc
        except OSError:
            sock.close()
            raise
        # the kernel keeps the timeout (SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket):
        # Python's own timeout would poll() before every send and every receive
        sock.settimeout(None)
        whole = int(timeout)
        timeval = struct.pack("ll", whole, max(int((timeout - whole) * 1e6), 0 if whole else 1))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._sock: socket.socket | None = sock
        reply, fds = self.call(Op.HELLO, proto.U32.pack(proto.VERSION))
        _v, self.domid, priv, self.max_grants, self.max_ports, _ps = proto.HELLO_REPLY.unpack(reply)
        self.privileged = bool(priv)
        self.gen_fd = fds[0] if fds else -1
        for fd in fds[1:]:
            os.close(fd)

    @property
    def closed(self) -> bool:
        """True once closed (or the daemon went away)."""
        return self._sock is None

    def call(self, op: int, payload: bytes = b"") -> tuple[bytes, list[int]]:
        """Send one request; return ``(payload, fds)`` or raise the mapped error."""
        if os.getpid() != self._pid:
            # a forked child would interleave its requests with the parent's on one socket
            raise LocalError("this control connection belongs to the parent process")
        with self._lock:
            sock = self._sock
            if sock is None:
                raise PlatformGone(f"control connection to {self.path} is closed")
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            msg = proto.encode_request(op, self._seq, payload)
            if len(msg) > proto.MAX_MESSAGE:
                raise LocalError(f"request of {len(msg)} bytes exceeds MAX_MESSAGE")
            try:
                sock.sendall(msg)
                data, anc, flags, _ = sock.recvmsg(proto.MAX_MESSAGE, proto.CMSG_SPACE)
            except (TimeoutError, BlockingIOError) as exc:  # the kernel's timeout: EAGAIN
                self._drop()
                raise PlatformError(
                    f"loopback daemon did not answer within {self.timeout} s", errno.ETIMEDOUT
                ) from exc
            except OSError as exc:
                self._drop()
                raise PlatformGone(f"loopback daemon connection lost: {exc}") from exc
            fds = proto.fds_from_ancdata(anc)
            if not data:
                self._drop()
                for fd in fds:
                    os.close(fd)
                raise PlatformGone("loopback daemon closed the connection")
            try:
                rop, rseq, status, out = proto.decode_reply(data)
                if flags & proto.TRUNCATED or (rop, rseq) != (
                    op,
                    self._seq,
                ):
                    raise proto.ProtocolViolation("reply does not match the request")
            except proto.ProtocolViolation as exc:
                for fd in fds:
                    os.close(fd)
                self._drop()
                raise PlatformGone(f"garbled reply from the loopback daemon: {exc}") from exc
        if status < 0:
            for fd in fds:
                os.close(fd)
            raise _error(op, status, out)
        return out, fds

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the connection: the daemon releases everything held through it."""
        with self._lock:
            self._drop()
        if self.gen_fd >= 0:
            os.close(self.gen_fd)
            self.gen_fd = -1


def _socket_from_env(path: str | os.PathLike[str] | None) -> str:
    if path is not None:
        return str(path)
    env = os.environ.get(ENV_SOCKET)
    if not env:
        raise LocalError(f"no control socket given and ${ENV_SOCKET} is not set")
    return env


class _OnConnection:
    """A handle that is one control connection: its domain and the connection itself."""

    _conn: ControlConnection

    @property
    def domid(self) -> int:
        """The domain this handle acts as."""
        return self._conn.domid

    @property
    def connection(self) -> ControlConnection:
        """The underlying control connection (accounting queries, faults)."""
        return self._conn


class ClientGrantTable(_OnConnection):
    """:class:`~xenpv.platforms.base.GrantTable` over a daemon connection."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._conn = ControlConnection(_socket_from_env(path), timeout=timeout)
        self._live: dict[int, SharedRegion | MappedRegion] = {}
        #: this handle's own pages (shares, frames) a grant copy may name instead of
        #: sending their bytes: (start address, end address, handle id, one memfd per page)
        self._own: list[tuple[int, int, int, bool]] = []
        self._own_gen = 0  # bumped when _own changes (copy plans re-encode)
        #: encodings of segments that carry no bytes (a grant copied into or out of own
        #: pages), by segment object: a driver that builds the same segments again and
        #: again (a net backend's staged copies) pays for each encoding once.  Valid for
        #: ``_named_gen`` (= ``_own_gen``), bounded by :data:`NAMED_KEPT`.
        self._named: dict[int, tuple[GrantCopy, bytes]] = {}
        self._named_gen = 0
        #: the last destination of copy_pieces: (buffer, _own_gen, what _dest_run said)
        self._pieces_dest: tuple[Any, int, tuple[int, int, int, bool] | None] | None = None

    def grant(self, domid: int, count: int = 1, *, writable: bool = True,
              notify: UnmapNotify | None = None) -> SharedRegion:
        """Allocate, map and grant ``count`` zeroed pages to ``domid``, with ``notify``
        attached if given."""
        flags = proto.SHARE_WRITABLE if writable else 0
        run = self._share(Op.GNT_SHARE, proto.SHARE_REQ.pack(domid, flags, count), domid,
                          writable)
        return with_notify(self, run, notify)

    def grant_reserved(self, ref: int, domid: int, *, writable: bool = True) -> SharedRegion:
        """Share one zeroed page at reserved ref 0 (console) or 1 (xenstore) with ``domid``."""
        flags = proto.SHARE_WRITABLE if writable else 0
        req = proto.SHARE_RESERVED_REQ.pack(ref, domid, flags)
        return self._share(Op.GNT_SHARE_RESERVED, req, domid, writable)

    def _share(
        self, op: int, req: bytes, domid: int, writable: bool, *, per_page: bool = False
    ) -> SharedRegion:
        """Map what GNT_SHARE / FRAME_ALLOC sent: one memfd of ``n`` pages, or (guest
        frames, ``per_page``) one one-page memfd per frame."""
        out, fds = self._conn.call(op, req)
        handle_id, n = proto.U32x2.unpack_from(out)
        refs = struct.unpack_from(f"<{n}I", out, 8)
        if len(fds) != (n if per_page else 1):
            for fd in fds:
                os.close(fd)
            self._conn.call(Op.GNT_UNMAP, proto.U32.pack(handle_id))
            raise PlatformGone(f"{Op(op).name}: {len(fds)} descriptors for {n} pages")
        pages = [(fd, 0) for fd in fds] if per_page else [(fds[0], i) for i in range(n)]
        region = self._place(handle_id, fds, lambda: Region(pages, writable=True))
        run = SharedRegion(refs, domid, region, handle_id, writable)
        self._live[handle_id] = run
        self._add_own(run, per_page)
        return run

    def _add_own(self, run: SharedRegion, per_page: bool) -> None:
        start = run.region.address
        self._own.append((start, start + run.region.length, run.handle_id, per_page))
        self._own_gen += 1

    def _drop_own(self, handle_id: int) -> None:
        self._own = [o for o in self._own if o[2] != handle_id]
        self._own_gen += 1

    def own_side(self, p: LocalPtr, length: int, *, dest: bool = False,
                 memo: dict[int, tuple[Any, ...]] | None = None) -> tuple[int, int] | None:
        """``(share handle id, byte offset)`` if the ``length`` bytes at ``p`` lie in pages
        this handle shared or allocated (one memfd's run: within one page of guest
        frames), so a grant copy can name them instead of carrying their bytes; None for
        any other buffer (and for a side the daemon would refuse as it is: out of the
        buffer, or a read-only buffer as a destination).  ``memo`` keeps what was learnt
        of each buffer object across the segments of one copy."""
        if not self._own:
            return None
        key = id(p.buffer)
        known = memo.get(key) if memo is not None else None
        if known is None or known[0] is not p.buffer:
            known = self._learn(p.buffer)
            if memo is not None:
                memo[key] = known
        _buf, base, size, readonly, run = known
        if base < 0 or (dest and readonly):
            return None
        if p.offset < 0 or length <= 0 or p.offset + length > size:
            return None
        addr = base + p.offset
        if run is None or not run[0] <= addr or addr + length > run[1]:  # look it up
            run = next((o for o in self._own if o[0] <= addr and addr + length <= o[1]), None)
            if run is None:
                return None
        start, _end, handle_id, per_page = run
        off = addr - start
        if per_page and off // PAGE_SIZE != (off + length - 1) // PAGE_SIZE:
            return None
        if off // PAGE_SIZE > 0xFFFF:
            return None
        return handle_id, off

    def _learn(self, buffer: Any) -> tuple[Any, ...]:
        """``(buffer, address or -1, length, read-only, own run holding its first byte)``."""
        try:
            view = memoryview(buffer).cast("B")
        except (TypeError, ValueError):
            return (buffer, -1, 0, True, None)
        addr = buffer_address(view)
        if addr is None:
            return (buffer, -1, 0, True, None)
        run = next((o for o in self._own if o[0] <= addr < o[1]), None)
        return (buffer, addr, len(view), view.readonly, run)

    def _place(self, handle_id: int, fds: list[int], build: Callable[[], Region]) -> Region:
        """Map what the daemon sent, close its descriptors; undo the share/map on failure."""
        try:
            return build()
        except BaseException:
            self._conn.call(Op.GNT_UNMAP, proto.U32.pack(handle_id))
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def end_access(self, pages: SharedPages) -> None:
        """End every grant of ``pages`` (GrantInUse: nothing ended) and unmap locally."""
        run = owned_run(pages, self._live)
        refs = run.refs
        try:
            self._conn.call(
                Op.GNT_END, proto.U32x2.pack(0, len(refs)) + struct.pack(f"<{len(refs)}I", *refs)
            )
        except GrantInUse as exc:
            raise GrantInUse(str(exc), refs) from None
        del self._live[run.handle_id]
        self._drop_own(run.handle_id)
        run.region.release()

    def set_unmap_notify(self, obj: SharedPages | MappedGrants, notify: UnmapNotify) -> None:
        """Attach (or replace) the unmap notification of a share or mapping."""
        run = owned_run(obj, self._live)
        offset, action, port = notify_args(notify)
        self._conn.call(Op.GNT_SET_NOTIFY, proto.U32x4.pack(run.handle_id, offset, port, action))

    def map(
        self,
        domid: int,
        refs: Sequence[int],
        *,
        writable: bool = True,
        notify: UnmapNotify | None = None,
    ) -> MappedRegion:
        """Map ``refs`` of ``domid`` contiguously; all or nothing."""
        req = proto.U32x2.pack(proto.MAP_WRITABLE if writable else 0, len(refs)) + b"".join(
            proto.U32x2.pack(domid, r) for r in refs
        )
        run = self._mapped(Op.GNT_MAP, req, refs, domid, writable)
        if notify is not None:
            try:
                self.set_unmap_notify(run, notify)
            except BaseException:
                self.unmap(run)
                raise
        return run

    def alloc_frames(self, count: int) -> SharedRegion:
        """``count`` zeroed guest frames of this domain (``refs`` are the gfns) that dom0
        may map with :meth:`foreign_map`; release with :meth:`free_frames`.  One memfd per
        frame, so ``count`` is at most ``proto.MAX_FDS`` (250)."""
        return self._share(
            Op.FRAME_ALLOC, proto.U32.pack(count), self.domid, True, per_page=True
        )

    def free_frames(self, frames: SharedPages) -> None:
        """Give the frames back (deferred while dom0 still maps one) and unmap locally."""
        run = owned_run(frames, self._live)
        del self._live[run.handle_id]
        self._drop_own(run.handle_id)
        run.region.release()
        self._conn.call(Op.GNT_UNMAP, proto.U32.pack(run.handle_id))

    def grant_frame(self, gfn: int, domid: int, *, ref: int | None = None) -> SharedRegion:
        """Grant this domain's frame ``gfn`` to ``domid`` (writable) at a free ref or at
        reserved ref ``ref``; the result maps the same page (release with
        :meth:`end_access`; the frame stays)."""
        req = proto.GRANT_FRAME_REQ.pack(
            gfn, proto.ANY_REF if ref is None else ref, domid, proto.SHARE_WRITABLE
        )
        out, fds = self._conn.call(Op.GNT_GRANT_FRAME, req)
        handle_id, granted, page = proto.U32x3.unpack_from(out)
        region = self._place(handle_id, fds, lambda: Region([(fds[0], page)], writable=True))
        run = SharedRegion((granted,), domid, region, handle_id, True)
        self._live[handle_id] = run
        self._add_own(run, True)
        return run

    def foreign_map(
        self, domid: int, gfns: Sequence[int], *, writable: bool = True
    ) -> MappedRegion:
        """``xenforeignmemory_map`` (dom0 only): map guest frames of ``domid``.

        Each frame arrives as its own descriptor, so one call maps at most
        ``proto.MAX_FDS`` (250) frames (``E2BIG`` beyond: split the request)."""
        flags = proto.MAP_WRITABLE if writable else 0
        req = proto.U32x3.pack(domid, flags, len(gfns)) + struct.pack(f"<{len(gfns)}I", *gfns)
        return self._mapped(Op.FOREIGN_MAP, req, gfns, domid, writable)

    def _mapped(
        self, op: int, req: bytes, refs: Sequence[int], domid: int, writable: bool
    ) -> MappedRegion:
        out, fds = self._conn.call(op, req)
        handle_id, count, _nfds = proto.U32x3.unpack_from(out)
        table = struct.unpack_from(f"<{2 * count}I", out, proto.U32x3.size)
        pages = [(fds[table[2 * i]], table[2 * i + 1]) for i in range(count)]
        region = self._place(handle_id, fds, lambda: Region(pages, writable=writable))
        run = MappedRegion(refs, domid, region, handle_id, writable)
        self._live[handle_id] = run
        return run

    def unmap(self, mapping: MappedGrants) -> None:
        """Unmap; the unmap notification fires."""
        run = owned_run(mapping, self._live)
        del self._live[run.handle_id]
        run.region.release()
        self._conn.call(Op.GNT_UNMAP, proto.U32.pack(run.handle_id))

    def copy(self, segments: Sequence[GrantCopy]) -> list[int]:
        """Grant copy done by the daemon; one ``GNTST_*`` per segment.  A local side in
        pages of this handle's own shares or frames travels as (share, offset), any other
        as bytes over the socket."""
        return _ClientCopyPlan(self, segments)()

    def copy_pieces(self, domid: int, pieces: Any, count: int, dest: Any) -> Sequence[int]:
        """:meth:`~xenpv.platforms.base.PieceCopies.copy_pieces`: into this handle's own
        pages (shares, frames) the request names them (encoded in one pass, compiled
        where built) and no bytes cross the socket; into any other buffer as
        :meth:`copy` segments."""
        if not 0 <= domid <= 0xFFFF:
            raise LocalError(f"copy pieces: domain id {domid} out of range")
        named = self._pieces_dest
        if named is None or named[0] is not dest or named[1] != self._own_gen:
            named = self._pieces_dest = (dest, self._own_gen, self._dest_run(dest))
        run = named[2]
        head = None
        if run is not None and count:
            handle_id, base, size, per_page = run
            try:
                head = encode_pieces(pieces, count, domid, handle_id, base, size, per_page)
            except ValueError as exc:
                raise LocalError(f"copy pieces: {exc}") from None
        if head is None:
            return copy_pieces_as_segments(self, domid, pieces, count, dest)
        out, fds = self._conn.call(Op.GNT_COPY, head)
        for fd in fds:
            os.close(fd)
        got, _ = proto.U32x2.unpack_from(out)
        if got != count or len(out) < 8 + 4 * count:
            raise PlatformGone(f"GNT_COPY answered {got} statuses for {count} pieces")
        return memoryview(out)[8:8 + 4 * count].cast("i")

    def _dest_run(self, dest: Any) -> tuple[int, int, int, bool] | None:
        """(share handle id, offset of ``dest`` in it, its size, one page per frame) if
        ``dest`` is a writable buffer lying in one of this handle's own runs, else None."""
        _buf, addr, size, readonly, _run = self._learn(dest)
        if addr < 0 or readonly:
            return None
        for start, end, handle_id, per_page in self._own:
            if start <= addr and addr + size <= end:
                return handle_id, addr - start, size, per_page
        return None

    def prepare_copy(self, segments: Sequence[GrantCopy]) -> Callable[[], list[int]]:
        """A reusable copy of ``segments``: the request layout is encoded once (again
        when this handle's own pages change; local source bytes are read at each run)."""
        return _ClientCopyPlan(self, segments)

    def stats(self, domid: int | None = None) -> tuple[int, ...]:
        """STATS of ``domid`` (default: self): grants, revoking, mappings, ports, shares,
        handles, xenstore watches."""
        out, _ = self._conn.call(Op.STATS, proto.U32.pack(self.domid if domid is None else domid))
        return tuple(proto.STATS_REPLY.unpack(out))

    def close(self) -> None:
        """Release everything (the daemon does it when the connection closes)."""
        for run in self._live.values():
            run.region.release()
        self._live.clear()
        self._own = []
        self._own_gen += 1
        self._conn.close()


#: segment encodings a grant table keeps (see ``ClientGrantTable._named``)
NAMED_KEPT = 16384
_SOURCE_NAMED = proto.GNTCOPY_source_gref | proto.GNTCOPY_source_own
_DEST_NAMED = proto.GNTCOPY_dest_gref | proto.GNTCOPY_dest_own


class _ClientCopyPlan:
    """GNT_COPY request for a fixed list of segments (docs/loopback-protocol.md §4.7).

    The request layout is encoded once (again when the table's own pages changed); a
    local side in the table's own pages is named (share, offset) and carries no bytes;
    other local destinations that follow each other in one buffer are filled with one
    slice assignment when all their segments succeeded."""

    def __init__(self, table: ClientGrantTable, segments: Sequence[GrantCopy]) -> None:
        self._table = table
        self._conn = table.connection
        self._segments = tuple(segments)
        self._gen = -1
        self._head = b""
        self._sent: list[GrantCopy] = []  # segments whose local source bytes are sent
        # runs of local destinations: [buffer, offset, length, first segment, end segment]
        self._runs: list[list[Any]] = []
        self._encode()

    def _encode(self) -> None:
        table = self._table
        head = [proto.U32x2.pack(len(self._segments), 0)]
        memo: dict[int, tuple[Any, ...]] = {}
        self._sent = []
        self._runs = []
        named = table._named
        if table._named_gen != table._own_gen:
            named.clear()
            table._named_gen = table._own_gen
        for i, s in enumerate(self._segments):
            known = named.get(id(s))
            if known is not None and known[0] is s:
                head.append(known[1])
                continue
            flags = 0
            sref = sdom = soff = dref = ddom = doff = 0
            if isinstance(s.source, GrantPtr):
                flags |= proto.GNTCOPY_source_gref
                sref, sdom, soff = s.source.ref, s.source.domid, s.source.offset
            elif (own := table.own_side(s.source, s.length, memo=memo)) is not None:
                flags |= proto.GNTCOPY_source_own
                sref, sdom, soff = own[0], own[1] // PAGE_SIZE, own[1] % PAGE_SIZE
            else:
                self._sent.append(s)
            if isinstance(s.dest, GrantPtr):
                flags |= proto.GNTCOPY_dest_gref
                dref, ddom, doff = s.dest.ref, s.dest.domid, s.dest.offset
            elif (own := table.own_side(s.dest, s.length, dest=True, memo=memo)) is not None:
                flags |= proto.GNTCOPY_dest_own
                dref, ddom, doff = own[0], own[1] // PAGE_SIZE, own[1] % PAGE_SIZE
            else:
                last = self._runs[-1] if self._runs else None
                if (
                    last is not None
                    and last[0] is s.dest.buffer
                    and last[1] + last[2] == s.dest.offset
                    and last[4] == i
                ):
                    last[2] += s.length
                    last[4] = i + 1
                else:
                    self._runs.append([s.dest.buffer, s.dest.offset, s.length, i, i + 1])
            packed = proto.COPY_SEG.pack(sref, sdom, soff, dref, ddom, doff, s.length, flags, 0)
            head.append(packed)
            if flags & _SOURCE_NAMED and flags & _DEST_NAMED:  # no bytes: the same each time
                if len(named) >= NAMED_KEPT:
                    named.clear()
                named[id(s)] = (s, packed)
        self._head = b"".join(head)
        self._gen = table._own_gen

    def __call__(self) -> list[int]:
        if self._gen != self._table._own_gen:
            self._encode()
        data = [
            bytes(
                memoryview(s.source.buffer).cast("B")[s.source.offset : s.source.offset + s.length]
            )
            for s in self._sent
            if isinstance(s.source, LocalPtr)
        ]
        out, fds = self._conn.call(Op.GNT_COPY, self._head + b"".join(data))
        for fd in fds:
            os.close(fd)
        count, _ = proto.U32x2.unpack_from(out)
        status = list(struct.unpack_from(f"<{count}i", out, 8))
        view = memoryview(out)
        cursor = 8 + 4 * count  # dest data, in order of the local destinations
        for buffer, offset, length, first, end in self._runs:
            dst = memoryview(buffer).cast("B")
            if not any(status[first:end]):
                dst[offset : offset + length] = view[cursor : cursor + length]
                cursor += length
                continue
            for seg, st in zip(self._segments[first:end], status[first:end], strict=True):
                if st == 0:
                    o = seg.dest.offset
                    dst[o : o + seg.length] = view[cursor : cursor + seg.length]
                cursor += seg.length
        return status


class ClientEvents(_OnConnection, EpollEvents):
    """:class:`~xenpv.platforms.base.EventChannels` over a daemon connection."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        super().__init__()
        self._conn = ControlConnection(_socket_from_env(path), timeout=timeout)
        self._gen_mm: mmap.mmap | None = None
        self._gen: memoryview | None = None
        if self._conn.gen_fd >= 0:
            size = max(self._conn.max_ports * 4, 4096)
            self._gen_mm = mmap.mmap(self._conn.gen_fd, size, prot=mmap.PROT_READ)
            self._gen = memoryview(self._gen_mm).cast("I")
        self._outbox: dict[int, tuple[int, int]] = {}  # port -> (fd, gen)

    def alloc_unbound(self, remote_domid: int) -> int:
        """A new port that only ``remote_domid`` may bind."""
        out, fds = self._conn.call(Op.EVT_ALLOC_UNBOUND, proto.U32.pack(remote_domid))
        (port,) = proto.U32.unpack(out)
        self._register(port, fds[0])
        return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Bind to a port offered to us; the new port is pending."""
        out, fds = self._conn.call(
            Op.EVT_BIND_INTERDOMAIN, proto.U32x2.pack(remote_domid, remote_port)
        )
        port, gen = proto.U32x2.unpack(out)
        self._register(port, fds[0])
        self._outbox[port] = (fds[1], gen)
        return port

    def bind_virq(self, virq: int) -> int:
        """A port signalled when the virtual IRQ ``virq`` fires (only VIRQ_DOM_EXC, which
        reaches dom0: a domain shut down or died)."""
        out, fds = self._conn.call(Op.EVT_BIND_VIRQ, proto.U32.pack(virq))
        (port,) = proto.U32.unpack(out)
        self._register(port, fds[0])
        return port

    def notify(self, port: int) -> None:
        """Signal the remote end of ``port`` (direct eventfd write when the cache is valid)."""
        cached = self._outbox.get(port)
        gen = self._gen
        if cached is not None and gen is not None and gen[port] == cached[1]:
            try:
                os.write(cached[0], _ONE)
            except OSError:  # saturated by a hostile peer: it reads as pending anyway
                pass
            return
        self._check_port(port)
        self._drop_outbox(port)
        out, fds = self._conn.call(Op.EVT_NOTIFY, proto.U32.pack(port))
        gen, has = proto.U32x2.unpack(out)
        if has and fds:
            self._outbox[port] = (fds[0], gen)

    def _drop_outbox(self, port: int) -> None:
        cached = self._outbox.pop(port, None)
        if cached is not None:
            os.close(cached[0])

    def restrict(self, domid: int) -> None:
        """Only bind interdomain channels to ``domid`` from now on."""
        self._conn.call(Op.EVT_RESTRICT, proto.U32.pack(domid))

    def status(self, domid: int, port: int) -> tuple[int, int, int]:
        """EVTCHNOP_status: ``(state, remote_domid, remote_port)``."""
        out, _ = self._conn.call(Op.EVT_STATUS, proto.U32x2.pack(domid, port))
        return tuple(proto.U32x3.unpack(out))

    def _release_port(self, port: int) -> None:
        self._drop_outbox(port)
        if not self._conn.closed:
            try:
                self._conn.call(Op.EVT_UNBIND, proto.U32.pack(port))
            except PlatformGone:
                pass

    def _release_all(self) -> None:
        for port in list(self._outbox):
            self._drop_outbox(port)
        if self._gen is not None:
            self._gen.release()
            self._gen = None
        if self._gen_mm is not None:
            self._gen_mm.close()
            self._gen_mm = None
        self._conn.close()


class ClientPlatform(BasePlatform[ClientGrantTable, ClientEvents]):
    """:class:`~xenpv.platforms.base.Platform` of the domain whose control socket it uses."""

    def __init__(
        self,
        control: str | os.PathLike[str] | None = None,
        xenstore_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        path = _socket_from_env(control)
        grants = ClientGrantTable(path, timeout=timeout)
        try:
            events = ClientEvents(path, timeout=timeout)
        except BaseException:
            grants.close()
            raise
        if xenstore_path is None:
            sibling = Path(path).with_name("xenstore")
            xenstore_path = os.environ.get(ENV_XENSTORED_PATH) or (
                str(sibling) if sibling.exists() else None
            )
        super().__init__(grants, events, None if xenstore_path is None else str(xenstore_path))

    def xenstore_ring(self) -> GuestXenstoreRing:
        """Take over the xenstore page and port the domain builder made for this domain
        (the daemon's ``XS_RING``; ``EBUSY`` while another process has them)."""
        events = self.events
        out, fds = events._conn.call(Op.XS_RING)
        page_fd, inbox = fds
        port, gfn, page = proto.U32x3.unpack(out)
        try:
            events._register(port, inbox)
            region = Region([(page_fd, page)], writable=True)
        except BaseException:
            with contextlib.suppress(PlatformError, LocalError, KeyError):
                events.unbind(port)
            raise
        finally:
            os.close(page_fd)
        return GuestXenstoreRing(region.mem, port, gfn, _ring_release(region, events, port))

    @classmethod
    def for_domain(cls, rundir: str | os.PathLike[str], domid: int, **kw: Any) -> ClientPlatform:
        """The platform of domain ``domid`` of the daemon running in ``rundir``."""
        base = Path(rundir) / f"dom{domid}"
        return cls(base / "control", base / "xenstore", **kw)

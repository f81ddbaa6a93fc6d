"""The loopback daemon's GNT_COPY (docs/loopback-protocol.md §4.7): a request payload in,
the reply payload out, for one control connection (one hypervisor handle).

Two twins serve it, chosen by :func:`copy_engine`:

* :class:`PyCopyEngine`, the readable one: the request is parsed into
  :class:`~xenpv.platforms.base.GrantCopy` records (a grant side as a ``GrantPtr``, a side
  in the caller's own pages as a :class:`~xenpv.platforms.loopback.core.SharePtr`, a side
  whose bytes travel in the request or the reply as a ``LocalPtr``) and run by the
  hypervisor's :class:`~xenpv.platforms.loopback.core.CopyPlan`, the same rules as the
  in-process platform's copies;
* ``CopyEngine`` (``cython/gntcopy.pyx``), compiled: it parses the request in place,
  keeps the hypervisor's answer for each page named until a grant table changes
  (:attr:`~xenpv.platforms.loopback.core.Hypervisor.grant_gen`) and copies with memmove.
  It asks the hypervisor the same questions (``grant_page``, ``_share_window``), so the
  table rules have one implementation; tests compare the two engines on arbitrary
  requests, hostile ones included.

Both check every length before allocating anything (hostile-inputs R5, R11): the local
source bytes must be in the request and the local destination bytes fit one reply.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any, Protocol

from xenpv.compiled import compiled_attr
from xenpv.errors import PlatformError
from xenpv.platforms.base import COPY_PIECE, PAGE_SIZE, GrantCopy, GrantPtr, LocalPtr
from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.core import CopyPlan, Handle, Hypervisor, SharePtr

__all__ = ["CopyEngineLike", "PyCopyEngine", "copy_engine", "encode_pieces",
           "encode_pieces_reference"]

#: flags of a side whose bytes are not in the request/reply (a grant, or the caller's own pages)
_SOURCE_NOT_SENT = proto.GNTCOPY_source_gref | proto.GNTCOPY_source_own
_DEST_NOT_SENT = proto.GNTCOPY_dest_gref | proto.GNTCOPY_dest_own


class CopyEngineLike(Protocol):
    """What the daemon asks of a GNT_COPY engine."""

    def run(self, payload: bytes) -> bytearray:
        """The reply payload to the request ``payload`` (or :class:`PlatformError`)."""

    def answer(self, msg: Any, n: int) -> bytearray | None:
        """The whole reply message to the request message ``msg[:n]`` if it is a
        GNT_COPY request framed right, else None (see :meth:`PyCopyEngine.answer`)."""

    def serve(self, sock: socket.socket, rbuf: bytearray) -> int:
        """Receive one request into ``rbuf``, answering a GNT_COPY (see
        :meth:`PyCopyEngine.serve`)."""

    def release(self) -> None:
        """Drop every memory view held (the connection closes)."""

    @property
    def kept(self) -> int:
        """How many plans or pages are kept between requests (bounded)."""


def _named_side(flags: int, gref: int, own: int, ref: int, domid: int, offset: int
                ) -> GrantPtr | SharePtr | None:
    """The side a GNT_COPY segment names: a grant, a page of the caller's own share
    (``ref`` its handle id, ``domid`` the page in it), or None (both flags: the
    segment fails with ``GNTST_general_error``)."""
    if flags & gref and flags & own:
        return None
    if flags & gref:
        return GrantPtr(domid, ref, offset)
    if offset >= PAGE_SIZE:
        return SharePtr(ref, -1)  # out of the page: refused as bad_copy_arg
    return SharePtr(ref, domid * PAGE_SIZE + offset)


class PyCopyEngine:
    """The readable GNT_COPY: the request as a :class:`CopyPlan`.  The plan of the last
    fully successful request without local source bytes is kept, and reused while the
    same request comes again (it re-validates by itself when a grant table changed)."""

    def __init__(self, hv: Hypervisor, handle: Handle) -> None:
        self.hv = hv
        self.handle = handle
        # (request, plan, reply) of the last fully successful grant copy without local
        # source data (bounded: both fit one message)
        self._cache: tuple[bytes, CopyPlan, bytearray] | None = None

    @property
    def kept(self) -> int:
        """1 while a plan is kept, else 0."""
        return int(self._cache is not None)

    def release(self) -> None:
        """Drop the kept plan's views."""
        if self._cache is not None:
            self._cache[1].release()
            self._cache = None

    def run(self, payload: bytes) -> bytearray:
        """The reply payload to the GNT_COPY request ``payload``."""
        if len(payload) < proto.U32x2.size:
            raise PlatformError("request payload has the wrong size", errno.EINVAL)
        count, _pad = proto.U32x2.unpack_from(payload)
        base = proto.U32x2.size + count * proto.COPY_SEG.size
        if len(payload) < base:
            raise PlatformError("short grant-copy request", errno.EINVAL)
        cached = self._cache
        if cached is not None and len(payload) == base and cached[0] == payload:
            _, plan, reply = cached
            keep = True
        else:
            self.release()
            plan, reply, local_src = self._plan(payload, count, base)
            keep = not local_src
        try:
            status = plan()
        except BaseException:
            self._cache = None
            plan.release()
            raise
        proto.U32x2.pack_into(reply, 0, count, 0)
        struct.pack_into(f"<{count}i", reply, proto.U32x2.size, *status)
        if keep and not any(status):
            self._cache = (payload, plan, reply)
        else:  # nothing is kept for a request with local data or a failed segment
            self._cache = None
            for seg, st in zip(plan.segments, status, strict=True):
                if st and isinstance(seg.dest, LocalPtr):  # a reused reply: zero bytes
                    seg.dest.buffer[seg.dest.offset : seg.dest.offset + seg.length] = bytes(
                        seg.length
                    )
            plan.release()
        return reply

    def answer(self, msg: Any, n: int) -> bytearray | None:
        """The whole reply message (header and payload) to the request message
        ``msg[:n]`` when it is a GNT_COPY request framed right (its length field says
        the rest of the message): :meth:`run`'s reply, or a failure's ``-errno`` as the
        status and no payload, as the daemon's general path would send it.  None for any
        other message, which that path frames (and refuses if it is garbled)."""
        view = memoryview(msg).cast("B")
        if not proto.REQUEST.size <= n <= len(view):
            return None
        op, seq, length = proto.REQUEST.unpack_from(view)
        if op != proto.Op.GNT_COPY or length != n - proto.REQUEST.size:
            return None
        status, out = 0, bytearray()
        try:
            out = self.run(bytes(view[proto.REQUEST.size : n]))
        except PlatformError as exc:
            status = -(exc.errno or errno.EINVAL)
        return bytearray(proto.REPLY.pack(op, seq, status, len(out))) + out

    def serve(self, sock: socket.socket, rbuf: bytearray) -> int:
        """Receive one request message from ``sock`` (non-blocking) into ``rbuf`` and,
        when it is a GNT_COPY framed right, send its reply (:meth:`answer`): -1 then,
        and when nothing waits; 0 at the end of the stream (or an empty message); else
        the length of the message left in ``rbuf`` for the daemon's general path.
        Descriptors sent along are closed (clients never send any); a truncated
        message raises :class:`~xenpv.platforms.loopback.proto.ProtocolViolation`, a
        failed receive or send OSError."""
        try:
            n, anc, flags, _ = sock.recvmsg_into((rbuf,), proto.CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return -1
        for fd in proto.fds_from_ancdata(anc):
            os.close(fd)
        if flags & proto.TRUNCATED:
            raise proto.ProtocolViolation("oversized request")
        if n == 0:
            return 0
        out = self.answer(rbuf, n)
        if out is None:
            return n
        sock.send(out)
        return -1

    def _plan(self, payload: bytes, count: int, base: int) -> tuple[CopyPlan, bytearray, bool]:
        """Validate the peer's lengths, then build the plan and the one reply buffer.

        Every length is checked before anything is allocated: the source data must be in
        the request and the destination data must fit one reply, so a request can never
        make the daemon allocate more than a message (hostile-inputs R5, R11)."""
        raw = [
            proto.COPY_SEG.unpack_from(payload, proto.U32x2.size + i * proto.COPY_SEG.size)
            for i in range(count)
        ]
        src_total = sum(s[6] for s in raw if not s[7] & _SOURCE_NOT_SENT)
        dst_total = sum(s[6] for s in raw if not s[7] & _DEST_NOT_SENT)
        if src_total > len(payload) - base:
            raise PlatformError("grant copy: not enough source data", errno.EINVAL)
        head = proto.U32x2.size + 4 * count
        if proto.REPLY.size + head + dst_total > proto.MAX_MESSAGE:
            raise PlatformError("grant copy: the destination data exceeds a reply", errno.E2BIG)
        data = memoryview(payload)[base:]
        reply = bytearray(head + dst_total)
        dest = memoryview(reply)[head:]
        segs: list[GrantCopy] = []
        out_len = src_cursor = 0
        for sref, sdom, soff, dref, ddom, doff, length, flags, _ in raw:
            src: GrantPtr | LocalPtr | SharePtr | None
            dst: GrantPtr | LocalPtr | SharePtr | None
            if flags & _SOURCE_NOT_SENT:
                src = _named_side(flags, proto.GNTCOPY_source_gref, proto.GNTCOPY_source_own,
                                  sref, sdom, soff)
            else:
                src = LocalPtr(data, src_cursor)
                src_cursor += length
            if flags & _DEST_NOT_SENT:
                dst = _named_side(flags, proto.GNTCOPY_dest_gref, proto.GNTCOPY_dest_own,
                                  dref, ddom, doff)
            else:
                dst = LocalPtr(dest, out_len)
                out_len += length
            segs.append(GrantCopy(src, dst, length))  # type: ignore[arg-type]  # SharePtr: the hypervisor's own side type
        return self.hv.prepare_copy(self.handle, segs), reply, src_cursor > 0


def _compiled() -> Any:
    """The compiled engine class, or None (not built, or ``XENPV_PURE_PYTHON=1``)."""
    return compiled_attr("xenpv.platforms.loopback._gntcopy", "CopyEngine")


_COMPILED = _compiled()


def copy_engine(hv: Hypervisor, handle: Handle, *, compiled: bool | None = None
                ) -> CopyEngineLike:
    """The GNT_COPY engine of one connection: compiled where built (``compiled``: force
    one, for tests; True raises ImportError when it is not built)."""
    if compiled is None:
        compiled = _COMPILED is not None
    if not compiled:
        return PyCopyEngine(hv, handle)
    if _COMPILED is None:
        from xenpv.platforms.loopback import _gntcopy

        engine: CopyEngineLike = _gntcopy.CopyEngine(hv, handle, SharePtr)
        return engine
    engine = _COMPILED(hv, handle, SharePtr)
    return engine


def encode_pieces_reference(pieces: Any, count: int, domid: int, handle: int, base: int,
                            size: int, per_page: bool) -> bytes | None:
    """The client's GNT_COPY request (head and segments) copying ``count``
    :data:`~xenpv.platforms.base.COPY_PIECE` records of ``pieces`` from grants of
    ``domid`` into its own share ``handle``, whose destination buffer starts ``base``
    bytes into the share and holds ``size`` bytes; None where a piece cannot be named so
    (it crosses a page of a share of one page per frame, or its page index does not
    fit).  A piece crossing its grant's page or running past the buffer raises
    ValueError.  The readable twin of the compiled ``encode_pieces``."""
    view = memoryview(pieces).cast("B")
    if count < 0 or count * COPY_PIECE.size > len(view) or base < 0 or size < 0:
        raise ValueError("bad piece count or destination")
    if proto.U32x2.size + count * proto.COPY_SEG.size > proto.MAX_MESSAGE:
        raise ValueError("too many pieces for one request")
    out = [proto.U32x2.pack(count, 0)]
    flags = proto.GNTCOPY_source_gref | proto.GNTCOPY_dest_own
    for ref, offset, length, place in COPY_PIECE.iter_unpack(view[:count * COPY_PIECE.size]):
        if offset + length > PAGE_SIZE or place + length > size:
            raise ValueError("a copy piece out of bounds")
        at = base + place
        if per_page and length and at // PAGE_SIZE != (at + length - 1) // PAGE_SIZE:
            return None
        if at // PAGE_SIZE > 0xFFFF:
            return None
        out.append(proto.COPY_SEG.pack(ref, domid & 0xFFFF, offset, handle, at // PAGE_SIZE,
                                       at % PAGE_SIZE, length, flags, 0))
    return b"".join(out)


#: :func:`encode_pieces_reference`, compiled where built
encode_pieces: Any = compiled_attr("xenpv.platforms.loopback._gntcopy", "encode_pieces",
                                   encode_pieces_reference)

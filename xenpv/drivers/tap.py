"""A Linux TAP device carrying :class:`~xenpv.protocols.ethernet.NetFrame` s with their
offload metadata, optionally in another network namespace.

Theory of operation
-------------------
:meth:`TapDevice.open` opens ``/dev/net/tun`` and attaches it to (or creates) the TAP
interface ``name`` with ``TUNSETIFF`` (``IFF_TAP | IFF_NO_PI``, plus ``IFF_VNET_HDR``);
with ``netns`` (a name under ``/run/netns``, as ``ip netns add`` makes, or a path) the
ioctl runs in a short-lived thread that first joins that namespace (``setns``), so the
interface is created there while this process stays where it is.  With ``queues`` > 1
the device is multi-queue (``IFF_MULTI_QUEUE``): one fd per queue, all read, and a
frame written on the fd its flow hashes to.  With ``offload`` the
device is told (``TUNSETOFFLOAD``: ``TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6``) that we take
frames with blank checksums and TCP segmentation left undone, which is what lets the
kernel's stack hand one 64 KiB TCP frame instead of 45.

Every frame crosses the fd with a 10-byte ``virtio_net_hdr`` in front (``TUNSETVNETHDRSZ``
= 10; little-endian on the machines xenpv runs on): ``flags`` (``NEEDS_CSUM`` 1,
``DATA_VALID`` 2), ``gso_type`` (TCPv4 1, TCPv6 4), ``hdr_len``, ``gso_size``,
``csum_start``, ``csum_offset``.  :func:`to_vnet` and :func:`from_vnet` translate that to
and from the netif flags a ``NetFrame`` carries (``csum_blank``, ``data_validated``,
GSO type and size); a frame whose blank checksum or GSO cannot be located (not TCP/UDP
over IP) is refused, as is a GSO type netif cannot carry.  The checksum field of a blank
frame is set to the pseudo-header sum, the convention of a partial checksum the kernel
completes.

:meth:`TapDevice.recv_many` waits (asyncio) for the frames ready (each queue's fd read
until it is empty, up to a bound: one wake-up and one failed read per pass, not per frame);
:meth:`TapDevice.recv` takes one.  :class:`TapPump` is the hot path: one reader callback
per queue fd, registered once, reads that fd until it is empty and hands the frames on as
one list (a frontend sends them with one ring push) synchronously when they can be taken
at once — no future, task switch or reader (de)registration per wake-up; only a receiver
short of room pauses the reading (its fds unregistered) until it caught up.  :meth:`TapDevice.write` writes one
frame without blocking (a full device queue drops it, counted); the frame is copied once,
into the buffer written, and its headers are located once for both the checksum field and
the queue its flow hashes to (compiled: ``cython/vnethdr.pyx``, whose readable twin is
:func:`vnet_frame_reference`).  The interface is
left to the caller to configure (addresses, ``up``); closing the fd of a TAP created
here removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno as _errno
import fcntl
import os
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from xenpv.compiled import compiled_attr
from xenpv.errors import LocalError
from xenpv.protocols.ethernet import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    L4Info,
    NetFrame,
    flow_hash,
    flow_hash_of,
    l4_info,
    partial_checksum_field,
)

__all__ = ["READ_BATCH", "TapDevice", "TapPump", "frame_flow_hash", "from_vnet", "to_vnet",
           "vnet_frame_reference", "vnet_meta"]

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR = struct.Struct("<BBHHHH")
NEEDS_CSUM, DATA_VALID = 1, 2
_VNET_TCPV4, _VNET_TCPV6, _VNET_ECN = 1, 4, 0x80
_CLONE_NEWNET = 0x40000000
_MAX_FRAME = 0xFFFF + VNET_HDR.size
_GSO_KIND = {0: GSO_NONE, _VNET_TCPV4: GSO_TCPV4, _VNET_TCPV6: GSO_TCPV6}
_HDR_NONE = VNET_HDR.pack(0, 0, 0, 0, 0, 0)
_HDR_VALID = VNET_HDR.pack(DATA_VALID, 0, 0, 0, 0, 0)
#: Frames :meth:`TapDevice.recv_many` takes in one go at most (by default).
READ_BATCH = 64


def to_vnet(frame: NetFrame) -> bytes | bytearray | None:
    """``virtio_net_hdr`` + frame bytes for a TAP write; None if the metadata cannot be
    expressed (a blank checksum or GSO on something that is not TCP/UDP over IP)."""
    plain = not frame.csum_blank and frame.gso_type == GSO_NONE
    return _to_vnet(frame, None if plain else l4_info(frame.data))


def _to_vnet(frame: NetFrame, info: L4Info | None) -> bytes | bytearray | None:
    """:func:`to_vnet` with the headers already located (``info`` is only looked at for
    a blank checksum or GSO).  The frame is copied once, into the buffer written."""
    data = frame.data
    if not frame.csum_blank and frame.gso_type == GSO_NONE:
        return (_HDR_VALID if frame.data_validated else _HDR_NONE) + data
    if info is None:
        return None
    tcp = info.proto == 6
    gso, hdr_len = 0, 0
    if frame.gso_type != GSO_NONE:
        if not tcp or frame.gso_size <= 0:
            return None
        gso = _VNET_TCPV4 if frame.gso_type == GSO_TCPV4 else _VNET_TCPV6
        hdr_len = info.l4 + (data[info.l4 + 12] >> 4) * 4
    field = partial_checksum_field(data, info)
    if field is None:
        return None
    at, value = field
    h = VNET_HDR.size
    out = bytearray(h + len(data))
    VNET_HDR.pack_into(out, 0, NEEDS_CSUM, gso, hdr_len, frame.gso_size if gso else 0,
                       info.l4, 16 if tcp else 6)
    out[h:] = data
    out[h + at:h + at + 2] = value
    return out


def vnet_frame_reference(data: bytes, csum_blank: bool, data_validated: bool, gso_type: int,
                         gso_size: int, want_hash: bool) -> tuple[bytes | bytearray | None, int]:
    """(:func:`to_vnet` of the frame with these bytes and metadata, its flow hash or 0
    unless ``want_hash``), its headers located once: the readable twin of the compiled
    ``xenpv.drivers._vnethdr.vnet_frame`` (``cython/vnethdr.pyx``)."""
    plain = not csum_blank and gso_type == GSO_NONE
    info = l4_info(data) if not plain or want_hash else None
    frame = NetFrame(data, csum_blank, data_validated, gso_type, gso_size)
    return _to_vnet(frame, info), flow_hash_of(data, info) if want_hash else 0


def _compiled(name: str, twin: Any) -> Any:
    """``name`` of the compiled ``xenpv.drivers._vnethdr`` (``cython/vnethdr.pyx``), or
    its readable twin (not built, or ``XENPV_PURE_PYTHON=1``:
    :func:`xenpv.compiled.pure_python`)."""
    return compiled_attr("xenpv.drivers._vnethdr", name, twin)


def _compiled_vnet() -> Callable[[bytes, bool, bool, int, int, bool],
                                 tuple[bytes | bytearray | None, int]]:
    """The compiled header builder, or its twin :func:`vnet_frame_reference`."""
    return _compiled("vnet_frame", vnet_frame_reference)  # type: ignore[no-any-return]


def _compiled_flow_hash() -> Callable[[bytes], int]:
    """The compiled :func:`~xenpv.protocols.ethernet.flow_hash`, or that function."""
    return _compiled("flow_hash", flow_hash)  # type: ignore[no-any-return]


_VNET_FRAME = _compiled_vnet()
#: A frame's flow hash (:func:`~xenpv.protocols.ethernet.flow_hash`), compiled where built.
frame_flow_hash = _compiled_flow_hash()


def from_vnet(buf: bytes) -> NetFrame | None:
    """The frame a TAP read returned (header first); None for a GSO type netif cannot
    carry or a runt."""
    if len(buf) < VNET_HDR.size + 14:
        return None
    meta = vnet_meta(buf)
    if meta is None:
        return None
    return NetFrame(buf[VNET_HDR.size:], *meta)


def vnet_meta(hdr: bytes | bytearray | memoryview) -> tuple[bool, bool, int, int] | None:
    """(csum_blank, data_validated, GSO type, GSO size) of the frame behind the
    ``virtio_net_hdr`` a TAP read put first in ``hdr``; None for a GSO type netif cannot
    carry."""
    flags, gso, _hdr_len, gso_size, _cs, _co = VNET_HDR.unpack_from(hdr)
    kind = _GSO_KIND.get(gso & ~_VNET_ECN)
    if kind is None:
        return None
    return (bool(flags & NEEDS_CSUM), bool(flags & DATA_VALID), kind,
            gso_size if kind != GSO_NONE else 0)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else f"/run/netns/{netns}"


def _open_tun(name: str, flags: int, offload: int, netns: str | None, count: int) -> list[int]:
    """Open and attach ``count`` TAP fds (queues; in ``netns``'s thread if given)."""
    if netns is not None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        try:
            nsfd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalError(f"no network namespace {netns} ({_netns_path(netns)}: "
                             f"{exc.strerror})") from None
        try:
            if libc.setns(nsfd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise LocalError(f"cannot enter network namespace {netns}: {os.strerror(err)}")
        finally:
            os.close(nsfd)
    fds: list[int] = []
    try:
        for _ in range(count):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            if flags & IFF_VNET_HDR:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR.size))
                fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


@dataclass
class _Result:
    fds: list[int] | None = None
    error: BaseException | None = None


class TapDevice:
    """One TAP interface's fd; see the module docstring.  Made by :meth:`open`."""

    def __init__(self, fds: list[int], name: str, netns: str | None, offload: bool) -> None:
        """Wrap attached fds, one per queue (use :meth:`open`)."""
        self.fds = fds
        self.name = name
        self.netns = netns
        self.offload = offload
        self._next = 0
        self.stats = dict.fromkeys(("rx_frames", "rx_bytes", "rx_refused", "tx_frames",
                                    "tx_bytes", "tx_refused", "tx_dropped"), 0)

    @classmethod
    def open(cls, name: str, *, netns: str | None = None, offload: bool = True,
             queues: int = 1) -> TapDevice:
        """Attach to (or create) TAP ``name``, in network namespace ``netns`` if given,
        with ``queues`` fds (``IFF_MULTI_QUEUE`` when more than one: the kernel spreads
        its flows over them, frames written go to the fd of their flow); LocalError if
        that cannot be done (no ``/dev/net/tun``, no permission, …)."""
        if not name or len(name) > 15 or "/" in name:
            raise LocalError(f"bad interface name {name!r}")
        if not 1 <= queues <= 16:
            raise LocalError("a TAP takes 1..16 queues here")
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        off = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if offload else 0
        result = _Result()

        def attach() -> None:
            try:
                result.fds = _open_tun(name, flags, off, netns, queues)
            except BaseException as exc:
                result.error = exc

        if netns is None:
            attach()
        else:  # the namespace is joined by a thread of its own, which then ends
            t = threading.Thread(target=attach, name=f"tap-{name}")
            t.start()
            t.join()
        if result.error is not None:
            if isinstance(result.error, OSError):
                raise LocalError(f"cannot open TAP {name}: {result.error.strerror}") from None
            raise result.error
        assert result.fds is not None
        return cls(result.fds, name, netns, offload)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return not self.fds

    def read_ready(self, limit: int = READ_BATCH) -> list[NetFrame]:
        """The frames the kernel has ready now, at most ``limit`` reads' worth (frames
        netif cannot carry are skipped and counted); empty if none is ready.  Each
        queue's fd is read until it is empty, starting after the one the last call
        ended on, so one busy queue costs one failed read per call, not per frame."""
        fds = self.fds
        if not fds:
            raise LocalError(f"TAP {self.name} is closed")
        frames: list[NetFrame] = []
        count = len(fds)
        reads = 0
        for k in range(count):
            at = (self._next + k) % count
            reads += self._read_fd(fds[at], limit - reads, frames)
            if reads >= limit:  # the next call starts with the fd not drained
                self._next = at
                return frames
        self._next = (self._next + 1) % count
        return frames

    def read_fd(self, fd: int, limit: int = READ_BATCH) -> list[NetFrame]:
        """The frames ready now on one queue's fd ``fd``, read until it is empty or
        ``limit`` reads were made (frames netif cannot carry are skipped and counted)."""
        if not self.fds:
            raise LocalError(f"TAP {self.name} is closed")
        frames: list[NetFrame] = []
        self._read_fd(fd, limit, frames)
        return frames

    def _read_fd(self, fd: int, limit: int, frames: list[NetFrame]) -> int:
        """Read ``fd`` into ``frames`` until it is empty or ``limit`` reads were made;
        the reads made (a failed one not counted)."""
        reads = 0
        stats = self.stats
        while reads < limit:
            try:
                buf = os.read(fd, _MAX_FRAME)
            except BlockingIOError:
                break
            except OSError as exc:
                raise LocalError(f"TAP {self.name}: read failed: {exc.strerror}") from None
            reads += 1
            frame = from_vnet(buf)
            if frame is None:
                stats["rx_refused"] += 1
                continue
            stats["rx_frames"] += 1
            stats["rx_bytes"] += len(frame.data)
            frames.append(frame)
        return reads

    async def _readable(self) -> None:
        """Wait until one of the fds is readable."""
        loop = asyncio.get_running_loop()
        fds = self.fds
        ready: asyncio.Future[None] = loop.create_future()
        for fd in fds:
            loop.add_reader(fd, _set_done, ready)
        try:
            await ready
        finally:
            for fd in fds:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(fd)

    async def recv_many(self, limit: int = READ_BATCH) -> list[NetFrame]:
        """The frames ready (at most ``limit`` reads' worth, at least one frame), waiting
        for the first."""
        while True:
            frames = self.read_ready(limit)
            if frames:
                return frames
            await self._readable()

    async def recv(self) -> NetFrame:
        """The next frame from the kernel (frames netif cannot carry are skipped)."""
        return (await self.recv_many(1))[0]

    def write(self, frame: NetFrame) -> bool:
        """Hand one frame to the kernel without blocking; False if refused or dropped."""
        fds = self.fds
        data = frame.data
        count = len(fds)
        buf, hashed = _VNET_FRAME(data, frame.csum_blank, frame.data_validated,
                                  frame.gso_type, frame.gso_size, count > 1)
        if buf is None or not fds:
            self.stats["tx_refused"] += 1
            return False
        fd = fds[hashed % count] if count > 1 else fds[0]
        try:
            os.write(fd, buf)
        except OSError as exc:
            if exc.errno not in (_errno.EAGAIN, _errno.EIO, _errno.EINVAL):
                raise LocalError(f"TAP {self.name}: write failed: {exc.strerror}") from None
            self.stats["tx_dropped"] += 1  # queue full, link down, or refused by the kernel
            return False
        self.stats["tx_frames"] += 1
        self.stats["tx_bytes"] += len(data)
        return True

    def close(self) -> None:
        """Close the fds (idempotent); a TAP created by them goes away."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def info(self) -> dict[str, object]:
        """Name, namespace, offload and counters."""
        return {"name": self.name, "netns": self.netns, "offload": self.offload,
                "queues": len(self.fds), **self.stats}


class TapPump:
    """Reads a :class:`TapDevice` from persistent reader callbacks, one per queue fd
    (registered once, at :meth:`start`): when an fd is readable its frames are read
    (until it is empty, at most ``batch``) and handed to ``forward`` as one list, in
    order.  ``forward`` answers at once with a bool (False ends the pump) when it could
    take them all now; otherwise it returns an awaitable (of that bool), and the pump
    stops reading every fd until it completes — so the TAP is read no faster than
    ``forward`` takes frames, and only a ``forward`` short of room costs a task and
    re-registering the fds.  A subclass may read its own way by overriding
    :meth:`_drain`.  :meth:`close` stops it and closes the TAP."""

    def __init__(self, tap: TapDevice,
                 forward: Callable[[list[NetFrame]], bool | Awaitable[bool]], *,
                 batch: int = READ_BATCH) -> None:
        """Nothing runs before :meth:`start`."""
        if batch < 1:
            raise LocalError("a TAP pump reads at least one frame per pass")
        self.tap = tap
        self.forward = forward
        self.batch = batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._done = False

    def start(self) -> None:
        """Start reading in the running loop."""
        self._loop = asyncio.get_running_loop()
        self._done = False
        self._watch()

    def _watch(self) -> None:
        loop = self._loop
        if loop is None or self._done or self._watched or self.tap.closed:
            return
        for fd in self.tap.fds:
            loop.add_reader(fd, self._ready, fd)
            self._watched.append(fd)

    def _unwatch(self) -> None:
        loop, watched, self._watched = self._loop, self._watched, []
        if loop is None:
            return
        for fd in watched:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(fd)

    def _stop(self) -> None:
        self._done = True
        self._unwatch()

    def _ready(self, fd: int) -> None:
        if not self._watched:
            return  # a callback already queued when the pump paused or stopped
        try:
            result = self._drain(fd)
        except LocalError:
            self._stop()  # closed underneath
            return
        if result is True:
            return
        if result is False:
            self._stop()
            return
        self._unwatch()  # short of room: read nothing more until forward took these
        assert self._loop is not None
        self._task = self._loop.create_task(self._resume(result))

    def _drain(self, fd: int) -> bool | Awaitable[bool]:
        """Read ``fd``'s ready frames and forward them (True: nothing was ready)."""
        frames = self.tap.read_fd(fd, self.batch)
        if not frames:
            return True
        return self.forward(frames)

    async def _resume(self, pending: Awaitable[bool]) -> None:
        try:
            going = await pending
        except LocalError:
            going = False
        if going:
            self._watch()
        else:
            self._stop()

    async def close(self) -> None:
        """Stop reading and close the TAP (idempotent)."""
        self._stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.tap.close()

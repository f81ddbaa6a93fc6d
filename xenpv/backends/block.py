"""Block backend: serves a raw image file or a block device to a blkif frontend.

Theory of operation
-------------------
:class:`BlockBackendDriver` is a :class:`~xenpv.xenbus.driver.BackendDriver` for one
``backend/vbd/<fe>/<devid>`` directory (xen-protocols.md §5.3, §6):

* before InitWait (``publish_features``) it checks the image named by its own ``params``
  (or the constructor's ``image_path``) and advertises ``max-ring-page-order``,
  ``multi-queue-max-queues``, ``feature-max-indirect-segments``, ``feature-persistent``,
  ``feature-flush-cache``, ``feature-barrier`` and ``feature-discard`` (with
  ``discard-granularity``/``-alignment``/``-secure``) as its :class:`BlockConfig` allows
  (a read-only device advertises no write-side feature);
* on connect it reads the frontend's ``protocol`` (the ABI of the slots), its
  ``feature-persistent`` and its ring keys (strictly, bounds first:
  :func:`~xenpv.drivers.ringchannel.read_ring_keys`), maps every queue's ring and binds
  its port (:class:`~xenpv.drivers.ringchannel.BackChannel`), starts one
  :class:`~xenpv.drivers.ringservice.RingService` per queue and publishes ``sectors``
  (512-byte units, over whole logical sectors), ``sector-size``, ``physical-sector-size``
  (configured, or a block device's own, ``BLKSSZGET``/``BLKPBSZGET``) and ``info``;
* with a stats directory it keeps the queues' live state in a file there for ``xenpv
  block info`` (:func:`read_live_stats`), rewritten at a bounded rate;
* online resize: the image size is polled (``resize_poll`` seconds); a change rewrites
  ``sectors`` and, in the same transaction, ``state`` (Connected again), which is what
  makes a frontend look at ``sectors`` again.

Requests (:class:`BlockRequests`, the sans-IO handler of the services): every slot is
copied once (the service's batch copy, R1) and validated from the copy: the plain reads
and writes that pass every check by one compiled pass over the batch
(:func:`~xenpv.protocols.blkif.scan_rw`), every other slot in full
(:func:`~xenpv.protocols.blkif.parse_request`,
:func:`~xenpv.protocols.blkif.validate_request` plus the indirect pages, themselves
copied once); a bad request is answered ``BLKIF_RSP_ERROR`` or ``BLKIF_RSP_EOPNOTSUPP``
and nothing else happens (no I/O, nothing mapped).  Grants are mapped for the request
only (writable for READ, read-only for WRITE, all or nothing, R9), or, with persistent
grants negotiated, kept mapped across requests up to ``max_persistent_grants`` (past that,
mapped per request).  Data moves directly between the image and the mapped grant pages
(no copy), by the engine of :mod:`xenpv.backends.blockio`: an io_uring that takes every
read and write of a ring pass in one system call (``engine="auto"`` where the kernel
allows it, or ``"io_uring"``), or ``os.preadv``/``os.pwritev`` inline in the ring pass or
in a thread pool; discards and flushes go to the thread pool.  Slow requests are served
concurrently and every answer goes out in completion order.

Durability: ``FLUSH_DISKCACHE`` waits for every request taken before it, then
``fdatasync``; only then is it answered.  ``WRITE_BARRIER`` does the same and also holds
back every request taken after it until it is answered.  ``DISCARD`` punches a hole
(``fallocate(PUNCH_HOLE|KEEP_SIZE)``); a file system that cannot answers EOPNOTSUPP.  A
secure one (offered as ``discard-secure``) first overwrites the data still allocated in
the range with zeros and syncs (:meth:`BlockImage.secure_discard`; ``BLKSECDISCARD`` on a
device).  With a logical sector size over 512 bytes a request not on whole logical
sectors (start, length, every segment) is answered ERROR.

Teardown (R13): the services stop taking requests, in-flight I/O is waited for (bounded)
before any mapping is released, then persistent mappings, rings and ports go.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno as _errno
import fcntl
import json
import logging
import os
import stat
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xenpv.backends.blockio import ENGINES, UringEngine, effective_engine
from xenpv.drivers.ringchannel import BackChannel, read_ring_keys
from xenpv.drivers.ringservice import RingService
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.platforms.base import MappedGrants, Platform
from xenpv.protocols import ProtocolError
from xenpv.protocols.blkif import (
    ABI,
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SECTOR_SHIFT,
    SEGMENT_DTYPE,
    VDISK_READONLY,
    AcceptedRW,
    BlkifRequestDiscard,
    BlkifRequestError,
    BlkifRequestIndirect,
    abi_from_protocol,
    indirect_pages,
    layouts,
    parse_request,
    scan_rw,
    validate_request,
)
from xenpv.protocols.layout import XEN_PAGE_SIZE
from xenpv.xenbus.driver import BackendDriver, PeerKeys
from xenpv.xenbus.watcher import BackendWatcher
from xenpv.xenstore.client import Transaction
from xenpv.xenstore.client import XenstoreClient as XenbusClient
from xenpv.xenstore.wire import XenstoreError

__all__ = [
    "DEFAULT_STATS_DIR",
    "BlockBackend",
    "BlockBackendDriver",
    "BlockConfig",
    "BlockImage",
    "BlockRequests",
    "PersistentGrants",
    "image_from_params",
    "live_stats_path",
    "read_live_stats",
    "response_packer",
]

log = logging.getLogger(__name__)

#: The most segments one request may carry (IOV_MAX bounds one preadv).
MAX_SEGMENTS_LIMIT = 1024
#: Linux blkback's default cap on persistent grants per queue.
DEFAULT_PERSISTENT_GRANTS = 1056
#: Seconds in-flight I/O may take to finish at teardown before mappings go regardless.
DRAIN_TIMEOUT = 10.0


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: linux/fs.h block device ioctls: _IO(0x12, 104), _IO(0x12, 123), _IO(0x12, 125).
_BLKSSZGET = 0x1268
_BLKPBSZGET = 0x127B
_BLKSECDISCARD = 0x127D
#: Bytes of zeros written per call when a secure discard overwrites a file's data.
_ZERO_CHUNK = 1 << 20
_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sector_size_ok(size: int, most: int = XEN_PAGE_SIZE) -> bool:
    return 512 <= size <= most and not size & (size - 1)


def _device_sizes(fd: int) -> tuple[int, int]:
    """A block device's logical and physical block sizes (``BLKSSZGET``, ``BLKPBSZGET``)."""
    logical = array.array("i", [0])
    physical = array.array("I", [0])
    fcntl.ioctl(fd, _BLKSSZGET, logical)
    fcntl.ioctl(fd, _BLKPBSZGET, physical)
    return int(logical[0]), int(physical[0])


@dataclass(frozen=True)
class BlockConfig:
    """What a block backend offers (host decisions, never taken from the frontend).

    ``engine``: ``"io_uring"`` (reads and writes through an io_uring per queue,
    discards and flushes in a pool of ``workers`` threads), ``"threads"`` (everything in
    the pool), ``"inline"`` (everything in the ring pass, fdatasync included) or
    ``"auto"``: io_uring where the kernel allows it, else reads and writes up to
    ``inline_max`` bytes inline and the rest in the pool (see
    :func:`xenpv.backends.blockio.effective_engine` and docs/block.md for the
    measurements).  ``direct``: open the image with ``O_DIRECT`` (no page cache).
    ``resize_poll``: seconds between image size checks while connected (0: never).

    ``sector_size``: the logical sector size published (``sector-size``); None takes the
    device's logical block size (``BLKSSZGET``), 512 for an image file.  A block device
    refuses one smaller than its own.  ``physical_sector_size``: None takes the device's
    (``BLKPBSZGET``), else the logical size.  ``discard_secure``: offer secure discard
    (``discard-secure=1``, see :func:`secure_discard`).
    """

    max_ring_order: int = 4
    max_queues: int = 4
    max_indirect_segments: int = 256
    persistent: bool = True
    max_persistent_grants: int = DEFAULT_PERSISTENT_GRANTS
    flush: bool = True
    barrier: bool = True
    discard: bool = True
    discard_secure: bool = False
    sector_size: int | None = None
    physical_sector_size: int | None = None
    engine: str = "auto"
    inline_max: int = 64 << 10
    workers: int = 8
    resize_poll: float = 1.0
    direct: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.max_ring_order <= 4:
            raise LocalError("max_ring_order must be 0..4")
        if not 1 <= self.max_queues <= 64:
            raise LocalError("max_queues must be 1..64")
        if not 0 <= self.max_indirect_segments <= min(MAX_SEGMENTS_LIMIT,
                                                        BLKIF_MAX_INDIRECT_SEGMENTS):
            raise LocalError(f"max_indirect_segments must be 0..{MAX_SEGMENTS_LIMIT}")
        if self.sector_size is not None and not _sector_size_ok(self.sector_size):
            raise LocalError("sector_size must be a power of two in 512..4096")
        if self.physical_sector_size is not None and (
                not _sector_size_ok(self.physical_sector_size, 1 << 20)
                or self.physical_sector_size < (self.sector_size or 512)):
            raise LocalError("physical_sector_size must be a power of two, at least the "
                             "sector size, at most 1 MiB")
        if self.engine not in ENGINES:
            raise LocalError(f"engine must be one of {', '.join(ENGINES)}")
        if self.workers < 1 or self.max_persistent_grants < 0:
            raise LocalError("workers must be positive, max_persistent_grants >= 0")


class BlockImage:
    """An open raw image file or block device: size, I/O, flush and hole punching.

    ``sector_size`` is the logical sector size served (None: a device's own logical block
    size, 512 for a file); ``physical_sector_size`` likewise (None: the device's, else
    the logical size).  The disk's size is the image's rounded down to whole logical
    sectors.  ``direct``: open with ``O_DIRECT`` (no page cache).
    """

    def __init__(self, path: str, *, readonly: bool = False, sector_size: int | None = None,
                 physical_sector_size: int | None = None, direct: bool = False) -> None:
        """Open ``path`` (read-only or read-write, with ``O_DIRECT`` if ``direct``);
        raises :class:`LocalError`."""
        self.path = path
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise LocalError(f"cannot open {path}: {exc.strerror}") from None
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            raise LocalError(f"{path} is not a regular file or block device")
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        logical, physical = 512, 512
        if self.is_block_device:
            try:
                logical, physical = _device_sizes(self.fd)
            except OSError as exc:
                self.close()
                raise LocalError(f"{path}: cannot read its block sizes: {exc.strerror}"
                                 ) from None
        if sector_size is not None and sector_size < logical:
            self.close()
            raise LocalError(f"{path}: sector size {sector_size} is below the device's "
                             f"logical block size {logical}")
        #: The logical sector size served (``sector-size``), bytes.
        self.sector_size = sector_size or logical
        #: ``physical-sector-size``, bytes (never below the logical size).
        self.physical_sector_size = max(physical_sector_size or physical, self.sector_size)
        #: Discard granularity: the file system's block size (a page for a device).
        self.discard_granularity = max(512, st.st_blksize if not self.is_block_device
                                       else XEN_PAGE_SIZE)
        self.discard_supported = True

    @property
    def size(self) -> int:
        """Bytes in the image now."""
        return os.lseek(self.fd, 0, os.SEEK_END)

    @property
    def sectors(self) -> int:
        """The disk's size now in 512-byte units (the unit of ``sectors`` and of the ring,
        whatever the sector size), over whole logical sectors only: a partial last
        logical sector is not exposed."""
        return (self.size // self.sector_size * self.sector_size) >> SECTOR_SHIFT

    def punch(self, offset: int, length: int) -> None:
        """Deallocate ``length`` bytes at ``offset`` (reads then return zeros)."""
        _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def secure_discard(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset`` so that the old data is gone, not just
        unreachable: a block device gets ``BLKSECDISCARD``; a file has the data still
        allocated in the range overwritten with zeros and made durable, then the range
        punched out (its blocks released) and that made durable too.  Raises
        :class:`OSError` (EOPNOTSUPP when the device or file system cannot)."""
        if self.is_block_device:
            fcntl.ioctl(self.fd, _BLKSECDISCARD, struct.pack("=QQ", offset, length))
            return
        zeros = bytes(min(_ZERO_CHUNK, length))
        for start, end in self._data_extents(offset, offset + length):
            while start < end:
                start += os.pwrite(self.fd, memoryview(zeros)[:min(len(zeros), end - start)],
                                   start)
        os.fdatasync(self.fd)
        self.punch(offset, length)
        os.fdatasync(self.fd)

    def _data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """The allocated (data) extents of the file in ``[start, end)`` (SEEK_DATA and
        SEEK_HOLE; the whole range where the file system cannot tell)."""
        out = []
        pos = start
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == _errno.ENXIO:  # no data past pos
                        break
                    raise
                if data >= end:
                    break
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
                out.append((data, hole))
                pos = hole
        except OSError as exc:
            if exc.errno not in (_errno.EINVAL, _errno.EOPNOTSUPP):
                raise
            return [(start, end)]
        return out

    def sync(self) -> None:
        """Make every completed write durable (``fdatasync``)."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def image_from_params(params: str) -> str:
    """The path in a toolstack ``params`` value (``PATH``, ``aio:PATH``, ``raw:PATH``)."""
    for prefix in ("aio:", "raw:", "file:", "phy:"):
        if params.startswith(prefix):
            return params[len(prefix):]
    return params


def response_packer(abi: ABI) -> Callable[[int, int, int], bytes]:
    """``pack(id, operation, status)`` -> the response record of ``abi`` (padding zero)."""
    size = layouts(abi).response.size
    st = struct.Struct("<QBxh" + "x" * (size - 12))
    return st.pack


class PersistentGrants:
    """Grants of one frontend kept mapped (writable, one page each) across requests, up
    to ``limit``; ``lookup`` maps a new ref while room is left.  Nothing is evicted
    (as blkback's limit, past it pages are mapped per request), so the hot path looks
    pages up in :attr:`maps` directly and counts its ``hits`` itself."""

    def __init__(self, platform: Platform, domid: int, limit: int) -> None:
        """Nothing mapped yet."""
        self.grants = platform.grants
        self.domid = domid
        self.limit = limit
        self.maps: dict[int, MappedGrants] = {}
        self.stats = {"hits": 0, "maps": 0, "full": 0}

    def lookup(self, ref: int) -> memoryview | None:
        """The page of ``ref`` (mapped now if room is left); None when the cache is full.
        A ref that cannot be mapped raises :class:`PlatformError`."""
        m = self.maps.get(ref)
        if m is not None:
            self.stats["hits"] += 1
            return m.mem
        if len(self.maps) >= self.limit:
            self.stats["full"] += 1
            return None
        m = self.grants.map(self.domid, [ref], writable=True)
        self.maps[ref] = m
        self.stats["maps"] += 1
        return m.mem

    def cached(self, ref: int) -> memoryview | None:
        """The page of ``ref`` if it is already mapped, else None (never maps)."""
        m = self.maps.get(ref)
        return None if m is None else m.mem

    def release(self) -> None:
        """Unmap every kept grant."""
        maps, self.maps = self.maps, {}
        for m in maps.values():
            with contextlib.suppress(PlatformError, LocalError):
                self.grants.unmap(m)


class _SharedMapping:
    """One map call's pages shared by the requests of a ring batch: unmapped when the
    last of its ``users`` ends."""

    __slots__ = ("mapped", "users")

    def __init__(self, mapped: MappedGrants, users: int) -> None:
        self.mapped = mapped
        self.users = users


class _Io:
    """One request being served: what to answer and what to release."""

    __slots__ = ("id", "kind", "length", "mappings", "offset", "op", "secure", "views")

    def __init__(self, rid: int, op: int, kind: int, offset: int, length: int) -> None:
        self.secure = False  # a DISCARD with BLKIF_DISCARD_SECURE
        self.id = rid
        self.op = op  # the operation to echo
        self.kind = kind  # what to do: READ, WRITE, FLUSH, BARRIER, DISCARD
        self.offset = offset
        self.length = length
        self.views: list[memoryview] = []
        self.mappings: list[MappedGrants | _SharedMapping] = []


class BlockRequests:
    """The sans-IO request handler of one queue (see the module docstring).

    ``respond`` is set to the queue's :meth:`RingService.respond` once the service exists.
    """

    def __init__(self, image: BlockImage, platform: Platform, frontend_domid: int, abi: ABI,
                 config: BlockConfig, *, persistent: PersistentGrants | None = None,
                 executor: concurrent.futures.Executor | None = None) -> None:
        """Serve ``image`` for ``frontend_domid``'s requests in ``abi`` slots."""
        self.image = image
        self.grants = platform.grants
        self.domid = frontend_domid
        self.abi = abi
        self.config = config
        self.persistent = persistent
        self.executor = executor
        self.slot = layouts(abi).ring.slot_size
        self._pack = response_packer(abi)
        ops = {BLKIF_OP_READ, BLKIF_OP_WRITE}  # a write to a read-only disk: ERROR
        if not image.readonly:
            if config.flush:
                ops.add(BLKIF_OP_FLUSH_DISKCACHE)
            if config.barrier:
                ops.add(BLKIF_OP_WRITE_BARRIER)
            if config.discard and image.discard_supported:
                ops.add(BLKIF_OP_DISCARD)
        if config.max_indirect_segments:
            ops.add(BLKIF_OP_INDIRECT)
        self.ops = frozenset(ops)
        #: Secure discards are served (offered as ``discard-secure``), else EOPNOTSUPP.
        self.secure_discard = BLKIF_OP_DISCARD in self.ops and config.discard_secure
        self.respond: Callable[[Iterable[bytes]], int] | None = None
        #: The queue's :meth:`RingService.respond_slots` (responses the compiled lane
        #: wrote as whole slots); without it they are handed out as records.
        self.respond_slots: Callable[[bytearray, int], None] | None = None
        #: The engine serving reads and writes (see :mod:`xenpv.backends.blockio`).
        self.engine = effective_engine(config.engine)
        if self.engine in ("threads", "mixed") and executor is None:
            self.engine = "inline"  # no pool to hand anything to
        self.uring: UringEngine | None = None
        #: The compiled fast lane (persistent grants on io_uring; see handle).
        self._lane: Any = None
        self._ready: list[bytes] | None = None
        self._kick_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[int, asyncio.Future[Any]] = {}
        #: io_uring transfers in flight by token (ascending), and the fences flushes and
        #: barriers wait on: (last token before them, future).
        self._uring_live: dict[int, _Io] = {}
        self._fences: list[tuple[int, asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: list[_Io] = []
        self._barrier = False
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        self._seq = 0
        self.closed = False
        #: ``taken``: requests read off the ring; ``completed``: answered (``errors``
        #: and ``unsupported`` of them with ERROR and EOPNOTSUPP, refusals included).
        self.stats = {"taken": 0, "completed": 0, "reads": 0, "writes": 0, "flushes": 0,
                      "barriers": 0, "discards": 0, "secure_discards": 0, "indirect": 0,
                      "errors": 0, "unsupported": 0, "bytes_read": 0, "bytes_written": 0,
                      "inline": 0, "threaded": 0, "uring": 0, "lane": 0, "maps": 0}

    # -- the handler
    @property
    def inflight(self) -> int:
        """Requests taken and not answered yet."""
        return len(self._inflight) + len(self._uring_live) + len(self._held) + (
            1 if self._barrier else 0) + (self._lane.inflight if self._lane is not None else 0)

    def handle(self, batch: memoryview, count: int) -> list[bytes]:
        """Parse, validate and start ``count`` requests; the answers ready now out."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            if self.engine == "io_uring":
                self._open_uring()
        ready: list[bytes] = []
        slot = self.slot
        self.stats["taken"] += count
        image = self.image
        # The plain reads and writes that pass every check, in one compiled pass over the
        # batch (itself the private copy, R1); anything else is validated in full here.
        fast = scan_rw(batch, count, self.abi, image.sectors, readonly=image.readonly,
                       sector_size=image.sector_size)
        # Without persistent grants the accepted reads and writes are mapped together:
        # one map call per run of them (per direction), not one per request.
        unmapped: list[tuple[_Io, tuple[tuple[int, int, int], ...]]] | None = \
            [] if self.persistent is None else None
        # With persistent grants on io_uring, runs of them go to the compiled lane (the
        # same requests as the readable path below, without a Python object each).
        lane = self._lane
        run: list[AcceptedRW] = []
        for j in range(count):
            accepted = fast[j]
            if accepted is not None and lane is not None and not self._barrier:
                run.append(accepted)
                continue
            if run:  # in order: what came before is started first
                self._start_lane(run, ready)
            if accepted is None:
                if unmapped:  # in order: what came before is started first
                    self._map_and_start(unmapped, ready)
                io = self._accept(batch, j * slot, ready)
            elif unmapped is not None:
                rid, op, offset, length, segs = accepted
                unmapped.append((_Io(rid, op, op, offset, length), segs))
                continue
            else:
                io = self._accept_rw(accepted, ready)
            if io is None:
                continue
            if self._barrier:
                self._held.append(io)
            else:
                self._start(io, ready)
        if run:
            self._start_lane(run, ready)
        if unmapped:
            self._map_and_start(unmapped, ready)
        if self.uring is not None:
            self._ready = ready  # what finishes during submission is answered now
            try:
                self.uring.submit_and_complete()
            finally:
                self._ready = None
            if lane is not None:
                self._lane_answers(ready)
        return ready

    def pack(self, rid: int, op: int, status: int) -> bytes:
        """The response record of one finished request (counted: ``completed``, and
        ``errors``/``unsupported`` by status)."""
        stats = self.stats
        stats["completed"] += 1
        if status == BLKIF_RSP_ERROR:
            stats["errors"] += 1
        elif status == BLKIF_RSP_EOPNOTSUPP:
            stats["unsupported"] += 1
        return self._pack(rid, op, status)

    def live(self) -> dict[str, int]:
        """This queue now: requests in flight, persistent grants held, every counter."""
        return {"inflight": self.inflight,
                "persistent_grants": len(self.persistent.maps) if self.persistent else 0,
                **self.stats}

    def _fail(self, rid: int, op: int, status: int, ready: list[bytes], why: str) -> None:
        log.debug("dom%d blkif request %d (op %d) refused: %s", self.domid, rid, op, why)
        ready.append(self.pack(rid, op, status))

    def _accept(self, batch: memoryview, off: int, ready: list[bytes]) -> _Io | None:
        """Copy, validate and turn one request into an :class:`_Io` (or answer it)."""
        req = parse_request(batch, off, self.abi)  # the single copy (R1)
        sectors = self.image.sectors
        try:
            validate_request(req, max_indirect_segments=self.config.max_indirect_segments,
                             disk_sectors=sectors, supported_ops=self.ops)
            if isinstance(req, BlkifRequestDiscard):
                secure = bool(req.flag & BLKIF_DISCARD_SECURE)
                if secure and not self.secure_discard:
                    raise BlkifRequestError("secure discard not offered", req.id,
                                            req.operation, BLKIF_RSP_EOPNOTSUPP)
                io = _Io(req.id, req.operation, BLKIF_OP_DISCARD,
                         req.sector_number << SECTOR_SHIFT, req.nr_sectors << SECTOR_SHIFT)
                io.secure = secure
                self._check_alignment(req.id, req.operation, io)
                return io
            if isinstance(req, BlkifRequestIndirect):
                segs = self._indirect_segments(req)
                kind = req.indirect_op
                self.stats["indirect"] += 1
            else:
                segs = np.array([(s.gref, s.first_sect, s.last_sect, 0) for s in req.seg],
                                dtype=SEGMENT_DTYPE)
                kind = req.operation
            total = int((segs["last"].astype(np.int64) - segs["first"] + 1).sum()) \
                if len(segs) else 0
            if total and (req.sector_number >= sectors or total > sectors - req.sector_number):
                raise BlkifRequestError(f"sectors {req.sector_number}+{total} beyond disk of "
                                        f"{sectors}", req.id, req.operation)
            if kind != BLKIF_OP_READ and self.image.readonly:
                raise BlkifRequestError("the disk is read-only", req.id, req.operation)
            io = _Io(req.id, req.operation, kind, req.sector_number << SECTOR_SHIFT,
                     total << SECTOR_SHIFT)
            self._check_alignment(req.id, req.operation, io, segs)
            if len(segs):
                self._map(io, segs, writable=kind == BLKIF_OP_READ)
            return io
        except BlkifRequestError as exc:
            self._fail(exc.id, exc.operation, exc.status, ready, str(exc))
        return None

    def _accept_rw(self, accepted: tuple[int, int, int, int, tuple[tuple[int, int, int], ...]],
                   ready: list[bytes]) -> _Io | None:
        """An :class:`_Io` for a READ/WRITE :func:`scan_rw` accepted: its pages are the
        persistent ones where possible, the rest mapped for it in one batch."""
        rid, op, offset, length, segs = accepted
        io = _Io(rid, op, op, offset, length)
        views = io.views
        pg = self.persistent
        if pg is not None:
            maps = pg.maps  # kept pages, looked up directly (counted below)
            for gref, start, end in segs:
                m = maps.get(gref)
                if m is None:
                    break
                views.append(m.mem[start:end])
            else:
                pg.stats["hits"] += len(segs)
                return io
            views.clear()
        try:
            self._map_segments(io, segs, writable=op == BLKIF_OP_READ)
        except BlkifRequestError as exc:
            self._fail(exc.id, exc.operation, exc.status, ready, str(exc))
            return None
        return io

    def _map_and_start(self, group: list[tuple[_Io, tuple[tuple[int, int, int], ...]]],
                       ready: list[bytes]) -> None:
        """Map the pages of every accepted READ/WRITE of ``group`` (no persistent grants)
        with one all-or-nothing call per direction, shared by its requests (unmapped when
        the last of them ends), and start them in order; if a call fails (a bad ref
        among them) each request is mapped on its own, so only the bad ones fail."""
        batch, group[:] = list(group), []
        for writable in (True, False):  # READs map writable, WRITEs read-only
            part = [g for g in batch if (g[0].op == BLKIF_OP_READ) == writable]
            if len(part) < 2:
                continue
            refs = [seg[0] for _, segs in part for seg in segs]
            try:
                m = self.grants.map(self.domid, refs, writable=writable)
            except PlatformError:
                continue  # per request below: the bad ones fail alone
            self.stats["maps"] += 1
            shared = _SharedMapping(m, len(part))
            mem, k = m.mem, 0
            for io, segs in part:
                views = io.views
                for _gref, start, end in segs:
                    base = k * XEN_PAGE_SIZE
                    views.append(mem[base + start:base + end])
                    k += 1
                io.mappings.append(shared)
        for io, segs in batch:
            if not io.mappings:
                try:
                    self._map_segments(io, segs, writable=io.op == BLKIF_OP_READ)
                except BlkifRequestError as exc:
                    self._fail(exc.id, exc.operation, exc.status, ready, str(exc))
                    continue
            if self._barrier:
                self._held.append(io)
            else:
                self._start(io, ready)

    def _check_alignment(self, rid: int, op: int, io: _Io,
                         segs: np.ndarray[Any, Any] | None = None) -> None:
        """With a logical sector size over 512 bytes the request's start and length, and
        every segment's start and length in its page, must be whole logical sectors (the
        ring still counts 512-byte units); else ERROR.  A request that moves no data (a
        flush or barrier without segments, which Linux's blkfront sends at sector
        (u64)-1) has no range to align."""
        ss = self.image.sector_size
        if ss <= 512 or not io.length:
            return
        if io.offset % ss or io.length % ss:
            raise BlkifRequestError(f"range {io.offset}+{io.length} not aligned to the "
                                    f"{ss}-byte sector size", rid, op)
        if segs is not None and len(segs):
            mask = (ss >> SECTOR_SHIFT) - 1
            first = segs["first"].astype(np.int64)
            bad = (first & mask) | ((segs["last"] - first + 1) & mask)
            if bad.any():
                k = int(np.argmax(bad != 0))
                raise BlkifRequestError(f"segment {k} (sectors {int(first[k])}.."
                                        f"{int(segs['last'][k])}) not aligned to the "
                                        f"{ss}-byte sector size", rid, op)

    def _indirect_segments(self, req: BlkifRequestIndirect) -> np.ndarray[Any, Any]:
        """Map the indirect pages read-only, copy the segment records out once, release
        the pages and check every record (first <= last <= 7)."""
        n = req.nr_segments
        pages = indirect_pages(n)
        refs = list(req.indirect_grefs[:pages])
        nbytes = n * SEGMENT_DTYPE.itemsize
        try:
            cached = [self.persistent.cached(r) for r in refs] if self.persistent else []
            if cached and all(c is not None for c in cached):
                raw = b"".join(bytes(c) for c in cached if c is not None)[:nbytes]
            else:
                m = self.grants.map(self.domid, refs, writable=False)
                try:
                    raw = bytes(m.mem[:nbytes])  # the single copy (R1)
                finally:
                    self.grants.unmap(m)
        except PlatformError as exc:
            raise BlkifRequestError(f"indirect pages {refs}: {exc}", req.id,
                                    req.operation) from None
        segs = np.frombuffer(raw, dtype=SEGMENT_DTYPE)
        bad = (segs["last"] > 7) | (segs["first"] > segs["last"])
        if bad.any():
            k = int(np.argmax(bad))
            raise BlkifRequestError(f"indirect segment {k}: first={segs['first'][k]} "
                                    f"last={segs['last'][k]}", req.id, req.operation)
        return segs

    def _map(self, io: _Io, segs: np.ndarray[Any, Any], *, writable: bool) -> None:
        """The memory of every segment (checked records): see :meth:`_map_segments`."""
        starts = (segs["first"].astype(np.int64) << SECTOR_SHIFT).tolist()
        ends = ((segs["last"].astype(np.int64) + 1) << SECTOR_SHIFT).tolist()
        self._map_segments(io, tuple(zip(segs["gref"].tolist(), starts, ends, strict=True)),
                           writable=writable)

    def _map_segments(self, io: _Io, segs: tuple[tuple[int, int, int], ...], *,
                      writable: bool) -> None:
        """The memory of every ``(gref, start, end)`` segment into ``io.views``:
        persistent pages where possible, the rest mapped for this request in one
        all-or-nothing batch."""
        pages: list[memoryview | None] = [None] * len(segs)
        try:
            pg = self.persistent
            if pg is not None:
                maps, hits = pg.maps, 0
                for i, seg in enumerate(segs):
                    m = maps.get(seg[0])  # kept already: no LRU bookkeeping per page
                    if m is not None:
                        pages[i] = m.mem
                        hits += 1
                    else:
                        pages[i] = pg.lookup(seg[0])
                pg.stats["hits"] += hits
            missing = [i for i, p in enumerate(pages) if p is None]
            if missing:
                m = self.grants.map(self.domid, [segs[i][0] for i in missing],
                                    writable=writable)
                self.stats["maps"] += 1
                io.mappings.append(m)
                for k, i in enumerate(missing):
                    pages[i] = m.mem[k * XEN_PAGE_SIZE:(k + 1) * XEN_PAGE_SIZE]
        except PlatformError as exc:
            self._unmap(io)
            raise BlkifRequestError(f"cannot map the request's grants: {exc}", io.id,
                                    io.op) from None
        views = io.views
        for (_gref, start, end), page in zip(segs, pages, strict=True):
            assert page is not None
            views.append(page[start:end])

    def _unmap(self, io: _Io) -> None:
        io.views.clear()
        mappings, io.mappings = io.mappings, []
        for m in mappings:
            if isinstance(m, _SharedMapping):
                m.users -= 1
                if m.users > 0:
                    continue
                m = m.mapped
            with contextlib.suppress(PlatformError, LocalError):
                self.grants.unmap(m)

    # -- doing the work
    def _work(self, io: _Io) -> Callable[[], int]:
        image = self.image
        if io.kind == BLKIF_OP_READ:
            return lambda: _transfer(os.preadv, image.fd, io.views, io.offset, io.length)
        if io.kind == BLKIF_OP_WRITE:
            return lambda: _transfer(os.pwritev, image.fd, io.views, io.offset, io.length)
        if io.kind == BLKIF_OP_DISCARD:
            return lambda: _discard(image, io.offset, io.length, secure=io.secure)

        def write_then_sync() -> int:  # flush or barrier, with its data if it has any
            status = BLKIF_RSP_OKAY
            if io.views:
                status = _transfer(os.pwritev, image.fd, io.views, io.offset, io.length)
            if status == BLKIF_RSP_OKAY:
                try:
                    image.sync()
                except OSError:
                    status = BLKIF_RSP_ERROR
            return status

        return write_then_sync

    def _count(self, io: _Io) -> None:
        k = io.kind
        if k == BLKIF_OP_READ:
            self.stats["reads"] += 1
            self.stats["bytes_read"] += io.length
        elif k == BLKIF_OP_WRITE:
            self.stats["writes"] += 1
            self.stats["bytes_written"] += io.length
        elif k == BLKIF_OP_DISCARD:
            self.stats["secure_discards" if io.secure else "discards"] += 1
        elif k == BLKIF_OP_FLUSH_DISKCACHE:
            self.stats["flushes"] += 1
        else:
            self.stats["barriers"] += 1

    def _start(self, io: _Io, ready: list[bytes] | None) -> None:
        kind = io.kind
        if self.uring is not None and io.views and (kind == BLKIF_OP_READ
                                                    or kind == BLKIF_OP_WRITE):
            stats = self.stats  # _count's, inline for the common case
            if kind == BLKIF_OP_READ:
                stats["reads"] += 1
                stats["bytes_read"] += io.length
            else:
                stats["writes"] += 1
                stats["bytes_written"] += io.length
            self._start_uring(io)
            return
        self._count(io)
        if kind in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
            self._start_ordered(io)
            return
        work = self._work(io)
        engine = self.engine
        if self.executor is None or engine == "inline" or (
                engine == "mixed" and io.kind != BLKIF_OP_DISCARD
                and io.length <= self.config.inline_max):
            self.stats["inline"] += 1
            status = work()
            self._unmap(io)
            rsp = self.pack(io.id, io.op, status)
            if ready is not None:
                ready.append(rsp)
            else:
                self._queue(rsp)
            return
        self.stats["threaded"] += 1
        assert self._loop is not None
        fut = self._loop.run_in_executor(self.executor, work)
        token = self._seq = self._seq + 1
        self._inflight[token] = fut
        fut.add_done_callback(lambda f: self._done(token, io, f))

    def _done(self, token: int, io: _Io, fut: asyncio.Future[Any]) -> None:
        self._inflight.pop(token, None)
        status = BLKIF_RSP_ERROR
        if not fut.cancelled() and fut.exception() is None:
            status = int(fut.result())
        self._unmap(io)
        self._queue(self.pack(io.id, io.op, status))

    # -- the io_uring engine
    def _open_uring(self) -> None:
        assert self._loop is not None
        try:
            self.uring = UringEngine(self._loop)
        except OSError as exc:  # e.g. locked-memory limits of an old kernel
            log.warning("dom%d: io_uring refused (%s); serving with the thread pool",
                        self.domid, exc)
            self.engine = "threads" if self.executor is not None else "inline"
            return
        self.uring.on_wakeup = self._flush_outbox  # answer what the wakeup completed
        if self.persistent is not None:
            self._lane = self.uring.open_lane(
                self.image.fd, self.persistent.maps, layouts(self.abi).response.size,
                self.slot)
            self.uring.on_lane = self._lane_other

    # -- the compiled lane (persistent grants on io_uring)
    def _start_lane(self, run: list[AcceptedRW], ready: list[bytes]) -> None:
        """Start ``run`` (accepted READs/WRITEs, emptied) on the lane; what it cannot
        take (a page not kept, no submission slot) the readable way, in order."""
        lane = self._lane
        lane.seq = self._seq
        rest = lane.start(run)
        self._seq = lane.seq
        self.stats["lane"] += len(run) - len(rest)
        run.clear()
        for accepted in rest:
            io = self._accept_rw(accepted, ready)
            if io is not None:
                self._start(io, ready)

    def _lane_other(self, token: int, res: int) -> None:
        """A lane request the lane did not answer (a short or failed transfer, or no room
        for its answer): served on as the readable path does, under its sequence number
        (so fences still wait for it)."""
        (rid, op, offset, length, segs), seq = self._lane.take(token)
        assert self.persistent is not None
        maps = self.persistent.maps
        io = _Io(rid, op, op, offset, length)
        io.views = [maps[gref].mem[start:end] for gref, start, end in segs]
        self._uring_live[seq] = io
        if 0 < res < length:
            self._uring_transfer(io, seq, _advance(io.views, res), offset + res, length - res)
        else:
            self._uring_finish(io, seq, BLKIF_RSP_OKAY if res == length else BLKIF_RSP_ERROR)

    def _lane_answers(self, ready: list[bytes] | None) -> None:
        """Push the answers the lane wrote (or add them to ``ready`` as records when there
        is no slot-level respond) and fold its counters into :attr:`stats`."""
        lane = self._lane
        n = lane.nout
        if n:
            lane.nout = 0
            if self.closed:
                pass
            elif self.respond_slots is not None:
                try:
                    self.respond_slots(lane.out, n)
                except (LocalError, PeerError) as exc:
                    log.debug("dom%d: %d responses dropped: %s", self.domid, n, exc)
            else:
                size, slot, out = layouts(self.abi).response.size, self.slot, lane.out
                records = [bytes(out[k * slot:k * slot + size]) for k in range(n)]
                if ready is not None:
                    ready.extend(records)
                else:  # (called from _flush_outbox, which sends the outbox next)
                    self._outbox.extend(records)
        reads, writes, bytes_read, bytes_written, hits, completed = lane.counts()
        if reads or writes or completed:
            stats = self.stats
            stats["reads"] += reads
            stats["writes"] += writes
            stats["uring"] += reads + writes
            stats["bytes_read"] += bytes_read
            stats["bytes_written"] += bytes_written
            stats["completed"] += completed
            if self.persistent is not None:
                self.persistent.stats["hits"] += hits
        if self._fences and completed:
            self._resolve_fences()

    def _start_uring(self, io: _Io) -> None:
        assert self._loop is not None
        self.stats["uring"] += 1
        token = self._seq = self._seq + 1
        self._uring_live[token] = io
        self._uring_transfer(io, token, io.views, io.offset, io.length)
        if self._ready is None and not self._kick_scheduled:  # started outside a ring
            self._kick_scheduled = True  # pass (after a barrier): submit soon
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self.uring is not None and self.uring.ring.fd >= 0:
            self.uring.submit_and_complete()
            if self._lane is not None and self._lane.nout:
                self._flush_outbox()

    def _uring_transfer(self, io: _Io, token: int, views: list[memoryview], offset: int,
                        remaining: int) -> None:
        write = io.kind == BLKIF_OP_WRITE

        def done(res: int) -> None:
            if 0 < res < remaining:  # short transfer: the rest as a new request
                self._uring_transfer(io, token, _advance(views, res), offset + res,
                                     remaining - res)
                return
            self._uring_finish(io, token,
                               BLKIF_RSP_OKAY if res == remaining else BLKIF_RSP_ERROR)

        assert self.uring is not None and self.image is not None
        if not self.uring.start(write, self.image.fd, views, offset, done):
            # no submission slot (the kernel is backlogged): move it here and now
            status = _transfer(os.pwritev if write else os.preadv, self.image.fd, views,
                               offset, remaining)
            self._uring_finish(io, token, status)

    def _uring_finish(self, io: _Io, token: int, status: int) -> None:
        live = self._uring_live
        live.pop(token, None)
        if io.mappings:  # persistent pages only: nothing to unmap
            self._unmap(io)
        else:
            io.views.clear()
        rsp = self.pack(io.id, io.op, status)
        if self._ready is not None:
            self._ready.append(rsp)
        else:
            self._queue(rsp)
        if self._fences:
            self._resolve_fences()

    def _resolve_fences(self) -> None:
        """Set every fence whose transfers have all finished."""
        live = self._uring_live
        oldest = min(live) if live else None  # the oldest transfer still running
        if self._lane is not None:
            lane_oldest = self._lane.oldest()
            if lane_oldest is not None and (oldest is None or lane_oldest < oldest):
                oldest = lane_oldest
        keep = []
        for last, fut in self._fences:
            if oldest is not None and oldest <= last:
                keep.append((last, fut))
            elif not fut.done():
                fut.set_result(None)
        self._fences = keep

    def _uring_fence(self) -> asyncio.Future[None] | None:
        """A future done once every io_uring transfer started so far has finished (None
        when none is running)."""
        if not self._uring_live and not (self._lane is not None and self._lane.inflight):
            return None
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._fences.append((self._seq, fut))
        return fut

    def _start_ordered(self, io: _Io) -> None:
        """FLUSH (and BARRIER, which also holds back later requests): wait for every
        request taken before, write its data if any, fdatasync, answer."""
        assert self._loop is not None
        earlier: list[asyncio.Future[Any]] = list(self._inflight.values())
        fence = self._uring_fence()
        if fence is not None:
            earlier.append(fence)
        barrier = io.kind == BLKIF_OP_WRITE_BARRIER
        if barrier:
            self._barrier = True
        work = self._work(io)

        async def ordered() -> None:
            status = BLKIF_RSP_ERROR
            try:
                if earlier:
                    await asyncio.wait(earlier)
                if self.executor is None:
                    status = work()
                else:
                    status = await asyncio.get_running_loop().run_in_executor(self.executor,
                                                                            work)
            finally:
                self._unmap(io)
                if not self.closed:
                    self._queue(self.pack(io.id, io.op, status))
                    if barrier:
                        self._release_held()

        task = self._loop.create_task(ordered())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release_held(self) -> None:
        self._barrier = False
        held, self._held = self._held, []
        for k, io in enumerate(held):
            if self._barrier:  # another barrier among them: hold the rest again
                self._held.extend(held[k:])
                return
            self._start(io, None)

    # -- answering
    def _queue(self, rsp: bytes) -> None:
        if self.closed:
            return
        self._outbox.append(rsp)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_outbox)

    def _flush_outbox(self) -> None:
        self._flush_scheduled = False
        if self._lane is not None:
            self._lane_answers(None)
        out, self._outbox = self._outbox, []
        if out and self.respond is not None and not self.closed:
            try:
                self.respond(out)
            except (LocalError, PeerError) as exc:  # the channel went away, or the
                # frontend broke the ring meanwhile (the service has stopped)
                log.debug("dom%d: %d responses dropped: %s", self.domid, len(out), exc)

    # -- teardown
    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop answering and wait (bounded) for in-flight I/O to finish, then release
        every mapping still held by a request (R13: workers joined before freeing)."""
        self.closed = True
        pending: list[Any] = [*self._inflight.values(), *self._tasks]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout)
            for t in late:
                t.cancel()
        if self.uring is not None:  # whatever is still in the kernel completes first
            self.uring.close()
        for io in self._held:
            self._unmap(io)
        self._held.clear()


def _transfer(fn: Callable[[int, list[memoryview], int], int], fd: int,
              views: list[memoryview], offset: int, length: int) -> int:
    """preadv/pwritev all of ``views`` at ``offset``, resuming short transfers; a status."""
    done = 0
    try:
        while done < length:
            n = fn(fd, views, offset + done)
            if n <= 0:
                return BLKIF_RSP_ERROR  # end of file: the image shrank under the request
            done += n
            if done < length:
                views = _advance(views, n)
    except OSError:
        return BLKIF_RSP_ERROR
    return BLKIF_RSP_OKAY


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


def _discard(image: BlockImage, offset: int, length: int, *, secure: bool = False) -> int:
    try:
        if secure:
            image.secure_discard(offset, length)
        else:
            image.punch(offset, length)
    except OSError as exc:
        if exc.errno in (_errno.EOPNOTSUPP, _errno.ENOSYS):
            if not secure:
                image.discard_supported = False
            return BLKIF_RSP_EOPNOTSUPP
        return BLKIF_RSP_ERROR
    return BLKIF_RSP_OKAY


#: Where ``xenpv block backend`` keeps live stats without ``--rundir``.
DEFAULT_STATS_DIR = "/run/xenpv/block"


def live_stats_path(stats_dir: str | os.PathLike[str], backend_path: str) -> str:
    """The stats file of the backend device at ``backend_path``:
    ``STATS_DIR/vbd-<backend>-<frontend>-<devid>.json``."""
    from xenpv.xenbus.paths import parse_backend_path

    bp = parse_backend_path(backend_path)
    return os.path.join(os.fspath(stats_dir),
                        f"{bp.devtype}-{bp.domid}-{bp.frontend_domid}-{bp.devid}.json")


def read_live_stats(stats_dir: str | os.PathLike[str], backend_path: str
                    ) -> dict[str, Any] | None:
    """The live state a backend process keeps for ``backend_path`` (None if there is
    none, or it is not such a state), with ``inflight`` summed over the queues, ``stale``
    true when the process that wrote it is gone (killed before it could remove the file)
    and ``age`` in seconds."""
    try:
        with open(live_stats_path(stats_dir, backend_path), "rb") as f:
            state = json.loads(f.read(1 << 20))
        pid = int(state["pid"])
        queues = state["queues"]
        state["inflight"] = sum(int(q["inflight"]) for q in queues)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, PeerError):
        return None
    try:
        os.kill(pid, 0)
        state["stale"] = False
    except ProcessLookupError:
        state["stale"] = True
    except PermissionError:  # alive, another user's
        state["stale"] = False
    with contextlib.suppress(TypeError, ValueError):
        state["age"] = round(max(0.0, time.time() - float(state["updated"])), 3)
    return dict(state)


def _write_atomically(target: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


class _BlockPeerError(PeerError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EINVAL


class BlockBackendDriver(BackendDriver):
    """Backend of one vbd (``backend/vbd/<fe>/<devid>``); see the module docstring.

    The image is ``image_path`` or the own ``params`` node (``aio:``/``raw:`` prefixes
    allowed), read-only if ``readonly`` or the own ``mode`` is not ``w``.  ``executor``
    serves the I/O (a private pool of ``config.workers`` threads if None).
    """

    def __init__(self, platform: Platform, client: XenbusClient, path: str, *,
                 image_path: str | None = None, readonly: bool | None = None,
                 config: BlockConfig | None = None,
                 executor: concurrent.futures.Executor | None = None,
                 stats_dir: str | os.PathLike[str] | None = None,
                 stats_interval: float = 1.0, **kw: Any) -> None:
        """Serve ``path`` (see :class:`BackendDriver` for the timeouts).  With
        ``stats_dir``, the live state of the queues is kept in a file there (see
        :func:`live_stats_path`), rewritten at most every ``stats_interval`` seconds
        while it changes and removed at disconnect."""
        super().__init__(client, path, **kw)
        self.stats_file: str | None = None
        if stats_dir is not None and stats_interval > 0:
            try:
                self.stats_file = live_stats_path(stats_dir, path)
            except PeerError as exc:  # not a backend/<type>/<fe>/<devid> path
                log.warning("%s: no live stats: %s", path, exc)
        self.stats_interval = stats_interval
        self._stats_task: asyncio.Task[None] | None = None
        self.platform = platform
        self.config = config or BlockConfig()
        self.image_path = image_path
        self.readonly = readonly
        self._executor = executor
        self._own_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.image: BlockImage | None = None
        self.abi: ABI | None = None
        self.channels: list[BackChannel] = []
        self.services: list[RingService] = []
        self.handlers: list[BlockRequests] = []
        self.persistent: list[PersistentGrants] = []
        self.sectors = 0
        self._resize_task: asyncio.Task[None] | None = None

    # -- configuration
    async def _own(self, name: str) -> str | None:
        raw = await self._read(f"{self.path}/{name}")
        return None if raw is None else raw.decode("utf-8", "replace")

    async def _image_config(self) -> tuple[str, bool]:
        path = self.image_path
        if path is None:
            params = await self._own("params")
            if not params:
                raise LocalError(f"{self.path}: no params (image path)")
            path = image_from_params(params)
        readonly = self.readonly
        if readonly is None:
            readonly = (await self._own("mode") or "r") != "w"
        return path, readonly

    def _open(self, path: str, readonly: bool) -> BlockImage:
        c = self.config
        return BlockImage(path, readonly=readonly, sector_size=c.sector_size,
                          physical_sector_size=c.physical_sector_size, direct=c.direct)

    def _features(self, image: BlockImage) -> dict[str, str | int]:
        c = self.config
        writable = not image.readonly
        keys: dict[str, str | int] = {
            "max-ring-page-order": c.max_ring_order,
            "multi-queue-max-queues": c.max_queues,
            "feature-persistent": int(c.persistent),
            "feature-flush-cache": int(writable and c.flush),
            "feature-barrier": int(writable and c.barrier),
        }
        if c.max_indirect_segments:
            keys["feature-max-indirect-segments"] = c.max_indirect_segments
        discard = writable and c.discard and image.discard_supported
        keys["feature-discard"] = int(discard)
        if discard:
            keys["discard-granularity"] = max(image.discard_granularity, image.sector_size)
            keys["discard-alignment"] = 0
            keys["discard-secure"] = int(c.discard_secure)
        return keys

    # -- hooks
    async def publish_features(self) -> None:
        """Check the image and advertise what this backend offers (before InitWait)."""
        path, readonly = await self._image_config()
        image = self._open(path, readonly)
        try:
            await self.write_keys(self._features(image))
        finally:
            image.close()

    async def connect(self, peer: PeerKeys) -> None:
        """Read the frontend's ABI, features and rings; map, bind, serve, publish the
        disk's properties."""
        try:
            abi = abi_from_protocol(await peer.raw("protocol"))
        except ProtocolError as exc:
            raise _BlockPeerError(str(exc)) from None
        fe_persistent = await peer.feature("feature-persistent")
        placements = await read_ring_keys(peer, max_order=self.config.max_ring_order,
                                          max_queues=self.config.max_queues)
        path, readonly = await self._image_config()
        self.image = image = self._open(path, readonly)
        self.abi = abi
        slot = layouts(abi).ring.slot_size
        for pl in placements:
            self.channels.append(BackChannel.attach(self.platform, self.peer_domid, pl,
                                                    slot_size=slot))
        if self.config.engine != "inline" and self._executor is None:
            self._own_executor = concurrent.futures.ThreadPoolExecutor(
                self.config.workers, thread_name_prefix=f"blkback-{self.peer_domid}")
        executor = self._executor or self._own_executor
        use_persistent = self.config.persistent and fe_persistent
        for ch in self.channels:
            pg = (PersistentGrants(self.platform, self.peer_domid,
                                   self.config.max_persistent_grants)
                  if use_persistent else None)
            if pg is not None:
                self.persistent.append(pg)
            handler = BlockRequests(image, self.platform, self.peer_domid, abi, self.config,
                                    persistent=pg, executor=executor)
            service = RingService(ch, handler)
            handler.respond = service.respond
            handler.respond_slots = service.respond_slots
            self.handlers.append(handler)
            self.services.append(service)
        self.sectors = image.sectors
        await self.write_keys({
            **self._features(image),
            "sectors": self.sectors,
            "sector-size": image.sector_size,
            "physical-sector-size": image.physical_sector_size,
            "info": VDISK_READONLY if readonly else 0,
        })
        for s in self.services:
            s.start()
            self.watch_ring(s)
        if self.config.resize_poll > 0:
            self._resize_task = asyncio.create_task(self._watch_size())
        if self.stats_file is not None:
            first = self._write_live(self.stats_file)  # there once Connected is
            if first is not None:
                self._stats_task = asyncio.create_task(self._publish_live(self.stats_file,
                                                                          first))

    async def disconnect(self) -> None:
        """Stop the queues, wait for in-flight I/O, release grants, rings and ports."""
        self.stop_watchers()
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stats_task
            self._stats_task = None
        if self.stats_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.stats_file)
        if self._resize_task is not None:
            self._resize_task.cancel()
            with contextlib.suppress(BaseException):
                await self._resize_task
            self._resize_task = None
        for s in self.services:
            s.stop()
        for h in self.handlers:
            await h.drain()
        for pg in self.persistent:
            pg.release()
        for ch in self.channels:
            ch.close()
        self.services, self.handlers, self.persistent, self.channels = [], [], [], []
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False)
            self._own_executor = None
        if self.image is not None:
            self.image.close()
            self.image = None

    # -- resize
    async def check_resize(self) -> bool:
        """If the image changed size, rewrite ``sectors`` and ``state`` (one transaction)
        so the frontend looks again; True if it did."""
        image = self.image
        if image is None or image.fd < 0:
            return False
        sectors = image.sectors
        if sectors == self.sectors:
            return False

        async def body(t: Transaction) -> None:
            if not await t.exists(f"{self.path}/state"):
                return
            await t.write(f"{self.path}/sectors", str(sectors).encode())
            await t.write(f"{self.path}/state", await t.read(f"{self.path}/state"))

        await self.client.transact(body, timeout=self.op_timeout)
        log.info("%s: resized to %d sectors", self.path, sectors)
        self.sectors = sectors
        return True

    async def _watch_size(self) -> None:
        while True:
            await asyncio.sleep(self.config.resize_poll)
            with contextlib.suppress(XenstoreError, TimeoutError, OSError):
                await self.check_resize()

    # -- live state
    def live_state(self) -> dict[str, Any]:
        """What ``xenpv block info`` shows of this device from another process: the
        serving process, when, and each queue's :meth:`BlockRequests.live`."""
        return {"pid": os.getpid(), "updated": time.time(), "path": self.path,
                "state": self.state.name, "interval": self.stats_interval,
                "queues": [h.live() for h in self.handlers]}

    def _write_live(self, target: str) -> list[dict[str, int]] | None:
        """Write the stats file (atomically); the queues written, None if it failed."""
        state = self.live_state()
        try:
            _write_atomically(target, json.dumps(state).encode())
        except OSError as exc:
            log.warning("%s: cannot keep live stats in %s: %s", self.path, target,
                        exc.strerror)
            return None
        queues: list[dict[str, int]] = state["queues"]
        return queues

    async def _publish_live(self, target: str, last: list[dict[str, int]]) -> None:
        """Rewrite the stats file every ``stats_interval`` seconds while the queues' state
        changes: bounded work whatever the request rate."""
        while True:
            await asyncio.sleep(self.stats_interval)
            if [h.live() for h in self.handlers] != last:
                written = self._write_live(target)
                if written is None:
                    return
                last = written

    # -- introspection
    def info(self) -> dict[str, Any]:
        """Negotiated features, rings, queues and counters (for ``xenpv block info``)."""
        return {
            "path": self.path,
            "state": self.state.name,
            "image": self.image.path if self.image else None,
            "readonly": self.image.readonly if self.image else None,
            "sectors": self.sectors,
            "abi": self.abi.value if self.abi else None,
            "queues": len(self.channels),
            "ring_pages": [1 << c.order for c in self.channels],
            "persistent": bool(self.persistent),
            "sector_size": self.image.sector_size if self.image else None,
            "inflight": [h.inflight for h in self.handlers],
            "persistent_grants": [len(pg.maps) for pg in self.persistent],
            "requests": [dict(h.stats) for h in self.handlers],
            "rings": [dict(s.stats) for s in self.services],
        }


class BlockBackend:
    """Serves every vbd whose backend is this domain, including devices added later
    (a :class:`~xenpv.xenbus.watcher.BackendWatcher` of ``vbd``)."""

    def __init__(self, platform: Platform, client: XenbusClient,
                 config: BlockConfig | None = None, *, devtype: str = "vbd",
                 **driver_kw: Any) -> None:
        """Prepare; :meth:`start` begins serving."""
        self.platform = platform
        self.client = client
        self.config = config or BlockConfig()
        self.devtype = devtype
        self.driver_kw = driver_kw
        self.watcher: BackendWatcher | None = None
        self.executor = (concurrent.futures.ThreadPoolExecutor(
            self.config.workers, thread_name_prefix="blkback")
            if self.config.engine != "inline" else None)

    async def start(self) -> None:
        """Watch the backend directory and serve what appears there."""
        def factory(client: XenbusClient, path: str) -> BlockBackendDriver:
            return BlockBackendDriver(self.platform, client, path, config=self.config,
                                      executor=self.executor, **self.driver_kw)

        self.watcher = BackendWatcher(self.client, self.platform.domid, self.devtype, factory)
        await self.watcher.start()

    @property
    def drivers(self) -> list[BlockBackendDriver]:
        """The drivers serving now."""
        if self.watcher is None:
            return []
        return [d for d in self.watcher.devices.values()
                if isinstance(d, BlockBackendDriver)]

    async def close(self) -> None:
        """Stop every driver (bounded, idempotent)."""
        if self.watcher is not None:
            await self.watcher.close()
            self.watcher = None
        if self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None


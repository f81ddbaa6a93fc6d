"""Block frontend: a vbd as an asyncio disk (``read``, ``write``, ``flush``, ``discard``).

Theory of operation
-------------------
:class:`BlockFrontend` is a :class:`~xenpv.xenbus.driver.FrontendDriver` for one
``device/vbd/<devid>`` directory (xen-protocols.md §5.3, §6):

* ``publish`` (backend in InitWait): reads ``max-ring-page-order`` and
  ``multi-queue-max-queues``, builds ``min(ours, theirs)`` queues of ``2**order`` pages
  (:class:`~xenpv.drivers.ringchannel.FrontChannel`) and writes, in one transaction, the
  ring keys (:func:`~xenpv.drivers.ringchannel.front_keys`), ``protocol`` (the ABI of its
  slots, :class:`FrontConfig`) and ``feature-persistent``;
* ``connect`` (backend Connected): reads ``sectors``, ``sector-size``,
  ``physical-sector-size``, ``info`` and the features (``feature-flush-cache``,
  ``feature-barrier``, ``feature-discard`` + ``discard-*``,
  ``feature-max-indirect-segments``, ``feature-persistent``), strictly, and starts one
  :class:`~xenpv.drivers.ringservice.RingClient` per queue.  A later change of the
  backend's ``sectors`` (online resize) updates :attr:`BlockFrontend.sectors`.

I/O: :meth:`~BlockFrontend.read` and :meth:`~BlockFrontend.write` take byte offsets and
lengths in whole logical sectors (``sector-size``; the ring's sector numbers and the
``sectors`` node stay in 512-byte units, and every segment covers whole logical sectors)
and split them into requests of at most
``feature-max-indirect-segments`` pages (INDIRECT, only if the backend offered it and the
config allows) or 11 pages (plain); every piece is submitted at once, on the queue with
the most free slots, waiting for ring space when all are full, so many requests are in
flight.  Data pages are granted per request (read-only for writes) and ended after the
answer (a page the backend still maps goes to the quarantine, R8) or, with persistent
grants negotiated, taken from a pool of pages granted writable once and reused.  Each
queue's ids and staged slots are kept by its request table
(:mod:`xenpv.frontends.blktable`, compiled in ``cython/blktable.pyx``), which also builds
and finishes the common request of :meth:`~BlockFrontend.read_many`/``write_many`` (one
page, on a free pool page) a whole batch per call, with no Python record per request.

Responses are validated (R6, scenario 11): an id that is not outstanding, a wrong
``operation`` echo or an unknown status fails the device closed (every waiter gets
:class:`BlockPeerError`, the queues stop, the error node is written); the response slot
was copied once by the ring client (R1).  ``EOPNOTSUPP`` to FLUSH/BARRIER/DISCARD turns the
feature off, as blkfront does.  Every wait is bounded by ``io_timeout`` (R12).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import functools
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from xenpv.compiled import compiled_attr
from xenpv.drivers.quarantine import GrantQuarantine
from xenpv.drivers.ringchannel import FrontChannel, front_keys
from xenpv.drivers.ringservice import RingClient
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.frontends import blktable
from xenpv.frontends.blktable import SLOT_BITS, Batch, RequestTable
from xenpv.platforms.base import Platform, SharedPages
from xenpv.protocols.blkif import (
    ABI,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    NATIVE_ABI,
    SECTOR_SHIFT,
    VDISK_CDROM,
    VDISK_READONLY,
    VDISK_REMOVABLE,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    indirect_pages,
    layouts,
    pack_indirect_columns,
)
from xenpv.protocols.layout import XEN_PAGE_SIZE
from xenpv.xenbus.driver import FrontendDriver, PeerKeys
from xenpv.xenstore.client import XenstoreClient as XenbusClient
from xenpv.xenstore.wire import XenstoreError

__all__ = ["BlockError", "BlockFrontend", "BlockPeerError", "BlockUnsupported", "FrontConfig"]

log = logging.getLogger(__name__)

_STATUSES = (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)
#: A request id is (generation << 16) | ring slot (:class:`RequestTable`): ids are not
#: reused soon after their answer, so a duplicate answer is caught (R6).
_SLOT_MASK = (1 << SLOT_BITS) - 1
#: gref, first and last sector of every unused segment of a plain request.
_NO_SEGMENTS = (0,) * (3 * BLKIF_MAX_SEGMENTS_PER_REQUEST)
#: The last sector of a whole page.
_PAGE_LAST = (XEN_PAGE_SIZE >> SECTOR_SHIFT) - 1


#: A request's data pages (refs, memory, give back) and its indirect pages, if any.
_Pages = tuple[list[int], list[memoryview], Callable[[], None]]
_RwPages = tuple[_Pages, _Pages | None]


class BlockError(LocalError):
    """A request failed: the backend answered ``status`` (ERROR or EOPNOTSUPP)."""

    def __init__(self, message: str, status: int = BLKIF_RSP_ERROR) -> None:
        super().__init__(message)
        self.status = status


class BlockUnsupported(BlockError):
    """The backend does not offer the operation (not advertised, or EOPNOTSUPP)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, BLKIF_RSP_EOPNOTSUPP)


class BlockPeerError(PeerError):
    """The backend broke the protocol; the device failed closed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = _errno.EPROTO


@dataclass(frozen=True)
class FrontConfig:
    """What this frontend asks for (each capped by what the backend offers)."""

    abi: ABI = NATIVE_ABI
    max_ring_order: int = 4
    max_queues: int = 4
    indirect: bool = True
    max_indirect_segments: int = 256
    persistent: bool = True
    #: Pages of the persistent pool (per device); past it, pages are granted per request.
    persistent_pages: int = 512
    io_timeout: float = 30.0
    #: Microseconds each queue's ring client polls for more answers after a batch before
    #: it sleeps.  0 (the default): back to the loop at once, so that the callers just
    #: answered send their next requests without waiting for answers that only those
    #: requests will bring (measured: docs/block.md "Fourth round").
    spin_us: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.max_ring_order <= 4 or self.max_queues < 1:
            raise LocalError("max_ring_order must be 0..4 and max_queues >= 1")
        if not 1 <= self.max_indirect_segments <= 4096:
            raise LocalError("max_indirect_segments must be 1..4096")
        if not 0 <= self.spin_us <= 1_000_000:
            raise LocalError("spin_us must be 0..1000000")


class _Pending:
    """One request on the ring outside the request table: how to finish it, and when its
    caller stops waiting (``future`` is the batch's, shared, when ``batch`` is set)."""

    __slots__ = ("batch", "deadline", "finish", "future", "op")

    def __init__(self, op: int, future: asyncio.Future[Any], finish: Callable[[int], None],
                 deadline: float, batch: Batch | None = None) -> None:
        self.op = op
        self.future = future
        self.finish = finish
        self.deadline = deadline
        self.batch = batch


def _compiled_tables() -> Any:
    """The compiled request table (``cython/blktable.pyx``), or None where its twin
    :mod:`xenpv.frontends.blktable` serves: not built, or ``XENPV_PURE_PYTHON=1``
    (:func:`xenpv.compiled.pure_python`)."""
    return compiled_attr("xenpv.frontends._blktable")


#: The module whose ``RequestTable`` and ``Batch`` the frontend uses.
_TABLES: Any = _compiled_tables() or blktable


class _Queue:
    """One ring: its channel, client, request table (free ids, staged requests, the
    one-page requests of batches) and the other outstanding requests."""

    def __init__(self, channel: FrontChannel, abi: ABI) -> None:
        self.channel = channel
        self.client: RingClient | None = None
        self.nr_ents = int(channel.ring.nr_ents)
        self.table: RequestTable = _TABLES.RequestTable(
            self.nr_ents, channel.slot_size, 4 if abi is ABI.X86_32 else 8)
        #: The table's free slots (the same list).
        self.free_ids: list[int] = self.table.free_ids
        #: Outstanding requests outside the table by id, in submission (hence deadline)
        #: order.
        self.pending: dict[int, _Pending] = {}

    @property
    def inflight(self) -> int:
        """Requests on this ring."""
        return len(self.pending) + self.table.inflight


class BlockFrontend(FrontendDriver):
    """The frontend of one vbd; see the module docstring.  After :meth:`start`,
    ``await fe.ready()`` and use :meth:`read`/:meth:`write`/:meth:`flush`/:meth:`discard`.
    """

    def __init__(self, platform: Platform, client: XenbusClient, path: str, *,
                 config: FrontConfig | None = None,
                 quarantine: GrantQuarantine | None = None, **kw: Any) -> None:
        """Serve the frontend directory ``path`` (see :class:`FrontendDriver`)."""
        super().__init__(client, path, **kw)
        self.platform = platform
        self.config = config or FrontConfig()
        #: Shares the backend still mapped when we ended them (R8), retried later.
        self.quarantine = quarantine if quarantine is not None else GrantQuarantine(
            platform.grants)
        self.abi = self.config.abi
        lay = layouts(self.abi)
        self._slot = lay.ring.slot_size
        #: id, operation echo and status at the head of every response slot.
        self._rsp_struct = struct.Struct("<QB1xh")
        self.queues: list[_Queue] = []
        self.sectors = 0
        self.sector_size = 512
        self.physical_sector_size = 512
        self.info_bits = 0
        self.features: dict[str, Any] = {}
        self.max_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST
        self.persistent = False
        self._pool: list[SharedPages] = []
        self._pool_free: list[SharedPages] = []
        self._pool_cap = 0
        self._pool_back = asyncio.Event()
        self._space = asyncio.Event()
        self._connected: asyncio.Future[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        #: The queue the requests of this loop turn go to (one push, one notify), None
        #: once pushed.
        self._batch_queue: _Queue | None = None
        self._push_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._rw_struct = lay.request.struct
        #: The protocol violation that failed the device (None while healthy).
        self.error: BlockPeerError | None = None
        self.io_stats = {"requests": 0, "indirect": 0, "responses": 0, "errors": 0,
                      "resizes": 0, "pool_waits": 0, "grants": 0}

    # -- properties
    @property
    def size(self) -> int:
        """Bytes on the disk: ``sectors`` (512-byte units, whatever the sector size) over
        whole logical sectors only (a backend publishing a partial one does not get it
        read or written)."""
        ss = self.sector_size
        return (self.sectors << SECTOR_SHIFT) // ss * ss

    @property
    def readonly(self) -> bool:
        """The backend serves the disk read-only (``info`` VDISK_READONLY)."""
        return bool(self.info_bits & VDISK_READONLY)

    @property
    def removable(self) -> bool:
        """``info`` VDISK_REMOVABLE."""
        return bool(self.info_bits & VDISK_REMOVABLE)

    @property
    def cdrom(self) -> bool:
        """``info`` VDISK_CDROM."""
        return bool(self.info_bits & VDISK_CDROM)

    @property
    def queue_depth(self) -> int:
        """Requests that can be in flight at once (ring slots over every queue)."""
        return sum(q.nr_ents for q in self.queues)

    @property
    def inflight(self) -> int:
        """Requests on the rings now."""
        return sum(q.inflight for q in self.queues)

    # -- xenbus hooks
    async def publish(self, backend: PeerKeys) -> None:
        """Build the rings the backend allows and write the ring keys (one transaction)."""
        self.quarantine.reap()
        self.error = None
        order = min(self.config.max_ring_order,
                    await backend.uint("max-ring-page-order", 0, 32, default=0))
        queues = min(self.config.max_queues,
                     await backend.uint("multi-queue-max-queues", 0, 1 << 16, default=1))
        queues = max(queues, 1)
        try:
            for _ in range(queues):
                ch = FrontChannel.create(self.platform, self.peer_domid,
                                         slot_size=self._slot, order=order,
                                         quarantine=self.quarantine)
                self.queues.append(_Queue(ch, self.abi))
        except PlatformError:
            self._release_queues()
            raise
        keys: dict[str, str | int] = {**front_keys([q.channel for q in self.queues]),
                                      "protocol": self.abi.value,
                                      "feature-persistent": int(self.config.persistent)}
        await self.write_keys(keys)

    async def connect(self, peer: PeerKeys) -> None:
        """Read the disk's properties and the backend's features; start the queues."""
        self.sectors = await peer.uint("sectors", 0, (1 << 63) - 1)
        self.sector_size = await peer.uint("sector-size", 512, XEN_PAGE_SIZE, default=512)
        if self.sector_size & (self.sector_size - 1):
            raise BlockPeerError(f"sector-size {self.sector_size} is not a power of two")
        self.physical_sector_size = await peer.uint("physical-sector-size", 512, 1 << 20,
                                                    default=self.sector_size)
        pss = self.physical_sector_size
        if pss & (pss - 1) or pss < self.sector_size:
            raise BlockPeerError(f"physical-sector-size {pss} is not a power of two at "
                                 f"least the sector-size {self.sector_size}")
        self.info_bits = await peer.uint("info", 0, 0xFFFF, default=0)
        f: dict[str, Any] = {
            "flush": await peer.feature("feature-flush-cache"),
            "barrier": await peer.feature("feature-barrier"),
            "discard": await peer.feature("feature-discard"),
            "persistent": await peer.feature("feature-persistent"),
        }
        indirect = await peer.uint("feature-max-indirect-segments", 0, 1 << 20, default=0)
        f["max_indirect_segments"] = indirect
        if f["discard"]:
            f["discard_granularity"] = await peer.uint("discard-granularity", 0, 1 << 30,
                                                       default=self.sector_size)
            f["discard_alignment"] = await peer.uint("discard-alignment", 0, 1 << 30,
                                                     default=0)
            f["discard_secure"] = await peer.feature("discard-secure")
        self.features = f
        self.persistent = self.config.persistent and bool(f["persistent"])
        if self.config.indirect and indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            self.max_segments = min(indirect, self.config.max_indirect_segments)
        else:
            self.max_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST
        self._pool_cap = max(self.config.persistent_pages, self.max_segments + 8)
        for q in self.queues:
            q.client = RingClient(q.channel, functools.partial(self._on_responses, q),
                                  spin_us=self.config.spin_us)
            q.client.start()
        self._watch_task = asyncio.create_task(self._watch_sectors())
        self._future().set_result(None)
        self._space.set()

    async def disconnect(self) -> None:
        """Stop the queues, fail what is in flight, release pages, rings and ports."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(BaseException):
                await self._watch_task
            self._watch_task = None
        fut = self._connected
        if fut is not None and not fut.done():
            fut.set_exception(LocalError("block device disconnected"))
            fut.exception()
        self._connected = None
        self._fail_all(BlockError("block device disconnected"))
        self._release_queues()

    def _release_queues(self) -> None:
        for q in self.queues:
            if q.client is not None:
                q.client.stop()
            q.channel.close()
        self.queues = []
        pool, self._pool, self._pool_free = self._pool, [], []
        for pages in pool:
            with contextlib.suppress(LocalError, PlatformError):
                self.quarantine.end(pages)
        self._space.set()
        self._pool_back.set()

    def _future(self) -> asyncio.Future[None]:
        if self._connected is None or self._connected.done():
            self._connected = asyncio.get_running_loop().create_future()
        return self._connected

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout`` s) until the disk is connected and usable."""
        if self._connected is None:
            self._future()
        assert self._connected is not None
        await asyncio.wait_for(asyncio.shield(self._connected), timeout)

    async def _watch_sectors(self) -> None:
        path = f"{self.peer_path}/sectors"
        with contextlib.suppress(Exception):
            async with self.client.watch(path, max_pending=4) as watch:
                async for _ in watch:
                    try:
                        raw = await self.client.read(path, timeout=self.op_timeout)
                        value = int(raw.decode("ascii"))
                    except (XenstoreError, TimeoutError, ValueError, UnicodeDecodeError):
                        continue
                    if 0 <= value < 1 << 63 and value != self.sectors:
                        log.info("%s: disk resized to %d sectors", self.path, value)
                        self.sectors = value
                        self.io_stats["resizes"] += 1

    # -- failing closed
    def _peer_failed(self, message: str) -> None:
        if self.error is not None:
            return
        self.error = BlockPeerError(message)
        log.warning("%s: backend misbehaved: %s", self.path, message)
        for q in self.queues:
            if q.client is not None:
                q.client.stop()
        self._fail_all(self.error)
        machine, error = self.machine, self.error
        if machine is not None and not machine.destroyed:
            self._post(lambda: machine.peer_error(error))  # error node, then Closing

    def _fail_all(self, exc: Exception) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._batch_queue = None
        for q in self.queues:
            # the staged requests were never pushed: nothing of theirs is on the ring
            futures = [b.future for b in q.table.fail_all()]  # pool pages back
            pending, q.pending = q.pending, {}
            for p in pending.values():
                futures.append(p.future)
                p.finish(BLKIF_RSP_ERROR)  # pages still mapped go to the quarantine
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()
            # the ids stay used: a queue that failed is never used again
        self._space.set()
        self._pool_back.set()

    # -- responses
    def _on_responses(self, q: _Queue, batch: memoryview, count: int) -> None:
        """Check and finish ``count`` responses (copied once by the ring client, R1): the
        request table finishes its own in one call, up to the first it leaves here (an
        answer to another request, or a violation this reports)."""
        pending, free_ids, table = q.pending, q.free_ids, q.table
        unpack = self._rsp_struct.unpack_from
        slot = self._slot
        j = done = 0
        try:
            while j < count:
                k = table.finish(batch, count, j)
                done += k - j
                if k == count:
                    return
                rid, op, status = unpack(batch, k * slot)
                j = k + 1
                p = pending.get(rid)
                if p is None:
                    expected = table.lookup(rid)
                    if expected < 0:
                        self._peer_failed(f"response to id {rid}, which is not outstanding")
                    elif op != expected:
                        self._peer_failed(f"response {rid}: operation {op}, request was "
                                          f"{expected}")
                    else:
                        self._peer_failed(f"response {rid}: unknown status {status}")
                    return
                if op != p.op:
                    self._peer_failed(f"response {rid}: operation {op}, request was {p.op}")
                    return
                if status not in _STATUSES:
                    self._peer_failed(f"response {rid}: unknown status {status}")
                    return
                del pending[rid]
                free_ids.append(rid & _SLOT_MASK)
                done += 1
                p.finish(status)
                b = p.batch
                if b is not None:
                    b.answered(status)
                elif not p.future.done():
                    p.future.set_result(status)
        finally:
            self.io_stats["responses"] += done
            self._space.set()
            self._pool_back.set()

    # -- submitting
    def _check_usable(self) -> None:
        if self.error is not None:
            raise self.error
        if not self.queues or self.queues[0].client is None or self._connected is None \
                or not self._connected.done():
            raise LocalError("block device not connected")

    async def _reserve(self) -> tuple[_Queue, int]:
        """A free ring slot: on the queue this loop turn's requests go to while it has
        room (they are pushed together), else on the queue with the most; waiting for
        space if needed (at most ``io_timeout``: slots of requests a silent backend never
        answered stay taken, R12)."""
        deadline = None
        while True:
            reserved = self._reserve_now()
            if reserved is not None:
                return reserved
            self._space.clear()
            deadline = await self._wait_for(self._space, deadline, "a free ring slot")

    def _reserve_now(self) -> tuple[_Queue, int] | None:
        """:meth:`_reserve` without waiting: None when every queue is full."""
        self._check_usable()
        best = self._batch_queue
        if best is None or not best.free_ids:
            best = max(self.queues, key=lambda q: len(q.free_ids))
        if best.free_ids:
            self._batch_queue = best
            return best, best.free_ids.pop()
        return None

    def _table_queue(self) -> _Queue | None:
        """The queue with the most free slots as this loop turn's queue (None, nothing
        chosen, when every queue is full)."""
        if not self.queues:
            return None
        best = max(self.queues, key=lambda q: len(q.free_ids))
        if not best.free_ids:
            return None
        self._batch_queue = best
        return best

    async def _wait_for(self, event: asyncio.Event, deadline: float | None, what: str
                        ) -> float:
        """Wait for ``event`` until ``deadline`` (now + ``io_timeout`` if None); the
        deadline, or :class:`TimeoutError` naming ``what``."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.config.io_timeout
        try:
            await asyncio.wait_for(event.wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise TimeoutError(f"no {what} within {self.config.io_timeout} s (requests "
                               "the backend has not answered hold them)") from None
        return deadline

    async def _request(self, reserved: tuple[_Queue, int], op: int,
                       build: Callable[[int], bytes], finish: Callable[[int], None]) -> int:
        """Put one request in the reserved slot and wait (bounded by ``io_timeout``) for
        its status.  The request is pushed with every other one built in this loop turn
        (:meth:`_push`: one push, one notification by the ring's rules)."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._submit(reserved, op, build, finish, fut, None)
        return await fut  # a late answer still finishes it (pages back, slot freed)

    def _submit(self, reserved: tuple[_Queue, int], op: int, build: Callable[[int], bytes],
                finish: Callable[[int], None], fut: asyncio.Future[Any],
                batch: Batch | None) -> None:
        """Put one request in the reserved slot, answered through ``fut`` (or through
        ``batch``, whose future ``fut`` is), pushed at the end of this loop turn."""
        q, slot = reserved
        rid = q.table.next_id(slot)  # a stale duplicate names an old id
        loop = asyncio.get_running_loop()
        try:
            self._check_usable()
            data = build(rid)
        except BaseException:
            q.free_ids.append(slot)
            finish(BLKIF_RSP_ERROR)
            raise
        deadline = loop.time() + self.config.io_timeout
        q.pending[rid] = _Pending(op, fut, finish, deadline, batch)
        q.table.stage(data)  # (room: every staged request holds a reserved slot)
        if not self._push_scheduled:
            self._push_scheduled = True
            loop.call_soon(self._push)
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._expire)
        self.io_stats["requests"] += 1

    def _push(self) -> None:
        """Push every request built since the last push, one ring push (and at most one
        notification) per queue."""
        self._push_scheduled = False
        self._batch_queue = None
        for q in self.queues:
            if q.table.staged and q.client is not None:
                n = q.table.take_staged()
                try:
                    pushed = q.client.submit_slots(q.table.out, n)
                except PeerError as exc:  # the backend broke the ring's indexes
                    self._peer_failed(str(exc))
                    return
                except LocalError:  # closed meanwhile: its requests failed already
                    continue
                if pushed < n:  # every one had a reserved slot: only a backend that
                    # moved the indexes wrongly takes the room away
                    self._peer_failed(f"ring full with {n - pushed} reserved requests "
                                      "unsent")
                    return

    def _expire(self) -> None:
        """Fail the waits of requests past their deadline with :class:`TimeoutError`
        (their ids and pages stay with the backend until it answers, R12); re-arm for
        the next deadline."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        nearest: float | None = None
        for q in self.queues:
            for rid, p in q.pending.items():  # submission order: deadlines ascending
                if p.future.done():
                    continue
                if p.deadline > now:
                    nearest = p.deadline if nearest is None else min(nearest, p.deadline)
                    break
                p.future.set_exception(TimeoutError(
                    f"request {rid}: no answer within {self.config.io_timeout} s"))
            for rid, deadline, b in q.table.entries():  # the table's, in any order
                if b.future.done():
                    continue
                if deadline > now:
                    nearest = deadline if nearest is None else min(nearest, deadline)
                    continue
                b.future.set_exception(TimeoutError(
                    f"request {rid}: no answer within {self.config.io_timeout} s"))
        if nearest is not None:
            self._watchdog = loop.call_at(nearest, self._expire)

    async def _pages(self, count: int, *, writable: bool
                     ) -> tuple[list[int], list[memoryview], Callable[[], None]]:
        """``count`` pages granted to the backend: their refs, their memory, and how to
        give them back.  With persistent grants every page comes from the pool (granted
        writable once, never ended while connected: the backend may keep it mapped),
        waiting for pages to come back when the pool is at its size."""
        got = self._pages_now(count, writable=writable)
        deadline = None
        while got is None:
            self._check_usable()
            self.io_stats["pool_waits"] += 1
            self._pool_back.clear()
            deadline = await self._wait_for(self._pool_back, deadline,
                                            f"{count} pages of the persistent pool")
            got = self._pages_now(count, writable=writable)
        return got

    def _pages_now(self, count: int, *, writable: bool
                   ) -> tuple[list[int], list[memoryview], Callable[[], None]] | None:
        """:meth:`_pages` without waiting: None when the pool has too few pages now."""
        if not self.persistent:
            share = self.platform.grants.grant(self.peer_domid, count, writable=writable)
            self.io_stats["grants"] += 1
            mems = [share.mem[i * XEN_PAGE_SIZE:(i + 1) * XEN_PAGE_SIZE]
                    for i in range(count)]

            def end() -> None:
                with contextlib.suppress(LocalError, PlatformError):
                    self.quarantine.end(share)
            return list(share.refs), mems, end
        if len(self._pool_free) + self._pool_cap - len(self._pool) < count:
            return None
        free = self._pool_free
        k = min(count, len(free))
        taken: list[SharedPages] = free[len(free) - k:]
        del free[len(free) - k:]
        try:
            while len(taken) < count:  # the pool grows up to its size
                pages = self.platform.grants.grant(self.peer_domid, 1, writable=True)
                self._pool.append(pages)
                taken.append(pages)
        except PlatformError:
            self._pool_free.extend(taken)
            raise
        pool = self._pool

        def back() -> None:
            if pool is self._pool:  # not from an earlier connection
                self._pool_free.extend(taken)
                self._pool_back.set()
        return [p.refs[0] for p in taken], [p.mem for p in taken], back

    def _grant_batch(self, count: int, write: bool) -> list[_Pages]:
        """Without persistent grants: ``count`` one-page grants for a batch's one-page
        requests, made (and ended, after the last of them is answered) in one call each;
        empty when fewer than two are needed or the grant fails (then per request)."""
        if count < 2:
            return []
        try:
            share = self.platform.grants.grant(self.peer_domid, count, writable=not write)
        except PlatformError:
            return []
        self.io_stats["grants"] += 1
        users = [count]

        def back() -> None:
            users[0] -= 1
            if users[0] == 0:
                with contextlib.suppress(LocalError, PlatformError):
                    self.quarantine.end(share)
        mem = share.mem
        return [([share.refs[i]], [mem[i * XEN_PAGE_SIZE:(i + 1) * XEN_PAGE_SIZE]], back)
                for i in range(count - 1, -1, -1)]

    def _check_range(self, offset: int, length: int) -> None:
        """Raise :class:`LocalError` unless ``offset``/``length`` are whole logical
        sectors on the disk."""
        ss = self.sector_size
        if offset < 0 or length < 0 or offset % ss or length % ss or offset % 512:
            raise LocalError(f"offset {offset} and length {length} must be multiples of "
                             f"the {ss}-byte sector size")
        if offset + length > self.size:
            raise LocalError(f"range {offset}+{length} beyond the {self.size}-byte disk")

    async def _rw(self, write: bool, offset: int, length: int,
                  data: memoryview | None, out: bytearray | None) -> None:
        """Move ``length`` bytes at ``offset``: split, submit every piece, wait for all."""
        self._check_range(offset, length)
        if write and self.readonly:
            raise BlockError("the disk is read-only")
        chunk = self.max_segments * XEN_PAGE_SIZE
        if length <= chunk:  # one request: no task of its own
            reserved = self._reserve_now()
            if reserved is None:
                reserved = await self._reserve()
            await self._one_rw(reserved, write, offset, length, data, out, 0)
            return
        pieces = []
        failed: Exception | None = None
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            try:
                reserved = await self._reserve()
            except Exception as exc:  # the pieces started still end (bounded) first
                failed = exc
                break
            pieces.append(asyncio.ensure_future(self._one_rw(reserved, write, offset + start,
                                                             n, data, out, start)))
        results = await asyncio.gather(*pieces, return_exceptions=True)
        if failed is not None:
            raise failed
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _rw_pages_now(self, npages: int, write: bool) -> _RwPages | None:
        """The data pages of a request of ``npages`` (and its indirect pages when it
        needs them) if they are free now, else None (nothing taken)."""
        got = self._pages_now(npages, writable=not write)
        if got is None:
            return None
        if npages <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return got, None
        ind = self._pages_now(indirect_pages(npages), writable=False)
        if ind is None:
            got[2]()
            return None
        return got, ind

    async def _rw_pages(self, npages: int, write: bool) -> _RwPages:
        """:meth:`_rw_pages_now`, waiting (bounded) for pool pages."""
        got = await self._pages(npages, writable=not write)
        if npages <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return got, None
        try:
            return got, await self._pages(indirect_pages(npages), writable=False)
        except BaseException:
            got[2]()
            raise

    def _build_rw(self, pages: _RwPages, write: bool, offset: int, n: int,
                  data: memoryview | None, out: memoryview | bytearray | None, start: int
                  ) -> tuple[int, Callable[[int], bytes], Callable[[int], None]]:
        """One READ/WRITE (INDIRECT past 11 pages) of ``n`` bytes at ``offset``, its data
        at ``start`` of ``data``/``out``, in ``pages``: the wire operation, how to build
        its slot, and how to finish it (copy a read out, give the pages back)."""
        (refs, mems, give_back), ind = pages
        npages = len(refs)
        if write:
            assert data is not None
            if npages == 1:
                mems[0][:n] = data[start:start + n]
            else:
                for i, m in enumerate(mems):
                    piece = data[start + i * XEN_PAGE_SIZE:
                                 start + min((i + 1) * XEN_PAGE_SIZE, n)]
                    m[:len(piece)] = piece
        # every page full but the last: (gref, first sector 0, last sector) each
        lasts = [_PAGE_LAST] * (npages - 1)
        lasts.append(((n - (npages - 1) * XEN_PAGE_SIZE) >> SECTOR_SHIFT) - 1)
        op = BLKIF_OP_WRITE if write else BLKIF_OP_READ
        sector = offset >> SECTOR_SHIFT
        build: Callable[[int], bytes]
        if ind is not None:
            ind_refs, ind_mems, _ = ind
            for m, content in zip(ind_mems, pack_indirect_columns(refs, 0, lasts),
                                  strict=True):
                m[:] = content
            grefs = tuple(ind_refs) + (0,) * (8 - len(ind_refs))

            def build(rid: int) -> bytes:
                return BlkifRequestIndirect(BLKIF_OP_INDIRECT, op, npages, rid, sector, 0,
                                            grefs).pack(self.abi)
            self.io_stats["indirect"] += 1
            wire_op = BLKIF_OP_INDIRECT
        else:
            flat: list[int] = []
            for ref, last in zip(refs, lasts, strict=True):
                flat += (ref, 0, last)
            flat += _NO_SEGMENTS[len(flat):]
            pack = self._rw_struct.pack

            def build(rid: int) -> bytes:
                return pack(op, npages, 0, rid, sector, *flat)
            wire_op = op

        def finish(status: int) -> None:
            if status == BLKIF_RSP_OKAY and not write and out is not None:
                if npages == 1:
                    out[start:start + n] = mems[0][:n]
                else:
                    for i, m in enumerate(mems):
                        k = min(XEN_PAGE_SIZE, n - i * XEN_PAGE_SIZE)
                        out[start + i * XEN_PAGE_SIZE:start + i * XEN_PAGE_SIZE + k] = m[:k]
            give_back()
            if ind is not None:
                ind[2]()
        return wire_op, build, finish

    async def _one_rw(self, reserved: tuple[_Queue, int], write: bool, offset: int, n: int,
                      data: memoryview | None, out: memoryview | bytearray | None,
                      start: int) -> None:
        npages = -(-n // XEN_PAGE_SIZE)
        try:
            pages = self._rw_pages_now(npages, write)  # no coroutine when they are free
            if pages is None:
                pages = await self._rw_pages(npages, write)
        except BaseException:
            reserved[0].free_ids.append(reserved[1])
            raise
        wire_op, build, finish = self._build_rw(pages, write, offset, n, data, out, start)
        status = await self._request(reserved, wire_op, build, finish)
        if status != BLKIF_RSP_OKAY:
            self.io_stats["errors"] += 1
            raise BlockError(f"{'write' if write else 'read'} of {n} bytes at {offset} "
                             f"failed (status {status})", status)

    async def _rw_many(self, write: bool,
                       items: Iterable[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Every ``(offset, buffer)`` of ``items`` read into or written from its buffer,
        as requests submitted back to back (pushed together) and answered through one
        future; see :meth:`read_many`."""
        ss, size = self.sector_size, self.size
        # everything is checked before anything is sent: one-page bytearrays (or bytes
        # to write) in one compiled pass, anything else item by item
        some = _TABLES.split_pages(items, write, ss, size) if type(items) is list else None
        pieces: list[tuple[int, int, memoryview, int]] = [] if some is None else some
        chunk = self.max_segments * XEN_PAGE_SIZE
        for offset, buf in items if some is None else ():
            view = memoryview(buf).cast("B")
            if not write and view.readonly:
                raise LocalError("read_many needs writable buffers")
            length = len(view)
            if offset < 0 or offset % ss or length % ss or offset % 512 \
                    or offset + length > size:
                self._check_range(offset, length)  # (raises, saying which rule)
            if 0 < length <= chunk:
                pieces.append((offset, length, view, 0))
                continue
            for start in range(0, length, chunk):
                pieces.append((offset + start, min(chunk, length - start), view, start))
        self._check_usable()
        if write and self.readonly:
            raise BlockError("the disk is read-only")
        if not pieces:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        total = len(pieces)
        batch: Batch = _TABLES.Batch(fut, total)
        failed: BaseException | None = None
        free, stats = self._pool_free, self.io_stats
        deadline = loop.time() + self.config.io_timeout
        granted = [] if self.persistent else self._grant_batch(
            sum(1 for piece in pieces if piece[1] <= XEN_PAGE_SIZE), write)
        k = 0
        while k < total:
            if self.persistent and free and free is self._pool_free and self.error is None:
                # the common case: one-page pieces on free pages of the persistent pool,
                # built into this turn's queue by its request table (no closure, no
                # record: the table finishes them too)
                q = self._batch_queue
                if q is None or not q.free_ids:
                    q = self._table_queue()
                if q is not None:
                    built = q.table.build(pieces, k, write, free, deadline, batch)
                    if built > k:
                        stats["requests"] += built - k
                        k = built
                        if not self._push_scheduled:
                            self._push_scheduled = True
                            loop.call_soon(self._push)
                        if self._watchdog is None:
                            self._watchdog = loop.call_at(deadline, self._expire)
                        if k == total:
                            break
            offset, n, view, start = pieces[k]
            try:
                reserved = self._reserve_now()
                if reserved is None:  # the ring is full: what is built goes out now
                    reserved = await self._reserve()
                try:
                    pages: _RwPages | None = (granted.pop(), None) \
                        if granted and n <= XEN_PAGE_SIZE else \
                        self._rw_pages_now(-(-n // XEN_PAGE_SIZE), write)
                    if pages is None:
                        pages = await self._rw_pages(-(-n // XEN_PAGE_SIZE), write)
                except BaseException:
                    reserved[0].free_ids.append(reserved[1])
                    raise
                wire_op, build, finish = self._build_rw(
                    pages, write, offset, n, view if write else None,
                    None if write else view, start)
                self._submit(reserved, wire_op, build, finish, fut, batch)
                deadline = loop.time() + self.config.io_timeout  # after any wait
            except BaseException as exc:  # the pieces sent still end (bounded) first
                failed = exc
                batch.remaining -= total - k
                if batch.remaining <= 0 and not fut.done():
                    fut.set_result(None)
                break
            k += 1
        for unused in granted:  # pages of pieces never sent
            unused[2]()
        try:
            await fut
        except BaseException:
            if failed is None:
                raise
        if failed is not None:
            raise failed
        if batch.errors:
            self.io_stats["errors"] += batch.errors
            raise BlockError(f"{batch.errors} of the {len(pieces)} requests of a "
                             f"{'write' if write else 'read'} batch failed (status "
                             f"{batch.status})", batch.status)

    # -- the API
    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (both whole sectors)."""
        out = bytearray(length)
        await self._rw(False, offset, length, None, out)
        return bytes(out)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (whole sectors) at ``offset``."""
        view = memoryview(data).cast("B")
        await self._rw(True, offset, len(view), view, None)

    async def read_many(self, items: Iterable[tuple[int, bytearray | memoryview]]) -> None:
        """Read every ``(offset, buffer)`` of ``items``: ``len(buffer)`` bytes at
        ``offset`` (both whole sectors) into the writable ``buffer``.  Every request is
        submitted at once (pushed together, waiting for ring space or pool pages only when
        they are short) and the call waits on one future for all of them: no task, future
        or coroutine per request.  All are checked before any is sent; if any fails,
        :class:`BlockError` after all have ended (the other buffers hold their data)."""
        await self._rw_many(False, items)

    async def write_many(self, items: Iterable[tuple[int, bytes | bytearray | memoryview]]
                         ) -> None:
        """Write every ``(offset, data)`` of ``items`` (whole sectors), as
        :meth:`read_many` reads."""
        await self._rw_many(True, items)

    async def _simple(self, op: int, build: Callable[[int], bytes]) -> int:
        return await self._request(await self._reserve(), op, build, lambda status: None)

    async def flush(self) -> bool:
        """Make every write answered so far durable: FLUSH_DISKCACHE, or a WRITE_BARRIER
        without data when only barriers are offered.  False (nothing sent) when the
        backend offers neither (its cache is then write-through)."""
        self._check_usable()
        f = self.features
        if f.get("flush"):
            op = BLKIF_OP_FLUSH_DISKCACHE
        elif f.get("barrier"):
            op = BLKIF_OP_WRITE_BARRIER
        else:
            return False
        status = await self._simple(op, lambda rid: BlkifRequest(op, 0, 0, rid, 0).pack(
            self.abi))
        if status == BLKIF_RSP_EOPNOTSUPP:
            f["flush" if op == BLKIF_OP_FLUSH_DISKCACHE else "barrier"] = False
            return await self.flush()
        if status != BLKIF_RSP_OKAY:
            raise BlockError(f"flush failed (status {status})", status)
        return True

    async def barrier(self) -> None:
        """A WRITE_BARRIER without data (raises :class:`BlockUnsupported` if not offered)."""
        self._check_usable()
        if not self.features.get("barrier"):
            raise BlockUnsupported("the backend does not offer barriers")
        op = BLKIF_OP_WRITE_BARRIER
        status = await self._simple(op, lambda rid: BlkifRequest(op, 0, 0, rid, 0).pack(
            self.abi))
        if status == BLKIF_RSP_EOPNOTSUPP:
            self.features["barrier"] = False
            raise BlockUnsupported("the backend refused a barrier")
        if status != BLKIF_RSP_OKAY:
            raise BlockError(f"barrier failed (status {status})", status)

    async def discard(self, offset: int, length: int, *, secure: bool = False) -> None:
        """Discard ``length`` bytes at ``offset`` (reads may then return zeros); both whole
        logical sectors.  ``secure``: the old data must be erased, not just unmapped
        (only when the backend offers ``discard-secure``, else
        :class:`BlockUnsupported` and nothing is sent; an EOPNOTSUPP answer turns secure
        discard off, plain discard stays)."""
        self._check_usable()
        self._check_range(offset, length)
        if not self.features.get("discard"):
            raise BlockUnsupported("the backend does not offer discard")
        if secure and not self.features.get("discard_secure"):
            raise BlockUnsupported("the backend does not offer secure discard")
        if length == 0:
            return
        op = BLKIF_OP_DISCARD
        sector, count = offset >> SECTOR_SHIFT, length >> SECTOR_SHIFT
        status = await self._simple(op, lambda rid: BlkifRequestDiscard(
            op, int(secure), 0, rid, sector, count).pack(self.abi))
        if status == BLKIF_RSP_EOPNOTSUPP:
            self.features["discard_secure" if secure else "discard"] = False
            raise BlockUnsupported(f"the backend refused {'secure ' if secure else ''}"
                                   "discard")
        if status != BLKIF_RSP_OKAY:
            raise BlockError(f"discard failed (status {status})", status)

    def info(self) -> dict[str, Any]:
        """Negotiated features, rings, queues and counters."""
        return {
            "path": self.path, "state": self.state.name, "sectors": self.sectors,
            "sector_size": self.sector_size,
            "physical_sector_size": self.physical_sector_size, "size": self.size,
            "readonly": self.readonly, "abi": self.abi.value,
            "queues": len(self.queues),
            "ring_pages": [1 << q.channel.order for q in self.queues],
            "queue_depth": self.queue_depth, "inflight": self.inflight,
            "max_segments": self.max_segments, "persistent": self.persistent,
            "features": dict(self.features), "stats": dict(self.io_stats),
        }

"""The block frontend's request table: one queue's ring ids, its staged requests, and its
in-flight one-page requests of batches (the readable twin of ``cython/blktable.pyx``).

Theory of operation
-------------------
Each queue of :class:`~xenpv.frontends.block.BlockFrontend` owns one
:class:`RequestTable`.  It hands out the ring slots (``free_ids``) and the request ids
(``(generation << 16) | slot``: an id is not reused soon after its answer, so a stale
duplicate answer names no outstanding request, R6), and it holds the requests built since
the last push as whole slots in ``out`` (``staged`` of them), so that a push copies them
into the ring in one call.

The common request of the batch API (:meth:`~xenpv.frontends.block.BlockFrontend.read_many`
/ ``write_many``) — at most one page, on a free page of the persistent pool — never
becomes a Python record of the frontend: :meth:`RequestTable.build` writes the slots of
as many such pieces as it can (a write's data copied into its page) and keeps each in the
table; :meth:`RequestTable.finish` consumes responses in ring order while each answers
such a request with its operation echoed and a known status (a read's data copied out, the
page back on its free list, the batch counted) and stops at the first it leaves to the
frontend's general path: another request's answer, or a protocol violation, which the
frontend reports (:meth:`RequestTable.lookup` tells it what the table holds).
:meth:`RequestTable.entries` and :meth:`RequestTable.fail_all` serve the frontend's
timeouts and its failing closed.

``XENPV_PURE_PYTHON=1`` (:mod:`xenpv.compiled`) or an unbuilt extension makes the frontend
use these classes; otherwise ``xenpv.frontends._blktable`` (the same API, no Python object
per request) serves.  Tests run both on the same operations.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any

from xenpv.protocols.blkif import (
    ABI,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SECTOR_SHIFT,
    layouts,
)
from xenpv.protocols.layout import XEN_PAGE_SIZE

__all__ = ["GENERATION_MASK", "SLOT_BITS", "Batch", "RequestTable", "split_pages"]

#: A request id is (generation << SLOT_BITS) | ring slot.
SLOT_BITS = 16
_SLOT_MASK = (1 << SLOT_BITS) - 1
#: Generations wrap here, so every id fits the wire's u64.
GENERATION_MASK = (1 << 48) - 1
_STATUSES = (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)
#: id, operation echo and status at the head of every response slot (every ABI).
_RESPONSE = struct.Struct("<QB1xh")
#: The unused segments of a one-segment plain request.
_ONE_SEGMENT_TAIL = (0,) * (3 * (BLKIF_MAX_SEGMENTS_PER_REQUEST - 1))

#: A piece of a batch: (byte offset on the disk, bytes, buffer, offset in the buffer).
Piece = tuple[int, int, memoryview, int]


def split_pages(items: list[Any], write: bool, sector_size: int, size: int
                ) -> list[Piece] | None:
    """The pieces of ``items`` (``(offset, buffer)`` pairs) when every one is a single
    piece the table builds: a ``bytearray`` (or, to write, ``bytes``) of at most a page,
    offset and length whole ``sector_size`` sectors (and 512-byte units) within ``size``
    bytes; else None, and the caller checks and splits them in full (which says what is
    wrong)."""
    pieces: list[Piece] = []
    for item in items:
        if type(item) is not tuple or len(item) != 2:
            return None
        offset, buf = item
        kind = type(buf)
        if type(offset) is not int or not (kind is bytearray or (write and kind is bytes)):
            return None
        n = len(buf)
        if not 0 < n <= XEN_PAGE_SIZE or offset < 0 or offset % sector_size \
                or n % sector_size or offset % 512 or n % 512 or offset + n > size:
            return None
        pieces.append((offset, n, memoryview(buf), 0))
    return pieces


class Batch:
    """The requests of one ``read_many``/``write_many`` call: one future for all of
    them, set (to None) when the last is answered; ``errors`` counts those answered with
    an error and ``status`` is the first such status."""

    __slots__ = ("errors", "future", "remaining", "status")

    def __init__(self, future: asyncio.Future[Any], remaining: int) -> None:
        """``remaining`` requests, answered through ``future``."""
        self.future = future
        self.remaining = remaining
        self.errors = 0
        self.status = BLKIF_RSP_OKAY

    def answered(self, status: int) -> None:
        """One request of the batch is answered; the future is set after the last."""
        if status != BLKIF_RSP_OKAY:
            self.errors += 1
            if self.status == BLKIF_RSP_OKAY:
                self.status = status
        self.remaining -= 1
        if self.remaining <= 0 and not self.future.done():
            self.future.set_result(None)


class _Entry:
    """A one-page request of a batch in the table."""

    __slots__ = ("batch", "deadline", "home", "n", "op", "out", "page", "start")

    def __init__(self, op: int, deadline: float, page: Any, home: list[Any],
                 out: memoryview | None, start: int, n: int, batch: Batch) -> None:
        self.op = op
        self.deadline = deadline
        self.page = page
        self.home = home
        self.out = out
        self.start = start
        self.n = n
        self.batch = batch


class RequestTable:
    """One queue's ids, staged slots and in-flight one-page batch requests; see the
    module docstring."""

    def __init__(self, nr_ents: int, slot_size: int, id_offset: int) -> None:
        """A ring of ``nr_ents`` slots of ``slot_size`` bytes, the request id at
        ``id_offset`` (4 for the x86_32 ABI, else 8)."""
        abi = ABI.X86_32 if id_offset == 4 else ABI.X86_64
        if not 0 < nr_ents <= 1 << SLOT_BITS or id_offset not in (4, 8) \
                or layouts(abi).ring.slot_size != slot_size:
            raise ValueError(f"no blkif ring of {nr_ents} slots of {slot_size} bytes with "
                             f"the id at {id_offset}")
        self.nr_ents = nr_ents
        self.slot_size = slot_size
        #: Free ring slots (taken from the end).
        self.free_ids: list[int] = list(range(nr_ents - 1, -1, -1))
        self.generation = 0
        #: Requests built since the last push, whole slots at the start of ``out``.
        self.out = bytearray(nr_ents * slot_size)
        self.staged = 0
        self._pack = layouts(abi).request.struct.pack
        self._entries: dict[int, _Entry] = {}

    @property
    def inflight(self) -> int:
        """Requests of the table on the ring (answered ones are gone)."""
        return len(self._entries)

    def next_id(self, slot: int) -> int:
        """The id of the next request in ``slot`` (a new generation)."""
        self.generation = (self.generation + 1) & GENERATION_MASK
        return (self.generation << SLOT_BITS) | slot

    def stage(self, data: bytes) -> None:
        """Stage one request built elsewhere (at most a slot; the rest is zeroed)."""
        e, k = self.slot_size, self.staged
        if len(data) > e or k >= self.nr_ents:
            raise ValueError("no room to stage the request")
        self.out[k * e:k * e + len(data)] = data
        self.out[k * e + len(data):(k + 1) * e] = bytes(e - len(data))
        self.staged = k + 1

    def take_staged(self) -> int:
        """How many slots are staged in ``out``; the stage is empty afterwards."""
        k, self.staged = self.staged, 0
        return k

    def build(self, pieces: Sequence[Piece], k: int, write: bool, free: list[Any],
              deadline: float, batch: Batch) -> int:
        """Build and stage ``pieces[k:]`` while each is at most a page and there are a
        free slot and a free page in ``free`` (the persistent pool's free list, whose
        pages the answer gives back there); returns the index of the first piece not
        built.  A write's data is copied into its page now, a read's out when answered;
        a piece not on whole 512-byte sectors, whose buffer is too short, or a read into
        a read-only buffer is left to the caller."""
        op = BLKIF_OP_WRITE if write else BLKIF_OP_READ
        free_ids, pack = self.free_ids, self._pack
        while k < len(pieces):
            offset, n, view, start = pieces[k]
            if not 0 < n <= XEN_PAGE_SIZE or n % 512 or offset < 0 or offset % 512 \
                    or start < 0 or not free or not free_ids:
                break
            page = free[-1]
            if (not write and view.readonly) or start + n > len(view) \
                    or len(page.mem) < n:
                break
            ref = page.refs[0]
            if self.staged >= self.nr_ents:
                raise ValueError("no room to stage the request")
            rid = self.next_id(free_ids.pop())
            self.stage(pack(op, 1, 0, rid, offset >> SECTOR_SHIFT, ref, 0,
                            (n >> SECTOR_SHIFT) - 1, *_ONE_SEGMENT_TAIL))
            free.pop()
            if write:
                page.mem[:n] = view[start:start + n]
            self._entries[rid] = _Entry(op, deadline, page, free, None if write else view,
                                        start, n, batch)
            k += 1
        return k

    def finish(self, responses: bytes | bytearray | memoryview, count: int, j: int) -> int:
        """Consume responses ``j`` .. ``count - 1`` of ``responses`` (whole slots, a
        private copy) while each answers a request of the table, echoes its operation
        and has a known status: a read's data copied out (if OKAY), the page back, the
        slot free, the batch counted.  Returns the index of the first response left to
        the caller (``count`` when none)."""
        entries, free_ids, e = self._entries, self.free_ids, self.slot_size
        while j < count:
            rid, op, status = _RESPONSE.unpack_from(responses, j * e)
            entry = entries.get(rid)
            if entry is None or op != entry.op or status not in _STATUSES:
                return j
            del entries[rid]
            free_ids.append(rid & _SLOT_MASK)
            page, n = entry.page, entry.n
            if status == BLKIF_RSP_OKAY and entry.out is not None:
                entry.out[entry.start:entry.start + n] = page.mem[:n]
            entry.home.append(page)
            entry.batch.answered(status)
            j += 1
        return j

    def lookup(self, rid: int) -> int:
        """The operation of the table's request ``rid`` on the ring, or -1 if none."""
        entry = self._entries.get(rid)
        return -1 if entry is None else entry.op

    def entries(self) -> list[tuple[int, float, Batch]]:
        """(id, deadline, batch) of every request of the table on the ring."""
        return [(rid, e.deadline, e.batch) for rid, e in self._entries.items()]

    def fail_all(self) -> list[Batch]:
        """End every request of the table unanswered (pages back, nothing copied; their
        slots stay taken: the queue is not used again) and drop the staged slots;
        returns their batches (once each, in the order first met)."""
        entries, self._entries = self._entries, {}
        self.staged = 0
        batches: dict[int, Batch] = {}
        for e in entries.values():
            e.home.append(e.page)
            batches.setdefault(id(e.batch), e.batch)
        return list(batches.values())

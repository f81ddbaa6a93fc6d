"""The net frontend's TX table: one queue's TX pages, its staged TX slots and the checks
on the backend's TX answers (the readable twin of ``cython/netfronttx.pyx``).

Theory of operation
-------------------
Each queue of :class:`~xenpv.frontends.net.NetFrontend` owns one :class:`TxTable` over
its granted TX pages (``npages`` of 4096 bytes in ``mem``, page ``k`` granted as
``refs[k]``; a page's id on the ring is its index).  Free pages are a stack: a frame
takes the pages ``pop()`` would give, in that order.  The slots of the frames filled
since the last push are laid out as whole 12-byte ``netif_tx_request`` slots in ``out``
(``staged`` of them), so a push is one
:meth:`~xenpv.drivers.ringservice.RingClient.submit_slots` call; :meth:`pushed` empties
it.  A frame's slots: the first with the total size, the checksum flags,
``NETTXF_extra_info`` when a GSO record follows and ``NETTXF_more_data`` when pages
follow; the GSO extra-info slot (given packed); one slot per further page, more-data on
all but the last.

Two ways in: :meth:`TxTable.fill` copies a frame's bytes into its pages, and
:meth:`TxTable.read_frame` reads one TAP frame (its 10-byte ``virtio_net_hdr`` into
``hdr``, the frame straight into the top free pages: no ``bytes`` object and no second
copy), after which :meth:`TxTable.commit` takes the pages the frame filled.

:meth:`TxTable.reap` checks the backend's answers (``netif_tx_response``: id, status) in
ring order: a NULL status (the answer to an extra-info slot) is skipped; an unknown
status, or an id that names no page in flight (never sent, or answered already) is a
protocol violation that stops the reaping and is returned as a message (the frontend
fails the device closed); every other answer frees its page.  A page :meth:`watch`-ed
(a multicast change whose answer is awaited) is handed back with its status instead of
being counted as an error.

``XENPV_PURE_PYTHON=1`` (:mod:`xenpv.compiled`) or an unbuilt extension makes the frontend
use this class; otherwise ``xenpv.frontends._nettx`` (the same API, compiled) serves.  A
Hypothesis test runs both on the same operations.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from xenpv.drivers.tap import VNET_HDR
from xenpv.protocols.layout import XEN_PAGE_SIZE
from xenpv.protocols.netif import (
    NETIF_RSP_DROPPED,
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    TX_RING,
    NETTXF_extra_info,
    NETTXF_more_data,
)

__all__ = ["MAX_FRAME", "MAX_FRAME_PAGES", "SLOT", "VNET_HDR_SIZE", "TxTable"]

#: Bytes of one TX ring slot (request or response).
SLOT = TX_RING.slot_size
#: The ``virtio_net_hdr`` in front of each TAP frame.
VNET_HDR_SIZE = VNET_HDR.size
#: The largest frame a TX chain carries (its size field is 16 bits).
MAX_FRAME = 0xFFFF
#: Pages a frame of :data:`MAX_FRAME` bytes takes.
MAX_FRAME_PAGES = -(-MAX_FRAME // XEN_PAGE_SIZE)
_REQ = struct.Struct("<IHHHH")
_RSP = struct.Struct("<Hh")
_STATUSES = (NETIF_RSP_OKAY, NETIF_RSP_ERROR, NETIF_RSP_DROPPED)


class TxTable:
    """One queue's TX pages and staged slots; see the module docstring."""

    def __init__(self, mem: Any, refs: list[int], max_slots: int) -> None:
        """Pages ``mem`` (``len(refs)`` of them, writable), granted as ``refs``; room
        for ``max_slots`` staged slots (the ring's size)."""
        self.mem = memoryview(mem).cast("B")
        self.refs = list(refs)
        self.npages = len(self.refs)
        if self.npages < 1 or len(self.mem) < self.npages * XEN_PAGE_SIZE or max_slots < 1:
            raise ValueError("a TX table needs its pages and room for a slot")
        self.free = list(range(self.npages - 1, -1, -1))
        self.out_ids: set[int] = set()
        self.watched: set[int] = set()
        self.out = bytearray(max_slots * SLOT)
        self.staged = 0
        self.hdr = bytearray(VNET_HDR_SIZE)
        self._pages = [self.mem[k * XEN_PAGE_SIZE:(k + 1) * XEN_PAGE_SIZE]
                       for k in range(self.npages)]

    def free_pages(self) -> int:
        """Pages free now."""
        return len(self.free)

    def outstanding(self) -> int:
        """Pages in flight (sent, not answered)."""
        return len(self.out_ids)

    def room(self) -> int:
        """Slots that can still be staged."""
        return len(self.out) // SLOT - self.staged

    def pushed(self) -> None:
        """The staged slots went to the ring (or were dropped): stage anew."""
        self.staged = 0

    def take(self) -> int:
        """Take one free page (for a request built elsewhere); ValueError if none."""
        if not self.free:
            raise ValueError("no free TX page")
        idx = self.free.pop()
        self.out_ids.add(idx)
        return idx

    def watch(self, idx: int) -> None:
        """Hand ``idx``'s answer back from :meth:`reap` (it is awaited)."""
        if 0 <= idx < self.npages:
            self.watched.add(idx)

    def fill(self, data: Any, flags: int, gso: bytes | None) -> int:
        """Copy the frame ``data`` into its pages and stage its slots (``flags``: the
        first slot's checksum flags; ``gso``: the packed GSO extra-info slot or None);
        the slots staged.  ValueError (nothing taken) without the pages or the room."""
        view = memoryview(data).cast("B")
        size = len(view)
        pages = self._check(size, gso)
        for k in range(pages):
            idx = self.free[-1 - k]
            piece = view[k * XEN_PAGE_SIZE:(k + 1) * XEN_PAGE_SIZE]
            at = idx * XEN_PAGE_SIZE
            self.mem[at:at + len(piece)] = piece
        return self.commit(size, flags, gso)

    def read_frame(self, fd: int) -> int:
        """Read one frame from the TAP fd ``fd``: its header into :attr:`hdr`, the
        frame into the top :data:`MAX_FRAME_PAGES` free pages (taken by :meth:`commit`
        only); the bytes read, header included, or -1 if none is ready.  ValueError
        without that many free pages, OSError if the read fails."""
        if len(self.free) < MAX_FRAME_PAGES:
            raise ValueError("a TAP read needs the pages of the largest frame free")
        bufs = [memoryview(self.hdr)]
        for k in range(MAX_FRAME_PAGES):
            bufs.append(self._pages[self.free[-1 - k]])
        bufs[-1] = bufs[-1][:MAX_FRAME - (MAX_FRAME_PAGES - 1) * XEN_PAGE_SIZE]
        try:
            return os.readv(fd, bufs)
        except BlockingIOError:
            return -1

    def head(self, size: int) -> memoryview:
        """The start of a frame of ``size`` bytes just read (its first page: every
        header is there)."""
        if not self.free:
            raise ValueError("no frame read")
        return self._pages[self.free[-1]][:min(size, XEN_PAGE_SIZE)]

    def frame(self, size: int) -> bytes:
        """A copy of the ``size`` bytes just read (for a frame sent another way)."""
        if not 0 < size <= MAX_FRAME or -(-size // XEN_PAGE_SIZE) > len(self.free):
            raise ValueError(f"no frame of {size} bytes read")
        pages = -(-size // XEN_PAGE_SIZE)
        return b"".join(bytes(self._pages[self.free[-1 - k]][:min(XEN_PAGE_SIZE,
                                                                   size - k * XEN_PAGE_SIZE)])
                        for k in range(pages))

    def commit(self, size: int, flags: int, gso: bytes | None) -> int:
        """Take the pages holding a frame of ``size`` bytes (the top free ones, as
        :meth:`fill` and :meth:`read_frame` leave it) and stage its slots; the slots
        staged.  ValueError (nothing taken) without the pages or the room."""
        pages = self._check(size, gso)
        idxs = [self.free.pop() for _ in range(pages)]
        self.out_ids.update(idxs)
        at = self.staged * SLOT
        first = idxs[0]
        head = flags | (NETTXF_extra_info if gso is not None else 0) | \
            (NETTXF_more_data if pages > 1 else 0)
        _REQ.pack_into(self.out, at, self.refs[first], 0, head, first, size)
        at += SLOT
        if gso is not None:
            self.out[at:at + SLOT] = gso.ljust(SLOT, b"\0")
            at += SLOT
        for k in range(1, pages):
            idx = idxs[k]
            last = k == pages - 1
            _REQ.pack_into(self.out, at, self.refs[idx], 0, 0 if last else NETTXF_more_data,
                           idx, size - k * XEN_PAGE_SIZE if last else XEN_PAGE_SIZE)
            at += SLOT
        n = at // SLOT - self.staged
        self.staged += n
        return n

    def _check(self, size: int, gso: bytes | None) -> int:
        if not 0 < size <= MAX_FRAME:
            raise ValueError(f"a TX frame of {size} bytes")
        if gso is not None and len(gso) > SLOT:
            raise ValueError("an extra-info slot larger than a slot")
        pages = -(-size // XEN_PAGE_SIZE)
        if pages > len(self.free):
            raise ValueError("no free TX pages for the frame")
        if pages + (gso is not None) > self.room():
            raise ValueError("no room for the frame's slots")
        return pages

    def reap(self, batch: Any, count: int) -> tuple[int, list[tuple[int, int]], str | None]:
        """Check and apply ``count`` TX answers (``batch``: whole slots, ring order):
        (answers other than OKAY, the watched pages' ``(id, status)``, the violation
        that stopped it or None)."""
        errors = 0
        answered: list[tuple[int, int]] = []
        if count * SLOT > len(memoryview(batch).cast("B")):
            raise ValueError("fewer answers in the batch than counted")
        for j in range(count):
            rid, status = _RSP.unpack_from(batch, j * SLOT)
            if status == NETIF_RSP_NULL:
                continue
            if status not in _STATUSES:
                return errors, answered, f"unknown status {status}"
            if rid not in self.out_ids:
                return errors, answered, f"response to id {rid}, which is not outstanding"
            self.out_ids.discard(rid)
            self.free.append(rid)
            if rid in self.watched:
                self.watched.discard(rid)
                answered.append((rid, status))
            elif status != NETIF_RSP_OKAY:
                errors += 1
        return errors, answered, None

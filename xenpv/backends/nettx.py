"""The net backend's TX copy group: where a batch's pieces go in the staging area, the
pieces' copy records, and what comes out once they are copied.

Theory of operation
-------------------
A :class:`TxGroupReference` (compiled: ``cython/nettx.pyx``, chosen by :func:`tx_group`)
belongs to one queue's staging area of ``pages`` own pages.  It lays pieces out there
(:meth:`~TxGroupReference.layout`, the rule of ``backends.net._Staging``: a piece never
crosses a page; pieces one after the other, each page taken in order; a whole page with a
key — the frontend's grant reference — on the first page free in the batch from ``key``
modulo the pages), and keeps the chains of one copy batch that the compiled TX scan
accepted (:meth:`~TxGroupReference.add`): each piece as one record of
:data:`~xenpv.platforms.base.COPY_PIECE` (grant reference, offset, length, place in the
staging area) in :attr:`~TxGroupReference.pieces`, ready for the grant table's
``copy_pieces`` in one call.  :meth:`~TxGroupReference.finish` takes the copy's statuses:
for each chain its bytes (None where a piece failed: the chain is dropped alone), and the
answers of every chain as whole TX ring slots in slot order (``NETIF_RSP_OKAY``, or
``NETIF_RSP_ERROR`` for a failed chain; ``NETIF_RSP_NULL`` for its extra-info slots), for
the ring service's ``respond_slots``; then the group is empty and the layout starts again.

The compiled class does the same with no Python object per piece.  The chains given to
:meth:`~TxGroupReference.add` were checked by the scan (pieces of at most a page, at most
the TX maximum in all); ``add`` still refuses (ValueError) a piece longer than a page and
a place past the area, so no input makes either write out of bounds.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from xenpv.compiled import compiled_attr
from xenpv.platforms.base import COPY_PIECE
from xenpv.protocols.netif import TX_RING

__all__ = ["TX_ANSWER_SLOT", "TxGroupReference", "tx_group"]

PAGE = 4096
#: Bytes of one TX ring slot (a request; an answer is written at its start, zero padded).
TX_ANSWER_SLOT = TX_RING.slot_size
_ANSWER = struct.Struct("<Hh8x")
_OKAY, _ERROR, _NULL = 0, -1, 1

#: one accepted chain, as :func:`xenpv.protocols.netif.scan_tx` gives it
Chain = tuple[int, int, int, tuple[int, ...], tuple[tuple[int, int, int], ...], tuple[int, int]]


class TxGroupReference:
    """The readable twin of the compiled ``TxGroup``; see the module docstring."""

    def __init__(self, pages: int) -> None:
        """A group over a staging area of ``pages`` pages (at least 1)."""
        if pages < 1:
            raise ValueError("a staging area has at least one page")
        self.pages = pages
        self.reset()

    def reset(self) -> None:
        """Forget the chains and the layout: place from the start again."""
        self._page, self._fill, self._next = -1, PAGE, 0
        self._used = bytearray(self.pages)
        self._pieces = bytearray()
        #: per chain: (flags, size, ids, extras, first piece, pieces, gso type, gso size)
        self._chains: list[tuple[int, int, tuple[int, ...], int, int, int, int, int]] = []

    @property
    def chains(self) -> int:
        """Chains in the group."""
        return len(self._chains)

    @property
    def count(self) -> int:
        """Pieces in the group."""
        return len(self._pieces) // COPY_PIECE.size

    @property
    def pieces(self) -> memoryview:
        """The group's pieces, :data:`~xenpv.platforms.base.COPY_PIECE` records."""
        return memoryview(self._pieces)

    def state(self) -> tuple[int, int, int, bytes]:
        """The layout's state (the page being filled, its fill, the first page not taken
        in order, the pages taken): for tests."""
        return self._page, self._fill, self._next, bytes(self._used)

    def layout(self, lengths: Sequence[int], keys: Sequence[int | None] | None,
               commit: bool) -> list[int] | None:
        """Where pieces of ``lengths`` (``keys[i]``: the key of a whole page, or None) go
        after what is placed, or None if they do not all fit; taken only with
        ``commit``."""
        pages = self.pages
        used = bytearray(self._used)
        page, fill, nxt = self._page, self._fill, self._next
        out = []
        for i, n in enumerate(lengths):
            if not 0 <= n <= PAGE:
                raise ValueError(f"a piece of {n} bytes")
            key = keys[i] if keys is not None and n == PAGE else None
            if key is not None:
                at = key % pages
                for _ in range(pages):
                    if not used[at]:
                        break
                    at = at + 1 if at + 1 < pages else 0
                else:
                    return None
                used[at] = 1
                out.append(at * PAGE)
                continue
            if n and fill + n > PAGE:  # the next page not taken
                while nxt < pages and used[nxt]:
                    nxt += 1
                if nxt >= pages:
                    return None
                page, fill = nxt, 0
                used[nxt] = 1
            out.append(max(page, 0) * PAGE + min(fill, PAGE))
            fill += n
        if commit:
            self._page, self._fill, self._next, self._used = page, fill, nxt, used
        return out

    def add(self, chain: Chain) -> bool:
        """Lay out and keep ``chain`` (its whole pages keyed by grant reference); False
        (nothing taken) if its pieces do not all fit."""
        flags, size, used, ids, frags, gso = chain
        at = self.layout([f[2] for f in frags],
                         [f[0] if not f[1] else None for f in frags], True)
        if at is None:
            return False
        first = self.count
        for (gref, offset, length), place in zip(frags, at, strict=True):
            self._pieces += COPY_PIECE.pack(gref, offset, length, place)
        self._chains.append((flags, size, ids, used - len(ids), first, len(frags),
                             gso[0], gso[1]))
        return True

    def finish(self, mem: Any, statuses: Sequence[int]
               ) -> tuple[list[tuple[bytes | None, int, int, int]], bytes]:
        """After the copy of :attr:`pieces` into ``mem`` (the staging area) with
        ``statuses`` (one per piece, 0 for success): per chain (its bytes or None if a
        piece failed, its flags, GSO type, GSO size), and every chain's answers as whole
        TX slots; the group is empty afterwards."""
        if len(statuses) < self.count:
            raise ValueError("fewer statuses than pieces")
        view = memoryview(mem).cast("B")
        frames: list[tuple[bytes | None, int, int, int]] = []
        answers = bytearray()
        for flags, size, ids, extras, first, n, gso_type, gso_size in self._chains:
            ok = not any(statuses[first:first + n])
            data = None
            if ok:
                parts = []
                for k in range(first, first + n):
                    _gref, _offset, length, place = COPY_PIECE.unpack_from(
                        self._pieces, k * COPY_PIECE.size)
                    parts.append(view[place:place + length])
                data = b"".join(parts)
                if len(data) != size:
                    raise ValueError("the pieces do not make the chain's size")
            status = _OKAY if ok else _ERROR
            answers += _ANSWER.pack(ids[0], status)
            answers += _ANSWER.pack(0, _NULL) * extras
            for i in ids[1:]:
                answers += _ANSWER.pack(i, status)
            frames.append((data, flags, gso_type, gso_size))
        self.reset()
        return frames, bytes(answers)


def tx_group(pages: int) -> Any:
    """A TX copy group over ``pages`` staging pages: the compiled ``TxGroup`` (the
    readable twin where it is not built or ``XENPV_PURE_PYTHON=1``)."""
    cls = compiled_attr("xenpv.backends._nettx", "TxGroup", TxGroupReference)
    return cls(pages)

"""The two byte rings of one console page (``xencons_interface``), for either side.

A console is one shared page holding two byte rings with free-running u32 indexes
(xen-protocols.md §8.1): ``out`` (2048 bytes, guest → backend) and ``in`` (1024 bytes,
backend → guest).  :class:`ConsoleRing` wraps both over the shared
:class:`~xenpv.rings.ByteRing` (compiled or reference) for the guest or the backend:
each call loads the peer's index once (single fetch, R1), and a corrupt index pair
(``prod - cons`` larger than the ring) reads as "nothing there" and is counted, never
raised (§8.1: ignored; scenario 27).  Both console halves use it, which is why it sits
here rather than in either of them.
"""

from __future__ import annotations

from xenpv.protocols.console import (
    XENCONS_IN_CONS_OFFSET,
    XENCONS_IN_OFFSET,
    XENCONS_IN_PROD_OFFSET,
    XENCONS_IN_SIZE,
    XENCONS_OUT_CONS_OFFSET,
    XENCONS_OUT_OFFSET,
    XENCONS_OUT_PROD_OFFSET,
    XENCONS_OUT_SIZE,
)
from xenpv.rings import ByteRing

__all__ = ["ConsoleRing"]


class ConsoleRing:
    """The two byte rings of one ``xencons_interface`` page, seen from one side.

    ``backend=False`` (guest): :meth:`write` produces into ``out``, :meth:`read` consumes
    ``in``.  ``backend=True``: :meth:`read` consumes ``out``, :meth:`write` produces into
    ``in``.  Indexes are loaded once per call; an insane index pair reads as empty/full
    and bumps :attr:`insane`.
    """

    def __init__(self, mem: memoryview, *, backend: bool) -> None:
        """Place the rings in ``mem`` (at least the 3088 bytes of the 4.17 page)."""
        # io/console.h: in[1024] @0, out[2048] @1024, in_cons, in_prod, out_cons, out_prod
        inring = ByteRing(mem, data_offset=XENCONS_IN_OFFSET, size=XENCONS_IN_SIZE,
                          prod_offset=XENCONS_IN_PROD_OFFSET,
                          cons_offset=XENCONS_IN_CONS_OFFSET, on_insane="zero")
        outring = ByteRing(mem, data_offset=XENCONS_OUT_OFFSET, size=XENCONS_OUT_SIZE,
                           prod_offset=XENCONS_OUT_PROD_OFFSET,
                           cons_offset=XENCONS_OUT_CONS_OFFSET, on_insane="zero")
        self.backend = backend
        self._rx, self._tx = (outring, inring) if backend else (inring, outring)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy as much of ``data`` as fits into the ring we produce; returns bytes."""
        return self._tx.write(data)

    def read(self, max_n: int = -1) -> bytes:
        """Take up to ``max_n`` bytes from the ring we consume."""
        return self._rx.read(max_n)

    def readable(self) -> int:
        """Bytes waiting in the ring we consume (0 if its indexes are corrupt)."""
        return self._rx.available()

    def writable(self) -> int:
        """Free bytes in the ring we produce (0 if its indexes are corrupt)."""
        return self._tx.free()

    @property
    def insane(self) -> int:
        """How many times a corrupt index pair was seen (and ignored)."""
        return int(self._rx.insane_count + self._tx.insane_count)

    def release(self) -> None:
        """Let go of the page memory (idempotent)."""
        self._rx.release()
        self._tx.release()

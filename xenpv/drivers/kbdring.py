"""The kbdif event ring (``io/kbdif.h``) over a shared page, for either side.

The *in* ring carries 40-byte events from the backend to the frontend: 51 slots at page
offset 1024, indexed modulo 51 (not a mask) by free-running u32 indexes ``in_cons`` (page
offset 0) and ``in_prod`` (offset 4), xen-protocols.md §9.1.  Both halves of the keyboard
pair build it here, through the ring layer's :class:`~xenpv.rings.ByteRing` (one index
load per call, barriers around the data).
"""

from __future__ import annotations

from typing import Any

from xenpv.protocols.kbdif import (
    XENKBD_IN_EVENT_SIZE,
    XENKBD_IN_RING_LEN,
    XENKBD_IN_RING_OFFS,
)
from xenpv.rings import ByteRing

__all__ = ["IN_CONS_OFFSET", "IN_PROD_OFFSET", "kbd_in_ring"]

#: ``xenkbd_page``: ``in_cons`` u32 at 0, ``in_prod`` u32 at 4.
IN_CONS_OFFSET = 0
IN_PROD_OFFSET = 4


def kbd_in_ring(page: Any, *, on_insane: str) -> ByteRing:
    """The in ring of the kbdif page ``page``; units are whole events.

    ``on_insane``: ``"zero"`` (the backend: a corrupt ``in_cons`` reads as a full ring,
    counted) or ``"error"`` (the frontend: ``in_prod`` beyond the ring raises and the ring
    stays broken, R4)."""
    return ByteRing(page, data_offset=XENKBD_IN_RING_OFFS, size=XENKBD_IN_RING_LEN,
                    prod_offset=IN_PROD_OFFSET, cons_offset=IN_CONS_OFFSET,
                    slot=XENKBD_IN_EVENT_SIZE, on_insane=on_insane)

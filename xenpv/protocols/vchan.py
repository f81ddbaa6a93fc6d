"""vchan control page (``xen/io/libxenvchan.h``) and libxenvchan's ring-placement rules.

Theory of operation
-------------------
The server grants one control page (:class:`VchanInterface`, 24 bytes then a grant list)
holding two ring index pairs: *left* (client writes, server reads) and *right* (server
writes, client reads), their orders (ring size = 2**order bytes), the two live bytes and
the two notify-request bytes.  A ring of order 10 lives inside the control page at 1024,
order 11 at 2048; orders 12..20 use 2**(order-12) separate pages whose grant refs are listed
at offset 24, left ring's first.  :func:`choose_orders` is the server's size choice,
:func:`validate_orders` the client's check of peer-written orders (hostile scenario 26), and
:func:`ring_placement` where each ring is.  Everything is pure.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from xenpv.errors import LocalError
from xenpv.protocols import ProtocolError
from xenpv.protocols.layout import (
    XEN_PAGE_SHIFT,
    XEN_PAGE_SIZE,
    Buffer,
    Field,
    Layout,
    Record,
    byte_ring_avail,
    byte_ring_space,
    c_struct,
)

# io/libxenvchan.h: notify bits
VCHAN_NOTIFY_WRITE = 0x1
VCHAN_NOTIFY_READ = 0x2

# live-byte values
VCHAN_CLI_GONE = 0
VCHAN_CLI_CONNECTED = 1
VCHAN_CLI_WAITING = 2
VCHAN_SRV_GONE = 0
VCHAN_SRV_ALIVE = 1

# ring orders
VCHAN_MIN_ORDER = 10
VCHAN_MAX_ORDER = 20
#: Orders below this live inside the control page.
VCHAN_PAGE_ORDER = XEN_PAGE_SHIFT
VCHAN_IN_PAGE_OFFSETS = {10: 1024, 11: 2048}

# Offsets of the interface fields (also what gntdev/gntalloc unmap notifications clear).
VCHAN_LEFT_CONS_OFFSET = 0
VCHAN_LEFT_PROD_OFFSET = 4
VCHAN_RIGHT_CONS_OFFSET = 8
VCHAN_RIGHT_PROD_OFFSET = 12
VCHAN_LEFT_ORDER_OFFSET = 16
VCHAN_RIGHT_ORDER_OFFSET = 18
VCHAN_CLI_LIVE_OFFSET = 20
VCHAN_SRV_LIVE_OFFSET = 21
VCHAN_CLI_NOTIFY_OFFSET = 22
VCHAN_SRV_NOTIFY_OFFSET = 23
VCHAN_GRANTS_OFFSET = 24

# xenstore keys under the vchan's xs_path
KEY_RING_REF = "ring-ref"
KEY_EVENT_CHANNEL = "event-channel"

RING_SHARED_LAYOUT = c_struct("ring_shared", [Field("cons", "I"), Field("prod", "I")])
INTERFACE_LAYOUT = c_struct(
    "vchan_interface",
    [
        Field("left_cons", "I", c="left.cons"),
        Field("left_prod", "I", c="left.prod"),
        Field("right_cons", "I", c="right.cons"),
        Field("right_prod", "I", c="right.prod"),
        Field("left_order", "H"),
        Field("right_order", "H"),
        Field("cli_live", "B"),
        Field("srv_live", "B"),
        Field("cli_notify", "B"),
        Field("srv_notify", "B"),
    ],
)


@dataclass(frozen=True)
class VchanInterface(Record):
    """A snapshot of the 24-byte control-page header."""

    LAYOUT: ClassVar[Layout] = INTERFACE_LAYOUT
    left_cons: int
    left_prod: int
    right_cons: int
    right_prod: int
    left_order: int
    right_order: int
    cli_live: int
    srv_live: int
    cli_notify: int
    srv_notify: int


def pages_for_order(order: int) -> int:
    """Separate pages a ring of ``order`` needs (0 for the in-page orders 10 and 11)."""
    return 0 if order < VCHAN_PAGE_ORDER else 1 << (order - VCHAN_PAGE_ORDER)


def nr_grants(left_order: int, right_order: int) -> int:
    """Grant refs listed in the control page for these orders."""
    return pages_for_order(left_order) + pages_for_order(right_order)


@dataclass(frozen=True)
class RingPlacement:
    """Where one ring lives: in the control page at ``offset``, or in separate pages.

    ``first_grant`` is the index into ``grants[]`` of its first page (separate pages only).
    """

    order: int
    size: int
    offset: int | None
    pages: int
    first_grant: int


def ring_placement(left_order: int, right_order: int) -> tuple[RingPlacement, RingPlacement]:
    """Placement of the (left, right) rings; the orders must be valid (:func:`validate_orders`)."""
    lp, rp = pages_for_order(left_order), pages_for_order(right_order)
    left = RingPlacement(left_order, 1 << left_order, VCHAN_IN_PAGE_OFFSETS.get(left_order), lp, 0)
    right = RingPlacement(right_order, 1 << right_order, VCHAN_IN_PAGE_OFFSETS.get(right_order), rp, lp)
    return left, right


def validate_orders(left_order: int, right_order: int) -> None:
    """Client's check of peer-written orders: each 10..20, in-page orders not equal, grants fit.

    The grant list (4 bytes per page from offset 24) must end before any in-page ring and
    inside the page.
    """
    for name, order in (("left", left_order), ("right", right_order)):
        if not VCHAN_MIN_ORDER <= order <= VCHAN_MAX_ORDER:
            raise ProtocolError(f"vchan {name} order {order} outside {VCHAN_MIN_ORDER}..{VCHAN_MAX_ORDER}")
    if left_order == right_order and left_order < VCHAN_PAGE_ORDER:
        raise ProtocolError(f"vchan rings both use the in-page order {left_order}")
    end = VCHAN_GRANTS_OFFSET + 4 * nr_grants(left_order, right_order)
    limit = min(
        [XEN_PAGE_SIZE] + [VCHAN_IN_PAGE_OFFSETS[o] for o in (left_order, right_order) if o < VCHAN_PAGE_ORDER]
    )
    if end > limit:
        raise ProtocolError(f"vchan grant list ends at {end}, beyond {limit}")


def parse_grants(page: Buffer, left_order: int, right_order: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Copy the (left, right) grant refs out of the control page; bad orders are peer errors."""
    validate_orders(left_order, right_order)
    n_left, n_right = pages_for_order(left_order), pages_for_order(right_order)
    refs = struct.unpack_from(f"<{n_left + n_right}I", page, VCHAN_GRANTS_OFFSET)
    return tuple(refs[:n_left]), tuple(refs[n_left:])


def _order_for(size: int) -> int:
    """Smallest order >= 12 whose ring holds ``size`` bytes."""
    order = VCHAN_PAGE_ORDER
    while (1 << order) < size:
        order += 1
    return order


def choose_orders(read_min: int, write_min: int) -> tuple[int, int]:
    """The server's (left_order, right_order) for minimum sizes of the left and right rings.

    ``read_min`` sizes the left ring (the server reads it), ``write_min`` the right ring.
    Mirrors libxenvchan's choice: prefer both rings inside the control page, else put one
    ring there and give the other separate pages, else separate pages for both.
    """
    limit = 1 << VCHAN_MAX_ORDER
    if not (0 <= read_min <= limit and 0 <= write_min <= limit):
        raise LocalError(f"vchan ring sizes must be 0..{limit}, got {read_min}, {write_min}")
    if read_min <= 1024 and write_min <= 2048:
        return 10, 11
    if read_min <= 2048 and write_min <= 1024:
        return 11, 10
    if read_min <= 2048:
        return 11, _order_for(write_min)
    if write_min <= 2048:
        return _order_for(read_min), 11
    return _order_for(read_min), _order_for(write_min)


def ring_avail(prod: int, cons: int, size: int) -> int:
    """Readable bytes of a vchan ring; an insane index pair reads as 0 (scenario 26)."""
    return byte_ring_avail(prod, cons, size)


def ring_space(prod: int, cons: int, size: int) -> int:
    """Free bytes of a vchan ring; an insane index pair reads as 0."""
    return byte_ring_space(prod, cons, size)

"""Console protocol (``xen/io/console.h``): the ``xencons_interface`` page.

The page holds two byte rings with free-running u32 indexes: ``in`` (1024 bytes, backend to
guest: keyboard input) and ``out`` (2048 bytes, guest to backend: console output), followed
by the four indexes.  Xen 4.17's struct ends at 3088; upstream adds a ``connection`` byte at
3088 (the backend writes 0 once connected; 1 = disconnected).  Byte *x* of a stream lives at
``x & (size - 1)``; ``prod - cons`` larger than the ring means a corrupt peer, which the
console backend ignores (it treats the ring as empty, hostile scenario 27).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from xenpv.protocols.layout import Field, Layout, Record, byte_ring_avail, byte_ring_space, c_struct

# io/console.h: ring sizes (sizeof(in), sizeof(out))
XENCONS_IN_SIZE = 1024
XENCONS_OUT_SIZE = 2048
XENCONS_IN_MASK = XENCONS_IN_SIZE - 1
XENCONS_OUT_MASK = XENCONS_OUT_SIZE - 1

# io/console.h: offsets in the page
XENCONS_IN_OFFSET = 0
XENCONS_OUT_OFFSET = XENCONS_IN_OFFSET + XENCONS_IN_SIZE
XENCONS_INDEXES_OFFSET = XENCONS_OUT_OFFSET + XENCONS_OUT_SIZE
XENCONS_IN_CONS_OFFSET = XENCONS_INDEXES_OFFSET
XENCONS_IN_PROD_OFFSET = XENCONS_INDEXES_OFFSET + 4
XENCONS_OUT_CONS_OFFSET = XENCONS_INDEXES_OFFSET + 8
XENCONS_OUT_PROD_OFFSET = XENCONS_INDEXES_OFFSET + 12
#: sizeof(struct xencons_interface) in Xen 4.17.
XENCONS_INTERFACE_SIZE = XENCONS_INDEXES_OFFSET + 16
#: [upstream] u8 `connection` after the indexes (struct size 3092 with tail padding).
XENCONS_CONNECTION_OFFSET = XENCONS_INTERFACE_SIZE
XENCONS_INTERFACE_SIZE_UPSTREAM = 3092
# [upstream] io/console.h: values of `connection`
XENCONSOLE_CONNECTED = 0
XENCONSOLE_DISCONNECTED = 1

# Console keys (§8.2), under /local/domain/<domid>/console; a secondary console's
# frontend writes KEY_RING_REF and KEY_PORT too (§8.3)
KEY_RING_REF = "ring-ref"
KEY_PORT = "port"
KEY_TYPE = "type"
KEY_OUTPUT = "output"
KEY_LIMIT = "limit"
KEY_TTY = "tty"
KEY_BACKEND_ID = "backend-id"
#: The value of ``output`` for a console on a pseudo-terminal.
CONSOLE_OUTPUT_PTY = "pty"
CONSOLE_TYPE_XENCONSOLED = "xenconsoled"
CONSOLE_TYPE_IOEMU = "ioemu"

INDEXES_LAYOUT = Layout(
    "xencons_interface.indexes",
    [Field("in_cons", "I"), Field("in_prod", "I"), Field("out_cons", "I"), Field("out_prod", "I")],
)
#: The whole 4.17 page header (ring bytes as raw strings), for whole-page snapshots.
INTERFACE_LAYOUT = c_struct(
    "xencons_interface",
    [
        Field("in", "s", XENCONS_IN_SIZE),
        Field("out", "s", XENCONS_OUT_SIZE),
        Field("in_cons", "I"),
        Field("in_prod", "I"),
        Field("out_cons", "I"),
        Field("out_prod", "I"),
    ],
)


@dataclass(frozen=True)
class ConsoleIndexes(Record):
    """The four ring indexes of a console page (parse at :data:`XENCONS_INDEXES_OFFSET`)."""

    LAYOUT: ClassVar[Layout] = INDEXES_LAYOUT
    PAGE_OFFSET: ClassVar[int] = XENCONS_INDEXES_OFFSET
    in_cons: int
    in_prod: int
    out_cons: int
    out_prod: int

    def out_pending(self) -> int:
        """Output bytes waiting for the backend; a corrupt (over-full) ring reads as 0."""
        return byte_ring_avail(self.out_prod, self.out_cons, XENCONS_OUT_SIZE)

    def in_space(self) -> int:
        """Free bytes in the input ring; a corrupt ring reads as 0."""
        return byte_ring_space(self.in_prod, self.in_cons, XENCONS_IN_SIZE)

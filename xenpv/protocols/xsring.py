"""Xenstore shared ring (``xen/io/xs_wire.h``): ``xenstore_domain_interface``.

One 4096-byte page (grant ref 1 of the guest's table): a 1024-byte request byte ring
(guest to xenstored), a 1024-byte response ring, four free-running u32 indexes, and the
``server_features`` / ``connection`` / ``error`` words.  Xen 4.17's struct is 2076 bytes;
upstream appends ``evtchn_port`` at 2076 (2080 bytes), used by dom0less guests when
non-zero.  ``prod - cons`` above 1024 means a corrupt ring (``XENSTORE_ERROR_RINGIDX``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from xenpv.protocols import ProtocolError
from xenpv.protocols.layout import Field, Layout, Record, byte_ring_fill, c_struct

# io/xs_wire.h
XENSTORE_RING_SIZE = 1024
XENSTORE_RING_MASK = XENSTORE_RING_SIZE - 1
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
#: [upstream] WATCH takes a depth parameter.
XENSTORE_SERVER_FEATURE_WATCHDEPTH = 4
#: [upstream] permissions may name DOMID_ANY.
XENSTORE_SERVER_FEATURE_DOMID_ANY = 8
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3
#: sizeof(struct xsd_sockmsg): the message header.
XSD_SOCKMSG_SIZE = 16

# Offsets in the page
XS_REQ_OFFSET = 0
XS_RSP_OFFSET = XENSTORE_RING_SIZE
XS_REQ_CONS_OFFSET = 2 * XENSTORE_RING_SIZE
XS_REQ_PROD_OFFSET = XS_REQ_CONS_OFFSET + 4
XS_RSP_CONS_OFFSET = XS_REQ_CONS_OFFSET + 8
XS_RSP_PROD_OFFSET = XS_REQ_CONS_OFFSET + 12
XS_SERVER_FEATURES_OFFSET = XS_REQ_CONS_OFFSET + 16
XS_CONNECTION_OFFSET = XS_REQ_CONS_OFFSET + 20
XS_ERROR_OFFSET = XS_REQ_CONS_OFFSET + 24
#: [upstream]
XS_EVTCHN_PORT_OFFSET = XS_REQ_CONS_OFFSET + 28
#: sizeof(struct xenstore_domain_interface): 4.17 and upstream.
XS_INTERFACE_SIZE = XS_EVTCHN_PORT_OFFSET
XS_INTERFACE_SIZE_UPSTREAM = XS_EVTCHN_PORT_OFFSET + 4

_CONTROL_FIELDS = [
    Field("req_cons", "I"),
    Field("req_prod", "I"),
    Field("rsp_cons", "I"),
    Field("rsp_prod", "I"),
    Field("server_features", "I"),
    Field("connection", "I"),
    Field("error", "I"),
]
#: The control words after the two rings (parse at :data:`XS_REQ_CONS_OFFSET`).
CONTROL_LAYOUT = Layout("xenstore_domain_interface.control", _CONTROL_FIELDS)
#: The whole 4.17 interface (rings as raw bytes).
INTERFACE_LAYOUT = c_struct(
    "xenstore_domain_interface",
    [Field("req", "s", XENSTORE_RING_SIZE), Field("rsp", "s", XENSTORE_RING_SIZE), *_CONTROL_FIELDS],
)
#: The upstream interface with ``evtchn_port``.
INTERFACE_LAYOUT_UPSTREAM = Layout(
    "xenstore_domain_interface[upstream]",
    [*INTERFACE_LAYOUT.fields, Field("evtchn_port", "I")],
)


@dataclass(frozen=True)
class XsControl(Record):
    """A snapshot of the ring's control words (indexes, features, connection, error)."""

    LAYOUT: ClassVar[Layout] = CONTROL_LAYOUT
    PAGE_OFFSET: ClassVar[int] = XS_REQ_CONS_OFFSET
    req_cons: int
    req_prod: int
    rsp_cons: int
    rsp_prod: int
    server_features: int
    connection: int
    error: int


def ring_used(prod: int, cons: int) -> int:
    """Bytes in a xenstore byte ring; more than 1024 is a corrupt peer (R2)."""
    n = byte_ring_fill(prod, cons)
    if n > XENSTORE_RING_SIZE:
        raise ProtocolError(f"xenstore ring index corrupt: prod {prod} cons {cons}")
    return n

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
from xenpv.xenstore import page as _page

# io/xs_wire.h (the page's own constants are defined once, in xenpv.xenstore.page, where
# the xenstore layer serves and uses the page)
XENSTORE_RING_SIZE = _page.RING_SIZE
XENSTORE_SERVER_FEATURE_RECONNECTION = _page.FEATURE_RECONNECTION
XENSTORE_SERVER_FEATURE_ERROR = _page.FEATURE_ERROR
XENSTORE_CONNECTED = _page.XS_CONNECTED
XENSTORE_RECONNECT = _page.XS_RECONNECT
XENSTORE_ERROR_NONE = _page.ERROR_NONE
XENSTORE_ERROR_COMM = _page.ERROR_COMM
XENSTORE_ERROR_RINGIDX = _page.ERROR_RINGIDX
XENSTORE_ERROR_PROTO = _page.ERROR_PROTO
XENSTORE_RING_MASK = XENSTORE_RING_SIZE - 1
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
#: [upstream] WATCH takes a depth parameter.
XENSTORE_SERVER_FEATURE_WATCHDEPTH = 4
#: [upstream] permissions may name DOMID_ANY.
XENSTORE_SERVER_FEATURE_DOMID_ANY = 8
#: sizeof(struct xsd_sockmsg): the message header.
XSD_SOCKMSG_SIZE = 16

# Offsets in the page
XS_REQ_OFFSET = _page.REQ_OFFSET
XS_RSP_OFFSET = _page.RSP_OFFSET
XS_REQ_CONS_OFFSET = _page.REQ_CONS_OFFSET
XS_REQ_PROD_OFFSET = _page.REQ_PROD_OFFSET
XS_RSP_CONS_OFFSET = _page.RSP_CONS_OFFSET
XS_RSP_PROD_OFFSET = _page.RSP_PROD_OFFSET
XS_SERVER_FEATURES_OFFSET = _page.FEATURES_OFFSET
XS_CONNECTION_OFFSET = _page.CONNECTION_OFFSET
XS_ERROR_OFFSET = _page.ERROR_OFFSET
#: sizeof(struct xenstore_domain_interface) in 4.17.
XS_INTERFACE_SIZE = _page.INTERFACE_SIZE
#: [upstream]
XS_EVTCHN_PORT_OFFSET = XS_REQ_CONS_OFFSET + 28
#: sizeof(struct xenstore_domain_interface) upstream.
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

"""Event channels (``xen/event_channel.h``): op numbers, port states, argument structs, limits.

A port is a u32 in a per-domain namespace; port 0 is never handed out and means
"invalid".  The 2-level ABI has 4096 ports for 64-bit guests (1024 for 32-bit); FIFO has
2**17.  The ``evtchn_*`` records are the hypercall argument structs, used by the loopback
emulator's event-channel operations.  :func:`parse_port` and :func:`validate_port` check
peer-supplied port numbers (xenstore ``event-channel`` values, hostile scenario 18).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from xenpv.protocols import ProtocolError
from xenpv.protocols.layout import Field, Layout, Record, c_struct, pad, parse_xs_uint

# event_channel.h: operations
EVTCHNOP_bind_interdomain = 0
EVTCHNOP_bind_virq = 1
EVTCHNOP_bind_pirq = 2
EVTCHNOP_close = 3
EVTCHNOP_send = 4
EVTCHNOP_status = 5
EVTCHNOP_alloc_unbound = 6
EVTCHNOP_bind_ipi = 7
EVTCHNOP_bind_vcpu = 8
EVTCHNOP_unmask = 9
EVTCHNOP_reset = 10
EVTCHNOP_init_control = 11
EVTCHNOP_expand_array = 12
EVTCHNOP_set_priority = 13

# event_channel.h: port states (EVTCHNOP_status)
EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2
EVTCHNSTAT_pirq = 3
EVTCHNSTAT_virq = 4
EVTCHNSTAT_ipi = 5

# event_channel.h: limits
#: 2-level ABI on a 64-bit guest: sizeof(xen_ulong_t)**2 * 64.
EVTCHN_2L_NR_CHANNELS = 8 * 8 * 64
#: 2-level ABI on a 32-bit guest.
EVTCHN_2L_NR_CHANNELS_32 = 4 * 4 * 64
EVTCHN_FIFO_PRIORITY_MAX = 0
EVTCHN_FIFO_PRIORITY_DEFAULT = 7
EVTCHN_FIFO_PRIORITY_MIN = 15
EVTCHN_FIFO_MAX_QUEUES = EVTCHN_FIFO_PRIORITY_MIN + 1
EVTCHN_FIFO_PENDING = 31
EVTCHN_FIFO_MASKED = 30
EVTCHN_FIFO_LINKED = 29
EVTCHN_FIFO_BUSY = 28
EVTCHN_FIFO_LINK_BITS = 17
EVTCHN_FIFO_LINK_MASK = (1 << EVTCHN_FIFO_LINK_BITS) - 1
EVTCHN_FIFO_NR_CHANNELS = 1 << EVTCHN_FIFO_LINK_BITS
BIND_PIRQ__WILL_SHARE = 1
#: Port 0 is reserved and never allocated.
EVTCHN_PORT_INVALID = 0

ALLOC_UNBOUND_LAYOUT = c_struct(
    "evtchn_alloc_unbound",
    [Field("dom", "H"), Field("remote_dom", "H"), Field("port", "I")],
)
BIND_INTERDOMAIN_LAYOUT = c_struct(
    "evtchn_bind_interdomain",
    [Field("remote_dom", "H"), pad(2), Field("remote_port", "I"), Field("local_port", "I")],
)
BIND_VIRQ_LAYOUT = c_struct(
    "evtchn_bind_virq",
    [Field("virq", "I"), Field("vcpu", "I"), Field("port", "I")],
)
PORT_LAYOUT = c_struct("evtchn_send", [Field("port", "I")])
STATUS_LAYOUT = c_struct(
    "evtchn_status",
    [
        Field("dom", "H"),
        pad(2),
        Field("port", "I"),
        Field("status", "I"),
        Field("vcpu", "I"),
        Field("remote_dom", "H", c="u.interdomain.dom"),
        pad(2),
        Field("remote_port", "I", c="u.interdomain.port"),
    ],
)


@dataclass(frozen=True)
class EvtchnAllocUnbound(Record):
    """``struct evtchn_alloc_unbound``: IN dom, remote_dom; OUT port."""

    LAYOUT: ClassVar[Layout] = ALLOC_UNBOUND_LAYOUT
    dom: int
    remote_dom: int
    port: int = 0


@dataclass(frozen=True)
class EvtchnBindInterdomain(Record):
    """``struct evtchn_bind_interdomain``: IN remote_dom, remote_port; OUT local_port."""

    LAYOUT: ClassVar[Layout] = BIND_INTERDOMAIN_LAYOUT
    remote_dom: int
    remote_port: int
    local_port: int = 0


@dataclass(frozen=True)
class EvtchnBindVirq(Record):
    """``struct evtchn_bind_virq``: IN virq, vcpu; OUT port."""

    LAYOUT: ClassVar[Layout] = BIND_VIRQ_LAYOUT
    virq: int
    vcpu: int
    port: int = 0


@dataclass(frozen=True)
class EvtchnPort(Record):
    """``struct evtchn_send`` / ``evtchn_close`` / ``evtchn_unmask``: one port."""

    LAYOUT: ClassVar[Layout] = PORT_LAYOUT
    port: int


@dataclass(frozen=True)
class EvtchnStatus(Record):
    """``struct evtchn_status`` with the union read as ``u.interdomain`` (``u.unbound.dom``
    shares ``remote_dom``; ``u.pirq``/``u.virq`` share its first 4 bytes)."""

    LAYOUT: ClassVar[Layout] = STATUS_LAYOUT
    dom: int
    port: int
    status: int = EVTCHNSTAT_closed
    vcpu: int = 0
    remote_dom: int = 0
    remote_port: int = 0


def validate_port(port: int, limit: int = EVTCHN_2L_NR_CHANNELS) -> None:
    """A peer-supplied port must be 1..``limit``-1 (0 is reserved)."""
    if not 0 < port < limit:
        raise ProtocolError(f"event channel port {port} outside 1..{limit - 1}")


def parse_port(value: str | bytes, what: str = "event-channel", limit: int = EVTCHN_FIFO_NR_CHANNELS) -> int:
    """Parse a peer-written port (xenstore ``event-channel``/``port``): decimal, 1..``limit``-1."""
    return parse_xs_uint(value, what, limit - 1, minimum=1)

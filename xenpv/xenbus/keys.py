"""Strict parsers for the numeric and boolean keys a peer writes at connect time.

Every value a peer domain writes into its xenstore directory is untrusted input
(hostile-inputs.md R5, R14, scenario 18).  Numbers go through the one strict parser,
:func:`xenpv.xenstore.values.parse_xs_number` (canonical decimal text: ASCII digits, no
sign, no spaces, no leading zeros, no more digits than the upper bound has), with both
bounds checked; anything else raises :class:`~xenpv.xenbus.states.BadKeyError`, a
:class:`~xenpv.errors.PeerError` whose ``errno`` goes into the ``error`` node:
``ENOENT`` for a missing key, ``ERANGE`` for a number out of range, ``EINVAL`` otherwise.
Nothing here allocates in proportion to a value it parses.

Value ranges (xen-protocols.md §5.3, §6.3-§6.4, §7.4, §9.3):

* grant refs (``ring-ref``, ``ring-refN``, ``tx-ring-ref``, ``page-gref`` …):
  ``GNTTAB_NR_RESERVED_ENTRIES`` (8) … 2^32 - 1; refs 0-7 are reserved;
* event-channel ports: 1 … 2^17 - 1 (the FIFO ABI's limit; port 0 is never bound);
* ``ring-page-order``: 0 … the advertised ``max-ring-page-order``;
* ``multi-queue-num-queues``: 1 … the advertised ``multi-queue-max-queues``;
* ``feature-*`` / ``request-*``: ``"0"`` or ``"1"``;
* ``protocol``: ``x86_32-abi``, ``x86_64-abi`` or ``arm-abi`` (§6.2).
"""

from __future__ import annotations

import errno as _errno

from xenpv.xenbus.states import BadKeyError
from xenpv.xenstore.values import U32_MAX, parse_xs_number

__all__ = [
    "EVTCHN_PORT_MAX",
    "GRANT_REF_MAX",
    "GRANT_REF_MIN",
    "PROTOCOLS",
    "U32_MAX",
    "missing",
    "parse_bool",
    "parse_grant_ref",
    "parse_num_queues",
    "parse_port",
    "parse_protocol",
    "parse_ring_page_order",
    "parse_uint",
]

#: grant_table.h: GNTTAB_NR_RESERVED_ENTRIES; lower refs are never handed out.
GRANT_REF_MIN = 8
GRANT_REF_MAX = U32_MAX
#: event_fifo.h: EVTCHN_FIFO_NR_CHANNELS = 2^17 ports (0 is reserved).
EVTCHN_PORT_MAX = (1 << 17) - 1
#: io/protocols.h: XEN_IO_PROTO_ABI_* strings (§6.2).
PROTOCOLS = frozenset({"x86_32-abi", "x86_64-abi", "arm-abi"})


def missing(key: str) -> BadKeyError:
    """The error for a required key the peer did not write."""
    return BadKeyError(f"peer key {key!r} is missing", _errno.ENOENT)


def _show(raw: bytes) -> str:
    return repr(raw[:32]) + ("…" if len(raw) > 32 else "")


def parse_uint(raw: bytes | None, key: str, lo: int = 0, hi: int = U32_MAX) -> int:
    """Parse canonical decimal ``raw`` and check ``lo <= value <= hi`` (a
    :class:`BadKeyError` carrying ``ENOENT``, ``ERANGE`` or ``EINVAL`` otherwise)."""
    return parse_xs_number(raw, key, lo=lo, hi=hi, error=BadKeyError)


def parse_grant_ref(raw: bytes | None, key: str = "ring-ref") -> int:
    """A grant reference (8 … 2^32 - 1)."""
    return parse_uint(raw, key, GRANT_REF_MIN, GRANT_REF_MAX)


def parse_port(raw: bytes | None, key: str = "event-channel") -> int:
    """An event-channel port (1 … 2^17 - 1)."""
    return parse_uint(raw, key, 1, EVTCHN_PORT_MAX)


def parse_ring_page_order(raw: bytes | None, max_order: int, key: str = "ring-page-order") -> int:
    """``ring-page-order``; absent means 0 (a single page, §5.3)."""
    if raw is None:
        return 0
    return parse_uint(raw, key, 0, max_order)


def parse_num_queues(
    raw: bytes | None, max_queues: int, key: str = "multi-queue-num-queues"
) -> int:
    """``multi-queue-num-queues``; absent means 1 (no multi-queue, §5.3)."""
    if raw is None:
        return 1
    return parse_uint(raw, key, 1, max_queues)


def parse_bool(raw: bytes | None, key: str, default: bool = False) -> bool:
    """A ``feature-*``/``request-*`` flag: ``"0"`` or ``"1"``; absent gives ``default``."""
    if raw is None:
        return default
    if raw == b"1":
        return True
    if raw == b"0":
        return False
    raise BadKeyError(f"peer key {key!r} is not 0 or 1: {_show(bytes(raw))}")


def parse_protocol(raw: bytes | None, default: str = "x86_64-abi") -> str:
    """``protocol``: one of :data:`PROTOCOLS`; absent means the backend's native ABI."""
    if raw is None:
        return default
    text = bytes(raw).decode("ascii", "replace")
    if text not in PROTOCOLS:
        raise BadKeyError(f"unknown protocol {_show(bytes(raw))}")
    return text

"""The one strict parser for numbers a peer writes in xenstore (sans-IO).

Every value another domain writes into xenstore is untrusted input (hostile-inputs.md R5,
R14, scenario 18): grant refs, event-channel ports, ring orders, queue counts, domain ids,
device numbers.  :func:`parse_xs_number` accepts only canonical decimal text: ASCII digits,
no sign, no spaces, no ``0x``, no leading zeros, no more digits than the largest value the
key allows (and never more than 20), so the work is bounded whatever the peer wrote.  The
per-key limits are arguments, and so is the error: each layer raises its own
:class:`~xenpv.errors.PeerError` (``BadKeyError`` in xenbus, ``VchanPeerError`` in vchan,
``ProtocolError`` in the protocol modules) from the same rules.  The error factory gets the
message and an errno for the xenbus ``error`` node: ``ENOENT`` for a missing key,
``ERANGE`` for a number out of range, ``EINVAL`` for anything else.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable

from xenpv.errors import PeerError

__all__ = ["U32_MAX", "XS_NUMBER_DIGITS_MAX", "parse_xs_number"]

U32_MAX = 0xFFFFFFFF
#: Digits of 2^64 - 1: no number a peer writes is longer.
XS_NUMBER_DIGITS_MAX = 20


def _peer_error(message: str, _errno_value: int) -> PeerError:
    return PeerError(message)


def _show(raw: bytes) -> str:
    return repr(raw[:32]) + ("…" if len(raw) > 32 else "")


def parse_xs_number(
    raw: bytes | bytearray | memoryview | str | None,
    key: str,
    *,
    lo: int = 0,
    hi: int = U32_MAX,
    error: Callable[[str, int], PeerError] = _peer_error,
) -> int:
    """Parse canonical decimal ``raw`` (the value of peer key ``key``), ``lo <= value <= hi``.

    ``None`` (the key is missing) is an error too; a caller with a default for an absent
    key checks for ``None`` first.  Errors are ``error(message, errno)``.
    """
    if raw is None:
        raise error(f"peer key {key!r} is missing", _errno.ENOENT)
    cut = raw[: XS_NUMBER_DIGITS_MAX + 1]  # bounded work, whatever the length
    data = cut.encode("utf-8", "replace") if isinstance(cut, str) else bytes(cut)
    digits = min(len(str(hi)), XS_NUMBER_DIGITS_MAX)
    if (
        not data
        or len(data) > digits
        or not data.isascii()
        or not data.isdigit()
        or (data[:1] == b"0" and len(data) > 1)
    ):
        raise error(f"peer key {key!r} is not a decimal number: {_show(data)}", _errno.EINVAL)
    value = int(data)
    if not lo <= value <= hi:
        raise error(f"peer key {key!r} = {value} not in {lo}..{hi}", _errno.ERANGE)
    return value

"""Xenbus states (``io/xenbus.h: enum xenbus_state``) and the xenbus peer errors.

A xenbus device's ``state`` node holds one of these values as a decimal string.  The
peer's node is untrusted input (hostile-inputs.md R5, R14): :func:`parse_state` accepts
exactly the nine decimal strings ``"0"`` … ``"8"`` and raises :class:`InvalidStateError`
(a :class:`~xenpv.errors.PeerError`) for anything else.
"""

from __future__ import annotations

import enum

from xenpv.errors import PeerError

__all__ = [
    "BadKeyError",
    "InvalidStateError",
    "InvalidTransitionError",
    "XenbusPeerError",
    "XenbusState",
    "parse_state",
]


class XenbusState(enum.IntEnum):
    """io/xenbus.h: ``XenbusState*`` values, written as decimal strings to ``…/state``."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8

    def encode(self) -> bytes:
        """Return the node value for this state (``b"4"`` for Connected)."""
        return b"%d" % self.value


class XenbusPeerError(PeerError):
    """The peer end of a xenbus device broke the protocol.

    ``errno`` is the positive errno recorded in the ``error`` node when the driver gives
    up on the device (``EINVAL`` unless a subclass says otherwise).
    """

    errno: int = 22  # EINVAL, as Linux's xenbus_dev_fatal(dev, -EINVAL, …) reports it

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class InvalidStateError(XenbusPeerError):
    """The peer's ``state`` node is not one of ``"0"`` … ``"8"``."""


class InvalidTransitionError(XenbusPeerError):
    """The peer moved to a state that the transition table does not allow here."""


class BadKeyError(XenbusPeerError):
    """A key the peer wrote (ring-ref, event-channel, feature-*, …) is missing or invalid."""


_STATE_TEXT = {s.encode(): s for s in XenbusState}


def parse_state(raw: bytes | str | None) -> XenbusState:
    """Parse the value of a peer's ``state`` node strictly.

    ``None`` (node missing) is :attr:`XenbusState.Unknown`, as the spec says ("node
    missing/unreadable").  Any value other than the nine decimal strings ``"0"``-``"8"``
    (signs, spaces, leading zeros, ``"99"``, huge numbers, non-ASCII) raises
    :class:`InvalidStateError`.
    """
    if raw is None:
        return XenbusState.Unknown
    if isinstance(raw, str):
        try:
            raw = raw.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidStateError(f"non-ASCII xenbus state {raw[:32]!r}") from None
    state = _STATE_TEXT.get(bytes(raw))
    if state is None:
        raise InvalidStateError(f"invalid xenbus state {bytes(raw[:32])!r}")
    return state

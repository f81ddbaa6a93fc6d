"""Errors of the vchan endpoints.

Anything the peer wrote that breaks the protocol (xenstore values, ring orders, grant
refs, indexes, live bytes) is a :class:`VchanPeerError`, a :class:`~xenpv.errors.PeerError`.
A peer that simply went away is not an error of the protocol: reads then return end of
file and writes raise :class:`BrokenPipeError`, as a socket would.
"""

from __future__ import annotations

from xenpv.errors import PeerError

__all__ = ["VchanBroken", "VchanPeerError"]


class VchanPeerError(PeerError):
    """The vchan peer broke the protocol (bad setup values or shared state)."""


class VchanBroken(VchanPeerError):
    """The shared ring state became insane (scenario 26): the vchan is locked for good."""

"""One event channel for several rings (netif's unsplit TX/RX): every firing wakes each.

A :class:`~.ringservice.RingService` or :class:`~.ringservice.RingClient` watches its
own port through the handle's :class:`~xenpv.platforms.dispatch.PortDispatcher`, which
keeps one callback per port.  When two rings share a port (a netif queue without split
event channels: the frontend allocates one port, the backend binds it once, and the
second :class:`~.ringchannel.FrontChannel`/:class:`~.ringchannel.BackChannel` is made
with ``shared_port``), :func:`share_port` — called after every pump started — replaces
that callback with one that runs each pump's wake-up in turn.  The returned dispatcher
is detached from the port by the owner after the pumps stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from xenpv.platforms.base import EventChannels
from xenpv.platforms.dispatch import PortDispatcher

__all__ = ["share_port"]


class _Pump(Protocol):
    def _on_event(self) -> None: ...


def share_port(events: EventChannels, port: int, pumps: Sequence[_Pump]) -> PortDispatcher:
    """Make every firing of ``port`` wake each of ``pumps`` (already started); balance
    with ``hub.detach(port)``."""
    hub = PortDispatcher.attach(events)

    def fired() -> None:
        for p in pumps:
            p._on_event()

    hub.watch(port, fired, unmask=True)
    return hub

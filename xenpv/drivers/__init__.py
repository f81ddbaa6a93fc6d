"""What split drivers share: resources, quarantine, event pump, streams and ring channels.

The driver layer (design.md: cli → drivers → xenbus → protocols → rings, with the
platforms and xenstore underneath).  Device drivers (:mod:`xenpv.frontends`,
:mod:`xenpv.backends`, :mod:`xenpv.vchan`) build on these pieces and never on each other:

* :mod:`~xenpv.drivers.resources` — :class:`DeviceResources`: the shares, mappings and
  ports of one connection, undone in one place (half-done setup and teardown);
* :mod:`~xenpv.drivers.quarantine` — :class:`GrantQuarantine`: shares the peer still
  maps, kept and retried, never reused (R8);
* :mod:`~xenpv.drivers.events` — :class:`EventRateLimiter` and :class:`EventPump`: one
  port with an event budget (R10, late unmask);
* :mod:`~xenpv.drivers.streams` — :class:`RingStreamTransport`: the asyncio byte-stream
  transport base (console, vchan);
* :mod:`~xenpv.drivers.consolering` — :class:`ConsoleRing`: the console page's two byte
  rings, for either side;
* :mod:`~xenpv.drivers.ringchannel` and :mod:`~xenpv.drivers.ringservice` — the
  request-ring base: :class:`FrontChannel`/:class:`BackChannel` (pages, port, keys for
  single, multi-page and multi-queue layouts) and :class:`RingService`/:class:`RingClient`
  (batches, a sans-IO :class:`RequestHandler`, notify only when the ring says so,
  spin-then-sleep, counters).

``docs/architecture.md`` ("Driver base") shows how a new device pair is written with them.
"""

from xenpv.drivers.consolering import ConsoleRing
from xenpv.drivers.events import EventPump, EventRateLimiter
from xenpv.drivers.quarantine import GrantQuarantine
from xenpv.drivers.resources import DeviceResources
from xenpv.drivers.ringchannel import (
    BackChannel,
    FrontChannel,
    RingChannelPeerError,
    RingKeys,
    RingPlacement,
    front_keys,
    read_ring_keys,
)
from xenpv.drivers.ringservice import RequestHandler, RingClient, RingService
from xenpv.drivers.streams import NoEndOfFile, RingStreamTransport

__all__ = [
    "BackChannel",
    "ConsoleRing",
    "DeviceResources",
    "EventPump",
    "EventRateLimiter",
    "FrontChannel",
    "GrantQuarantine",
    "NoEndOfFile",
    "RequestHandler",
    "RingChannelPeerError",
    "RingClient",
    "RingKeys",
    "RingPlacement",
    "RingService",
    "RingStreamTransport",
    "front_keys",
    "read_ring_keys",
]

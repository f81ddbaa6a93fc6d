"""vchan: libxenvchan-compatible byte streams between two domains.

* :class:`VchanServer` / :class:`VchanClient` -- the two endpoints, with a blocking API
  (``send``, ``recv``, ``recv_into``, ``wait_readable``, ``close``) for scripts and hot
  loops; ``await VchanServer.create(...)`` / ``await VchanClient.create(...)`` from asyncio.
* :func:`open_connection` / :func:`start_server` -- asyncio streams in the style of
  :func:`asyncio.open_connection` / :func:`asyncio.start_server`.
* :class:`VchanPeerError` / :class:`VchanBroken` -- what a misbehaving peer produces.

The wire format (control page, orders, placement) is :mod:`xenpv.protocols.vchan`; see
``docs/vchan.md`` for a guide.

The names below are imported on first use, so that the sans-IO data path
(:mod:`xenpv.vchan.ring`) does not load asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xenpv._lazy import lazy_exports

if TYPE_CHECKING:
    from xenpv.vchan.endpoint import EventHub, VchanClient, VchanEndpoint, VchanServer
    from xenpv.vchan.errors import VchanBroken, VchanPeerError
    from xenpv.vchan.ring import VchanRings
    from xenpv.vchan.streams import VchanStreamServer, VchanTransport, open_connection, start_server

_EXPORTS = {
    "EventHub": "endpoint",
    "VchanClient": "endpoint",
    "VchanEndpoint": "endpoint",
    "VchanServer": "endpoint",
    "VchanBroken": "errors",
    "VchanPeerError": "errors",
    "VchanRings": "ring",
    "VchanStreamServer": "streams",
    "VchanTransport": "streams",
    "open_connection": "streams",
    "start_server": "streams",
}
__all__ = [
    "EventHub",
    "VchanBroken",
    "VchanClient",
    "VchanEndpoint",
    "VchanPeerError",
    "VchanRings",
    "VchanServer",
    "VchanStreamServer",
    "VchanTransport",
    "open_connection",
    "start_server",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""vchan: libxenvchan-compatible byte streams between two domains.

* :class:`VchanServer` / :class:`VchanClient` -- the two endpoints, with a blocking API
  (``send``, ``recv``, ``recv_into``, ``wait_readable``, ``close``) for scripts and hot
  loops; ``await VchanServer.create(...)`` / ``await VchanClient.create(...)`` from asyncio.
* :func:`open_connection` / :func:`start_server` -- asyncio streams in the style of
  :func:`asyncio.open_connection` / :func:`asyncio.start_server`.
* :class:`VchanPeerError` / :class:`VchanBroken` -- what a misbehaving peer produces.

The wire format (control page, orders, placement) is :mod:`xenpv.protocols.vchan`; see
``docs/vchan.md`` for a guide.
"""

from __future__ import annotations

from xenpv.vchan.endpoint import EventHub, VchanClient, VchanEndpoint, VchanServer, reap
from xenpv.vchan.errors import VchanBroken, VchanPeerError
from xenpv.vchan.ring import VchanRings
from xenpv.vchan.streams import VchanStreamServer, VchanTransport, open_connection, start_server

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
    "reap",
    "start_server",
]

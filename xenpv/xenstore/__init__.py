"""Xenstore for xenpv: the wire codec, path rules, an asyncio client and an embedded server.

* :mod:`xenpv.xenstore.wire` — sans-IO message codec (``io/xs_wire.h``).
* :mod:`xenpv.xenstore.paths` — path validation and relative-path helpers.
* :mod:`xenpv.xenstore.client` — asyncio client (:func:`~xenpv.xenstore.client.connect`).
* :mod:`xenpv.xenstore.server` — the embedded xenstored.
"""

from __future__ import annotations

from xenpv.xenstore.wire import WireError, XenstoreError, XsType

__all__ = ["WireError", "XenstoreError", "XsType"]

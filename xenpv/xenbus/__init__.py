"""Xenbus: the device model that negotiates every split driver (xen-protocols.md §5).

* :mod:`~xenpv.xenbus.states` — :class:`XenbusState` and the strict state parser;
* :mod:`~xenpv.xenbus.machine` — transition tables as data and the sans-IO machine;
* :mod:`~xenpv.xenbus.paths`, :mod:`~xenpv.xenbus.keys` — device paths, the error node,
  strict parsers for peer-written keys;
* :mod:`~xenpv.xenbus.driver` — asyncio :class:`FrontendDriver` / :class:`BackendDriver`;
* :mod:`~xenpv.xenbus.watcher` — per-domain device discovery;
* :mod:`~xenpv.xenbus.toolstack` — create/remove/list device pairs as dom0;
* :mod:`~xenpv.xenbus.diagram` — the tables rendered as Mermaid or Graphviz text.
"""

from __future__ import annotations

from xenpv.xenbus.driver import (
    BackendDriver,
    DeviceConfigError,
    DeviceRemovedError,
    FrontendDriver,
    PeerKeys,
)
from xenpv.xenbus.machine import (
    BackendMachine,
    FrontendMachine,
    FrontendStyle,
    XenbusMachine,
)
from xenpv.xenbus.paths import backend_path, error_path, frontend_path
from xenpv.xenbus.states import (
    BadKeyError,
    InvalidStateError,
    InvalidTransitionError,
    XenbusPeerError,
    XenbusState,
    parse_state,
)
from xenpv.xenbus.toolstack import add_device, list_devices, remove_device
from xenpv.xenbus.watcher import BackendWatcher, FrontendWatcher

__all__ = [
    "BackendDriver",
    "BackendMachine",
    "BackendWatcher",
    "BadKeyError",
    "DeviceConfigError",
    "DeviceRemovedError",
    "FrontendDriver",
    "FrontendMachine",
    "FrontendStyle",
    "FrontendWatcher",
    "InvalidStateError",
    "InvalidTransitionError",
    "PeerKeys",
    "XenbusMachine",
    "XenbusPeerError",
    "XenbusState",
    "add_device",
    "backend_path",
    "error_path",
    "frontend_path",
    "list_devices",
    "parse_state",
    "remove_device",
]

"""Xenbus: the device model that negotiates every split driver (xen-protocols.md §5).

* :mod:`~xenpv.xenbus.states` — :class:`XenbusState` and the strict state parser;
* :mod:`~xenpv.xenbus.machine` — transition tables as data and the sans-IO machine;
* :mod:`~xenpv.xenbus.paths`, :mod:`~xenpv.xenbus.keys` — device paths, the error node,
  strict parsers for peer-written keys;
* :mod:`~xenpv.xenbus.driver` — asyncio :class:`FrontendDriver` / :class:`BackendDriver`;
* :mod:`~xenpv.xenbus.watcher` — per-domain device discovery;
* :mod:`~xenpv.xenbus.toolstack` — create/remove/list device pairs as dom0;
* :mod:`~xenpv.xenbus.diagram` — the tables rendered as Mermaid or Graphviz text.

The names below are imported on first use, so that importing a sans-IO module
(``states``, ``machine``, ``keys``, ``paths``) does not load asyncio and the xenstore client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xenpv._lazy import lazy_exports

if TYPE_CHECKING:
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
    from xenpv.xenbus.paths import (
        backend_path,
        error_path,
        frontend_path,
    )
    from xenpv.xenbus.states import (
        BadKeyError,
        InvalidStateError,
        InvalidTransitionError,
        XenbusPeerError,
        XenbusState,
        parse_state,
    )
    from xenpv.xenbus.toolstack import (
        add_device,
        list_devices,
        remove_device,
    )
    from xenpv.xenbus.watcher import (
        BackendWatcher,
        FrontendWatcher,
    )

_EXPORTS = {
    "BackendDriver": "driver",
    "DeviceConfigError": "driver",
    "DeviceRemovedError": "driver",
    "FrontendDriver": "driver",
    "PeerKeys": "driver",
    "BackendMachine": "machine",
    "FrontendMachine": "machine",
    "FrontendStyle": "machine",
    "XenbusMachine": "machine",
    "backend_path": "paths",
    "error_path": "paths",
    "frontend_path": "paths",
    "BadKeyError": "states",
    "InvalidStateError": "states",
    "InvalidTransitionError": "states",
    "XenbusPeerError": "states",
    "XenbusState": "states",
    "parse_state": "states",
    "add_device": "toolstack",
    "list_devices": "toolstack",
    "remove_device": "toolstack",
    "BackendWatcher": "watcher",
    "FrontendWatcher": "watcher",
}
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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

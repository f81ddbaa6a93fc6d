"""The real-Xen platform mode of the platform test suite.

:class:`~xenpv.platforms.xen.XenPlatform` (cffi on ``libxengnttab.so.1`` and
``libxenevtchn.so.1``) runs on the loopback emulator through the emulator's replacement
libraries: a daemon machine whose domains are ``xen_on_loopback`` platforms, dom0
in the test process and every other domain in its own child process.

What Xen's C library API cannot express is declared in :data:`XEN_LIMITS`, so a suite test
that needs it can be checked against the documented refusal instead.
"""

from __future__ import annotations

from typing import Any

from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.testing.xenmode import xen_platform

FACTORY = "xenpv.platforms.choose:xen_on_loopback"

#: Suite features libxengnttab does not offer (see xenpv/platforms/xen/grants.py):
#: strict end of access (gntalloc ends a still-mapped grant later, never refuses),
#: attaching an unmap notification after the fact, and notifications on multi-page runs.
XEN_LIMITS = frozenset({"strict_end_access", "late_unmap_notify", "multipage_unmap_notify"})


def xen_machine(*, max_grants: int = 128, max_ports: int = 32) -> Any:
    """A daemon machine whose platforms are the real-Xen platform on the shim."""
    machine = DaemonMachine(
        max_grants=max_grants, max_ports=max_ports, factory=FACTORY, local_factory=xen_platform
    )
    machine.limits = XEN_LIMITS
    return machine

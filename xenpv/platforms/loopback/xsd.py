"""Which xenstored is dom0's on the emulator: ``xenpv loopback up --xenstored NAME``.

Theory of operation
-------------------
The emulator's daemon plays the hypervisor; dom0's xenstored is a separate role.  The
domain builder (:mod:`~xenpv.platforms.loopback.builder`) gives every new domain its
xenstore page and port, and then the toolstack *introduces* the domain to dom0's
xenstored — whichever that is.  This module names the choices and the small interface a
choice implements, so that another xenstored (Xen's C ``xenstored``, ``oxenstored``) can
be plugged in without touching the daemon:

* ``ours`` — the embedded :class:`~xenpv.xenstore.server.XenstoredServer`, run inside the
  daemon with an in-process dom0 platform of the daemon's hypervisor (so ``INTRODUCE``
  maps the page and binds the port there), plus one socket per domain
  (``RUNDIR/dom<N>/xenstore``) for programs that prefer a socket.  This one is built
  into the daemon (``LoopbackDaemon``), not registered here.
* anything else — a :class:`Dom0Xenstored` factory registered in :data:`XENSTOREDS` under
  its name.  The daemon then starts no embedded server: it calls :meth:`~Dom0Xenstored.
  start` once dom0 exists, :meth:`~Dom0Xenstored.introduce` after building each domain's
  ring (the toolstack's ``INTRODUCE``), :meth:`~Dom0Xenstored.release` after destroying
  one, and :meth:`~Dom0Xenstored.close` at shutdown.  The implementation runs its server
  as dom0 through the replacement libraries (``loopback env --domid 0``) and reports the
  socket dom0's tools use through :meth:`~Dom0Xenstored.socket_path`; the daemon
  connects there as the toolstack to write each domain's home before introducing it and
  to remove it after a destroy.

Names accepted on the command line are :data:`CHOICES`; a name without a registered
factory is refused with a clear error.  ``xen-c`` is Xen's C xenstored
(:class:`~xenpv.platforms.loopback.xenstoreds.XenCDom0Xenstored`); ``oxenstored`` is
reserved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from xenpv.errors import LocalError

__all__ = ["CHOICES", "OURS", "XENSTOREDS", "Dom0Xenstored", "choose"]

#: The embedded xenstored (built into the daemon).
OURS = "ours"
#: Every name ``--xenstored`` accepts.
CHOICES = (OURS, "xen-c", "oxenstored")


class Dom0Xenstored(Protocol):
    """Dom0's xenstored when it is not ours (see the module docstring)."""

    async def start(self, rundir: Path) -> None:
        """Start serving as dom0 of the daemon running in ``rundir`` (dom0 exists)."""
        ...

    def socket_path(self, domid: int) -> str | None:
        """The socket whose connections act as ``domid`` (None: that domain has only
        its ring)."""
        ...

    async def introduce(self, domid: int, gfn: int, port: int) -> None:
        """``INTRODUCE domid gfn port`` (the domain's home is written already)."""
        ...

    async def release(self, domid: int) -> None:
        """The domain was destroyed: ``RELEASE`` it (``@releaseDomain`` must fire)."""
        ...

    async def close(self) -> None:
        """Stop the server."""
        ...


#: Factories of the xenstoreds other than ours, by ``--xenstored`` name (a factory only
#: builds the object: it starts nothing until :meth:`Dom0Xenstored.start`).
def _xen_c() -> Dom0Xenstored:
    from xenpv.platforms.loopback.xenstoreds import XenCDom0Xenstored

    return XenCDom0Xenstored()


def _oxenstored() -> Dom0Xenstored:
    from xenpv.platforms.loopback.xenstoreds import XenCDom0Xenstored, XenOxenstored

    return XenCDom0Xenstored(server_class=XenOxenstored)


XENSTOREDS: dict[str, Callable[[], Dom0Xenstored]] = {"xen-c": _xen_c,
                                                     "oxenstored": _oxenstored}


def choose(name: str) -> Dom0Xenstored | None:
    """The xenstored called ``name``: None for ours, else a new instance; a
    :class:`~xenpv.errors.LocalError` for a name that is unknown or not available."""
    if name == OURS:
        return None
    if name not in CHOICES:
        raise LocalError(f"unknown xenstored {name!r} (one of {', '.join(CHOICES)})")
    factory = XENSTOREDS.get(name)
    if factory is None:
        raise LocalError(f"xenstored {name!r} is not available in this build of xenpv "
                         f"(use --xenstored {OURS})")
    return factory()

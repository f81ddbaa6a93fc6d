"""The real-Xen platform: grant tables and event channels through Xen's C libraries.

:class:`XenPlatform` implements :class:`xenpv.platforms.base.Platform` with cffi (ABI
mode) bindings to ``libxengnttab.so.1`` and ``libxenevtchn.so.1`` (see ``_libs.py``) and
the asyncio xenstore client on ``$XENSTORED_PATH``, the xenstored socket or
``/dev/xen/xenbus``.  Run under the loopback emulator's environment (``xenpv loopback env
--domid N``), the same code drives the emulator through its replacement libraries, which is
how the test suite exercises it.
"""

from __future__ import annotations

import os
from pathlib import Path

from xenpv.errors import LocalError
from xenpv.platforms.base import BasePlatform
from xenpv.platforms.xen._libs import XenLibraries, load
from xenpv.platforms.xen.events import XenEvents
from xenpv.platforms.xen.grants import XenGrantTable, XenMappedGrants, XenSharedPages

__all__ = [
    "XenEvents",
    "XenGrantTable",
    "XenLibraries",
    "XenMappedGrants",
    "XenPlatform",
    "XenSharedPages",
    "default_xenstore_path",
    "load",
]

#: Where libxenstore looks when ``$XENSTORED_PATH`` is unset.
DEFAULT_XENSTORED_RUNDIR = "/var/run/xenstored"
XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")


def default_xenstore_path() -> str | None:
    """The xenstore endpoint libxenstore would pick: ``$XENSTORED_PATH``, else the
    xenstored socket in ``$XENSTORED_RUNDIR`` (default ``/var/run/xenstored``) if it exists,
    else the xenbus device if it exists; ``None`` when there is none."""
    path = os.environ.get("XENSTORED_PATH")
    if path:
        return path
    rundir = os.environ.get("XENSTORED_RUNDIR") or DEFAULT_XENSTORED_RUNDIR
    candidates = (os.path.join(rundir, "socket"), *XENBUS_DEVICES)
    return next((c for c in candidates if os.path.exists(c)), None)


class XenPlatform(BasePlatform[XenGrantTable, XenEvents]):
    """Everything a driver needs, for this domain, on real Xen's libraries.

    ``domid`` is this domain's id (a guest learns it from its xenstore key ``domid``); when
    omitted, ``$XENPV_LOOPBACK_DOMID`` (set by ``xenpv loopback env``) is used.
    ``lib_dir`` loads the libraries from that directory instead of the loader's search
    path; ``xenstore_path`` overrides :func:`default_xenstore_path`.
    """

    def __init__(
        self,
        domid: int | None = None,
        *,
        lib_dir: str | os.PathLike[str] | None = None,
        xenstore_path: str | None = None,
    ) -> None:
        if domid is None:
            env = os.environ.get("XENPV_LOOPBACK_DOMID")
            if env is None or not env.isdigit():
                raise LocalError("XenPlatform needs domid= (read it from the xenstore key 'domid')")
            domid = int(env)
        self.libraries = load(lib_dir)
        grants = XenGrantTable(self.libraries, domid)
        try:
            events = XenEvents(self.libraries, domid)
        except BaseException:
            grants.close()
            raise
        super().__init__(grants, events, xenstore_path or default_xenstore_path())

    @classmethod
    async def discover(
        cls,
        *,
        lib_dir: str | os.PathLike[str] | None = None,
        xenstore_path: str | None = None,
    ) -> XenPlatform:
        """Open the platform for the domain this process runs in, learning its domid the
        way a guest does: from its own xenstore key ``domid`` (a relative path)."""
        from xenpv.errors import PeerError
        from xenpv.xenstore.client import connect

        path = xenstore_path or default_xenstore_path()
        if path is None:
            raise LocalError("no xenstore endpoint (set XENSTORED_PATH)")
        async with await connect(path) as xs:
            raw = await xs.read("domid")
        if not raw.isdigit() or int(raw) >= 0x7FF0:
            raise PeerError(f"xenstore key 'domid' is not a domain id: {raw[:32]!r}")
        return cls(int(raw), lib_dir=lib_dir, xenstore_path=path)

    @classmethod
    def for_loopback(cls, rundir: str | os.PathLike[str], domid: int) -> XenPlatform:
        """This platform acting as domain ``domid`` of the loopback emulator running in
        ``rundir``, through the emulator's replacement libraries.

        The libraries connect to ``$XENPV_LOOPBACK_SOCKET``, so the process must run in
        that domain's environment (``xenpv loopback env --rundir RUNDIR --domid N``).
        """
        from xenpv.cli.loopback import shim_dir

        base = Path(rundir).resolve() / f"dom{domid}"
        socket = os.environ.get("XENPV_LOOPBACK_SOCKET", "")
        if not socket or Path(socket).resolve() != base / "control":
            raise LocalError(
                f"not in dom{domid}'s environment: XENPV_LOOPBACK_SOCKET={socket!r} "
                f"(see 'xenpv loopback env --rundir {rundir} --domid {domid}')"
            )
        return cls(domid, lib_dir=shim_dir(), xenstore_path=str(base / "xenstore"))

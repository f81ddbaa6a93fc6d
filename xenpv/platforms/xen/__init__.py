"""The real-Xen platform: grant tables and event channels through Xen's C libraries.

:class:`XenPlatform` implements :class:`xenpv.platforms.base.Platform` with cffi (ABI
mode) bindings to ``libxengnttab.so.1`` and ``libxenevtchn.so.1`` (see ``_libs.py``) and
the asyncio xenstore client on ``$XENSTORED_PATH``, the xenstored socket or
``/dev/xen/xenbus``.  Run under the loopback emulator's environment (``xenpv loopback env
--domid N``), the same code drives the emulator through its replacement libraries, which is
how the test suite exercises it (:func:`xenpv.platforms.choose.xen_on_loopback`).
"""

from __future__ import annotations

import os

from xenpv.errors import LocalError, PeerError
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
    "parse_domid",
]

#: Where libxenstore looks when ``$XENSTORED_PATH`` is unset.
DEFAULT_XENSTORED_RUNDIR = "/var/run/xenstored"
XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")
#: xen.h: DOMID_FIRST_RESERVED; a guest's own id is below it.
DOMID_FIRST_RESERVED = 0x7FF0


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


def parse_domid(raw: bytes | str) -> int:
    """The value of this domain's xenstore key ``domid`` (written by the toolstack): a
    domain id below ``DOMID_FIRST_RESERVED``, else a :class:`~xenpv.errors.PeerError`."""
    from xenpv.xenstore.values import parse_xs_number

    return parse_xs_number(raw, "domid", lo=0, hi=DOMID_FIRST_RESERVED - 1,
                           error=lambda message, _errno: PeerError(message))


class XenPlatform(BasePlatform[XenGrantTable, XenEvents]):
    """Everything a driver needs, for this domain, on real Xen's libraries.

    ``domid`` is this domain's id (a guest learns it from its xenstore key ``domid``:
    :meth:`discover`, or :func:`xenpv.platforms.choose.open_platform`).  ``lib_dir`` loads the libraries from that directory instead of the loader's search
    path; ``xenstore_path`` overrides :func:`default_xenstore_path`.
    """

    def __init__(
        self,
        domid: int,
        *,
        lib_dir: str | os.PathLike[str] | None = None,
        xenstore_path: str | None = None,
    ) -> None:
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
        from xenpv.xenstore.client import connect

        path = xenstore_path or default_xenstore_path()
        if path is None:
            raise LocalError("no xenstore endpoint (set XENSTORED_PATH)")
        async with await connect(path) as xs:
            raw = await xs.read("domid")
        return cls(parse_domid(raw), lib_dir=lib_dir, xenstore_path=path)

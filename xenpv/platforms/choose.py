"""Which platform this process runs on: :func:`open_platform`, the one place that decides.

Programs (the ``xenpv`` commands, ``python -m xenpv.vchan.tool``) call it; drivers never
do, they are given a platform.  The choice follows the environment:

* ``loopback``: the emulator's control-protocol client
  (:class:`~xenpv.platforms.loopback.client.ClientPlatform`), as domain ``domid`` of the
  emulator running in ``rundir``, or, without ``rundir``, as the domain whose environment
  this process runs in (``$XENPV_LOOPBACK_SOCKET``, set by ``xenpv loopback env``);
* ``xen``: Xen's C libraries (:class:`~xenpv.platforms.xen.XenPlatform`).  With
  ``rundir`` they are the emulator's replacement libraries (:func:`xen_on_loopback`); the
  domain id is ``domid``, else ``$XENPV_LOOPBACK_DOMID``, else the xenstore key ``domid``
  (how a guest learns its own id);
* ``auto`` (the default): ``$XENPV_PLATFORM`` when it names one of the two kinds (tests
  and the real-Xen runbook set ``XENPV_PLATFORM=xen`` to run Xen's libraries, which under
  the emulator's environment are its replacement libraries), else ``loopback`` when
  ``rundir`` is given or the emulator's environment is set, else ``xen``.

In-process emulator platforms share a hypervisor object with their peers, so they come
from their machine (:mod:`xenpv.platforms.loopback.harness`), not from the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xenpv.errors import LocalError
from xenpv.platforms.base import BasePlatform
from xenpv.platforms.loopback import env as _env

if TYPE_CHECKING:
    from xenpv.platforms.xen import XenPlatform

__all__ = ["KINDS", "open_platform", "xen_on_loopback"]

#: What :func:`open_platform` accepts as ``kind``.
KINDS = ("auto", "loopback", "xen")


def open_platform(
    kind: str = "auto",
    *,
    rundir: str | os.PathLike[str] | None = None,
    domid: int | None = None,
) -> BasePlatform[Any, Any]:
    """The platform of this process's domain (see the module's docstring for the choice).

    ``rundir`` names a loopback emulator's run directory; ``domid`` is this domain's id
    (required with ``rundir``).  The caller closes the platform.
    """
    if kind not in KINDS:
        raise LocalError(f"unknown platform {kind!r} (one of {', '.join(KINDS)})")
    if rundir is not None and domid is None:
        raise LocalError("open_platform(rundir=…) needs domid=")
    if kind == "auto":
        kind = os.environ.get(_env.ENV_PLATFORM) or "auto"
        if kind not in KINDS:
            raise LocalError(f"{_env.ENV_PLATFORM}={kind!r}: not one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "loopback" if rundir is not None or os.environ.get(_env.ENV_SOCKET) else "xen"
    if kind == "loopback":
        from xenpv.platforms.loopback.client import ClientPlatform

        if rundir is None:
            return ClientPlatform()
        assert domid is not None
        return ClientPlatform.for_domain(rundir, domid)
    if rundir is not None:
        assert domid is not None
        return xen_on_loopback(rundir, domid)
    from xenpv.platforms.xen import XenPlatform, parse_domid
    from xenpv.xenstore.blocking import BlockingClient

    if domid is None:
        domid = _env.env_domid()
    if domid is None:
        with BlockingClient() as xs:
            domid = parse_domid(xs.read("domid"))
    return XenPlatform(domid)


def xen_on_loopback(rundir: str | os.PathLike[str], domid: int) -> XenPlatform:
    """:class:`~xenpv.platforms.xen.XenPlatform` acting as domain ``domid`` of the loopback
    emulator running in ``rundir``, through the emulator's replacement libraries.

    The libraries connect to ``$XENPV_LOOPBACK_SOCKET``, so the process must run in that
    domain's environment (``xenpv loopback env --rundir RUNDIR --domid N``).
    """
    from xenpv.platforms.xen import XenPlatform

    base = Path(rundir).resolve() / f"dom{domid}"
    socket = os.environ.get(_env.ENV_SOCKET, "")
    if not socket or Path(socket).resolve() != base / "control":
        raise LocalError(
            f"not in dom{domid}'s environment: {_env.ENV_SOCKET}={socket!r} "
            f"(see 'xenpv loopback env --rundir {rundir} --domid {domid}')"
        )
    return XenPlatform(domid, lib_dir=_env.shim_dir(), xenstore_path=str(base / "xenstore"))

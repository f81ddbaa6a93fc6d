"""What makes a process a domain of the loopback emulator: its environment.

A program acts as domain N of an emulator running in RUNDIR when it runs under
:func:`domain_env` (``xenpv loopback env --rundir RUNDIR --domid N`` prints it): xenpv's
client platform and the replacement C libraries in :func:`shim_dir` find the domain's
control socket in :data:`ENV_SOCKET`, and any xenstore client finds the domain's xenstored
socket in :data:`ENV_XENSTORED_PATH` (libxenstore's own variable).  Everything that knows
these names or paths imports them from here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ENV_DOMID",
    "ENV_SOCKET",
    "ENV_XENSTORED_PATH",
    "domain_env",
    "env_domid",
    "shim_dir",
]

#: The domain's control socket (``RUNDIR/dom<N>/control``); authoritative.
ENV_SOCKET = "XENPV_LOOPBACK_SOCKET"
#: The domain's id, for information (the socket decides which domain a process is).
ENV_DOMID = "XENPV_LOOPBACK_DOMID"
#: libxenstore's variable for the xenstored socket (``RUNDIR/dom<N>/xenstore``).
ENV_XENSTORED_PATH = "XENSTORED_PATH"
#: Which platform :func:`xenpv.platforms.choose.open_platform` picks by default
#: (``xen`` or ``loopback``; unset: decided by the environment).
ENV_PLATFORM = "XENPV_PLATFORM"


def shim_dir() -> Path:
    """Directory of the replacement libraries (``libxengnttab.so.1`` …)."""
    return Path(__file__).resolve().parent / "shim"


def env_domid() -> int | None:
    """The domain id ``$XENPV_LOOPBACK_DOMID`` names, ``None`` when unset or not a number."""
    text = os.environ.get(ENV_DOMID, "")
    return int(text) if text.isascii() and text.isdigit() else None


def domain_env(rundir: str | os.PathLike[str], domid: int) -> dict[str, str]:
    """The environment variables under which any program acts as domain ``domid``."""
    from xenpv import peers

    base = Path(rundir).resolve() / f"dom{domid}"
    dirs = [str(shim_dir())]
    try:  # Debian's Xen libraries (libxenstore, libxenvchan …) for the real programs
        dirs.append(str(peers.lib_dir()))
    except peers.PeerMissing:
        pass
    old = os.environ.get("LD_LIBRARY_PATH", "")
    if old:
        dirs.append(old)
    return {
        ENV_SOCKET: str(base / "control"),
        ENV_DOMID: str(domid),
        ENV_XENSTORED_PATH: str(base / "xenstore"),
        "LD_LIBRARY_PATH": ":".join(dirs),
    }

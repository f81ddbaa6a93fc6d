"""The real-Xen platform acting as a domain of the loopback emulator, for tests.

:func:`xen_platform` opens :class:`~xenpv.platforms.xen.XenPlatform` (cffi on Xen's
``libxengnttab``/``libxenevtchn``, here the emulator's replacement libraries) as domain
``domid`` of the emulator whose run directory is ``rundir``, in this process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from xenpv.platforms.choose import xen_on_loopback
from xenpv.platforms.loopback.env import domain_env
from xenpv.platforms.xen import XenPlatform


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the block; the previous values come back after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def xen_platform(rundir: str, domid: int) -> XenPlatform:
    """``XenPlatform`` as domain ``domid`` of the emulator at ``rundir``."""
    # The libraries read $XENPV_LOOPBACK_SOCKET when a handle is opened; the handles keep
    # their connection afterwards, so the variable is only needed while opening.
    with environment(domain_env(rundir, domid)):
        return xen_on_loopback(rundir, domid)

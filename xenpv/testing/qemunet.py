"""QEMU 10's net backend as a real peer of our net frontend, on a loopback machine.

:func:`qemu_vif` starts Debian's QEMU 10 (:data:`xenpv.peers.QEMU10`, from
bookworm-backports) as dom0's device model for a guest of a running loopback machine
(anything with a ``rundir`` and a ``spawn(domid, argv, **kw)`` that starts a program
through the replacement libraries: :class:`~xenpv.testing.vchan.VchanLab`, or the interop
tests' ``LoopbackRun``).  QEMU serves one ``xen-net-device`` whose netdev is a TAP device
in a network namespace the caller made; QEMU writes the vif's backend and frontend
directories itself (``backend/qnic/<guest>/<idx>``, ``device/vif/<idx>``).  Our
:class:`~xenpv.frontends.net.NetFrontend`, acting as the guest, connects to it, and a
:class:`~xenpv.frontends.net.TapBridge` puts a second TAP, in the guest's namespace, on
top of the frontend.  A kernel stack in each namespace then talks through
our frontend and QEMU's backend:

    guest netns TAP <-> TapBridge <-> NetFrontend <-rings-> QEMU 10 <-> TAP in QEMU's netns

Both TAPs exist while the context is open (the caller gives them addresses); both go away
when it closes (QEMU, ended by pid, created its own; ours is closed).  Nothing here
touches the host's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from xenpv import peers
from xenpv.drivers.tap import TapDevice
from xenpv.frontends.net import NetFrontConfig, NetFrontend, TapBridge
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.xenstore.client import XenstoreClient, connect

__all__ = ["MAC", "QemuVif", "qemu_vif", "read_dir", "start_qemu_net"]

#: The vif's MAC unless one is given (QEMU writes it into the frontend directory).
MAC = "00:16:3e:00:00:23"


class Lab(Protocol):
    """What :func:`qemu_vif` needs of a loopback machine."""

    @property
    def rundir(self) -> str | os.PathLike[str]:
        """The emulator's run directory."""
        ...

    def spawn(self, domid: int, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` acting as ``domid`` (ended by the lab when it closes)."""
        ...


@dataclass
class QemuVif:
    """A connected vif between our frontend and QEMU 10's backend."""

    #: QEMU's process (ended by pid when the context closes).
    qemu: subprocess.Popen[Any]
    frontend: NetFrontend
    bridge: TapBridge
    #: ``backend/qnic/<guest>/<idx>`` and ``device/vif/<idx>``.
    backend_path: str
    frontend_path: str
    #: The two directories' keys once connected (what each side wrote).
    backend_keys: dict[str, str] = field(default_factory=dict)
    frontend_keys: dict[str, str] = field(default_factory=dict)


async def read_dir(xs: XenstoreClient, path: str) -> dict[str, str]:
    """The keys directly under ``path`` with their values (subdirectories left out)."""
    out: dict[str, str] = {}
    for name in await xs.directory(path):
        with contextlib.suppress(Exception):  # a node removed meanwhile
            if not await xs.directory(f"{path}/{name}"):
                out[name] = (await xs.read(f"{path}/{name}")).decode(errors="replace")
    return out


async def _wait_key(xs: XenstoreClient, path: str, timeout: float,
                    qemu: subprocess.Popen[Any]) -> bytes:
    async with asyncio.timeout(timeout):
        while True:
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited with status {qemu.returncode} before "
                                   f"writing {path}")
            with contextlib.suppress(Exception):  # not there yet
                value = await xs.read(path)
                if value:
                    return value
            await asyncio.sleep(0.05)


async def start_qemu_net(lab: Lab, guest: int, *, netns: str, tap: str, log: IO[bytes],
                         mac: str = MAC, idx: int = 0,
                         timeout: float = 20.0) -> tuple[subprocess.Popen[Any], str]:
    """Start QEMU 10 as dom0's device model for ``guest``, serving vif ``idx`` (``mac``)
    over TAP ``tap`` in namespace ``netns`` (its output to ``log``), and wait until it has
    written the vif's directories; return QEMU's process and the vif's frontend path.  A
    frontend (ours in process, or ``xenpv net frontend IDX`` as the guest) can then
    connect.  The lab ends QEMU when it closes (or end it by pid).  Raises ``PeerMissing``
    at once if QEMU 10 was not fetched, ``TimeoutError`` after ``timeout`` s."""
    argv = peers.qemu_net_backend(guest, tap, mac, idx, netns=netns)
    frontend_path = f"/local/domain/{guest}/device/vif/{idx}"
    xs0 = await connect(str(Path(lab.rundir) / "dom0" / "xenstore"))
    try:
        qemu = lab.spawn(0, argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            await _wait_key(xs0, f"{frontend_path}/backend", timeout, qemu)
        except BaseException:
            await _end(qemu)
            raise
    finally:
        await xs0.close()
    return qemu, frontend_path


@contextlib.asynccontextmanager
async def qemu_vif(lab: Lab, guest: int, *, qemu_netns: str, qemu_tap: str,
                   guest_netns: str, guest_tap: str, log: IO[bytes],
                   mac: str = MAC, idx: int = 0, offload: bool = True,
                   config: NetFrontConfig | None = None,
                   timeout: float = 20.0) -> AsyncIterator[QemuVif]:
    """QEMU 10 serving vif ``idx`` of ``guest`` over TAP ``qemu_tap`` in ``qemu_netns``
    (:func:`start_qemu_net`), our frontend connected to it in this process and bridged to
    TAP ``guest_tap`` in ``guest_netns`` (checksum/TSO offload between that TAP and the
    frontend when ``offload``).  Both namespaces must exist; the TAPs are made here and
    are down and without addresses.  Raises ``PeerMissing`` at once if QEMU 10 was not
    fetched, ``TimeoutError`` if the vif does not connect within ``timeout``."""
    rundir = Path(lab.rundir)
    async with contextlib.AsyncExitStack() as stack:  # undone in reverse order
        platform = ClientPlatform.for_domain(rundir, guest)
        stack.callback(platform.close)
        xs0 = await connect(str(rundir / "dom0" / "xenstore"))
        stack.push_async_callback(xs0.close)
        xsg = await connect(str(rundir / f"dom{guest}" / "xenstore"))
        stack.push_async_callback(xsg.close)
        qemu, frontend_path = await start_qemu_net(lab, guest, netns=qemu_netns, tap=qemu_tap,
                                                   log=log, mac=mac, idx=idx, timeout=timeout)
        stack.push_async_callback(_end, qemu)
        backend_path = (await xs0.read(f"{frontend_path}/backend")).decode()
        frontend = NetFrontend(platform, xsg, frontend_path,
                               config=config or NetFrontConfig(tx_pages=64, rx_pages=64))
        await frontend.start()
        stack.push_async_callback(frontend.close)  # the Closing handshake, QEMU still up
        await frontend.ready(timeout)
        bridge = TapBridge(frontend, TapDevice.open(guest_tap, netns=guest_netns,
                                                    offload=offload))
        bridge.start()
        stack.push_async_callback(bridge.close)
        yield QemuVif(qemu, frontend, bridge, backend_path, frontend_path,
                      await read_dir(xs0, backend_path), await read_dir(xs0, frontend_path))


async def _end(qemu: subprocess.Popen[Any]) -> None:
    """End QEMU by its pid (``ip netns exec`` exec'd it: the same process)."""
    if qemu.poll() is None:
        qemu.kill()
    await asyncio.to_thread(qemu.wait, 10)

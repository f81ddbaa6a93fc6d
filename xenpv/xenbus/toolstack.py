"""Toolstack helper: create, remove and list device pairs as dom0 (the way libxl does).

Creation writes both directories in one transaction (xen-protocols.md §5.2)::

    /local/domain/<fe>/device/<type>/<devid>              perms [n<fe>, r<be>]
        backend = <backend path>, backend-id = <be>, state = 1, + frontend keys
    /local/domain/<be>/backend/<btype>/<fe>/<devid>       perms [n<be>, r<fe>]
        frontend = <frontend path>, frontend-id = <fe>, online = 1, state = 1, + backend keys

The permissions are set on each directory before its keys are written, so every key
inherits them.  ``btype`` is normally ``type`` (QEMU's block backend uses ``qdisk``
behind a ``vbd`` frontend).

Removal (§5.4): in one transaction ``online = 0`` and, unless the backend already shows
Closed, ``state = 5``; then wait (bounded) for the backend to reach Closed (or vanish);
then delete both directories in one transaction.  With ``force`` (or when the wait times
out) the helper writes backend ``state = 6`` itself before deleting.

The helper decides only from its arguments and from the backend directory: it never
follows paths read from the frontend directory, which the guest can write (R14).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

from xenpv.errors import LocalError, PeerError
from xenpv.protocols.blkif import vdev_encode
from xenpv.xenbus.paths import (
    DevicePathError,
    backend_dir,
    backend_path,
    frontend_dir,
    frontend_path,
    parse_frontend_path,
)
from xenpv.xenbus.states import XenbusState, parse_state
from xenpv.xenstore.client import Perm, Transaction, XenstoreClient
from xenpv.xenstore.wire import XenstoreError

__all__ = [
    "DeviceExistsError",
    "DeviceInfo",
    "NoSuchDeviceError",
    "add_device",
    "list_devices",
    "remove_device",
    "vbd_keys",
    "vif_keys",
]

KeyValues = Mapping[str, str | bytes | int]


class DeviceExistsError(LocalError):
    """The device directory to create already exists."""


class NoSuchDeviceError(LocalError):
    """Neither directory of the device to remove exists."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device pair as the toolstack sees it (states None: missing or malformed)."""

    devtype: str
    devid: int
    frontend_domid: int
    backend_domid: int
    frontend_path: str
    backend_path: str
    frontend_state: XenbusState | None
    backend_state: XenbusState | None
    online: bool | None


def _value(v: str | bytes | int) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _check_keys(keys: KeyValues) -> None:
    for name in keys:
        if not name or name.startswith("/") or "//" in name or name.endswith("/"):
            raise LocalError(f"invalid key name {name!r}")


async def _read(t: Transaction | XenstoreClient, path: str) -> bytes | None:
    try:
        return await t.read(path)
    except XenstoreError as exc:
        if exc.errno_name == "ENOENT":
            return None
        raise


def _state(raw: bytes | None) -> XenbusState | None:
    if raw is None:
        return None
    try:
        return parse_state(raw)
    except PeerError:
        return None


async def _free_devid(t: Transaction, fe_domid: int, devtype: str) -> int:
    try:
        names = await t.directory(frontend_dir(fe_domid, devtype))
    except XenstoreError as exc:
        if exc.errno_name != "ENOENT":
            raise
        names = []
    used = {int(n) for n in names if n.isdigit() and len(n) <= 10}
    devid = 0
    while devid in used:
        devid += 1
    return devid


async def add_device(
    client: XenstoreClient,
    devtype: str,
    frontend_domid: int,
    backend_domid: int,
    devid: int | None = None,
    *,
    frontend_keys: KeyValues | None = None,
    backend_keys: KeyValues | None = None,
    backend_type: str | None = None,
    frontend_readonly: tuple[str, ...] = (),
    timeout: float = 5.0,
) -> DeviceInfo:
    """Create a device pair (see the module docstring); returns its paths and states.

    ``devid`` None picks the lowest id unused in the frontend's ``device/<type>``.
    ``frontend_readonly`` names frontend keys the guest may read but not change (perms
    ``[n<be>, r<fe>]``, as libxl gives a vif's ``mtu``).
    Raises :class:`DeviceExistsError` if either directory exists.
    """
    fkeys, bkeys = dict(frontend_keys or {}), dict(backend_keys or {})
    _check_keys(fkeys)
    _check_keys(bkeys)
    btype = backend_type or devtype

    async def body(t: Transaction) -> DeviceInfo:
        dev = devid if devid is not None else await _free_devid(t, frontend_domid, devtype)
        fe = frontend_path(frontend_domid, devtype, dev)
        be = backend_path(backend_domid, btype, frontend_domid, dev)
        for path in (fe, be):
            if await t.exists(path):
                raise DeviceExistsError(f"{path} already exists")
        fe_items: dict[str, str | bytes | int] = {
            "backend": be, "backend-id": backend_domid, "state": int(XenbusState.Initialising),
        }  # fmt: skip
        be_items: dict[str, str | bytes | int] = {
            "frontend": fe, "frontend-id": frontend_domid, "online": 1,
            "state": int(XenbusState.Initialising),
        }  # fmt: skip
        for path, perms, items in (
            (fe, [Perm("n", frontend_domid), Perm("r", backend_domid)], {**fkeys, **fe_items}),
            (be, [Perm("n", backend_domid), Perm("r", frontend_domid)], {**bkeys, **be_items}),
        ):
            await t.mkdir(path)
            await t.set_perms(path, perms)
            for name, value in items.items():
                await t.write(f"{path}/{name}", _value(value))
        for name in frontend_readonly:
            if name in fkeys:
                await t.set_perms(f"{fe}/{name}", [Perm("n", backend_domid),
                                                   Perm("r", frontend_domid)])
        return DeviceInfo(
            devtype, dev, frontend_domid, backend_domid, fe, be,
            XenbusState.Initialising, XenbusState.Initialising, True,
        )  # fmt: skip

    return await client.transact(body, timeout=timeout)


async def _wait_backend_closed(client: XenstoreClient, be: str, timeout: float) -> bool:
    """Wait until ``be/state`` reads Closed or the directory is gone; False on timeout."""
    try:
        async with asyncio.timeout(timeout), client.watch(f"{be}/state", max_pending=4) as watch:
            async for _ in watch:
                raw = await _read(client, f"{be}/state")
                if raw is None or _state(raw) is XenbusState.Closed:
                    return True
    except TimeoutError:
        return False
    return False


async def remove_device(
    client: XenstoreClient,
    devtype: str,
    frontend_domid: int,
    devid: int,
    backend_domid: int,
    *,
    backend_type: str | None = None,
    timeout: float = 10.0,
    force: bool = False,
) -> bool:
    """Remove a device pair (see the module docstring).

    Returns True if the backend reached Closed by itself, False if the removal was
    forced (``force``, or no Closed within ``timeout`` seconds).  Raises
    :class:`NoSuchDeviceError` if neither directory exists.
    """
    fe = frontend_path(frontend_domid, devtype, devid)
    be = backend_path(backend_domid, backend_type or devtype, frontend_domid, devid)

    async def begin(t: Transaction) -> bool:
        be_exists = await t.exists(be)
        if not be_exists and not await t.exists(fe):
            raise NoSuchDeviceError(f"no device at {fe} / {be}")
        if be_exists:
            await t.write(f"{be}/online", b"0")
            if _state(await _read(t, f"{be}/state")) is not XenbusState.Closed:
                await t.write(f"{be}/state", XenbusState.Closing.encode())
        return be_exists

    be_exists = await client.transact(begin, timeout=5.0)
    clean = True
    if be_exists:
        clean = not force and await _wait_backend_closed(client, be, timeout)

    async def finish(t: Transaction) -> None:
        await t.rm(fe)
        await t.rm(be)
        parent = be.rsplit("/", 1)[0]
        with contextlib.suppress(XenstoreError):
            if not await t.directory(parent):
                await t.rm(parent)

    if not clean:
        # forced removal: let watchers see Closed before the directory goes away
        with contextlib.suppress(XenstoreError):
            await client.write(f"{be}/state", XenbusState.Closed.encode())
    await client.transact(finish, timeout=5.0)
    return clean


async def _info(
    client: XenstoreClient, devtype: str, be_domid: int, fe_domid: int, devid: int, be: str
) -> DeviceInfo:
    fe_raw = await _read(client, f"{be}/frontend")
    try:
        fe = str(parse_frontend_path(fe_raw)) if fe_raw is not None else ""
    except DevicePathError:
        fe = ""
    if not fe:
        fe = frontend_path(fe_domid, devtype, devid)
    online = await _read(client, f"{be}/online")
    return DeviceInfo(
        devtype, devid, fe_domid, be_domid, fe, be,
        _state(await _read(client, f"{fe}/state")),
        _state(await _read(client, f"{be}/state")),
        None if online is None else online != b"0",
    )  # fmt: skip


async def _numeric_children(client: XenstoreClient, path: str) -> list[int]:
    try:
        names = await client.directory(path)
    except XenstoreError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and len(n) <= 10)


async def list_devices(
    client: XenstoreClient,
    devtype: str,
    *,
    backend_domid: int = 0,
    frontend_domid: int | None = None,
    backend_type: str | None = None,
) -> list[DeviceInfo]:
    """Every ``devtype`` device served by ``backend_domid`` (of ``frontend_domid`` if given)."""
    root = backend_dir(backend_domid, backend_type or devtype)
    out: list[DeviceInfo] = []
    fes = [frontend_domid] if frontend_domid is not None else await _numeric_children(client, root)
    for fe in fes:
        for devid in await _numeric_children(client, f"{root}/{fe}"):
            be = f"{root}/{fe}/{devid}"
            out.append(await _info(client, devtype, backend_domid, fe, devid, be))
    return out


def vbd_keys(target: str, *, mode: str = "w", vdev: str = "xvda", cdrom: bool = False,
             backend_type: str = "phy") -> tuple[int, dict[str, str | int], dict[str, str | int]]:
    """The devid, frontend keys and backend keys libxl writes for a disk (``vbd``).

    ``target`` is the image or device path (``params``), ``mode`` ``r`` or ``w``, ``vdev``
    the guest's name for it (``xvda``, ``hdb``, ``d0p1`` …; its number is the devid and the
    frontend's ``virtual-device``)."""
    if mode not in ("r", "w"):
        raise LocalError(f"mode must be r or w, not {mode!r}")
    if not target:
        raise LocalError("a vbd needs a target")
    devid = vdev_encode(vdev)
    kind = "cdrom" if cdrom else "disk"
    frontend: dict[str, str | int] = {"virtual-device": devid, "device-type": kind}
    backend: dict[str, str | int] = {
        "params": target, "type": backend_type, "mode": mode, "device-type": kind,
        "dev": vdev, "removable": int(cdrom), "bootable": 1, "discard-enable": 1,
    }  # fmt: skip
    return devid, frontend, backend


def vif_keys(devid: int, *, mac: str | None = None, bridge: str = "xenpv0", mtu: int = 1500,
             script: str = "vif-bridge", rate: str | None = None
             ) -> tuple[dict[str, str | int], dict[str, str | int]]:
    """The frontend and backend keys libxl writes for a network interface (``vif``):
    ``mac`` (``xx:xx:xx:xx:xx:xx``; a random one in Xen's 00:16:3e range if None),
    ``handle`` (the devid), ``mtu`` on both sides, and for the backend ``bridge`` (for
    xenpv's net backend: the switch to join), ``script``, ``type`` = vif and the
    optional ``rate`` (``BYTES,USECS``: a credit limit on what the guest sends)."""
    import os
    import re

    if mac is None:
        mac = "00:16:3e:" + ":".join(f"{b:02x}" for b in (os.urandom(3)[0] & 0x7F,
                                                           *os.urandom(2)))
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", mac):
        raise LocalError(f"not a MAC address: {mac!r}")
    if int(mac[:2], 16) & 1:
        raise LocalError(f"{mac} is a group (multicast) address")
    if not 68 <= mtu <= 65535:
        raise LocalError(f"mtu {mtu} not in 68..65535")
    if not bridge or "/" in bridge or len(bridge) > 64:
        raise LocalError(f"bad bridge name {bridge!r}")
    mac = mac.lower()
    front: dict[str, str | int] = {"mac": mac, "handle": devid, "mtu": mtu}
    back: dict[str, str | int] = {"mac": mac, "handle": devid, "mtu": mtu, "bridge": bridge,
                                  "script": script, "type": "vif"}
    if rate is not None:
        if not re.fullmatch(r"\d+,\d+", rate):
            raise LocalError(f"rate must be BYTES,USECS, not {rate!r}")
        back["rate"] = rate
    return front, back

"""Xenbus device paths (xen-protocols.md §5.2) and the error node.

::

    frontend:  /local/domain/<fe>/device/<type>/<devid>
    backend:   /local/domain/<be>/backend/<type>/<fe>/<devid>
    error:     /local/domain/<self>/error/<device path relative to home>/error
               value "<positive errno> <message>"

The parsers here check shape only (decimal domids and devids without signs or leading
zeros, device types made of ``[a-z0-9_-]``); they raise :class:`DevicePathError` (a
:class:`~xenpv.xenbus.states.XenbusPeerError`) because the paths they parse come from
xenstore nodes.  Building a path from bad arguments is a :class:`~xenpv.errors.LocalError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenpv.errors import LocalError
from xenpv.xenbus.states import XenbusPeerError

__all__ = [
    "DOMID_MAX",
    "BackendPath",
    "DevicePathError",
    "FrontendPath",
    "backend_dir",
    "backend_path",
    "domain_path",
    "error_path",
    "error_value",
    "frontend_dir",
    "frontend_path",
    "parse_backend_path",
    "parse_frontend_path",
]

#: Highest ordinary domid (xen.h: DOMID_FIRST_RESERVED is 0x7FF0).
DOMID_MAX = 0x7FEF
#: Device ids are non-negative decimal numbers; vbd ids use up to 29 bits (§6.4).
DEVID_MAX = 0xFFFFFFFF
#: Longest device type name accepted.
TYPE_MAX = 32

_NUM = r"(0|[1-9][0-9]{0,9})"
_TYPE = r"([a-z0-9][a-z0-9_-]{0,31})"
_FRONTEND_RE = re.compile(rf"/local/domain/{_NUM}/device/{_TYPE}/{_NUM}")
_BACKEND_RE = re.compile(rf"/local/domain/{_NUM}/backend/{_TYPE}/{_NUM}/{_NUM}")
_TYPE_RE = re.compile(_TYPE)


class DevicePathError(XenbusPeerError):
    """A device path read from xenstore is malformed or names the wrong domain."""


def _check(domid: int, what: str) -> int:
    if not isinstance(domid, int) or not 0 <= domid <= DOMID_MAX:
        raise LocalError(f"{what} {domid!r} is not a domid (0..{DOMID_MAX})")
    return domid


def _check_type(devtype: str) -> str:
    if not isinstance(devtype, str) or not _TYPE_RE.fullmatch(devtype):
        raise LocalError(f"invalid device type {devtype!r}")
    return devtype


def _check_devid(devid: int) -> int:
    if not isinstance(devid, int) or not 0 <= devid <= DEVID_MAX:
        raise LocalError(f"invalid device id {devid!r}")
    return devid


def domain_path(domid: int) -> str:
    """``/local/domain/<domid>``, the domain's home."""
    return f"/local/domain/{_check(domid, 'domid')}"


def frontend_dir(fe_domid: int, devtype: str) -> str:
    """``/local/domain/<fe>/device/<type>``: where a frontend finds its devices."""
    return f"{domain_path(fe_domid)}/device/{_check_type(devtype)}"


def backend_dir(be_domid: int, devtype: str) -> str:
    """``/local/domain/<be>/backend/<type>``: where a backend finds its devices."""
    return f"{domain_path(be_domid)}/backend/{_check_type(devtype)}"


def frontend_path(fe_domid: int, devtype: str, devid: int) -> str:
    """``/local/domain/<fe>/device/<type>/<devid>``."""
    return f"{frontend_dir(fe_domid, devtype)}/{_check_devid(devid)}"


def backend_path(be_domid: int, devtype: str, fe_domid: int, devid: int) -> str:
    """``/local/domain/<be>/backend/<type>/<fe>/<devid>``."""
    return f"{backend_dir(be_domid, devtype)}/{_check(fe_domid, 'frontend domid')}/{_check_devid(devid)}"


@dataclass(frozen=True, slots=True)
class FrontendPath:
    """A parsed frontend device path."""

    domid: int
    devtype: str
    devid: int

    def __str__(self) -> str:
        return frontend_path(self.domid, self.devtype, self.devid)


@dataclass(frozen=True, slots=True)
class BackendPath:
    """A parsed backend device path."""

    domid: int
    devtype: str
    frontend_domid: int
    devid: int

    def __str__(self) -> str:
        return backend_path(self.domid, self.devtype, self.frontend_domid, self.devid)


def _text(raw: bytes | str, what: str) -> str:
    if isinstance(raw, bytes):
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise DevicePathError(f"non-ASCII {what} {raw[:64]!r}") from None
    return raw


def _domid(text: str, what: str) -> int:
    value = int(text)
    if value > DOMID_MAX:
        raise DevicePathError(f"{what} {value} is not an ordinary domid")
    return value


def _devid(text: str) -> int:
    value = int(text)
    if value > DEVID_MAX:
        raise DevicePathError(f"device id {value} out of range")
    return value


def parse_frontend_path(raw: bytes | str) -> FrontendPath:
    """Parse ``/local/domain/<fe>/device/<type>/<devid>``; :class:`DevicePathError` if not."""
    text = _text(raw, "frontend path")
    m = _FRONTEND_RE.fullmatch(text)
    if m is None:
        raise DevicePathError(f"not a frontend device path: {text[:128]!r}")
    return FrontendPath(_domid(m[1], "frontend domid"), m[2], _devid(m[3]))


def parse_backend_path(raw: bytes | str) -> BackendPath:
    """Parse ``/local/domain/<be>/backend/<type>/<fe>/<devid>``; :class:`DevicePathError` if not."""
    text = _text(raw, "backend path")
    m = _BACKEND_RE.fullmatch(text)
    if m is None:
        raise DevicePathError(f"not a backend device path: {text[:128]!r}")
    return BackendPath(
        _domid(m[1], "backend domid"), m[2], _domid(m[3], "frontend domid"), _devid(m[4])
    )


def error_path(device_path: str) -> str:
    """The error node of a device, under the home of the domain that owns ``device_path``.

    ``/local/domain/5/device/vbd/51712`` → ``/local/domain/5/error/device/vbd/51712/error``.
    """
    parts = device_path.split("/")
    if len(parts) < 5 or parts[:3] != ["", "local", "domain"] or not parts[3].isdigit():
        raise LocalError(f"{device_path!r} is not under a domain's home")
    home = "/".join(parts[:4])
    return f"{home}/error/{'/'.join(parts[4:])}/error"


def error_value(errno: int, message: str) -> bytes:
    """``"<positive errno> <message>"`` (§5.2), bounded to fit a xenstore node."""
    text = f"{abs(int(errno))} {message}"
    data = text.encode("ascii", "backslashreplace")
    return data[:1024]

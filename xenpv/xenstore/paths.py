"""Xenstore path rules (shared by the client and the embedded server).

A xenstore path is either absolute (``/local/domain/3/name``), relative to the
connection's domain home (``device/vif/0`` means ``/local/domain/<domid>/device/vif/0``;
only domain connections may use them), or a special watch name starting with ``@``
(``@introduceDomain``, ``@releaseDomain``, upstream also ``@releaseDomain/<domid>``).

Rules (xen-protocols.md §4.1): ASCII letters, digits and ``- / _ @``; no ``//``; no
trailing ``/`` except the root itself; not empty; ``@`` only as the first character of a
special name; at most :data:`~xenpv.xenstore.wire.ABS_PATH_MAX` (3072) bytes absolute and
:data:`~xenpv.xenstore.wire.REL_PATH_MAX` (2048) relative.

The functions are pure: they neither touch a store nor do I/O.
"""

from __future__ import annotations

import re

from xenpv.errors import LocalError
from xenpv.xenstore.wire import ABS_PATH_MAX, REL_PATH_MAX

__all__ = [
    "SPECIAL_INTRODUCE",
    "SPECIAL_RELEASE",
    "InvalidPathError",
    "basename",
    "domain_path",
    "is_child",
    "is_special",
    "join_path",
    "parent",
    "relative_to",
    "resolve",
    "validate_path",
]

#: Watch name that fires when a domain is introduced (INTRODUCE).
SPECIAL_INTRODUCE = "@introduceDomain"
#: Watch name that fires when a domain is released or dies.
SPECIAL_RELEASE = "@releaseDomain"

_VALID = re.compile(r"[A-Za-z0-9\-/_]*\Z")
# Fast path: a whole valid absolute or relative path (no //, no trailing /).
_WELL_FORMED = re.compile(r"(?:/|/?[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)*)\Z")


class InvalidPathError(LocalError, ValueError):
    """A path breaks the xenstore path rules (a server answers such requests ``EINVAL``)."""


def _text(path: str | bytes) -> str:
    if isinstance(path, bytes):
        try:
            return path.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidPathError(f"xenstore path {path!r} is not ASCII") from None
    return path


def is_special(path: str | bytes) -> bool:
    """Return True if ``path`` is a special watch name (starts with ``@``)."""
    return (path[:1] == "@") if isinstance(path, str) else (path[:1] == b"@")


def validate_path(path: str | bytes, *, allow_special: bool = True) -> None:
    """Raise :class:`InvalidPathError` unless ``path`` is a valid xenstore path.

    ``allow_special`` admits ``@name`` watch paths (for WATCH/UNWATCH/SET_PERMS/GET_PERMS
    on the special nodes); everywhere else pass False.
    """
    text = _text(path)
    if len(text) <= REL_PATH_MAX and _WELL_FORMED.match(text):
        return
    if not text:
        raise InvalidPathError("empty xenstore path")
    body = text
    if text[0] == "@":
        if not allow_special:
            raise InvalidPathError(f"special name {text!r} not allowed here")
        body = text[1:]
        if not body or body[0] == "/":
            raise InvalidPathError(f"invalid special name {text!r}")
    limit = ABS_PATH_MAX if text[0] == "/" else REL_PATH_MAX
    if len(text) > limit:
        raise InvalidPathError(f"xenstore path of {len(text)} bytes exceeds {limit}")
    if not _VALID.match(body):
        raise InvalidPathError(f"invalid character in xenstore path {text!r}")
    if "//" in body:
        raise InvalidPathError(f"'//' in xenstore path {text!r}")
    if body.endswith("/") and text != "/":
        raise InvalidPathError(f"trailing '/' in xenstore path {text!r}")


def domain_path(domid: int) -> str:
    """Return the home of domain ``domid``: ``/local/domain/<domid>``."""
    return f"/local/domain/{domid}"


def resolve(path: str, domid: int) -> str:
    """Return ``path`` made absolute for a connection of domain ``domid``.

    Absolute paths and special names are returned unchanged; relative paths are placed
    under ``/local/domain/<domid>``.
    """
    if path[:1] in ("/", "@"):
        return path
    return f"{domain_path(domid)}/{path}"


def relative_to(path: str, domid: int) -> str:
    """Return ``path`` relative to domain ``domid``'s home if it lies strictly below it.

    Used to report watch events for watches registered with a relative path.  Paths not
    below the home (and the home itself) are returned unchanged.
    """
    prefix = domain_path(domid) + "/"
    if path.startswith(prefix) and len(path) > len(prefix):
        return path[len(prefix) :]
    return path


def is_child(path: str, parent: str) -> bool:
    """Return True if ``path`` equals ``parent`` or lies anywhere below it."""
    if path == parent:
        return True
    if parent == "/":
        return path.startswith("/")
    return path.startswith(parent) and path[len(parent) : len(parent) + 1] == "/"


def parent(path: str) -> str:
    """Return the parent of an absolute path (the root is its own parent)."""
    if path == "/":
        return "/"
    head, _, _ = path.rpartition("/")
    return head or "/"


def basename(path: str) -> str:
    """Return the last component of a path (``""`` for the root)."""
    return path.rpartition("/")[2]


def join_path(base: str, name: str) -> str:
    """Return ``base/name`` without doubling the root's slash."""
    if base == "/":
        return "/" + name
    return f"{base}/{name}"

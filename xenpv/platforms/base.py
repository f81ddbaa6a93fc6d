"""The platform interfaces drivers are given: grant table, event channels, xenstore.

Theory of operation
-------------------
A split driver needs exactly three things from the platform underneath it (design.md,
rule 2): a *grant table* to share pages with a peer domain and to map the pages a peer
shares, *event channels* to poke the peer and be poked, and a *xenstore client*.  This
module defines them as :class:`typing.Protocol` classes so that drivers are written once
and run on every platform: the loopback emulator in one process, the loopback emulator
across processes (one process per domain, talking to ``xenpv loopback up``), and real Xen
(``xenpv.platforms.xen``, through Xen's C libraries).  Drivers receive a :class:`Platform`
(or the individual interfaces) as an argument; they never import a platform.

Memory is exposed as a :class:`memoryview` over the mapped pages (read-only mappings give
a read-only view, so a write raises ``TypeError``) plus :func:`numpy.frombuffer` arrays
over the same bytes.  Multi-page objects are always mapped contiguously, in ref order.

Errors: every refusal by the platform is a :class:`PlatformError` subclass carrying an
errno (``GrantInUse`` = ``EBUSY`` so callers can quarantine a page, ``MapError`` with the
``GNTST_*`` code of the first failing ref, ``ResourceExhausted`` = ``ENOSPC``, …).  Wrong
use of the API (unmapping twice, a port this handle does not own) is a
:class:`~xenpv.errors.LocalError` where the platform can tell, else a ``PlatformError``.
"""

from __future__ import annotations

import enum
import errno as _errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from xenpv.errors import PlatformError

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "DOMID_SELF",
    "GNTTAB_NR_RESERVED_ENTRIES",
    "PAGE_SIZE",
    "EventChannels",
    "EvtchnState",
    "GntSt",
    "GrantCopy",
    "GrantInUse",
    "GrantPtr",
    "GrantTable",
    "LocalPtr",
    "MapError",
    "MappedGrants",
    "NoSuchDomain",
    "Platform",
    "PlatformGone",
    "PortError",
    "ResourceExhausted",
    "SharedPages",
    "UnmapNotify",
    "prepare_copy",
]

#: Xen page size for every ring protocol (bytes).
PAGE_SIZE = 4096
#: grant_table.h: refs 0..7 are reserved (0 console, 1 xenstore) and never handed out.
GNTTAB_NR_RESERVED_ENTRIES = 8
#: xen.h: DOMID_SELF.
DOMID_SELF = 0x7FF0


class GntSt(enum.IntEnum):
    """grant_table.h: ``GNTST_*`` status codes of map and copy operations."""

    okay = 0
    general_error = -1
    bad_domain = -2
    bad_gntref = -3
    bad_handle = -4
    bad_virt_addr = -5
    bad_dev_addr = -6
    no_device_space = -7
    permission_denied = -8
    bad_page = -9
    bad_copy_arg = -10
    address_too_big = -11
    eagain = -12
    no_space = -13


class EvtchnState(enum.IntEnum):
    """event_channel.h: EVTCHNSTAT_* port states reported by EVTCHNOP_status."""

    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


# --------------------------------------------------------------------------- errors


class GrantInUse(PlatformError):
    """Ending access failed because the grantee still maps the page (R8, ``EBUSY``).

    Nothing was ended.  The caller must quarantine the pages and retry later; it must
    never reuse them.
    """

    def __init__(self, message: str, refs: Sequence[int] = ()) -> None:
        super().__init__(message, _errno.EBUSY)
        self.refs = tuple(refs)


class MapError(PlatformError):
    """Mapping a batch of grants failed; nothing of the batch stays mapped (R9).

    ``index`` is the position of the first failing ref in the batch and ``status`` its
    ``GNTST_*`` code.
    """

    def __init__(self, message: str, errno: int, index: int, status: int) -> None:
        super().__init__(message, errno)
        self.index = index
        self.status = status


class ResourceExhausted(PlatformError):
    """A bounded table (grant refs, ports) is full (``ENOSPC``); nothing was allocated."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ENOSPC)


class NoSuchDomain(PlatformError):
    """The domain named does not exist (``ESRCH``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ESRCH)


class PortError(PlatformError):
    """An event-channel operation was refused (``EINVAL``/``EPERM``): port not offered to
    this domain, not unbound, not owned by this handle, or restricted."""


class PlatformGone(PlatformError):
    """The platform itself went away (the loopback daemon died): ``ENOTCONN``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ENOTCONN)


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True, slots=True)
class UnmapNotify:
    """What happens when a mapping (or a share) goes away, whoever ends it — including
    process death (gntdev/gntalloc ``SET_UNMAP_NOTIFY``).

    ``offset`` is a byte offset within the mapping; ``clear_byte`` zeroes that byte
    (needs a writable mapping); ``port`` (a local port of this domain), if not ``None``,
    is signalled afterwards.
    """

    offset: int
    clear_byte: bool = True
    port: int | None = None


class _Pages:
    """Common part of shared and mapped page runs: a memoryview and numpy views."""

    __slots__ = ()

    mem: memoryview

    def array(self, dtype: npt.DTypeLike = np.uint8, offset: int = 0, count: int = -1) -> Any:
        """A numpy array over the pages (no copy; read-only if the mapping is)."""
        return np.frombuffer(self.mem, dtype=dtype, offset=offset, count=count)

    @property
    def nbytes(self) -> int:
        """Length of the run in bytes (pages * 4096)."""
        return len(self.mem)


@runtime_checkable
class SharedPages(Protocol):
    """Pages this domain allocated and granted to ``domid`` (gntalloc-style).

    ``refs[i]`` names page *i* of ``mem``; ``mem`` is always writable locally.
    """

    refs: tuple[int, ...]
    domid: int
    writable: bool
    mem: memoryview

    def array(self, dtype: npt.DTypeLike = ..., offset: int = ..., count: int = ...) -> Any:
        """A numpy array over the pages."""
        ...


@runtime_checkable
class MappedGrants(Protocol):
    """Grants of domain ``domid`` mapped contiguously into this process.

    ``mem`` is read-only unless the mapping was made writable.
    """

    refs: tuple[int, ...]
    domid: int
    writable: bool
    mem: memoryview

    def array(self, dtype: npt.DTypeLike = ..., offset: int = ..., count: int = ...) -> Any:
        """A numpy array over the pages."""
        ...


@dataclass(frozen=True, slots=True)
class GrantPtr:
    """One side of a grant copy that is a grant: (granter domid, ref, offset in page)."""

    domid: int
    ref: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class LocalPtr:
    """One side of a grant copy in local memory: a buffer and a byte offset into it."""

    buffer: Any  # any object supporting the buffer protocol (writable for a destination)
    offset: int = 0


@dataclass(frozen=True, slots=True)
class GrantCopy:
    """One ``GNTTABOP_copy`` segment; must not cross a page on a grant side."""

    source: GrantPtr | LocalPtr
    dest: GrantPtr | LocalPtr
    length: int


# --------------------------------------------------------------------------- interfaces


@runtime_checkable
class GrantTable(Protocol):
    """Grant pages to other domains, map their grants, copy through grants."""

    @property
    def domid(self) -> int:
        """The domain this handle acts as."""
        ...

    def grant(self, domid: int, count: int = 1, *, writable: bool = True) -> SharedPages:
        """Allocate ``count`` zeroed pages, map them locally (contiguous) and grant each
        to ``domid``.  ``writable=False`` makes read-only grants.  Raises
        :class:`ResourceExhausted` when the grant table is full (nothing allocated)."""
        ...

    def end_access(self, pages: SharedPages) -> None:
        """Revoke every grant of ``pages`` and release them locally.

        Raises :class:`GrantInUse` and ends **nothing** while the grantee still maps any
        of the pages (quarantine them and retry later)."""
        ...

    def set_unmap_notify(self, obj: SharedPages | MappedGrants, notify: UnmapNotify) -> None:
        """Attach (or replace) the unmap notification of a share or a mapping."""
        ...

    def map(
        self,
        domid: int,
        refs: Sequence[int],
        *,
        writable: bool = True,
        notify: UnmapNotify | None = None,
    ) -> MappedGrants:
        """Map grants ``refs`` of ``domid`` contiguously, in order.

        All or nothing: on any failure raises :class:`MapError` (index and ``GNTST_*`` of
        the first failing ref) and nothing of the batch stays mapped (R9)."""
        ...

    def unmap(self, mapping: MappedGrants) -> None:
        """Unmap; the mapping's unmap notification fires."""
        ...

    def copy(self, segments: Sequence[GrantCopy]) -> list[int]:
        """Perform grant copies; returns one ``GNTST_*`` status per segment."""
        ...

    def close(self) -> None:
        """Release everything held through this handle (as process death would)."""
        ...


@runtime_checkable
class EventChannels(Protocol):
    """Event channels with ``/dev/xen/evtchn`` semantics.

    A delivered port stays masked until :meth:`unmask`; notifications coalesce; binding
    interdomain leaves the new local port pending once."""

    @property
    def domid(self) -> int:
        """The domain this handle acts as."""
        ...

    def fileno(self) -> int:
        """A pollable fd, readable while some port of this handle is pending."""
        ...

    def alloc_unbound(self, remote_domid: int) -> int:
        """A new local port that only ``remote_domid`` may bind."""
        ...

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Connect to a port ``remote_domid`` offered to us; returns the new local port
        (pending).  :class:`PortError` if the port was not offered to this domain."""
        ...

    def notify(self, port: int) -> None:
        """Signal the remote end of local ``port`` (no-op while unbound)."""
        ...

    def pending(self, timeout: float | None = 0.0) -> int | None:
        """Return a pending port (now masked), waiting at most ``timeout`` seconds
        (``None`` = forever); ``None`` if nothing arrived."""
        ...

    def unmask(self, port: int) -> None:
        """Re-enable delivery for ``port`` (fires at once if notified meanwhile)."""
        ...

    async def wait(self, timeout: float | None = None) -> int:
        """Await a pending port (asyncio, via ``loop.add_reader`` on :meth:`fileno`).
        Raises :class:`TimeoutError` after ``timeout`` seconds."""
        ...

    def unbind(self, port: int) -> None:
        """Close local ``port``; the remote end goes back to unbound."""
        ...

    def close(self) -> None:
        """Close every port of this handle."""
        ...


@runtime_checkable
class Platform(Protocol):
    """Everything a driver needs, for one domain."""

    @property
    def domid(self) -> int:
        """The domain this platform acts as."""
        ...

    @property
    def grants(self) -> GrantTable:
        """The grant table handle."""
        ...

    @property
    def events(self) -> EventChannels:
        """The event-channel handle."""
        ...

    @property
    def xenstore_path(self) -> str | None:
        """Path of this domain's xenstore socket (or device), if it has one."""
        ...

    async def xenstore(self) -> Any:
        """A connected :mod:`xenpv.xenstore.client` client acting as this domain."""
        ...

    def close(self) -> None:
        """Close the grant and event-channel handles (everything they hold)."""
        ...


def prepare_copy(grants: Any, segments: Sequence[GrantCopy]) -> Callable[[], list[int]]:
    """A callable running the grant copy ``segments`` (one ``GNTST_*`` per segment).

    Platforms that can validate a copy once and repeat it cheaply offer
    ``grants.prepare_copy``; on the others this simply calls ``grants.copy`` each time.
    Reuse it for copies repeated over the same grants and local buffers."""
    prepare = getattr(grants, "prepare_copy", None)
    if prepare is not None:
        plan: Callable[[], list[int]] = prepare(segments)
        return plan
    fixed = tuple(segments)
    return lambda: list(grants.copy(fixed))


async def open_xenstore_client(path: str) -> Any:
    """Connect the asyncio xenstore client to ``path`` (shared by every platform)."""
    import importlib

    # imported lazily: the xenstore layer is optional for grant/event-only users
    xs_client: Any = importlib.import_module("xenpv.xenstore.client")
    return await xs_client.connect(path)


G = TypeVar("G", bound=GrantTable)
E = TypeVar("E", bound=EventChannels)


class BasePlatform(Generic[G, E]):
    """A concrete :class:`Platform` bundling a grant table, event channels and a xenstore
    socket path; platforms subclass it (``BasePlatform[MyGrants, MyEvents]``) and only
    build the two handles."""

    def __init__(self, grants: G, events: E, xenstore_path: str | None = None) -> None:
        self._grants = grants
        self._events = events
        self._xenstore_path = xenstore_path

    @property
    def domid(self) -> int:
        """The domain this platform acts as."""
        return self._grants.domid

    @property
    def grants(self) -> G:
        """The grant table handle."""
        return self._grants

    @property
    def events(self) -> E:
        """The event-channel handle."""
        return self._events

    @property
    def xenstore_path(self) -> str | None:
        """This domain's xenstore socket (or device), if it has one."""
        return self._xenstore_path

    async def xenstore(self) -> Any:
        """A connected xenstore client acting as this domain."""
        if self._xenstore_path is None:
            from xenpv.errors import LocalError

            raise LocalError("this platform has no xenstore endpoint")
        return await open_xenstore_client(self._xenstore_path)

    def close(self) -> None:
        """Close the event-channel and grant handles (everything they hold)."""
        self._events.close()
        self._grants.close()

    def __enter__(self) -> BasePlatform[G, E]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

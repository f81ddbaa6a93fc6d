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

Optional platform features are small interfaces of their own, checked with
``isinstance`` (all are :func:`typing.runtime_checkable`): :class:`ReservedGrants`
(place a page at a reserved grant ref, as a domain builder does), :class:`GuestFrames`
(guest frame numbers a dom0 backend may foreign-map), :class:`PreparedCopies` (grant
copies validated once, repeated cheaply) and :class:`PieceCopies` (many copies out of one
domain's grants into one local buffer, given as a compact array; :func:`copy_pieces`
serves every platform, through ``copy`` where the platform has nothing better).  The xenstore client is described by
:class:`XenstoreClient` (asyncio; :mod:`xenpv.xenstore.client` satisfies it) and
:class:`BlockingXenstore` (:mod:`xenpv.xenstore.blocking`), the node operations both
share in their calling style being what drivers use.

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

import array
import enum
import errno as _errno
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from xenpv.errors import LocalError, PlatformError

if TYPE_CHECKING:
    import numpy.typing as npt

    from xenpv.platforms.dispatch import PortDispatcher

__all__ = [
    "COPY_PIECE",
    "DOMID_SELF",
    "GNTTAB_NR_RESERVED_ENTRIES",
    "GNTTAB_RESERVED_CONSOLE",
    "PAGE_SIZE",
    "BlockingXenstore",
    "EventChannels",
    "EvtchnState",
    "GntSt",
    "GrantCopy",
    "GrantInUse",
    "GrantPtr",
    "GrantTable",
    "GuestFrames",
    "GuestXenstoreRing",
    "LocalPtr",
    "MapError",
    "MappedGrants",
    "NoSuchDomain",
    "PieceCopies",
    "Platform",
    "PlatformGone",
    "PortError",
    "PreparedCopies",
    "ReservedGrants",
    "ResourceExhausted",
    "SharedPages",
    "UnmapNotify",
    "XenstoreClient",
    "XenstoreNodes",
    "XenstoreWatch",
    "check_pieces",
    "copy_pieces",
    "copy_pieces_as_segments",
    "prepare_copy",
]

#: Xen page size for every ring protocol (bytes).
PAGE_SIZE = 4096
#: grant_table.h: refs 0..7 are reserved (0 console, 1 xenstore) and never handed out.
GNTTAB_NR_RESERVED_ENTRIES = 8
#: grant_table.h: GNTTAB_RESERVED_CONSOLE, the primary console page of every guest.
GNTTAB_RESERVED_CONSOLE = 0
#: xen.h: DOMID_SELF.
DOMID_SELF = 0x7FF0
#: One piece of :meth:`PieceCopies.copy_pieces`: the source's grant reference, its offset
#: in the granted page, the length, and the place (byte offset) in the destination buffer.
COPY_PIECE = struct.Struct("<IHHI")


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

    def array(self, dtype: npt.DTypeLike = "u1", offset: int = 0, count: int = -1) -> Any:
        """A numpy array over the pages (no copy; read-only if the mapping is)."""
        # imported here: numpy starts a BLAS thread pool, which byte-stream users of the
        # pages (vchan, console, xenstore) should not pay for
        import numpy as np

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

    def grant(self, domid: int, count: int = 1, *, writable: bool = True,
              notify: UnmapNotify | None = None) -> SharedPages:
        """Allocate ``count`` zeroed pages, map them locally (contiguous) and grant each
        to ``domid``.  ``writable=False`` makes read-only grants.  ``notify`` is attached
        when the pages are shared (every platform supports it for a single page; some
        only then).  Raises :class:`ResourceExhausted` when the grant table is full
        (nothing allocated)."""
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

    @property
    def dispatcher(self) -> PortDispatcher:
        """The handle's one :class:`~xenpv.platforms.dispatch.PortDispatcher` (drivers
        wait on their ports through it; see that module)."""
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
class ReservedGrants(Protocol):
    """Optional grant-table feature: share a page at a reserved ref (a domain builder's
    job: ref 0 console, ref 1 xenstore)."""

    def grant_reserved(self, ref: int, domid: int, *, writable: bool = True) -> SharedPages:
        """Share one zeroed page at reserved ``ref`` with ``domid``."""
        ...

    def end_access(self, pages: SharedPages) -> None:
        """As :meth:`GrantTable.end_access`."""
        ...


@runtime_checkable
class GuestFrames(Protocol):
    """Optional grant-table feature: guest frames of this domain that a dom0 backend
    may map by frame number (``xenforeignmemory_map``)."""

    def alloc_frames(self, count: int) -> SharedPages:
        """``count`` zeroed frames (``refs`` are the frame numbers)."""
        ...

    def free_frames(self, frames: SharedPages) -> None:
        """Give the frames back (deferred while a backend still maps one)."""
        ...

    def grant_frame(self, gfn: int, domid: int, *, ref: int | None = None) -> SharedPages:
        """Grant frame ``gfn`` to ``domid`` at a free ref or at reserved ``ref``."""
        ...

    def end_access(self, pages: SharedPages) -> None:
        """As :meth:`GrantTable.end_access`."""
        ...


@runtime_checkable
class PreparedCopies(Protocol):
    """Optional grant-table feature: copies validated once and repeated cheaply."""

    def prepare_copy(self, segments: Sequence[GrantCopy]) -> Callable[[], list[int]]:
        """A callable running ``segments`` (one ``GNTST_*`` per segment) each call."""
        ...


@runtime_checkable
class PieceCopies(Protocol):
    """Optional grant-table feature: many grant copies out of one domain's grants into
    one local buffer, given as a compact array (a backend's batch of packets)."""

    def copy_pieces(self, domid: int, pieces: Any, count: int, dest: Any) -> Sequence[int]:
        """Copy ``count`` :data:`COPY_PIECE` records of ``pieces`` (a buffer): each from
        grant ``ref`` of ``domid`` at ``offset`` to ``place`` in ``dest`` (a writable
        buffer; a platform may name its own frames instead of carrying bytes).  One
        ``GNTST_*`` per piece, as a buffer of C ints (``array('i')`` or a memoryview
        cast to ``'i'``).  A piece crossing its page on the grant side or running past
        ``dest`` is refused (``LocalError``, nothing copied)."""
        ...


def check_pieces(pieces: Any, count: int, dest_size: int, domid: int = 0) -> memoryview:
    """``pieces`` as bytes of ``count`` :data:`COPY_PIECE` records, once checked: none
    crosses its grant's page, none runs past ``dest_size`` (``LocalError`` if one does;
    also for too few records, or a ``domid`` that is not a domain id)."""
    if not 0 <= domid <= 0xFFFF:
        raise LocalError(f"domain id {domid} out of range")
    view = memoryview(pieces).cast("B")
    if count < 0 or len(view) < count * COPY_PIECE.size:
        raise LocalError(f"{count} copy pieces in {len(view)} bytes")
    view = view[:count * COPY_PIECE.size]
    for _ref, offset, length, place in COPY_PIECE.iter_unpack(view):
        if offset + length > PAGE_SIZE or place + length > dest_size:
            raise LocalError(f"copy piece ({offset}, {length}, {place}) out of bounds")
    return view


def copy_pieces(grants: GrantTable, domid: int, pieces: Any, count: int, dest: Any
                ) -> Sequence[int]:
    """:meth:`PieceCopies.copy_pieces` on any grant table: the platform's own where it
    has one, else as :class:`GrantCopy` segments through ``grants.copy``."""
    if isinstance(grants, PieceCopies):
        return grants.copy_pieces(domid, pieces, count, dest)
    return copy_pieces_as_segments(grants, domid, pieces, count, dest)


def copy_pieces_as_segments(grants: GrantTable, domid: int, pieces: Any, count: int,
                            dest: Any) -> Sequence[int]:
    """:meth:`PieceCopies.copy_pieces` done with ``grants.copy`` (a platform with no
    cheaper way)."""
    view = check_pieces(pieces, count, memoryview(dest).nbytes, domid)
    segs = [GrantCopy(GrantPtr(domid, ref, offset), LocalPtr(dest, place), length)
            for ref, offset, length, place in COPY_PIECE.iter_unpack(view)]
    return array.array("i", grants.copy(segs) if segs else [])


class XenstoreNodes(Protocol):
    """The asyncio node operations drivers use, on a client or inside a transaction."""

    async def read(self, path: str, *, timeout: float | None = None) -> bytes:
        """The value of ``path`` (``XenstoreError`` ENOENT if absent)."""
        ...

    async def write(self, path: str, value: bytes | str, *, timeout: float | None = None
                    ) -> None:
        """Create or replace ``path``."""
        ...

    async def rm(self, path: str, *, timeout: float | None = None) -> None:
        """Remove ``path`` and everything below it."""
        ...

    async def directory(self, path: str, *, timeout: float | None = None) -> list[str]:
        """Names of the children of ``path``."""
        ...

    async def set_perms(self, path: str, perms: Iterable[str], *,
                        timeout: float | None = None) -> None:
        """Replace the permission list of ``path`` (``"n5"``/``"r5"``-style entries)."""
        ...


class XenstoreWatch(Protocol):
    """A registered watch: an async iterator of events."""

    async def register(self) -> object:
        """Send the WATCH request."""
        ...

    async def unregister(self, *, timeout: float | None = None) -> None:
        """Send the UNWATCH request."""
        ...

    def __aiter__(self) -> AsyncIterator[object]:
        """Iterate over the watch events."""
        ...


T = TypeVar("T")


class XenstoreClient(XenstoreNodes, Protocol):
    """The asyncio xenstore client drivers are given (:mod:`xenpv.xenstore.client`)."""

    @property
    def connected(self) -> bool:
        """True until the connection is lost or closed."""
        ...

    async def close(self) -> None:
        """Close the connection."""
        ...

    async def transact(self, fn: Callable[[XenstoreNodes], Awaitable[T]], *, retries: int = 16,
                       timeout: float | None = None) -> T:
        """Run ``await fn(t)`` in a transaction (a :class:`XenstoreNodes`), again on
        ``EAGAIN``."""
        ...

    def watch(self, path: str, token: str | None = None, *, depth: int | None = None,
              max_pending: int = 256, timeout: float | None = None) -> XenstoreWatch:
        """A watch on ``path`` (register it before iterating)."""
        ...


class BlockingXenstore(Protocol):
    """The blocking xenstore client (:mod:`xenpv.xenstore.blocking`): the same node
    operations, called without a loop."""

    @property
    def connected(self) -> bool:
        """True until the connection is lost or closed."""
        ...

    def read(self, path: str) -> bytes:
        """The value of ``path``."""
        ...

    def write(self, path: str, value: bytes | str) -> None:
        """Create or replace ``path``."""
        ...

    def rm(self, path: str) -> None:
        """Remove ``path`` and everything below it."""
        ...

    def directory(self, path: str) -> list[str]:
        """Names of the children of ``path``."""
        ...

    def set_perms(self, path: str, perms: Iterable[str]) -> None:
        """Replace the permission list of ``path``."""
        ...

    def transact(self, fn: Callable[[Any], T], *, retries: int = 16) -> T:
        """Run ``fn(t)`` in a transaction, again on ``EAGAIN``."""
        ...

    def close(self) -> None:
        """Close the connection."""
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

    async def xenstore(self) -> XenstoreClient:
        """A connected :mod:`xenpv.xenstore.client` client acting as this domain."""
        ...

    def close(self) -> None:
        """Close the grant and event-channel handles (everything they hold)."""
        ...


def prepare_copy(grants: GrantTable, segments: Sequence[GrantCopy]
                 ) -> Callable[[], list[int]]:
    """A callable running the grant copy ``segments`` (one ``GNTST_*`` per segment).

    Platforms that can validate a copy once and repeat it cheaply are
    :class:`PreparedCopies`; on the others this simply calls ``grants.copy`` each time.
    Reuse it for copies repeated over the same grants and local buffers."""
    if isinstance(grants, PreparedCopies):
        return grants.prepare_copy(segments)
    fixed = tuple(segments)
    return lambda: list(grants.copy(fixed))


async def open_xenstore_client(path: str) -> XenstoreClient:
    """Connect the asyncio xenstore client to ``path`` (shared by every platform)."""
    # imported here: the xenstore client is only loaded by platforms that use it
    from xenpv.xenstore.client import connect

    return await connect(path)


if TYPE_CHECKING:
    from xenpv.xenstore import blocking as _blocking
    from xenpv.xenstore import client as _client

    def _both_clients_conform(a: _client.XenstoreClient, b: _blocking.BlockingClient
                              ) -> tuple[XenstoreClient, BlockingXenstore]:
        """Checked by mypy only: both clients satisfy their interface."""
        return a, b


@dataclass(frozen=True)
class GuestXenstoreRing:
    """A domain's own xenstore connection as its kernel sees it (what a guest finds in
    its start info): the page (``xenstore_domain_interface``, mapped writable), the port
    (bound to dom0's xenstored, delivered to this platform's event handle) and the guest
    frame holding the page.  ``release`` unmaps the page and gives the port back to the
    domain (the next taker reconnects)."""

    mem: memoryview
    port: int
    gfn: int
    release: Callable[[], None]


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

    async def xenstore(self) -> XenstoreClient:
        """A connected xenstore client acting as this domain."""
        if self._xenstore_path is None:
            from xenpv.errors import LocalError

            raise LocalError("this platform has no xenstore endpoint")
        return await open_xenstore_client(self._xenstore_path)

    def xenstore_ring(self) -> GuestXenstoreRing:
        """Take over this domain's xenstore ring (platforms that can: the emulator's);
        :class:`~xenpv.errors.LocalError` here."""
        from xenpv.errors import LocalError

        raise LocalError("this platform gives no access to the domain's xenstore ring")

    async def xenstore_over_ring(self, *, timeout: float | None = None) -> XenstoreClient:
        """A xenstore client acting as this domain over its own ring (not the socket):
        :meth:`xenstore_ring` plus :func:`xenpv.xenstore.ring.connect_ring`; closing the
        client releases the ring."""
        from xenpv.xenstore.ring import connect_ring

        ring = self.xenstore_ring()
        try:
            client: XenstoreClient = await connect_ring(
                ring.mem, self._events, ring.port, timeout=timeout, on_close=ring.release)
        except BaseException:
            ring.release()
            raise
        return client

    def blocking_xenstore_over_ring(self, *, timeout: float | None = None) -> Any:
        """A :class:`~xenpv.xenstore.ring.BlockingRingClient` acting as this domain over
        its own ring; closing it releases the ring."""
        from xenpv.xenstore.ring import BlockingRingClient

        ring = self.xenstore_ring()
        try:
            return BlockingRingClient(ring.mem, self._events, ring.port, timeout=timeout,
                                      on_close=ring.release)
        except BaseException:
            ring.release()
            raise

    def close(self) -> None:
        """Close the event-channel and grant handles (everything they hold)."""
        self._events.close()
        self._grants.close()

    def __enter__(self) -> BasePlatform[G, E]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

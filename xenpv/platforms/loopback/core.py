"""The loopback emulator's hypervisor: domains, grant tables, event channels, accounting.

Theory of operation
-------------------
:class:`Hypervisor` holds all state of the emulated machine.  It is used directly by the
in-process platform (``inprocess.py``) and by the daemon (``daemon.py``), which turns
control-socket messages (docs/loopback-protocol.md) into calls on it; both therefore share
one set of semantics.

* **Handles.**  Every grant share, mapping and port is owned by a :class:`Handle` (one
  control connection, or one in-process grant/event object).  :meth:`Hypervisor.close_handle`
  releases everything it owns exactly like the death of the process holding it.
* **Grants.**  Each domain has a bounded table of :class:`GrantEntry` (refs 0-7 are never
  handed out; free refs are reused FIFO, so a just-freed ref is not handed out again at
  once).  A share allocates a fresh memfd (:class:`Segment`) holding its zeroed pages; pages
  are never recycled, so an old descriptor can never show later data.  Mapping a grant
  records a :class:`Mapping`; while a grant is mapped (or pinned by the ``hold_mapped``
  fault), strict end-of-access fails with :class:`GrantInUse` (R8) and deferred end turns
  it *revoking* until the last mapping goes.  Map batches are all-or-nothing (R9).
* **Unmap notifications** (gntdev/gntalloc ``SET_UNMAP_NOTIFY``) fire when a mapping is
  unmapped, a share's page is ended, or the owning handle closes: clear the byte through
  the segment, then signal the port's remote end.
* **Event channels.**  Each port owns an *inbox* eventfd for its whole life.  Signalling a
  port writes 1 to the inbox of its remote end, so clients that cached the remote inbox
  (their *outbox*) notify without the hypervisor.  Each domain has a *generation page*
  (memfd of u32 per port) whose entry is bumped whenever a port's remote end changes, so a
  cached outbox can be validated with one memory load.  Masking lives in the clients
  (one epoll set per handle, see ``events.py`` and the protocol document).
* **Accounting.**  :meth:`stats` and :meth:`assert_released` let tests prove that every
  grant, mapping and port was released.
* **Descriptor quota.**  Every memfd, inbox eventfd and control connection the daemon
  holds on behalf of a domain is charged to it (a segment counts :data:`SEGMENT_FDS`,
  the most it can hold: the memfd, the hypervisor's mmap and a read-only reopening).  An
  unprivileged domain is refused with :class:`ResourceExhausted` beyond ``max_fds``, and
  also once the process's lowest free descriptor is within :data:`FD_RESERVE` of its
  ``RLIMIT_NOFILE``: that reserve is dom0's, so no guest can lock dom0 out.

Nothing here blocks: every operation is bounded work on in-memory tables plus a few
syscalls on memfds/eventfds.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import mmap
import os
import resource
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    DOMID_SELF,
    GNTTAB_NR_RESERVED_ENTRIES,
    PAGE_SIZE,
    EvtchnState,
    GntSt,
    GrantCopy,
    GrantInUse,
    GrantPtr,
    LocalPtr,
    MapError,
    NoSuchDomain,
    PortError,
    ResourceExhausted,
)

DOMID_FIRST_RESERVED = 0x7FF0
FIRST_GFN = 0x10000  # guest frame numbers handed out from here, never reused
MAX_BATCH = 1024

NOTIFY_CLEAR_BYTE = 1
NOTIFY_SEND_EVENT = 2

FAULT_HOLD_MAPPED = 1
FAULT_RELEASE_HOLD = 2
FAULT_DROP_NOTIFY = 3
FAULT_DUPLICATE_NOTIFY = 4

#: xen.h: the virtual IRQs a domain may bind; only VIRQ_DOM_EXC is emulated
NR_VIRQS = 24
VIRQ_DOM_EXC = 3  # global: "a domain shut down or died", delivered to the privileged domain
#: sched.h SHUTDOWN_* reasons (SCHEDOP_shutdown); 3 is a crash
SHUTDOWN_CRASH = 3
SHUTDOWN_MAX = 255  # domctl.h: XEN_DOMINF_shutdownmask

#: descriptors one segment may hold in the daemon (memfd, mmap's dup, read-only reopening)
SEGMENT_FDS = 3
#: descriptors below RLIMIT_NOFILE that only dom0 may use
FD_RESERVE = 64

_ONE = (1).to_bytes(8, "little")
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # linux/fcntl.h, 5.1+


def signal_eventfd(fd: int) -> None:
    """Add 1 to an inbox eventfd.  A counter a hostile peer saturated (EAGAIN) already
    reads as pending, so that is not an error; neither is a just-closed inbox."""
    try:
        os.write(fd, _ONE)
    except OSError:
        pass


class Segment:
    """One memfd holding the pages of one share (zeroed at creation, never recycled).

    Seals keep descriptors handed to grantees from doing more than the grant allows: the
    size is sealed at once (nobody can shrink the pages under the other mappers, which
    would turn their accesses into SIGBUS), and a read-only share is sealed against
    future writes before its first grantee receives a descriptor.  The seal matters
    because an ``O_RDONLY`` descriptor of a memfd can be reopened read-write through
    ``/proc/self/fd``; with ``F_SEAL_FUTURE_WRITE`` such a reopening can neither ``write``
    nor map ``PROT_WRITE``, while the granter's own earlier mapping stays writable.
    """

    __slots__ = (
        "_mm",
        "_ro_fd",
        "_view",
        "charged",
        "fd",
        "npages",
        "readonly_sealed",
        "refs_live",
    )

    def __init__(self, npages: int, name: str, *, writable: bool = True) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, npages * PAGE_SIZE)  # ftruncate: zero-filled pages (R7)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            if writable:  # nothing more to seal later: forbid further seals too
                seals |= fcntl.F_SEAL_SEAL
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
        except OSError:
            os.close(self.fd)
            raise
        self.npages = npages
        self.charged: Domain | None = None  # the domain whose descriptor quota it uses
        self.refs_live = npages  # grant entries still referring to this segment
        self.readonly_sealed = False
        self._ro_fd = -1
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None

    def seal_readonly(self) -> None:
        """Forbid new writes and writable mappings through any descriptor (idempotent).

        Existing writable mappings — the granter's, and the hypervisor's own
        :attr:`mm`, created here first for clear-byte notifications — keep working."""
        if self.readonly_sealed:
            return
        self.mm  # noqa: B018 - the hypervisor's writable view must exist before the seal
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
        self.readonly_sealed = True

    def clear_byte(self, offset: int) -> None:
        """Zero one byte (unmap notification), through the hypervisor's own mapping."""
        if self.fd >= 0:
            self.mm[offset] = 0

    @property
    def ro_fd(self) -> int:
        """An ``O_RDONLY`` descriptor of the same memory: ``PROT_WRITE`` mmaps fail."""
        if self._ro_fd < 0:
            self._ro_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return self._ro_fd

    @property
    def mm(self) -> mmap.mmap:
        """The hypervisor's own view of the pages (grant copy, clear-byte)."""
        if self._mm is None:
            self._mm = mmap.mmap(self.fd, self.npages * PAGE_SIZE)
        return self._mm

    @property
    def view(self) -> memoryview:
        """A byte memoryview over :attr:`mm` (kept, so copies do not rebuild it)."""
        if self._view is None:
            self._view = memoryview(self.mm)
        return self._view

    def close(self) -> None:
        """Drop the hypervisor's references; the memory goes when the last user unmaps."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a copy in progress elsewhere holds it: let GC do it
                pass
            self._mm = None
        if self._ro_fd >= 0:
            os.close(self._ro_fd)
            self._ro_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(eq=False)
class GrantEntry:
    """One live grant-table entry of a granting domain."""

    ref: int
    granter: Domain
    grantee: int
    readonly: bool
    segment: Segment
    page: int
    share: Share
    mappers: int = 0  # live mappings of this entry (all handles)
    holds: int = 0  # fault injection: pretend a peer keeps it mapped
    revoking: bool = False
    freed: bool = False
    frame: bool = False  # a guest frame (``ref`` is its gfn), not a grant

    @property
    def in_use(self) -> bool:
        """True while some grantee maps the page (or a hold pins it)."""
        return self.mappers > 0 or self.holds > 0


@dataclass(eq=False)
class Notify:
    """An unmap notification: clear a byte and/or signal a port."""

    offset: int
    action: int
    port: Port | None  # referenced: kept open until the notification fires (gntdev does too)


@dataclass(eq=False)
class Share:
    """Pages one handle shared in one call."""

    handle_id: int
    owner: Handle
    domid: int
    writable: bool
    entries: list[GrantEntry]
    notify: Notify | None = None
    ended: int = 0  # entries ended or revoking (a partial end makes the rest unmappable)

    @property
    def refs(self) -> tuple[int, ...]:
        """The grant refs, in page order."""
        return tuple(e.ref for e in self.entries)

    def segment_at(self, offset: int) -> tuple[Segment, int]:
        """The segment and byte offset behind byte ``offset`` of the share."""
        e = self.entries[offset // PAGE_SIZE]
        return e.segment, e.page * PAGE_SIZE + offset % PAGE_SIZE

    def segments(self) -> list[Segment]:
        """The distinct memfds behind the share, in page order (one for a grant share,
        one per frame for guest frames)."""
        out: list[Segment] = []
        for e in self.entries:
            if not out or out[-1] is not e.segment:
                out.append(e.segment)
        return out

    def pages(self) -> list[tuple[int, int]]:
        """``(fd, page)`` per page of the share (the owner's own read-write fds)."""
        return [(e.segment.fd, e.page) for e in self.entries]

    @property
    def done(self) -> bool:
        """True once every page is ended or revoking (the owner has let go of it)."""
        return all(e.revoking or e.freed for e in self.entries)


@dataclass(eq=False)
class Mapping:
    """A batch of foreign grants mapped by one handle."""

    handle_id: int
    owner: Handle
    entries: list[GrantEntry]
    writable: bool
    notify: Notify | None = None

    def segment_at(self, offset: int) -> tuple[Segment, int]:
        """The segment and byte offset behind byte ``offset`` of the mapping."""
        e = self.entries[offset // PAGE_SIZE]
        return e.segment, e.page * PAGE_SIZE + offset % PAGE_SIZE

    def pages(self, readonly_fds: bool) -> list[tuple[int, int]]:
        """``(fd, page)`` per entry, using read-only fds where asked."""
        return [(e.segment.ro_fd if readonly_fds else e.segment.fd, e.page) for e in self.entries]


@dataclass(eq=False)
class Port:
    """One event-channel port of a domain."""

    port: int
    domain: Domain
    owner: Handle
    remote_domid: int  # unbound: who may bind; interdomain: the peer domain
    inbox: int  # eventfd
    state: EvtchnState = EvtchnState.unbound
    remote: Port | None = None
    notify_refs: int = 0  # unmap notifications that will signal this port
    detached: bool = False  # unbound by its owner, kept alive for notify_refs
    #: The handle a port lent to another handle goes back to when that one lets go of it
    #: (the domain builder's xenstore port: see ``builder.adopt_xenstore_ring``).
    home: Handle | None = None
    virq: int | None = None  # bound to this virtual IRQ (state virq, no remote end)


@dataclass(eq=False)
class Handle:
    """One open of the emulated devices (a control connection, or an in-process object)."""

    id: int
    domain: Domain
    shares: dict[int, Share] = field(default_factory=dict)
    mappings: dict[int, Mapping] = field(default_factory=dict)
    ports: dict[int, Port] = field(default_factory=dict)
    restrict: int | None = None
    closed: bool = False
    on_close: list[Callable[[], None]] = field(default_factory=list)
    _next: int = 1

    def next_id(self) -> int:
        """A fresh share/mapping handle number, unique within this handle."""
        n = self._next
        self._next += 1
        return n


class Domain:
    """One emulated domain: grant table, ports, handles, generation page."""

    def __init__(self, domid: int, name: str, *, max_grants: int, max_ports: int) -> None:
        self.domid = domid
        self.name = name
        self.privileged = domid == 0
        self.dying = False
        self.shutdown_reason: int | None = None  # set once the domain shut down (or crashed)
        # xen_domain_handle_t: dom0's is all zeroes, as on Xen; every other domain a fresh one
        self.uuid = uuid.UUID(int=0) if domid == 0 else uuid.uuid4()
        self.virqs: dict[int, Port] = {}  # virq -> the port it is bound to
        self.max_grants = max_grants
        self.max_ports = max_ports
        self.grants: dict[int, GrantEntry] = {}
        self.frames: dict[int, GrantEntry] = {}  # gfn -> page (foreign-mappable by dom0)
        self.next_gfn = FIRST_GFN
        self._free_refs: deque[int] = deque(range(GNTTAB_NR_RESERVED_ENTRIES, max_grants))
        self.ports: dict[int, Port] = {}
        self._free_ports: list[int] = list(range(1, max_ports))  # heap: lowest first
        self.handles: dict[int, Handle] = {}
        size = max(max_ports * 4, PAGE_SIZE)
        self.gen_fd = os.memfd_create(
            f"xenpv-gen-dom{domid}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        )
        os.ftruncate(self.gen_fd, size)
        self._gen_mm = mmap.mmap(self.gen_fd, size)
        # clients get it read-only: sealed so that not even a /proc reopening can write it
        fcntl.fcntl(
            self.gen_fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL,
        )
        self.gen = memoryview(self._gen_mm).cast("I")
        self.maptrack = 0  # pages this domain currently maps (all handles)
        self.fds = 0  # descriptors held on its behalf (see the descriptor quota)
        self.notify_drop = 0
        self.notify_duplicate = False

    # -- refs and ports
    def alloc_refs(self, count: int) -> list[int]:
        """Take ``count`` free refs (all or none)."""
        if count > len(self._free_refs):
            raise ResourceExhausted(
                f"dom{self.domid}: grant table full ({len(self.grants)} of "
                f"{self.max_grants - GNTTAB_NR_RESERVED_ENTRIES} refs in use)"
            )
        return [self._free_refs.popleft() for _ in range(count)]

    def free_ref(self, ref: int) -> None:
        """Return ``ref`` to the free list (reused last: FIFO)."""
        del self.grants[ref]
        if ref >= GNTTAB_NR_RESERVED_ENTRIES:  # reserved refs never enter the free list
            self._free_refs.append(ref)

    def alloc_port(self) -> int:
        """The lowest free port (never 0)."""
        if not self._free_ports:
            raise ResourceExhausted(f"dom{self.domid}: all {self.max_ports - 1} ports in use")
        return heapq.heappop(self._free_ports)

    def free_port(self, port: int) -> None:
        """Return ``port`` to the free set."""
        del self.ports[port]
        heapq.heappush(self._free_ports, port)

    def bump(self, port: int) -> None:
        """Bump the generation of ``port`` (its remote end changed)."""
        self.gen[port] = (self.gen[port] + 1) & 0xFFFFFFFF

    def close(self) -> None:
        """Release the generation page."""
        self.gen.release()
        self._gen_mm.close()
        os.close(self.gen_fd)


@dataclass(frozen=True, slots=True)
class DomainStats:
    """Outstanding resources of one domain (see :meth:`Hypervisor.stats`)."""

    grants: int
    grants_revoking: int
    mappings: int
    ports: int
    shares: int
    handles: int
    fds: int = 0  # descriptors charged to the domain (see the descriptor quota)


@dataclass(slots=True)
class SharePtr:
    """One side of a grant copy in pages the copying handle shared or allocated itself
    (a :class:`Share` of that handle): the share's handle id and a byte offset in it.

    The loopback client sends this instead of the bytes of a local buffer that lies in
    such pages, so the daemon copies memfd page to memfd page.  A share of another
    handle, an ended or unknown one is refused (``GNTST_bad_page``): it can never name
    memory the caller does not hold itself."""

    handle_id: int
    offset: int


class CopyPlan:
    """A validated grant copy that can be run again and again (``GNTTABOP_copy``).

    Validation (grants, bounds, permissions) is done once and repeated only when the
    grant tables changed since (:attr:`Hypervisor.grant_gen`) or the handle closed, so a
    driver copying the same pages repeatedly pays one memcpy per contiguous run:
    adjacent segments that are contiguous on both sides are merged.  :meth:`release`
    drops the views it holds (local buffers can be resized again).
    """

    __slots__ = ("_gen", "_handle", "_hv", "_ops", "_status", "segments")

    def __init__(self, hv: Hypervisor, h: Handle, segments: Sequence[GrantCopy]) -> None:
        self._hv = hv
        self._handle = h
        self.segments = tuple(segments)
        self._gen = -1
        self._ops: list[tuple[memoryview, memoryview]] = []
        self._status: list[int] = []

    def _build(self) -> None:
        hv, h = self._hv, self._handle
        status: list[int] = []
        runs: list[
            list[Any]
        ] = []  # [dst base, dst mv, dst start, src base, src mv, src start, len]
        for seg in self.segments:
            if not 0 <= seg.length <= PAGE_SIZE:  # grant_table.c: at most one page
                status.append(GntSt.bad_copy_arg)
                continue
            src = hv._copy_window(h, seg.source, seg.length, False)
            if isinstance(src, int):
                status.append(int(src))
                continue
            dst = hv._copy_window(h, seg.dest, seg.length, True)
            if isinstance(dst, int):
                status.append(int(dst))
                continue
            status.append(GntSt.okay)
            last = runs[-1] if runs else None
            if (
                last is not None
                and last[0] is dst[0]
                and last[3] is src[0]
                and last[2] + last[6] == dst[2]
                and last[5] + last[6] == src[2]
            ):
                last[6] += seg.length
            else:
                runs.append([dst[0], dst[1], dst[2], src[0], src[1], src[2], seg.length])
        self._ops = [(dmv[ds : ds + n], smv[ss : ss + n]) for _d, dmv, ds, _s, smv, ss, n in runs]
        self._status = status
        self._gen = hv.grant_gen

    def __call__(self) -> list[int]:
        """Run the copy; one ``GNTST_*`` status per segment."""
        if self._handle.closed:
            raise PlatformError("handle is closed", errno.EBADF)
        if self._gen != self._hv.grant_gen:
            self._build()
        for dst, src in self._ops:
            dst[:] = src
        return list(self._status)

    def release(self) -> None:
        """Drop the memory views (the plan rebuilds them if run again)."""
        for dst, src in self._ops:
            dst.release()
            src.release()
        self._ops = []
        self._gen = -1


class Hypervisor:
    """The emulated machine: domain table plus the grant and event-channel operations."""

    def __init__(
        self,
        *,
        max_grants: int = 4096,
        max_ports: int = 1024,
        max_maptrack: int = 16384,
        max_handles: int = 256,
        max_fds: int = 4096,
    ) -> None:
        if max_grants <= GNTTAB_NR_RESERVED_ENTRIES or max_ports < 2:
            raise LocalError("table sizes too small")
        self.max_grants = max_grants
        self.max_ports = max_ports
        self.max_maptrack = max_maptrack
        self.max_handles = max_handles
        self.max_fds = max_fds  # descriptors held for one unprivileged domain
        self.domains: dict[int, Domain] = {}
        self._zombies: list[Domain] = []  # destroyed domains with grants still mapped
        self._next_handle = 1
        self.grant_gen = 0  # bumped on every grant-table change (invalidates copy plans)
        self.on_domain_created: list[Callable[[Domain], None]] = []
        self.on_domain_destroyed: list[Callable[[Domain], None]] = []
        #: The domain builder's xenstore rings by domid (``builder.XenstoreRing``).
        self.xenstore_rings: dict[int, Any] = {}
        self.create_domain(0, "Domain-0")

    # ------------------------------------------------------------------ domains
    def create_domain(self, domid: int, name: str | None = None) -> Domain:
        """Create domain ``domid`` (0 is created by the constructor and is privileged)."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise PlatformError(f"invalid domid {domid}", errno.EINVAL)
        if domid in self.domains:
            raise PlatformError(f"domain {domid} exists", errno.EEXIST)
        dom = Domain(
            domid, name or f"dom{domid}", max_grants=self.max_grants, max_ports=self.max_ports
        )
        self.domains[domid] = dom
        for cb in self.on_domain_created:
            cb(dom)
        return dom

    def destroy_domain(self, domid: int) -> None:
        """Tear domain ``domid`` down like a dead domain: its handles are closed."""
        dom = self.domain(domid)
        if domid == 0:
            raise PlatformError("dom0 cannot be destroyed", errno.EPERM)
        dom.dying = True
        self.grant_gen += 1
        for h in list(dom.handles.values()):
            self.close_handle(h)
        del self.domains[domid]
        if dom.grants or dom.frames:
            self._zombies.append(dom)
        dom.close()
        for cb in self.on_domain_destroyed:
            cb(dom)
        self.send_global_virq(VIRQ_DOM_EXC)

    def shutdown_domain(self, domid: int, reason: int) -> None:
        """SCHEDOP_shutdown / remote shutdown: the domain stays, marked shut down with
        ``reason`` (sched.h ``SHUTDOWN_*``; 3 = crash), and VIRQ_DOM_EXC fires.  A second
        shutdown keeps the first reason and fires nothing, as Xen."""
        dom = self.domain(domid)
        if domid == 0:
            raise PlatformError("dom0 cannot be shut down here", errno.EPERM)
        if not 0 <= reason <= SHUTDOWN_MAX:
            raise PlatformError(f"invalid shutdown reason {reason}", errno.EINVAL)
        if dom.shutdown_reason is not None:
            return
        dom.shutdown_reason = reason
        self.send_global_virq(VIRQ_DOM_EXC)

    def send_global_virq(self, virq: int) -> None:
        """Signal a global virtual IRQ: Xen delivers it to the privileged domain only
        (the default global-virq handler), on the port that domain bound to it."""
        for dom in self.domains.values():
            if dom.privileged:
                p = dom.virqs.get(virq)
                if p is not None and p.inbox >= 0:
                    signal_eventfd(p.inbox)

    def domain(self, domid: int) -> Domain:
        """The live domain ``domid``, or :class:`NoSuchDomain`."""
        dom = self.domains.get(domid)
        if dom is None:
            raise NoSuchDomain(f"no domain {domid}")
        return dom

    def _resolve(self, h: Handle, domid: int) -> int:
        return h.domain.domid if domid == DOMID_SELF else domid

    # ------------------------------------------------------------------ descriptor quota
    def charge_fds(self, dom: Domain, n: int) -> None:
        """Charge ``n`` descriptors to ``dom``: :class:`ResourceExhausted` (nothing
        charged) if an unprivileged domain would exceed ``max_fds``."""
        if not dom.privileged and dom.fds + n > self.max_fds:
            raise ResourceExhausted(
                f"dom{dom.domid}: descriptor quota reached ({dom.fds} of {self.max_fds} held)"
            )
        dom.fds += n

    def check_headroom(self, dom: Domain, fd: int) -> None:
        """:class:`ResourceExhausted` if ``fd``, just created for unprivileged ``dom``,
        lies in dom0's reserve: the kernel hands out the lowest free descriptor, so every
        one below it is in use and fewer than :data:`FD_RESERVE` are left."""
        if dom.privileged:
            return
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and fd >= soft - FD_RESERVE:
            raise ResourceExhausted(
                f"dom{dom.domid}: the emulator is short of descriptors (the rest is dom0's)"
            )

    def _new_segment(self, dom: Domain, npages: int, name: str, *, writable: bool) -> Segment:
        self.charge_fds(dom, SEGMENT_FDS)
        try:
            seg = Segment(npages, name, writable=writable)
        except OSError as exc:
            dom.fds -= SEGMENT_FDS
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise ResourceExhausted(f"dom{dom.domid}: cannot allocate pages: {exc}") from exc
            raise PlatformError(f"cannot allocate pages: {exc}", exc.errno) from exc
        seg.charged = dom
        try:
            self.check_headroom(dom, seg.fd)
        except ResourceExhausted:
            self._close_segment(seg)
            raise
        return seg

    def _close_segment(self, seg: Segment) -> None:
        seg.close()
        if seg.charged is not None:
            seg.charged.fds -= SEGMENT_FDS
            seg.charged = None

    # ------------------------------------------------------------------ handles
    def open_handle(self, domid: int) -> Handle:
        """Open a handle acting as ``domid``."""
        dom = self.domain(domid)
        if len(dom.handles) >= self.max_handles:
            raise ResourceExhausted(f"dom{domid}: {self.max_handles} handles open")
        self.charge_fds(dom, 1)  # the connection's socket, in the daemon
        h = Handle(self._next_handle, dom)
        self._next_handle += 1
        dom.handles[h.id] = h
        return h

    def close_handle(self, h: Handle) -> None:
        """Release everything ``h`` holds, as the death of its process would (idempotent).

        Order: its mappings go (their notifications fire), its shares end (deferred while
        mapped; their notifications fire), its ports close."""
        if h.closed:
            return
        h.closed = True
        for m in list(h.mappings.values()):
            self._unmap(m)
        for s in list(h.shares.values()):
            self._end_share(s, s.entries)
        for p in list(h.ports.values()):
            if not self._return_port(p):
                self._close_port(p)
        del h.domain.handles[h.id]
        h.domain.fds -= 1
        for cb in h.on_close:
            cb()

    def _check_open(self, h: Handle) -> None:
        if h.closed:
            raise PlatformError("handle is closed", errno.EBADF)

    # ------------------------------------------------------------------ grants
    def share(
        self, h: Handle, domid: int, count: int, *, writable: bool, reserved: int | None = None
    ) -> Share:
        """gntalloc ALLOC_GREF: ``count`` zeroed pages granted to ``domid``.

        ``reserved`` (0 console or 1 xenstore) puts a single page at that reserved ref,
        as Xen's domain builder does; refused if the ref is in use."""
        self._check_open(h)
        dom = h.domain
        if not 0 < count <= MAX_BATCH:
            raise PlatformError(f"bad page count {count}", errno.EINVAL)
        if domid == dom.domid or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise PlatformError(f"cannot grant to domain {domid}", errno.EINVAL)
        self.domain(domid)
        if reserved is not None:
            # grant_table.h: GNTTAB_RESERVED_CONSOLE 0, GNTTAB_RESERVED_XENSTORE 1
            if reserved not in (0, 1) or count != 1:
                raise PlatformError(f"ref {reserved} cannot be shared explicitly", errno.EINVAL)
            if reserved in dom.grants:
                raise PlatformError(f"reserved ref {reserved} is in use", errno.EBUSY)
            refs = [reserved]
        else:
            refs = dom.alloc_refs(count)
        try:
            seg = self._new_segment(
                dom, count, f"xenpv-dom{dom.domid}-gnt{refs[0]}", writable=writable
            )
        except PlatformError:
            if reserved is None:
                dom._free_refs.extendleft(reversed(refs))
            raise
        self.grant_gen += 1
        share = Share(h.next_id(), h, domid, writable, [])
        for i, ref in enumerate(refs):
            entry = GrantEntry(ref, dom, domid, not writable, seg, i, share)
            dom.grants[ref] = entry
            share.entries.append(entry)
        h.shares[share.handle_id] = share
        return share

    def end_access(self, h: Handle, refs: Sequence[int], *, defer: bool = False) -> int:
        """End grants ``refs`` of this handle; returns how many ended now.

        Strict mode raises :class:`GrantInUse` and ends nothing if any is mapped."""
        self._check_open(h)
        entries: list[GrantEntry] = []
        for ref in refs:
            e = h.domain.grants.get(ref)
            if e is None or e.share.owner is not h or e.revoking or e.freed:
                raise PlatformError(f"ref {ref} is not shared through this handle", errno.ENOENT)
            entries.append(e)
        busy = [e.ref for e in entries if e.in_use]
        if busy and not defer:
            raise GrantInUse(f"dom{h.domain.domid}: refs {busy} are still mapped", busy)
        ended = 0
        by_share: dict[int, list[GrantEntry]] = {}
        for e in entries:
            by_share.setdefault(id(e.share), []).append(e)
        for group in by_share.values():
            ended += self._end_share(group[0].share, group)
        return ended

    def _end_share(self, share: Share, entries: Iterable[GrantEntry]) -> int:
        # ends what is unmapped now; what is mapped becomes revoking (deferred end)
        todo = [e for e in entries if not (e.revoking or e.freed)]
        n = share.notify
        if n is not None and share.entries[n.offset // PAGE_SIZE] in todo:
            # the owner's mapping of that page goes away: fire before the memory may go
            share.notify = None
            self._fire(share.segment_at, n, True)
        ended = 0
        share.ended += len(todo)
        for e in todo:
            self.grant_gen += 1
            if e.in_use:
                e.revoking = True
            else:
                self._free_entry(e)
                ended += 1
        if share.done:
            share.owner.shares.pop(share.handle_id, None)
        return ended

    def _free_entry(self, e: GrantEntry) -> None:
        self.grant_gen += 1
        e.freed = True
        e.revoking = False
        dom = e.granter
        if e.frame:
            if dom.frames.get(e.ref) is e:
                del dom.frames[e.ref]
        elif dom.grants.get(e.ref) is e:
            dom.free_ref(e.ref)
        e.segment.refs_live -= 1
        if e.segment.refs_live == 0:
            self._close_segment(e.segment)
        if dom in self._zombies and not dom.grants and not dom.frames:
            self._zombies.remove(dom)

    def alloc_frames(self, h: Handle, count: int) -> Share:
        """Give the domain ``count`` zeroed guest frames that dom0 may map foreign.

        Returned as a share whose ``refs`` are the gfns; it ends like a share (its handle
        unmapped, or the handle closed), deferred while dom0 still maps a frame.

        Each frame is its own one-page memfd: a frame may later be granted alone
        (:meth:`grant_frame`), and the grantee's descriptor must reach that page only,
        never the frames allocated next to it."""
        self._check_open(h)
        dom = h.domain
        if not 0 < count <= MAX_BATCH:
            raise PlatformError(f"bad frame count {count}", errno.EINVAL)
        if len(dom.frames) + count > self.max_grants:
            raise ResourceExhausted(f"dom{dom.domid}: frame table full")
        gfns = list(range(dom.next_gfn, dom.next_gfn + count))
        segs: list[Segment] = []
        try:
            for gfn in gfns:
                segs.append(
                    self._new_segment(dom, 1, f"xenpv-dom{dom.domid}-gfn{gfn:#x}", writable=True)
                )
        except PlatformError:
            for seg in segs:
                self._close_segment(seg)
            raise
        dom.next_gfn += count
        share = Share(h.next_id(), h, 0, True, [])
        for gfn, seg in zip(gfns, segs, strict=True):
            entry = GrantEntry(gfn, dom, 0, False, seg, 0, share, frame=True)
            dom.frames[gfn] = entry
            share.entries.append(entry)
        h.shares[share.handle_id] = share
        return share

    def grant_frame(
        self, h: Handle, gfn: int, domid: int, *, reserved: int | None = None
    ) -> Share:
        """Grant guest frame ``gfn`` of the caller's domain to ``domid``, writable, at a
        free ref or at ``reserved`` (0 console, 1 xenstore): what Xen's domain builder
        does for the console and xenstore pages, so one page is reachable both as a
        frame (``xenforeignmemory_map``) and as a grant.

        Returned as a one-page share over the frame's memory; ending it leaves the frame
        alone, and freeing the frame leaves the grant (the memory stays while either
        refers to it)."""
        self._check_open(h)
        dom = h.domain
        frame = dom.frames.get(gfn)
        if frame is None or frame.revoking or frame.freed:
            raise PlatformError(f"dom{dom.domid} has no frame {gfn:#x}", errno.EINVAL)
        if domid == dom.domid or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise PlatformError(f"cannot grant to domain {domid}", errno.EINVAL)
        self.domain(domid)
        if reserved is not None:
            # grant_table.h: GNTTAB_RESERVED_CONSOLE 0, GNTTAB_RESERVED_XENSTORE 1
            if reserved not in (0, 1):
                raise PlatformError(f"ref {reserved} cannot be granted explicitly", errno.EINVAL)
            if reserved in dom.grants:
                raise PlatformError(f"reserved ref {reserved} is in use", errno.EBUSY)
            ref = reserved
        else:
            (ref,) = dom.alloc_refs(1)
        seg = frame.segment
        self.grant_gen += 1
        share = Share(h.next_id(), h, domid, True, [])
        entry = GrantEntry(ref, dom, domid, False, seg, frame.page, share)
        seg.refs_live += 1  # the memory stays while the grant or the frame refers to it
        dom.grants[ref] = entry
        share.entries.append(entry)
        h.shares[share.handle_id] = share
        return share

    def foreign_map(self, h: Handle, domid: int, gfns: Sequence[int], *, writable: bool) -> Mapping:
        """``xenforeignmemory_map``: dom0 maps guest frames of ``domid``, all or nothing."""
        self._check_open(h)
        if not h.domain.privileged:
            raise PlatformError("only dom0 may map foreign frames", errno.EPERM)
        if not 0 < len(gfns) <= MAX_BATCH:
            raise PlatformError(f"bad map count {len(gfns)}", errno.EINVAL)
        dom = self.domains.get(self._resolve(h, domid))
        if dom is None or dom is h.domain:
            raise MapError(f"bad domain {domid}", errno.ESRCH, 0, GntSt.bad_domain)
        if h.domain.maptrack + len(gfns) > self.max_maptrack:
            raise MapError("maptrack full", errno.ENOSPC, 0, GntSt.no_space)
        entries: list[GrantEntry] = []
        for i, gfn in enumerate(gfns):
            e = dom.frames.get(gfn)
            if e is None or e.revoking:
                raise MapError(
                    f"frame #{i}: dom{dom.domid} has no frame {gfn:#x}",
                    errno.EINVAL,
                    i,
                    GntSt.bad_page,
                )
            entries.append(e)
        for e in entries:
            e.mappers += 1
        h.domain.maptrack += len(entries)
        m = Mapping(h.next_id(), h, entries, writable)
        h.mappings[m.handle_id] = m
        return m

    def map(self, h: Handle, refs: Sequence[tuple[int, int]], *, writable: bool) -> Mapping:
        """gntdev MAP_GRANT_REF: map ``(domid, ref)`` pairs, all or nothing (R9)."""
        self._check_open(h)
        if not 0 < len(refs) <= MAX_BATCH:
            raise PlatformError(f"bad map count {len(refs)}", errno.EINVAL)
        me = h.domain.domid
        if h.domain.maptrack + len(refs) > self.max_maptrack:
            # grant_table.c: the maptrack table bounds how much a domain can map
            raise MapError(
                f"dom{me}: maptrack full ({h.domain.maptrack} pages mapped)",
                errno.ENOSPC,
                0,
                GntSt.no_space,
            )
        entries: list[GrantEntry] = []
        for i, (domid, ref) in enumerate(refs):
            domid = self._resolve(h, domid)
            dom = self.domains.get(domid)
            if dom is None or domid == me:
                raise MapError(f"map #{i}: bad domain {domid}", errno.ESRCH, i, GntSt.bad_domain)
            e = dom.grants.get(ref)
            if e is None or e.revoking or e.grantee != me:
                raise MapError(
                    f"map #{i}: dom{domid} ref {ref} is not granted to dom{me}",
                    errno.ENOENT,
                    i,
                    GntSt.bad_gntref,
                )
            if writable and e.readonly:
                raise MapError(
                    f"map #{i}: dom{domid} ref {ref} is a read-only grant",
                    errno.EPERM,
                    i,
                    GntSt.permission_denied,
                )
            if e.share.ended and e.segment.npages > 1:
                # The only descriptor of this page also reaches the share's ended pages,
                # which are no longer granted: a new mapping must not receive it.
                raise MapError(
                    f"map #{i}: dom{domid} ref {ref} belongs to a partly ended share",
                    errno.ENOENT,
                    i,
                    GntSt.bad_gntref,
                )
            entries.append(e)
        # Validation is complete before any entry changes, so a failure above leaves
        # nothing mapped: the "successful subset" to unwind is always empty.
        for e in entries:
            if e.readonly:
                e.segment.seal_readonly()  # before any grantee holds a descriptor
            e.mappers += 1
        h.domain.maptrack += len(entries)
        m = Mapping(h.next_id(), h, entries, writable)
        h.mappings[m.handle_id] = m
        return m

    def unmap(self, h: Handle, handle_id: int) -> None:
        """gntdev UNMAP: drop mapping ``handle_id`` (or, for a share, end it deferred)."""
        self._check_open(h)
        m = h.mappings.get(handle_id)
        if m is not None:
            self._unmap(m)
            return
        s = h.shares.get(handle_id)
        if s is None:
            raise PlatformError(f"no mapping or share {handle_id}", errno.ENOENT)
        self._end_share(s, s.entries)

    def _unmap(self, m: Mapping) -> None:
        del m.owner.mappings[m.handle_id]
        if m.notify is not None:
            notify, m.notify = m.notify, None
            self._fire(m.segment_at, notify, m.writable)
        m.owner.domain.maptrack -= len(m.entries)
        for e in m.entries:
            e.mappers -= 1
            if e.revoking and not e.in_use:
                self._free_entry(e)

    def set_notify(self, h: Handle, handle_id: int, offset: int, action: int, port: int) -> None:
        """SET_UNMAP_NOTIFY on a mapping or share of this handle."""
        self._check_open(h)
        obj: Mapping | Share | None = h.mappings.get(handle_id) or h.shares.get(handle_id)
        if obj is None:
            raise PlatformError(f"no mapping or share {handle_id}", errno.ENOENT)
        if action & ~(NOTIFY_CLEAR_BYTE | NOTIFY_SEND_EVENT):
            raise PlatformError(f"bad notify action {action}", errno.EINVAL)
        if not 0 <= offset < len(obj.entries) * PAGE_SIZE:
            raise PlatformError(f"notify offset {offset} outside the mapping", errno.EINVAL)
        if action & NOTIFY_CLEAR_BYTE and not obj.writable and isinstance(obj, Mapping):
            raise PlatformError("clear-byte needs a writable mapping", errno.EINVAL)
        port_obj: Port | None = None
        if action & NOTIFY_SEND_EVENT:
            port_obj = h.domain.ports.get(port)
            if port_obj is None or port_obj.detached:
                raise PlatformError(
                    f"notify port {port} is not a port of this domain", errno.EINVAL
                )
            port_obj.notify_refs += 1
        if obj.notify is not None:
            self._drop_notify(obj.notify)
        obj.notify = Notify(offset, action, port_obj)

    def _drop_notify(self, n: Notify) -> None:
        p, n.port = n.port, None
        if p is not None:
            p.notify_refs -= 1
            if p.detached and p.notify_refs == 0:
                self._close_port(p)

    def _fire(
        self,
        segment_at: Callable[[int], tuple[Segment, int]],
        n: Notify,
        writable: bool,
    ) -> None:
        if n.action & NOTIFY_CLEAR_BYTE and writable:
            seg, off = segment_at(n.offset)
            seg.clear_byte(off)
        if n.port is not None:
            self._signal_remote(n.port)
        self._drop_notify(n)

    # ------------------------------------------------------------------ grant copy
    def copy(self, h: Handle, segments: Sequence[GrantCopy]) -> list[int]:
        """GNTTABOP_copy: one ``GNTST_*`` status per segment (segments independent)."""
        self._check_open(h)
        plan = CopyPlan(self, h, segments)
        try:
            return plan()
        finally:
            plan.release()

    def prepare_copy(self, h: Handle, segments: Sequence[GrantCopy]) -> CopyPlan:
        """A reusable, pre-validated copy of ``segments`` (see :class:`CopyPlan`)."""
        self._check_open(h)
        return CopyPlan(self, h, segments)

    def _copy_window(self, h: Handle, p: Any, length: int, dest: bool) -> Any:
        """``(base object, memoryview, start)`` for one side, or a GNTST code (int)."""
        if isinstance(p, GrantPtr):
            if p.offset < 0 or length < 0 or p.offset + length > PAGE_SIZE:
                return GntSt.bad_copy_arg
            found = self.grant_page(h, p.domid, p.ref, dest)
            if isinstance(found, int):
                return found
            seg, start = found
            return seg, seg.view, start + p.offset
        if isinstance(p, SharePtr):
            return self._share_window(h, p, length)
        if not isinstance(p, LocalPtr):
            return GntSt.general_error
        try:
            buf = memoryview(p.buffer).cast("B")
        except (TypeError, ValueError) as exc:  # not a contiguous buffer: caller's bug
            raise LocalError(f"grant copy needs a contiguous local buffer: {exc}") from exc
        if p.offset < 0 or length < 0 or p.offset + length > len(buf):
            return GntSt.bad_copy_arg
        if dest and buf.readonly:
            return GntSt.bad_copy_arg
        return p.buffer, buf, p.offset

    def grant_page(
        self, h: Handle, domid: int, ref: int, dest: bool
    ) -> int | tuple[Segment, int]:
        """The page a grant copy side names by ``(domid, ref)`` as ``(segment, byte
        offset of the page in it)``, or the GNTST code refusing it: the domain must exist
        (``DOMID_SELF`` is the caller's), the ref be granted to the caller's domain and
        not revoking, and a destination be a writable grant.

        A page given stays the answer while :attr:`grant_gen` does not change (and ``h``
        is open), so a copy engine may keep it until then (``cython/gntcopy.pyx``); a
        refusal may turn into a page without a bump (a domain created)."""
        dom = self.domains.get(self._resolve(h, domid))
        if dom is None:
            return GntSt.bad_domain
        e = dom.grants.get(ref)
        if e is None or e.revoking or e.grantee != h.domain.domid:
            return GntSt.bad_gntref
        if dest and e.readonly:
            return GntSt.permission_denied
        return e.segment, e.page * PAGE_SIZE

    @staticmethod
    def _share_window(h: Handle, p: SharePtr, length: int) -> Any:
        """The window of a :class:`SharePtr` side, or a GNTST code: the share must be one
        of ``h``'s own, every page it touches live, and the run one memfd's consecutive
        pages (a guest frame is its own memfd: a window there stays in one page)."""
        share = h.shares.get(p.handle_id)
        if share is None:
            return GntSt.bad_page
        off, entries = p.offset, share.entries
        size = len(entries) * PAGE_SIZE
        # an empty window must still start in a page of the share (one at its very end
        # names no page)
        if off < 0 or length < 0 or off + length > size or off >= size:
            return GntSt.bad_copy_arg
        k = off // PAGE_SIZE
        first = entries[k]
        seg = first.segment
        if first.revoking or first.freed or seg.fd < 0:
            return GntSt.bad_page
        inpage = off - k * PAGE_SIZE
        if inpage + length > PAGE_SIZE:  # the window goes on into the following pages
            for j in range(k + 1, (off + length - 1) // PAGE_SIZE + 1):
                e = entries[j]
                if e.revoking or e.freed:
                    return GntSt.bad_page
                if e.segment is not seg or e.page != first.page + j - k:
                    return GntSt.bad_copy_arg
        return seg, seg.view, first.page * PAGE_SIZE + inpage

    # ------------------------------------------------------------------ event channels
    def _new_port(self, h: Handle, remote_domid: int) -> Port:
        dom = h.domain
        self.charge_fds(dom, 1)
        try:
            num = dom.alloc_port()
        except ResourceExhausted:
            dom.fds -= 1
            raise
        try:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as exc:
            heapq.heappush(dom._free_ports, num)
            dom.fds -= 1
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise ResourceExhausted(f"dom{dom.domid}: eventfd: {exc}") from exc
            raise PlatformError(f"eventfd: {exc}", exc.errno) from exc
        try:
            self.check_headroom(dom, fd)
        except ResourceExhausted:
            os.close(fd)
            heapq.heappush(dom._free_ports, num)
            dom.fds -= 1
            raise
        p = Port(num, dom, h, remote_domid, fd)
        dom.ports[num] = p
        h.ports[num] = p
        dom.bump(num)
        return p

    def alloc_unbound(self, h: Handle, remote_domid: int) -> Port:
        """EVTCHNOP_alloc_unbound: a port only ``remote_domid`` may bind."""
        self._check_open(h)
        remote_domid = self._resolve(h, remote_domid)
        self.domain(remote_domid)
        return self._new_port(h, remote_domid)

    def bind_interdomain(self, h: Handle, remote_domid: int, remote_port: int) -> Port:
        """EVTCHNOP_bind_interdomain: connect to an unbound port offered to us."""
        self._check_open(h)
        me = h.domain.domid
        remote_domid = self._resolve(h, remote_domid)
        if h.restrict is not None and remote_domid != h.restrict:
            raise PortError(
                f"handle restricted to dom{h.restrict}, not dom{remote_domid}", errno.EPERM
            )
        rdom = self.domain(remote_domid)
        rp = rdom.ports.get(remote_port)
        if rp is None or rp.state != EvtchnState.unbound or rp.remote_domid != me:
            raise PortError(
                f"dom{remote_domid} port {remote_port} is not offered to dom{me}", errno.EINVAL
            )
        lp = self._new_port(h, remote_domid)
        lp.state = rp.state = EvtchnState.interdomain
        lp.remote, rp.remote = rp, lp
        rdom.bump(rp.port)
        h.domain.bump(lp.port)
        signal_eventfd(lp.inbox)  # bind leaves the new local port pending
        return lp

    def bind_virq(self, h: Handle, virq: int) -> Port:
        """EVTCHNOP_bind_virq (vcpu 0): a port signalled when ``virq`` fires.

        Only VIRQ_DOM_EXC is emulated (``ENOSYS`` for the others, ``EINVAL`` past
        NR_VIRQS); a domain binds a virq once (``EEXIST``, as Xen).  Any domain may bind
        it, but like every global virq it is delivered to the privileged domain only."""
        self._check_open(h)
        if not 0 <= virq < NR_VIRQS:
            raise PortError(f"virq {virq} does not exist", errno.EINVAL)
        if virq != VIRQ_DOM_EXC:
            raise PortError(f"virq {virq} is not emulated", errno.ENOSYS)
        dom = h.domain
        if virq in dom.virqs:
            raise PortError(f"dom{dom.domid}: virq {virq} is already bound", errno.EEXIST)
        p = self._new_port(h, DOMID_SELF)
        p.state = EvtchnState.virq
        p.virq = virq
        dom.virqs[virq] = p
        return p

    def unbind(self, h: Handle, port: int) -> None:
        """EVTCHNOP_close of a port this handle owns."""
        self._check_open(h)
        p = h.ports.get(port)
        if p is None:
            raise PortError(f"port {port} is not bound by this handle", errno.EINVAL)
        if not self._return_port(p):
            self._close_port(p)

    def lend_port(self, p: Port, h: Handle) -> None:
        """Move port ``p`` of ``h``'s domain to handle ``h``; it goes back to its current
        owner when ``h`` unbinds it or closes (the domain builder's xenstore port, taken
        over by the process acting as the guest's kernel)."""
        self._check_open(h)
        if p.domain is not h.domain or p.detached or p.home is not None:
            raise PortError(f"port {p.port} cannot be lent", errno.EBUSY)
        del p.owner.ports[p.port]
        p.home, p.owner = p.owner, h
        h.ports[p.port] = p
        p.domain.bump(p.port)

    def _return_port(self, p: Port) -> bool:
        """Give a lent port back to its home handle (False: it is not lent, or its home
        is gone, so it closes)."""
        home = p.home
        if home is None or home.closed or p.detached:
            return False
        del p.owner.ports[p.port]
        p.owner, p.home = home, None
        home.ports[p.port] = p
        p.domain.bump(p.port)
        return True

    def _close_port(self, p: Port) -> None:
        if not p.detached:
            p.detached = True
            del p.owner.ports[p.port]
        if p.notify_refs > 0:
            return  # an unmap notification still refers to it: closed when it fires
        if p.virq is not None:
            p.domain.virqs.pop(p.virq, None)
            p.virq = None
        r = p.remote
        if r is not None:
            # event_channel.h: closing one end puts the other back to unbound
            r.remote = None
            r.state = EvtchnState.unbound
            r.domain.bump(r.port)
        p.remote = None
        p.state = EvtchnState.closed
        p.domain.free_port(p.port)
        p.domain.bump(p.port)
        os.close(p.inbox)
        p.inbox = -1
        p.domain.fds -= 1

    def port_of(self, h: Handle, port: int) -> Port:
        """The port ``port`` owned by ``h``, or :class:`PortError`."""
        p = h.ports.get(port)
        if p is None:
            raise PortError(f"port {port} is not bound by this handle", errno.EINVAL)
        return p

    def notify(self, h: Handle, port: int) -> Port | None:
        """EVTCHNOP_send through the hypervisor; returns the remote port (or ``None``)."""
        self._check_open(h)
        p = self.port_of(h, port)
        if p.virq is not None:  # event_channel.c: EVTCHNOP_send on a virq port
            raise PortError(f"port {port} is bound to a virq", errno.EINVAL)
        return self._signal_remote(p)

    def _signal_remote(self, p: Port) -> Port | None:
        r = p.remote
        if r is None:
            return None  # unbound: a successful no-op
        dom = p.domain
        if dom.notify_drop > 0:
            dom.notify_drop -= 1
            return r
        signal_eventfd(r.inbox)
        if dom.notify_duplicate:
            signal_eventfd(r.inbox)
        return r

    def restrict(self, h: Handle, domid: int) -> None:
        """IOCTL_EVTCHN_RESTRICT_DOMID (irreversible)."""
        self._check_open(h)
        if h.restrict is not None and h.restrict != domid:
            raise PortError(f"already restricted to dom{h.restrict}", errno.EINVAL)
        h.restrict = domid

    def status(self, h: Handle, domid: int, port: int) -> tuple[int, int, int]:
        """EVTCHNOP_status: ``(state, remote_domid, remote_port)``."""
        domid = self._resolve(h, domid)
        if domid != h.domain.domid and not h.domain.privileged:
            raise PlatformError("only dom0 may inspect other domains", errno.EPERM)
        dom = self.domain(domid)
        p = dom.ports.get(port)
        if p is None:
            return (EvtchnState.closed, 0, 0)
        if p.virq is not None:  # (the virq number is the second field)
            return (EvtchnState.virq, p.virq, 0)
        if p.remote is None:
            return (EvtchnState.unbound, p.remote_domid, 0)
        return (EvtchnState.interdomain, p.remote.domain.domid, p.remote.port)

    # ------------------------------------------------------------------ faults
    def fault(self, kind: int, domid: int, ref: int = 0, arg: int = 0) -> None:
        """Fault injection: hold/release a grant mapped, drop/duplicate notifications."""
        dom = self.domain(domid)
        if kind in (FAULT_HOLD_MAPPED, FAULT_RELEASE_HOLD):
            e = dom.grants.get(ref)
            if e is None:
                raise PlatformError(f"dom{domid} has no grant {ref}", errno.ENOENT)
            if kind == FAULT_HOLD_MAPPED:
                e.holds += 1
            elif e.holds > 0:
                e.holds -= 1
                if e.revoking and not e.in_use:
                    self._free_entry(e)
        elif kind == FAULT_DROP_NOTIFY:
            dom.notify_drop = arg
            self._invalidate_outboxes(dom)
        elif kind == FAULT_DUPLICATE_NOTIFY:
            dom.notify_duplicate = bool(arg)
            self._invalidate_outboxes(dom)
        else:
            raise PlatformError(f"unknown fault {kind}", errno.EINVAL)

    def _invalidate_outboxes(self, dom: Domain) -> None:
        # clients must take the hypervisor path for the fault to apply to them
        for port in dom.ports:
            dom.bump(port)

    def hold_mapped(self, domid: int, ref: int) -> None:
        """Pretend a peer keeps grant ``(domid, ref)`` mapped (scenario 13)."""
        self.fault(FAULT_HOLD_MAPPED, domid, ref)

    def release_hold(self, domid: int, ref: int) -> None:
        """Undo :meth:`hold_mapped`."""
        self.fault(FAULT_RELEASE_HOLD, domid, ref)

    # ------------------------------------------------------------------ accounting
    def stats(self, domid: int) -> DomainStats:
        """Outstanding resources of a live domain."""
        dom = self.domain(domid)
        return DomainStats(
            grants=len(dom.grants),
            grants_revoking=sum(1 for e in dom.grants.values() if e.revoking),
            mappings=sum(len(h.mappings) for h in dom.handles.values()),
            ports=len(dom.ports),
            shares=sum(len(h.shares) for h in dom.handles.values()),
            handles=len(dom.handles),
            fds=dom.fds,
        )

    def outstanding(self) -> dict[str, int]:
        """Machine-wide totals: grants, mappings, ports, handles, zombie domains."""
        doms = list(self.domains.values())
        return {
            "grants": sum(len(d.grants) for d in doms) + sum(len(d.grants) for d in self._zombies),
            "frames": sum(len(d.frames) for d in doms) + sum(len(d.frames) for d in self._zombies),
            "mappings": sum(len(h.mappings) for d in doms for h in d.handles.values()),
            "ports": sum(len(d.ports) for d in doms),
            "handles": sum(len(d.handles) for d in doms),
            "zombies": len(self._zombies),
        }

    def assert_released(self) -> None:
        """Raise ``AssertionError`` listing what is still outstanding, if anything."""
        left = {k: v for k, v in self.outstanding().items() if v}
        if left:
            raise AssertionError(f"loopback emulator still holds {left}")

    def close(self) -> None:
        """Destroy every domain and release all memory (end of an in-process run)."""
        for domid in sorted(self.domains, reverse=True):
            if domid != 0:
                self.destroy_domain(domid)
        dom0 = self.domains.get(0)
        if dom0 is not None:
            for h in list(dom0.handles.values()):
                self.close_handle(h)
            dom0.close()
            del self.domains[0]
        for z in self._zombies:
            for e in list(z.grants.values()):
                e.mappers = e.holds = 0
                self._free_entry(e)
        self._zombies.clear()

"""The loopback platform in one process: several domains sharing one :class:`Hypervisor`.

Used by unit tests and fuzzing.  Semantics are those of the daemon (the daemon drives the
very same :class:`~xenpv.platforms.loopback.core.Hypervisor`); only the transport differs:
here the platform objects call the hypervisor directly and map its memfds themselves.
Event-channel inboxes are duplicated into the handle, exactly as a control connection
would receive them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    BasePlatform,
    GrantCopy,
    GrantTable,
    GuestXenstoreRing,
    MappedGrants,
    SharedPages,
    UnmapNotify,
    copy_pieces_as_segments,
)
from xenpv.platforms.loopback.core import (
    NOTIFY_CLEAR_BYTE,
    NOTIFY_SEND_EVENT,
    CopyPlan,
    Handle,
    Hypervisor,
    Mapping,
    Share,
)
from xenpv.platforms.loopback.events import EpollEvents
from xenpv.platforms.loopback.memory import MappedRegion, Region, SharedRegion, owned_run

__all__ = ["InProcessEvents", "InProcessGrantTable", "InProcessPlatform", "notify_args"]


def notify_args(notify: UnmapNotify) -> tuple[int, int, int]:
    """``(offset, action, port)`` of an :class:`UnmapNotify` (protocol encoding)."""
    action = (NOTIFY_CLEAR_BYTE if notify.clear_byte else 0) | (
        NOTIFY_SEND_EVENT if notify.port is not None else 0
    )
    return notify.offset, action, notify.port or 0


def with_notify(gt: GrantTable, run: SharedRegion, notify: UnmapNotify | None) -> SharedRegion:
    """``run`` with ``notify`` attached (``grant(notify=...)``); on failure the share is
    ended again and the error propagates."""
    if notify is not None:
        try:
            gt.set_unmap_notify(run, notify)
        except BaseException:
            gt.end_access(run)
            raise
    return run


class InProcessGrantTable:
    """:class:`~xenpv.platforms.base.GrantTable` of one domain, in process."""

    def __init__(self, hv: Hypervisor, domid: int) -> None:
        self._hv = hv
        self._h: Handle = hv.open_handle(domid)
        self._live: dict[int, SharedRegion | MappedRegion] = {}

    @property
    def domid(self) -> int:
        """The domain this handle acts as."""
        return self._h.domain.domid

    def grant(self, domid: int, count: int = 1, *, writable: bool = True,
              notify: UnmapNotify | None = None) -> SharedRegion:
        """Allocate, map and grant ``count`` zeroed pages to ``domid``, with ``notify``
        attached if given."""
        return with_notify(self, self._share(domid, count, writable, None), notify)

    def grant_reserved(self, ref: int, domid: int, *, writable: bool = True) -> SharedRegion:
        """Share one zeroed page at reserved ref 0 (console) or 1 (xenstore) with ``domid``."""
        return self._share(domid, 1, writable, ref)

    def _share(self, domid: int, count: int, writable: bool, reserved: int | None) -> SharedRegion:
        share = self._hv.share(self._h, domid, count, writable=writable, reserved=reserved)
        return self._wrap(share, domid, writable)

    def alloc_frames(self, count: int) -> SharedRegion:
        """``count`` zeroed guest frames of this domain (``refs`` are the gfns) that dom0
        may map with :meth:`foreign_map`; release with :meth:`free_frames`."""
        return self._wrap(self._hv.alloc_frames(self._h, count), self.domid, True)

    def free_frames(self, frames: SharedPages) -> None:
        """Give the frames back (deferred while dom0 still maps one) and unmap locally."""
        run = owned_run(frames, self._live)
        del self._live[run.handle_id]
        run.region.release()
        self._hv.unmap(self._h, run.handle_id)

    def grant_frame(self, gfn: int, domid: int, *, ref: int | None = None) -> SharedRegion:
        """Grant this domain's frame ``gfn`` to ``domid`` (writable) at a free ref or at
        reserved ref ``ref``; the result maps the same page (release with
        :meth:`end_access`; the frame stays)."""
        return self._wrap(self._hv.grant_frame(self._h, gfn, domid, reserved=ref), domid, True)

    def foreign_map(
        self, domid: int, gfns: Sequence[int], *, writable: bool = True
    ) -> MappedRegion:
        """``xenforeignmemory_map`` (dom0 only): map guest frames of ``domid``."""
        m = self._hv.foreign_map(self._h, domid, gfns, writable=writable)
        return self._place(m, gfns, domid, writable, None)

    def _wrap(self, share: Share, domid: int, writable: bool) -> SharedRegion:
        try:
            region = Region(share.pages(), writable=True)
        except BaseException:
            self._hv.unmap(self._h, share.handle_id)
            raise
        run = SharedRegion(share.refs, domid, region, share.handle_id, writable)
        self._live[run.handle_id] = run
        return run

    def end_access(self, pages: SharedPages) -> None:
        """End every grant of ``pages`` (GrantInUse: nothing ended) and unmap locally."""
        run = owned_run(pages, self._live)
        self._hv.end_access(self._h, run.refs)
        del self._live[run.handle_id]
        run.region.release()

    def set_unmap_notify(self, obj: SharedPages | MappedGrants, notify: UnmapNotify) -> None:
        """Attach (or replace) the unmap notification of a share or mapping."""
        run = owned_run(obj, self._live)
        self._hv.set_notify(self._h, run.handle_id, *notify_args(notify))

    def map(
        self,
        domid: int,
        refs: Sequence[int],
        *,
        writable: bool = True,
        notify: UnmapNotify | None = None,
    ) -> MappedRegion:
        """Map ``refs`` of ``domid`` contiguously; all or nothing."""
        m = self._hv.map(self._h, [(domid, r) for r in refs], writable=writable)
        return self._place(m, refs, domid, writable, notify)

    def _place(
        self,
        m: Mapping,
        refs: Sequence[int],
        domid: int,
        writable: bool,
        notify: UnmapNotify | None,
    ) -> MappedRegion:
        try:
            region = Region(m.pages(readonly_fds=not writable), writable=writable)
            if notify is not None:
                self._hv.set_notify(self._h, m.handle_id, *notify_args(notify))
        except BaseException:
            self._hv.unmap(self._h, m.handle_id)
            raise
        run = MappedRegion(refs, domid, region, m.handle_id, writable)
        self._live[run.handle_id] = run
        return run

    def unmap(self, mapping: MappedGrants) -> None:
        """Unmap; the unmap notification fires."""
        run = owned_run(mapping, self._live)
        del self._live[run.handle_id]
        run.region.release()
        self._hv.unmap(self._h, run.handle_id)

    def copy(self, segments: Sequence[GrantCopy]) -> list[int]:
        """Grant copy; one ``GNTST_*`` per segment."""
        return self._hv.copy(self._h, segments)

    def copy_pieces(self, domid: int, pieces: Any, count: int, dest: Any) -> Sequence[int]:
        """:meth:`~xenpv.platforms.base.PieceCopies.copy_pieces`: the hypervisor's copy
        of the pieces as segments (in process nothing crosses a socket)."""
        return copy_pieces_as_segments(self, domid, pieces, count, dest)

    def prepare_copy(self, segments: Sequence[GrantCopy]) -> CopyPlan:
        """A reusable, pre-validated copy (re-validated when grant tables change)."""
        return self._hv.prepare_copy(self._h, segments)

    def close(self) -> None:
        """Release everything (as process death would)."""
        for run in self._live.values():
            run.region.release()
        self._live.clear()
        self._hv.close_handle(self._h)


class InProcessEvents(EpollEvents):
    """:class:`~xenpv.platforms.base.EventChannels` of one domain, in process."""

    def __init__(self, hv: Hypervisor, domid: int) -> None:
        super().__init__()
        self._hv = hv
        self._h: Handle = hv.open_handle(domid)

    @property
    def domid(self) -> int:
        """The domain this handle acts as."""
        return self._h.domain.domid

    def alloc_unbound(self, remote_domid: int) -> int:
        """A new port that only ``remote_domid`` may bind."""
        p = self._hv.alloc_unbound(self._h, remote_domid)
        self._register(p.port, os.dup(p.inbox))
        return p.port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Bind to a port offered to us; the new port is pending."""
        p = self._hv.bind_interdomain(self._h, remote_domid, remote_port)
        self._register(p.port, os.dup(p.inbox))
        return p.port

    def bind_virq(self, virq: int) -> int:
        """A port signalled when the virtual IRQ ``virq`` fires (only VIRQ_DOM_EXC)."""
        p = self._hv.bind_virq(self._h, virq)
        self._register(p.port, os.dup(p.inbox))
        return p.port

    def notify(self, port: int) -> None:
        """Signal the remote end of ``port``."""
        self._hv.notify(self._h, port)

    def restrict(self, domid: int) -> None:
        """Only bind interdomain channels to ``domid`` from now on."""
        self._hv.restrict(self._h, domid)

    def _release_port(self, port: int) -> None:
        if not self._h.closed:
            self._hv.unbind(self._h, port)

    def _release_all(self) -> None:
        self._hv.close_handle(self._h)


class InProcessPlatform(BasePlatform[InProcessGrantTable, InProcessEvents]):
    """:class:`~xenpv.platforms.base.Platform` of one domain on an in-process hypervisor."""

    def __init__(self, hv: Hypervisor, domid: int, xenstore_path: str | None = None) -> None:
        self.hv = hv
        grants = InProcessGrantTable(hv, domid)
        super().__init__(grants, InProcessEvents(hv, domid), xenstore_path)

    def xenstore_ring(self) -> GuestXenstoreRing:
        """Take over the xenstore page and port the domain builder made for this domain
        (:mod:`~xenpv.platforms.loopback.builder`); ``EBUSY`` while another handle has
        them."""
        from xenpv.platforms.loopback.builder import adopt_xenstore_ring

        events = self.events
        ring, port = adopt_xenstore_ring(self.hv, events._h)
        try:
            events._register(port.port, os.dup(port.inbox))
            region = Region(ring.frames.pages(), writable=True)
        except BaseException:
            self.hv.unbind(events._h, port.port)
            raise
        return GuestXenstoreRing(region.mem, port.port, ring.gfn,
                                 _ring_release(region, events, port.port))


def _ring_release(region: Region, events: EpollEvents, port: int) -> Callable[[], None]:
    """Unmap ``region`` and unbind ``port`` once (the port goes back to the domain)."""
    done: list[bool] = []

    def release() -> None:
        if done:
            return
        done.append(True)
        region.release()
        with contextlib.suppress(PlatformError, LocalError):
            events.unbind(port)

    return release

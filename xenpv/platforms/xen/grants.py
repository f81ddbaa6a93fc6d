"""Grant tables on real Xen, through ``libxengnttab.so.1`` (gntdev / gntalloc).

Theory of operation
-------------------
:class:`XenGrantTable` holds one ``xengntshr`` handle (pages this domain shares) and one
``xengnttab`` handle (grants of other domains mapped here).  The library mmaps the pages;
Python sees them through a :class:`memoryview` over a cffi buffer at that address.

Releasing memory must never leave a Python object pointing at unmapped addresses (a
segfault, not an exception).  So after the library unmapped a run (unmap, unshare or
close), an anonymous read-only zero mapping is placed over the same range with
``MAP_FIXED_NOREPLACE`` — never clobbering whatever another thread may have mapped there
in between — and stale views read zeros.  That placeholder is unmapped by a cffi ``gc``
destructor once the last view of the run is gone.

Limits of the C library, surfaced as they are:

* unmap notifications can only be attached when a *single* page is shared or mapped
  (``xengntshr_share_page_notify`` / ``xengnttab_map_grant_ref_notify``), so
  :meth:`XenGrantTable.set_unmap_notify` after the fact and notifications on multi-page
  runs raise :class:`PlatformError` (``EOPNOTSUPP``);
* ending a share never fails: gntalloc itself keeps a page the peer still maps alive
  until the peer unmaps it (the kernel quarantines it, R8), so :class:`GrantInUse` is
  not raised here;
* a failed batch map reports one errno and not which ref failed; the refs are then
  probed one by one (each mapped and unmapped at once) so that :class:`MapError` names the
  first failing ref and its ``GNTST_*`` code (``index = -1`` if every single ref maps).
"""

from __future__ import annotations

import array
import errno
import mmap as _mmap
from collections.abc import Sequence
from typing import Any

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import (
    COPY_PIECE,
    PAGE_SIZE,
    GntSt,
    GrantCopy,
    GrantPtr,
    LocalPtr,
    MapError,
    MappedGrants,
    SharedPages,
    UnmapNotify,
    _Pages,
    check_pieces,
)
from xenpv.platforms.xen._libs import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    XenLibraries,
    call_error,
    ffi,
)

__all__ = ["XenGrantTable", "XenMappedGrants", "XenSharedPages"]

MAP_FIXED_NOREPLACE = 0x100000  # linux/mman.h
_NO_NOTIFY = 0xFFFFFFFF  # xengnttab.h: -1 = no such notification action
_MAP_FAILED = ffi.cast("void *", -1)

# errno of a failed map -> GNTST_* of the failing ref
_MAP_STATUS = {
    errno.ESRCH: GntSt.bad_domain,
    errno.ENOENT: GntSt.bad_gntref,
    errno.EINVAL: GntSt.bad_gntref,
    errno.EPERM: GntSt.permission_denied,
    errno.EACCES: GntSt.permission_denied,
}


class _Run(_Pages):
    """A page run the C library mapped at ``addr``, viewed from Python."""

    __slots__ = ("_libs", "_ptr", "_state", "domid", "mem", "refs", "writable")

    def __init__(
        self,
        libs: XenLibraries,
        addr: Any,
        refs: Sequence[int],
        domid: int,
        writable: bool,
        *,
        local_writable: bool,
    ) -> None:
        self._libs = libs
        self.refs = tuple(refs)
        self.domid = domid
        self.writable = writable
        length = len(self.refs) * PAGE_SIZE
        state = {"placeholder": False}
        self._state = state
        # Resolved here: the destructor may run inside the garbage collector while a cffi
        # lookup holds cffi's (non-re-entrant) lock, so it must not look anything up.
        munmap = libs.libc.munmap

        def _collect(ptr: Any) -> None:
            # The last view is gone: drop the zero placeholder (never the grant mapping,
            # which only the library may unmap).
            if state["placeholder"]:
                munmap(ptr, length)

        self._ptr: Any = ffi.gc(ffi.cast("char *", addr), _collect)
        view = memoryview(ffi.buffer(self._ptr, length))
        self.mem: memoryview = view if local_writable else view.toreadonly()

    @property
    def address(self) -> Any:
        """The run's start address (a cffi pointer)."""
        return self._ptr

    def _after_unmap(self) -> None:
        """Put harmless zero pages where the library just unmapped the run."""
        length = len(self.refs) * PAGE_SIZE
        got = self._libs.libc.mmap(
            self._ptr,
            length,
            _mmap.PROT_READ,
            _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
        if got == ffi.cast("void *", self._ptr):
            self._state["placeholder"] = True
        elif got != _MAP_FAILED:
            # A kernel without MAP_FIXED_NOREPLACE took it as a hint and put it elsewhere.
            self._libs.libc.munmap(got, length)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} dom{self.domid} refs={list(self.refs)}>"


class XenSharedPages(_Run):
    """Pages this domain shares with ``domid`` (a :class:`~xenpv.platforms.base.SharedPages`)."""

    __slots__ = ()


class XenMappedGrants(_Run):
    """Grants of ``domid`` mapped here (a :class:`~xenpv.platforms.base.MappedGrants`)."""

    __slots__ = ()


def _notify_args(notify: UnmapNotify | None, npages: int) -> tuple[int, int]:
    """``(notify_offset, notify_port)`` for the C library (-1 = none)."""
    if notify is None:
        return _NO_NOTIFY, _NO_NOTIFY
    if npages != 1:
        raise PlatformError(
            "libxengnttab attaches unmap notifications to single pages only", errno.EOPNOTSUPP
        )
    if not 0 <= notify.offset < PAGE_SIZE:
        raise LocalError(f"unmap notification offset {notify.offset} outside the page")
    port = _NO_NOTIFY if notify.port is None else notify.port
    return (notify.offset if notify.clear_byte else _NO_NOTIFY), port


class XenGrantTable:
    """:class:`~xenpv.platforms.base.GrantTable` on ``libxengnttab.so.1``."""

    def __init__(self, libs: XenLibraries, domid: int) -> None:
        self._libs = libs
        self._domid = domid
        self._live: dict[int, _Run] = {}
        gt = libs.gnttab
        self._gnttab: Any = gt.xengnttab_open(ffi.NULL, 0)
        if self._gnttab == ffi.NULL:
            raise call_error("xengnttab_open")
        self._gntshr: Any = gt.xengntshr_open(ffi.NULL, 0)
        if self._gntshr == ffi.NULL:
            err = call_error("xengntshr_open")
            gt.xengnttab_close(self._gnttab)
            raise err

    @property
    def domid(self) -> int:
        """The domain this handle acts as."""
        return self._domid

    def _handles(self) -> tuple[Any, Any]:
        if self._gnttab is None:
            raise LocalError("grant table is closed")
        return self._gnttab, self._gntshr

    def _own(self, run: object, kind: type[_Run]) -> _Run:
        if not isinstance(run, kind) or self._live.get(id(run)) is not run:
            raise LocalError(f"{run!r} does not belong to this grant table (or was released)")
        return run

    def grant(
        self,
        domid: int,
        count: int = 1,
        *,
        writable: bool = True,
        notify: UnmapNotify | None = None,
    ) -> XenSharedPages:
        """Allocate ``count`` zeroed pages, map them here and grant each to ``domid``.

        ``notify`` (single page only) is attached when the page is shared.
        """
        if count < 1:
            raise LocalError(f"cannot share {count} pages")
        _, gntshr = self._handles()
        offset, port = _notify_args(notify, count)
        refs = ffi.new("uint32_t[]", count)
        gt = self._libs.gnttab
        if notify is None:
            addr = gt.xengntshr_share_pages(gntshr, domid, count, refs, int(writable))
        else:
            addr = gt.xengntshr_share_page_notify(
                gntshr, domid, refs, int(writable), offset, port
            )
        if addr == ffi.NULL:
            raise call_error("xengntshr_share_pages")
        run = XenSharedPages(self._libs, addr, list(refs), domid, writable, local_writable=True)
        self._live[id(run)] = run
        return run

    def end_access(self, pages: SharedPages) -> None:
        """Unshare ``pages``: revoke the grants (the kernel keeps a page the peer still maps
        until it unmaps it) and release them here."""
        run = self._own(pages, XenSharedPages)
        _, gntshr = self._handles()
        if self._libs.gnttab.xengntshr_unshare(gntshr, run.address, len(run.refs)) < 0:
            raise call_error("xengntshr_unshare")
        del self._live[id(run)]
        run._after_unmap()

    def set_unmap_notify(self, obj: SharedPages | MappedGrants, notify: UnmapNotify) -> None:
        """Not available through libxengnttab: pass ``notify`` to :meth:`grant` or
        :meth:`map` instead (single pages)."""
        raise PlatformError(
            "libxengnttab sets unmap notifications only when sharing or mapping a page",
            errno.EOPNOTSUPP,
        )

    def map(
        self,
        domid: int,
        refs: Sequence[int],
        *,
        writable: bool = True,
        notify: UnmapNotify | None = None,
    ) -> XenMappedGrants:
        """Map grants ``refs`` of ``domid`` contiguously, in order (all or nothing)."""
        refs = [int(r) for r in refs]
        if not refs:
            raise LocalError("nothing to map")
        gnttab, _ = self._handles()
        offset, port = _notify_args(notify, len(refs))
        prot = _mmap.PROT_READ | (_mmap.PROT_WRITE if writable else 0)
        gt = self._libs.gnttab
        if notify is None:
            crefs = ffi.new("uint32_t[]", refs)
            addr = gt.xengnttab_map_domain_grant_refs(gnttab, len(refs), domid, crefs, prot)
        else:
            addr = gt.xengnttab_map_grant_ref_notify(gnttab, domid, refs[0], prot, offset, port)
        if addr == ffi.NULL:
            err = ffi.errno
            index = 0 if len(refs) == 1 else self._first_failing(gnttab, domid, refs, prot)
            if index >= 0 and len(refs) > 1:
                err = ffi.errno
            status = _MAP_STATUS.get(err, GntSt.general_error)
            raise MapError(f"mapping grants {refs} of domain {domid} failed", err, index, status)
        run = XenMappedGrants(self._libs, addr, refs, domid, writable, local_writable=writable)
        self._live[id(run)] = run
        return run

    def _first_failing(self, gnttab: Any, domid: int, refs: list[int], prot: int) -> int:
        """Index of the first ref that cannot be mapped alone (cffi's errno then holds
        its error), or -1."""
        gt = self._libs.gnttab
        one = ffi.new("uint32_t[1]")
        for i, ref in enumerate(refs):
            one[0] = ref
            addr = gt.xengnttab_map_domain_grant_refs(gnttab, 1, domid, one, prot)
            if addr == ffi.NULL:
                return i
            gt.xengnttab_unmap(gnttab, addr, 1)
        return -1

    def unmap(self, mapping: MappedGrants) -> None:
        """Unmap (the mapping's unmap notification fires)."""
        run = self._own(mapping, XenMappedGrants)
        gnttab, _ = self._handles()
        if self._libs.gnttab.xengnttab_unmap(gnttab, run.address, len(run.refs)) < 0:
            raise call_error("xengnttab_unmap")
        del self._live[id(run)]
        run._after_unmap()

    def copy(self, segments: Sequence[GrantCopy]) -> list[int]:
        """Grant copies (``GNTTABOP_copy``); one ``GNTST_*`` status per segment.

        A grant side that would cross its page gets ``bad_copy_arg`` without reaching the
        hypervisor (the device would refuse the whole batch).
        """
        gnttab, _ = self._handles()
        statuses = [int(GntSt.okay)] * len(segments)
        send: list[int] = []
        keep: list[Any] = []  # cffi buffers that must outlive the call
        segs = ffi.new("xengnttab_grant_copy_segment_t[]", max(len(segments), 1))
        for i, seg in enumerate(segments):
            if not 0 <= seg.length <= 0xFFFF:
                raise LocalError(f"grant copy length {seg.length} out of range")
            c = segs[len(send)]
            c.len = seg.length
            c.flags = 0
            bad = False
            for side, ptr, dest in (("source", seg.source, False), ("dest", seg.dest, True)):
                union = getattr(c, side)
                if isinstance(ptr, GrantPtr):
                    c.flags |= GNTCOPY_dest_gref if dest else GNTCOPY_source_gref
                    union.foreign.ref = ptr.ref
                    union.foreign.domid = ptr.domid
                    union.foreign.offset = ptr.offset
                    bad |= not 0 <= ptr.offset or ptr.offset + seg.length > PAGE_SIZE
                elif isinstance(ptr, LocalPtr):
                    buf = ffi.from_buffer(ptr.buffer, require_writable=dest)
                    if ptr.offset < 0 or ptr.offset + seg.length > len(buf):
                        raise LocalError(f"grant copy {side} outside its local buffer")
                    keep.append(buf)
                    union.virt = ffi.cast("char *", buf) + ptr.offset
                else:
                    raise LocalError(f"grant copy {side} must be a GrantPtr or a LocalPtr")
            if not c.flags:
                raise LocalError("a grant copy needs a grant on at least one side")
            if bad:
                statuses[i] = int(GntSt.bad_copy_arg)
            else:
                send.append(i)
        if send:
            if self._libs.gnttab.xengnttab_grant_copy(gnttab, len(send), segs) < 0:
                raise call_error("xengnttab_grant_copy")
            for k, i in enumerate(send):
                statuses[i] = int(segs[k].status)
        return statuses

    def copy_pieces(self, domid: int, pieces: Any, count: int, dest: Any) -> Sequence[int]:
        """:meth:`~xenpv.platforms.base.PieceCopies.copy_pieces`: one
        ``xengnttab_grant_copy`` of segments built straight from the pieces (no
        :class:`GrantCopy` records), each into ``dest`` at its place."""
        gnttab, _ = self._handles()
        buf = ffi.from_buffer(dest, require_writable=True)
        view = check_pieces(pieces, count, len(buf), domid)
        statuses = array.array("i", bytes(4 * count))
        if not count:
            return statuses
        segs = ffi.new("xengnttab_grant_copy_segment_t[]", count)
        base = ffi.cast("char *", buf)
        for k, (ref, offset, length, place) in enumerate(COPY_PIECE.iter_unpack(view)):
            c = segs[k]
            c.len = length
            c.flags = GNTCOPY_source_gref
            c.source.foreign.ref = ref
            c.source.foreign.domid = domid
            c.source.foreign.offset = offset
            c.dest.virt = base + place
        if self._libs.gnttab.xengnttab_grant_copy(gnttab, count, segs) < 0:
            raise call_error("xengnttab_grant_copy")
        for k in range(count):
            statuses[k] = int(segs[k].status)
        return statuses

    def close(self) -> None:
        """Unmap and unshare everything, then close both library handles (idempotent)."""
        if self._gnttab is None:
            return
        for run in list(self._live.values()):
            try:
                if isinstance(run, XenSharedPages):
                    self.end_access(run)
                else:
                    self.unmap(run)
            except PlatformError:
                self._live.pop(id(run), None)
        gt = self._libs.gnttab
        gt.xengnttab_close(self._gnttab)
        gt.xengntshr_close(self._gntshr)
        self._gnttab = self._gntshr = None

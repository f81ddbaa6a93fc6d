"""Contiguous mappings of pages that live in separate memfds (the only mmap code of xenpv).

Theory of operation
-------------------
A batch of grants is mapped as one contiguous run (io/ring.h: a multi-page ring's slots
straddle page boundaries), but its pages may come from several memfds.  Python's
:mod:`mmap` cannot place a mapping at a fixed address, so this module calls libc's
``mmap``/``munmap`` through cffi (ABI mode, no compiler needed):

1. reserve ``n * 4096`` bytes of address space (``PROT_NONE``, anonymous, private);
2. place each run of consecutive pages of one fd there with ``MAP_SHARED | MAP_FIXED``
   (read-only mappings use ``PROT_READ`` only, and their fds are ``O_RDONLY``, so the
   kernel refuses ``PROT_WRITE``);
3. hand out a :class:`memoryview` over the run (read-only view for read-only mappings).

Releasing a run must not leave Python objects pointing at unmapped memory (a segfault,
not an exception).  So :meth:`Region.release` first replaces the whole run *in place* with
anonymous read-only zero pages (the grant memory is unreachable from that instant), and
the address range itself is returned to the kernel by a cffi ``gc`` destructor once the
last memoryview or numpy array over it is gone.
"""

from __future__ import annotations

import mmap as _mmap
import os
from collections.abc import Sequence
from typing import Any

import cffi

from xenpv.errors import LocalError, PlatformError

PAGE_SIZE = 4096

_ffi = cffi.FFI()
_ffi.cdef(
    """
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    """
)
_libc: Any = _ffi.dlopen(None)
# Resolved now, not on first use: cffi resolves a function under a lock that is not
# re-entrant, and the destructor below can run inside the garbage collector while another
# lookup holds that lock (it would wait forever).
_munmap: Any = _libc.munmap
_MAP_FAILED = _ffi.cast("void *", -1)

PROT_NONE = 0
PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
MAP_FIXED = 0x10  # linux/mman.h


def _check(ptr: Any, what: str) -> Any:
    if ptr == _MAP_FAILED:
        err = _ffi.errno
        raise PlatformError(f"{what}: {os.strerror(err)}", err)
    return ptr


def _unmap(ptr: Any, length: int) -> None:
    _munmap(ptr, length)


class Region:
    """A contiguous run of pages mapped from one or more fds.

    ``pages`` lists ``(fd, page_index)`` for each page of the run, in order.
    """

    __slots__ = ("_ptr", "length", "mem", "writable")

    def __init__(self, pages: Sequence[tuple[int, int]], *, writable: bool) -> None:
        if not pages:
            raise PlatformError("empty mapping", 22)
        self.length = len(pages) * PAGE_SIZE
        self.writable = writable
        raw = _check(
            _libc.mmap(_ffi.NULL, self.length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
            "reserve",
        )
        # The destructor runs when the last buffer over the run is collected.
        length = self.length
        self._ptr: Any = _ffi.gc(_ffi.cast("char *", raw), lambda p: _unmap(p, length))
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        try:
            i = 0
            while i < len(pages):
                fd, first = pages[i]
                j = i + 1
                while j < len(pages) and pages[j] == (fd, first + (j - i)):
                    j += 1
                _check(
                    _libc.mmap(
                        self._ptr + i * PAGE_SIZE,
                        (j - i) * PAGE_SIZE,
                        prot,
                        MAP_SHARED | MAP_FIXED,
                        fd,
                        first * PAGE_SIZE,
                    ),
                    "map pages",
                )
                i = j
        except BaseException:
            self._scrub()
            raise
        view = memoryview(_ffi.buffer(self._ptr, self.length))
        self.mem: memoryview = view if writable else view.toreadonly()

    @property
    def address(self) -> int:
        """Start address of the run (for diagnostics)."""
        return int(_ffi.cast("uintptr_t", self._ptr))

    def _scrub(self) -> None:
        # Replace every page in place with anonymous read-only zero pages: the fds' memory
        # is no longer reachable through this address range, stale views read zeros.
        _check(
            _libc.mmap(
                self._ptr,
                self.length,
                PROT_READ,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                -1,
                0,
            ),
            "scrub",
        )

    def release(self) -> None:
        """Detach the run from the fds' memory (idempotent)."""
        if self._ptr is not None:
            self._scrub()
            self._ptr = None


def buffer_address(buffer: Any) -> int | None:
    """Address of the first byte of ``buffer`` (any contiguous buffer), or None if it
    exposes no contiguous buffer."""
    try:
        return int(_ffi.cast("uintptr_t", _ffi.from_buffer(buffer)))
    except (TypeError, ValueError, BufferError):
        return None


def map_fd(fd: int, npages: int, *, writable: bool) -> Region:
    """Map the first ``npages`` pages of ``fd`` contiguously."""
    return Region([(fd, i) for i in range(npages)], writable=writable)


class _PageRun:
    """Common part of a shared or mapped run: refs, peer domid, memory, numpy views."""

    __slots__ = ("domid", "handle_id", "mem", "refs", "region", "writable")

    def __init__(
        self, refs: Sequence[int], domid: int, region: Region, handle_id: int, writable: bool
    ) -> None:
        self.refs = tuple(refs)
        self.domid = domid
        self.region = region
        self.mem = region.mem
        self.handle_id = handle_id
        self.writable = writable

    def array(self, dtype: Any = "u1", offset: int = 0, count: int = -1) -> Any:
        """A numpy array over the pages (no copy; read-only if the memory is)."""
        import numpy as np

        return np.frombuffer(self.mem, dtype=dtype, offset=offset, count=count)

    @property
    def nbytes(self) -> int:
        """Length in bytes."""
        return len(self.mem)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} dom{self.domid} refs={list(self.refs)}>"


class SharedRegion(_PageRun):
    """Pages this domain shares with ``domid`` (implements ``base.SharedPages``)."""

    __slots__ = ()


class MappedRegion(_PageRun):
    """Grants of ``domid`` mapped here (implements ``base.MappedGrants``)."""

    __slots__ = ()


def owned_run(obj: object, live: dict[int, Any]) -> Any:
    """``obj`` if it is a live page run of the handle whose runs are ``live``, else
    :class:`~xenpv.errors.LocalError` (released twice, or another handle's run)."""
    run = live.get(getattr(obj, "handle_id", -1))
    if run is None or run is not obj:
        raise LocalError(f"{obj!r} does not belong to this grant table (or was released)")
    return run

"""cffi (ABI mode) bindings to Xen's stable tool libraries ``libxengnttab.so.1`` and
``libxenevtchn.so.1``.

The declarations below are written from the libraries' documented C API (function
prototypes and the 24-byte ``xengnttab_grant_copy_segment`` layout are the ABI); no
compiler is needed.  The libraries are found by soname through the dynamic loader (so
``LD_LIBRARY_PATH`` applies), or loaded from an explicit directory, which is how the test
suite runs this platform on the loopback emulator's replacement libraries.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from typing import Any

import cffi

from xenpv.errors import PlatformError
from xenpv.platforms.base import GrantInUse, NoSuchDomain, PlatformGone, ResourceExhausted

GNTTAB_SONAME = "libxengnttab.so.1"
EVTCHN_SONAME = "libxenevtchn.so.1"

ffi = cffi.FFI()
ffi.cdef(
    """
    typedef uint16_t domid_t;
    typedef uint32_t evtchn_port_t;
    typedef int xenevtchn_port_or_error_t;
    struct xentoollog_logger;

    /* xengnttab.h */
    typedef struct xengntdev_handle xengnttab_handle;
    typedef struct xengntdev_handle xengntshr_handle;
    typedef struct xengnttab_grant_copy_segment {
        union {
            void *virt;
            struct {
                uint32_t ref;
                uint16_t offset;
                uint16_t domid;
            } foreign;
        } source, dest;
        uint16_t len;
        uint16_t flags;
        int16_t status;
    } xengnttab_grant_copy_segment_t;

    xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags);
    int xengnttab_close(xengnttab_handle *xgt);
    void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count,
                                          uint32_t domid, uint32_t *refs, int prot);
    void *xengnttab_map_grant_ref_notify(xengnttab_handle *xgt, uint32_t domid, uint32_t ref,
                                         int prot, uint32_t notify_offset,
                                         evtchn_port_t notify_port);
    int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);
    int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count,
                             xengnttab_grant_copy_segment_t *segs);

    xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags);
    int xengntshr_close(xengntshr_handle *xgs);
    void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count,
                                uint32_t *refs, int writable);
    void *xengntshr_share_page_notify(xengntshr_handle *xgs, uint32_t domid, uint32_t *ref,
                                      int writable, uint32_t notify_off,
                                      evtchn_port_t notify_port);
    int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count);

    /* xenevtchn.h */
    typedef struct xenevtchn_handle xenevtchn_handle;
    xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags);
    int xenevtchn_close(xenevtchn_handle *xce);
    int xenevtchn_fd(xenevtchn_handle *xce);
    int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
    xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce,
                                                          uint32_t domid);
    xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce,
                                                         uint32_t domid,
                                                         evtchn_port_t remote_port);
    int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
    xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
    int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
    int xenevtchn_restrict(xenevtchn_handle *xce, domid_t domid);

    /* libc, to keep released address ranges harmless (see grants.py) */
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    """
)

#: xengnttab.h: GNTCOPY_* flags of a copy segment.
GNTCOPY_source_gref = 1
GNTCOPY_dest_gref = 2


@dataclass(frozen=True)
class XenLibraries:
    """The loaded libraries (cffi library objects) and where they came from."""

    gnttab: Any
    evtchn: Any
    libc: Any
    lib_dir: str | None


_cache: dict[str | None, XenLibraries] = {}
_lock = threading.Lock()


def _open(name: str, lib_dir: str | None) -> Any:
    path = os.path.join(lib_dir, name) if lib_dir else name
    try:
        return ffi.dlopen(path)
    except OSError as exc:
        raise PlatformError(f"cannot load {path}: {exc}", 2) from exc


def load(lib_dir: str | os.PathLike[str] | None = None) -> XenLibraries:
    """Load (once per directory) ``libxengnttab.so.1`` and ``libxenevtchn.so.1``.

    ``lib_dir`` names the directory to load them from; ``None`` uses
    ``$XENPV_XEN_LIB_DIR`` if set, else the dynamic loader's search (``LD_LIBRARY_PATH``,
    then the system).  Raises :class:`PlatformError` (``ENOENT``) when they are missing.
    """
    key = os.fspath(lib_dir) if lib_dir is not None else os.environ.get("XENPV_XEN_LIB_DIR")
    with _lock:
        libs = _cache.get(key)
        if libs is None:
            libs = XenLibraries(
                gnttab=_open(GNTTAB_SONAME, key),
                evtchn=_open(EVTCHN_SONAME, key),
                libc=ffi.dlopen(None),
                lib_dir=key,
            )
            _cache[key] = libs
        return libs


def call_error(what: str, err: int | None = None) -> PlatformError:
    """The :class:`PlatformError` subclass for the C call ``what`` that failed with errno
    ``err`` (default: the errno cffi saved for this thread's last call)."""
    code = ffi.errno if err is None else err
    message = f"{what}: {os.strerror(code)}"
    if code == errno.ESRCH:
        return NoSuchDomain(message)
    if code == errno.ENOSPC:
        return ResourceExhausted(message)
    if code == errno.ENOTCONN:
        return PlatformGone(message)
    if code == errno.EBUSY:
        return GrantInUse(message)
    return PlatformError(message, code)

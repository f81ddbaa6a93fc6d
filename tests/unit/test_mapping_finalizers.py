"""The destructors that return a mapping's address range must never wait for cffi's lock.

They run when the last view over a run is freed, which can be inside the garbage
collector. cffi resolves a library function on first use under a lock that is not
re-entrant, and that resolution allocates, so it can trigger a collection: a destructor
that then resolved ``munmap`` itself waited for the lock forever (``xenpv bench all`` hung
this way in ``map_unmap_per_s``). Each case runs in a fresh interpreter (nothing resolved
yet) and frees a run while the lock is held, as the collector would in the middle of a
lookup; it must finish.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

LOOPBACK = textwrap.dedent(
    """
    import os
    from xenpv.platforms.loopback import memory
    fd = os.memfd_create("t")
    os.ftruncate(fd, 4096)
    run = memory.Region([(fd, 0)], writable=True)
    with memory._ffi._lock:
        del run
    print("done")
    """
)

XEN = textwrap.dedent(
    """
    import ctypes, mmap
    from xenpv.platforms.xen import _libs
    from xenpv.platforms.xen.grants import XenMappedGrants

    # The test's own mmap/munmap go through ctypes, so nothing in cffi is resolved.
    c = ctypes.CDLL(None, use_errno=True)
    c.mmap.restype = ctypes.c_void_p
    c.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
    c.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = c.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    libs = _libs.XenLibraries(gnttab=None, evtchn=None, libc=_libs.ffi.dlopen(None),
                              lib_dir=None)
    run = XenMappedGrants(libs, _libs.ffi.cast("void *", addr), [8], 1, True,
                          local_writable=True)
    # As after xengnttab_unmap: the range is gone, the run puts its placeholder there.
    c.munmap(addr, 4096)
    run._after_unmap()
    assert run._state["placeholder"]
    with _libs.ffi._lock:
        del run
    print("done")
    """
)


@pytest.mark.parametrize("source", [LOOPBACK, XEN], ids=["loopback", "xen"])
def test_a_mapping_destructor_never_waits_for_cffis_lookup_lock(source: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", source],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"

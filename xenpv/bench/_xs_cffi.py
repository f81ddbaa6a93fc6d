"""Sequential reads through Xen's ``libxenstore.so.4``, called from Python with cffi.

Run as ``python -m xenpv.bench._xs_cffi PATH COUNT`` with ``XENSTORED_PATH`` and
``LD_LIBRARY_PATH`` set (``xs_open(0)`` honours the former; the dynamic linker needs the
latter for the library's own dependencies).  Prints ``COUNT SECONDS``: ``xs_open(0)`` once,
then ``COUNT`` calls of ``xs_read(h, XBT_NULL, PATH, &len)`` and ``free`` of the value.
"""

from __future__ import annotations

import os
import sys
import time

import cffi

_CDEF = """
struct xs_handle;
struct xs_handle *xs_open(unsigned long flags);
void xs_close(struct xs_handle *xsh);
void *xs_read(struct xs_handle *h, uint32_t t, const char *path, unsigned int *len);
void free(void *ptr);
"""


def main(argv: list[str]) -> int:
    """Measure; see the module docstring."""
    path, count = argv[0].encode(), int(argv[1])
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    lib = ffi.dlopen("libxenstore.so.4")
    libc = ffi.dlopen(None)
    h = lib.xs_open(0)
    if h == ffi.NULL:
        print(f"xs_open: {os.strerror(ffi.errno)}", file=sys.stderr)
        return 1
    length = ffi.new("unsigned int *")
    xs_read, free = lib.xs_read, libc.free
    t0 = time.perf_counter()
    for _ in range(count):
        value = xs_read(h, 0, path, length)
        if value == ffi.NULL:
            print(f"xs_read: {os.strerror(ffi.errno)}", file=sys.stderr)
            return 1
        free(value)
    elapsed = time.perf_counter() - t0
    lib.xs_close(h)
    print(count, f"{elapsed:.9f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

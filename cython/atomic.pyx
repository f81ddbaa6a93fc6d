# Byte atomics, a full fence and single 32-bit index accesses, for Python callers.
#
# vchan's notify bytes (cli_notify/srv_notify, xen-protocols.md §10.2) are modified by both
# peers at once, so setting and clearing bits there must be atomic; a Python
# read-modify-write could lose the peer's bit and stall it.  The shared-index helpers give
# Python code a single aligned 4-byte load/store (never struct.pack_into, §12 pitfall 11).

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint32_t

from includes.barrier cimport (
    xenpv_atomic_fetch_and_clear8,
    xenpv_atomic_or8,
    xenpv_load_u32,
    xenpv_mb,
    xenpv_store_u32,
)

from xenpv.errors import LocalError


cdef uint8_t *_locate(Py_buffer *view, object buf, Py_ssize_t offset, Py_ssize_t width) except NULL:
    PyObject_GetBuffer(buf, view, PyBUF_WRITABLE)
    if offset < 0 or offset + width > view.len:
        PyBuffer_Release(view)
        raise LocalError(f"offset {offset} is outside the {view.len}-byte buffer")
    if width > 1 and ((<size_t>view.buf + offset) & (width - 1)):
        PyBuffer_Release(view)
        raise LocalError(f"offset {offset} is not {width}-byte aligned")
    return <uint8_t *>view.buf + offset


def atomic_or8(buf, Py_ssize_t offset, unsigned int bits) -> int:
    """Atomically OR ``bits`` into the byte at ``buf[offset]``; returns the old byte."""
    cdef Py_buffer view
    cdef uint8_t *p = _locate(&view, buf, offset, 1)
    cdef uint8_t old = xenpv_atomic_or8(p, <uint8_t>bits)
    PyBuffer_Release(&view)
    return old


def atomic_fetch_and_clear8(buf, Py_ssize_t offset, unsigned int bits) -> int:
    """Atomically clear ``bits`` in the byte at ``buf[offset]``; returns the old byte."""
    cdef Py_buffer view
    cdef uint8_t *p = _locate(&view, buf, offset, 1)
    cdef uint8_t old = xenpv_atomic_fetch_and_clear8(p, <uint8_t>bits)
    PyBuffer_Release(&view)
    return old


def full_barrier() -> None:
    """A full memory fence (orders earlier stores before later loads)."""
    xenpv_mb()


def load_u32(buf, Py_ssize_t offset) -> int:
    """One aligned 32-bit load of a shared index at ``buf[offset]``."""
    cdef Py_buffer view
    cdef uint8_t *p = _locate(&view, buf, offset, 4)
    cdef uint32_t v = xenpv_load_u32(p)
    PyBuffer_Release(&view)
    return v


def store_u32(buf, Py_ssize_t offset, value: int) -> None:
    """One aligned 32-bit store of a shared index at ``buf[offset]`` (value taken mod 2^32)."""
    cdef Py_buffer view
    cdef uint32_t v = <uint32_t>(value & 0xFFFFFFFF)
    cdef uint8_t *p = _locate(&view, buf, offset, 4)
    xenpv_store_u32(p, v)
    PyBuffer_Release(&view)

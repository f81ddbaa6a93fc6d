# Holding a caller's buffer across calls (the rings keep their memory for their lifetime).
#
# The export lives outside the Python object that holds it: Cython's generated tp_clear
# would clear a Py_buffer member's ``obj`` behind PyBuffer_Release's back, and the exporter
# (a bytearray, an mmap) would then die with an export outstanding.

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc


cdef inline Py_buffer *hold_buffer(object buf) except NULL:
    """Acquire a writable export of ``buf`` that outlives this call (see drop_buffer)."""
    cdef Py_buffer *view = <Py_buffer *>PyMem_Malloc(sizeof(Py_buffer))
    if view == NULL:
        raise MemoryError()
    try:
        PyObject_GetBuffer(buf, view, PyBUF_WRITABLE)
    except BaseException:
        PyMem_Free(view)
        raise
    return view


cdef inline void drop_buffer(Py_buffer **view) noexcept:
    """Release and free a held export (no-op when there is none); clears the pointer."""
    if view[0] != NULL:
        PyBuffer_Release(view[0])
        PyMem_Free(view[0])
        view[0] = NULL

# Declarations of xenpv_copy.h (the rings' alignment-robust memory copy).


cdef extern from "xenpv_copy.h" nogil:
    void xenpv_copy(void *dst, const void *src, size_t length)

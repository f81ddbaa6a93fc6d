# Declarations of xenpv_barrier.h (barriers, shared-index accesses, byte atomics).
from libc.stdint cimport uint8_t, uint32_t


cdef extern from "xenpv_barrier.h" nogil:
    const int XENPV_DEBUG_ENABLED
    void xenpv_compiler_barrier()
    void xenpv_rmb()
    void xenpv_wmb()
    void xenpv_mb()
    void xenpv_cpu_relax()
    long long xenpv_now_ns()
    uint32_t xenpv_load_u32(const void *p)
    void xenpv_store_u32(void *p, uint32_t v)
    uint8_t xenpv_load_u8(const void *p)
    uint8_t xenpv_atomic_or8(void *p, uint8_t bits)
    uint8_t xenpv_atomic_fetch_and_clear8(void *p, uint8_t bits)

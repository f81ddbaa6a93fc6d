/*
 * xenpv_barrier.h: memory barriers, shared-index accesses and byte atomics for xenpv's rings.
 *
 * Theory of operation
 * -------------------
 * Two domains (or, on the loopback emulator, two processes) share ring pages and run on
 * different CPUs at the same time.  Each side publishes progress by storing a free-running
 * 32-bit index and reads the other side's index; the data slots are plain memory.  Correctness
 * rests on three things, all provided here and nowhere else in xenpv:
 *
 *   1. Ordering.  A producer's slot stores must be visible before its index store (write
 *      barrier); a consumer must load the index before the slots it covers (read barrier);
 *      and "store my index, then load the peer's event field" needs a full barrier because
 *      even x86 (TSO) may let a later load pass an earlier store (xen-protocols.md §1.8).
 *   2. Index accesses are single, aligned 32-bit volatile loads and stores, so the compiler
 *      can neither tear them, nor merge them, nor hoist a load out of a polling loop
 *      (xen-protocols.md §12 pitfalls 10-12).
 *   3. The vchan notify bytes are updated by both peers concurrently, so setting and
 *      clearing bits there must be atomic read-modify-write operations on one byte.
 *
 * With XENPV_DEBUG defined (``XENPV_DEBUG_BUILD=1 pip install -e .``) XENPV_DEBUG_ENABLED
 * is 1 and the Cython code runs its expensive invariant checks.
 */
#ifndef XENPV_BARRIER_H
#define XENPV_BARRIER_H

#include <stdint.h>
#include <time.h>

#ifdef XENPV_DEBUG
#define XENPV_DEBUG_ENABLED 1
#else
#define XENPV_DEBUG_ENABLED 0
#endif

/* Stops the compiler from moving memory accesses across this point; emits no instruction. */
static inline void xenpv_compiler_barrier(void)
{
    __asm__ __volatile__("" ::: "memory");
}

#if defined(__x86_64__) || defined(__i386__)
/*
 * x86 is TSO: loads are not reordered with older loads and stores are not reordered with
 * older stores, so read and write barriers only have to stop the compiler.
 */
static inline void xenpv_rmb(void) { xenpv_compiler_barrier(); }
static inline void xenpv_wmb(void) { xenpv_compiler_barrier(); }
#else
/*
 * Weakly ordered CPUs (Arm): an acquire fence orders earlier loads before later accesses
 * (read barrier); a release fence orders earlier accesses before later stores (write barrier).
 */
static inline void xenpv_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void xenpv_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
#endif

/*
 * Full barrier: orders earlier stores before later loads too.  Needed between publishing an
 * index and reading the peer's event field (or re-checking the ring after re-arming), where
 * a missed ordering means a missed wake-up and a hung device.  Emits mfence/lock-op on x86.
 */
static inline void xenpv_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/*
 * Inside a busy-wait on a shared index: tells the CPU we are spinning (x86 `pause` saves
 * power and avoids a memory-order mis-speculation penalty when the peer's store arrives).
 */
static inline void xenpv_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    xenpv_compiler_barrier();
#endif
}

/* Monotonic nanoseconds, for bounded busy-waits. */
static inline long long xenpv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One aligned 32-bit load of a shared index; volatile so it is re-done on every call. */
static inline uint32_t xenpv_load_u32(const void *p)
{
    return *(const volatile uint32_t *)p;
}

/* One aligned 32-bit store of a shared index: the peer never sees a torn or zeroed value. */
static inline void xenpv_store_u32(void *p, uint32_t v)
{
    *(volatile uint32_t *)p = v;
}

/* One volatile byte load (vchan live/notify bytes). */
static inline uint8_t xenpv_load_u8(const void *p)
{
    return *(const volatile uint8_t *)p;
}

/* Atomically OR bits into a shared byte (vchan request_notify); returns the old value. */
static inline uint8_t xenpv_atomic_or8(void *p, uint8_t bits)
{
    return __atomic_fetch_or((uint8_t *)p, bits, __ATOMIC_SEQ_CST);
}

/*
 * Atomically clear bits in a shared byte and return its old value (vchan send_notify: the
 * caller signals the peer if any of the bits were set).  A plain load/and/store could lose a
 * bit the peer set in between and stall it forever.
 */
static inline uint8_t xenpv_atomic_fetch_and_clear8(void *p, uint8_t bits)
{
    return __atomic_fetch_and((uint8_t *)p, (uint8_t)~bits, __ATOMIC_SEQ_CST);
}

#endif /* XENPV_BARRIER_H */

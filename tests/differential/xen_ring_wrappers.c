/*
 * A ring driven by Xen's own io/ring.h macros, for the differential tests.
 *
 * Each supported slot size S gets a ring type (DEFINE_RING_TYPES over an S-byte opaque
 * entry) and a set of small functions that do one xenpv ring operation with the macros.
 * A handle (struct xr) remembers the slot size and points at the macro's front or back ring
 * structure; the exported xr_* functions dispatch on the slot size.
 *
 * xenpv validates every peer index before use; the same checks are spelled here with the
 * macros (RING_REQUEST_PROD_OVERFLOW / RING_RESPONSE_PROD_OVERFLOW) plus xenpv's two
 * tightenings (req_prod may not fall behind consumed requests; no more responses than
 * requests outstanding).  A failed check returns -1.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* tools interface: ring.h then leaves xen_mb/xen_rmb/xen_wmb to us */
#define __XEN_TOOLS__
#define xen_mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/ring.h>

#define XR_SIZES(X) X(4) X(8) X(12) X(16) X(64) X(112)

struct xr {
    int slot;
    int front;
    void *ring;
};

#define XR_IMPL(S)                                                                          \
struct xr_entry##S { uint8_t b[S]; };                                                       \
DEFINE_RING_TYPES(xr##S, struct xr_entry##S, struct xr_entry##S);                           \
typedef struct xr##S##_front_ring F##S;                                                     \
typedef struct xr##S##_back_ring B##S;                                                      \
                                                                                            \
static void *front_new##S(void *page, unsigned bytes, int init, RING_IDX start)            \
{                                                                                           \
    F##S *r = calloc(1, sizeof(*r));                                                        \
    struct xr##S##_sring *s = page;                                                         \
    if (init) {                                                                             \
        SHARED_RING_INIT(s);                                                                \
        s->req_prod = s->rsp_prod = start;                                                  \
        s->req_event = s->rsp_event = start + 1;                                            \
    }                                                                                       \
    FRONT_RING_ATTACH(r, s, start, bytes);                                                  \
    return r;                                                                               \
}                                                                                           \
                                                                                            \
static void *back_new##S(void *page, unsigned bytes, RING_IDX start)                       \
{                                                                                           \
    B##S *r = calloc(1, sizeof(*r));                                                        \
    BACK_RING_ATTACH(r, (struct xr##S##_sring *)page, start, bytes);                        \
    return r;                                                                               \
}                                                                                           \
                                                                                            \
static long long front_avail##S(F##S *r)                                                    \
{                                                                                           \
    RING_IDX prod = r->sring->rsp_prod;                                                     \
    if (RING_RESPONSE_PROD_OVERFLOW(r, prod) ||                                             \
        (RING_IDX)(prod - r->rsp_cons) > (RING_IDX)(r->req_prod_pvt - r->rsp_cons))         \
        return -1;                                                                          \
    xen_rmb();                                                                              \
    return RING_HAS_UNCONSUMED_RESPONSES(r);                                                \
}                                                                                           \
                                                                                            \
static long long back_avail##S(B##S *r)                                                     \
{                                                                                           \
    RING_IDX prod = r->sring->req_prod;                                                     \
    if (RING_REQUEST_PROD_OVERFLOW(r, prod) ||                                              \
        (RING_IDX)(prod - r->rsp_prod_pvt) < (RING_IDX)(r->req_cons - r->rsp_prod_pvt))     \
        return -1;                                                                          \
    xen_rmb();                                                                              \
    return RING_HAS_UNCONSUMED_REQUESTS(r);                                                 \
}                                                                                           \
                                                                                            \
static long long front_op##S(F##S *r, int op, uint8_t *buf, long long n)                    \
{                                                                                           \
    long long i, avail;                                                                     \
    int flag;                                                                               \
    switch (op) {                                                                           \
    case 0: /* free requests */                                                             \
        return RING_FREE_REQUESTS(r);                                                       \
    case 1: /* put up to n requests */                                                      \
        for (i = 0; i < n && !RING_FULL(r); i++) {                                          \
            memcpy(RING_GET_REQUEST(r, r->req_prod_pvt), buf + i * S, S);                   \
            r->req_prod_pvt++;                                                              \
        }                                                                                   \
        return i;                                                                           \
    case 2: /* plain push */                                                                \
        RING_PUSH_REQUESTS(r);                                                              \
        return 0;                                                                           \
    case 3: /* push and check notify */                                                     \
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(r, flag);                                       \
        return flag;                                                                        \
    case 4: /* unconsumed responses */                                                      \
        return front_avail##S(r);                                                           \
    case 5: /* take up to n responses */                                                    \
        avail = front_avail##S(r);                                                          \
        if (avail < 0)                                                                      \
            return -1;                                                                      \
        for (i = 0; i < n && i < avail; i++) {                                              \
            RING_COPY_RESPONSE(r, r->rsp_cons, (struct xr_entry##S *)(buf + i * S));        \
            r->rsp_cons++;                                                                  \
        }                                                                                   \
        return i;                                                                           \
    case 6: /* final check */                                                               \
        if (front_avail##S(r) < 0)                                                          \
            return -1;                                                                      \
        RING_FINAL_CHECK_FOR_RESPONSES(r, flag);                                            \
        if (front_avail##S(r) < 0)                                                          \
            return -1;                                                                      \
        return flag != 0;                                                                   \
    case 7: /* private indexes */                                                           \
        return ((long long)r->req_prod_pvt << 32) | r->rsp_cons;                            \
    case 8:                                                                                 \
        return RING_SIZE(r);                                                                \
    }                                                                                       \
    return -9;                                                                              \
}                                                                                           \
                                                                                            \
static long long back_op##S(B##S *r, int op, uint8_t *buf, long long n)                     \
{                                                                                           \
    long long i;                                                                            \
    RING_IDX rc, rp;                                                                        \
    int flag;                                                                               \
    switch (op) {                                                                           \
    case 4: /* unconsumed requests */                                                       \
        return back_avail##S(r);                                                            \
    case 5: /* take up to n requests, blkback-style loop */                                 \
        rp = r->sring->req_prod;                                                            \
        if (RING_REQUEST_PROD_OVERFLOW(r, rp) ||                                            \
            (RING_IDX)(rp - r->rsp_prod_pvt) < (RING_IDX)(r->req_cons - r->rsp_prod_pvt))   \
            return -1;                                                                      \
        xen_rmb();                                                                          \
        rc = r->req_cons;                                                                   \
        for (i = 0; rc != rp && i < n; i++) {                                               \
            if (RING_REQUEST_CONS_OVERFLOW(r, rc))                                          \
                break;                                                                      \
            RING_COPY_REQUEST(r, rc, (struct xr_entry##S *)(buf + i * S));                  \
            r->req_cons = ++rc;                                                             \
        }                                                                                   \
        return i;                                                                           \
    case 6: /* final check */                                                               \
        if (back_avail##S(r) < 0)                                                           \
            return -1;                                                                      \
        RING_FINAL_CHECK_FOR_REQUESTS(r, flag);                                             \
        if (back_avail##S(r) < 0)                                                           \
            return -1;                                                                      \
        return flag != 0;                                                                   \
    case 1: /* put n responses (the caller keeps n <= consumed - answered) */               \
        for (i = 0; i < n; i++) {                                                           \
            memcpy(RING_GET_RESPONSE(r, r->rsp_prod_pvt), buf + i * S, S);                  \
            r->rsp_prod_pvt++;                                                              \
        }                                                                                   \
        return i;                                                                           \
    case 2:                                                                                 \
        RING_PUSH_RESPONSES(r);                                                             \
        return 0;                                                                           \
    case 3:                                                                                 \
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(r, flag);                                      \
        return flag;                                                                        \
    case 7:                                                                                 \
        return ((long long)r->req_cons << 32) | r->rsp_prod_pvt;                            \
    case 8:                                                                                 \
        return RING_SIZE(r);                                                                \
    }                                                                                       \
    return -9;                                                                              \
}

XR_SIZES(XR_IMPL)

struct xr *xr_new(int slot, int front, void *page, unsigned bytes, int init, uint32_t start)
{
    struct xr *h = calloc(1, sizeof(*h));
    h->slot = slot;
    h->front = front;
#define XR_NEW(S)                                                                           \
    if (slot == S)                                                                          \
        h->ring = front ? front_new##S(page, bytes, init, start) : back_new##S(page, bytes, start);
    XR_SIZES(XR_NEW)
    if (!h->ring) {
        free(h);
        return NULL;
    }
    return h;
}

void xr_free(struct xr *h)
{
    free(h->ring);
    free(h);
}

long long xr_op(struct xr *h, int op, uint8_t *buf, long long n)
{
#define XR_OP(S)                                                                            \
    if (h->slot == S)                                                                       \
        return h->front ? front_op##S(h->ring, op, buf, n) : back_op##S(h->ring, op, buf, n);
    XR_SIZES(XR_OP)
    return -9;
}

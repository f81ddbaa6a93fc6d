/*
 * Benchmark anchor: a blkif-sized ring driven by Xen's io/ring.h macros, whole loop in C.
 *
 * One process plays both ends.  Each round the frontend queues a batch of requests and
 * pushes them (notify check), the backend copies the requests out (RING_COPY_REQUEST),
 * queues one response per request and pushes them, and the frontend copies the responses
 * out.  A side that finds its ring empty does the final check (re-arm) as a real driver
 * would.  Entries are whole slots, copied once each way: the same work xenpv's batch calls do.
 */
#include <stdint.h>
#include <string.h>

/* tools interface: ring.h then leaves xen_mb/xen_rmb/xen_wmb to us */
#define __XEN_TOOLS__
#define xen_mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/ring.h>

#define ENTRY 112

struct bench_entry { uint8_t b[ENTRY]; };
DEFINE_RING_TYPES(bench, struct bench_entry, struct bench_entry);

/* Runs `rounds` rounds of `batch` requests on the ring in `page`; returns requests completed
 * and adds the notifications each side would have sent to *notifies. */
long long bench_ring_macros(void *page, unsigned bytes, long long rounds, int batch,
                            long long *notifies)
{
    struct bench_sring *s = page;
    struct bench_front_ring front;
    struct bench_back_ring back;
    struct bench_entry reqs[64], got[64], rsps[64];
    long long done = 0, r;
    int i, n, notify, more;

    if (batch > 64)
        batch = 64;
    memset(reqs, 0x5a, sizeof(reqs));
    memset(rsps, 0xa5, sizeof(rsps));
    SHARED_RING_INIT(s);
    FRONT_RING_INIT(&front, s, bytes);
    BACK_RING_INIT(&back, s, bytes);

    for (r = 0; r < rounds; r++) {
        /* frontend: queue and push a batch */
        n = (int)RING_FREE_REQUESTS(&front);
        if (n > batch)
            n = batch;
        for (i = 0; i < n; i++)
            memcpy(RING_GET_REQUEST(&front, front.req_prod_pvt + i), &reqs[i], ENTRY);
        front.req_prod_pvt += n;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
        *notifies += notify;

        /* backend: copy requests out once, answer each, push */
        n = 0;
        for (;;) {
            RING_IDX rp = back.sring->req_prod, rc = back.req_cons;
            if (RING_REQUEST_PROD_OVERFLOW(&back, rp))
                return -1;
            xen_rmb();
            while (rc != rp && n < batch && !RING_REQUEST_CONS_OVERFLOW(&back, rc)) {
                RING_COPY_REQUEST(&back, rc, &got[n]);
                back.req_cons = ++rc;
                n++;
            }
            if (n)
                break;
            RING_FINAL_CHECK_FOR_REQUESTS(&back, more);
            if (!more)
                break;
        }
        for (i = 0; i < n; i++)
            memcpy(RING_GET_RESPONSE(&back, back.rsp_prod_pvt + i), &rsps[i], ENTRY);
        back.rsp_prod_pvt += n;
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
        *notifies += notify;

        /* frontend: copy responses out once */
        n = 0;
        for (;;) {
            RING_IDX rp = front.sring->rsp_prod;
            if (RING_RESPONSE_PROD_OVERFLOW(&front, rp))
                return -1;
            xen_rmb();
            while (front.rsp_cons != rp && n < batch) {
                RING_COPY_RESPONSE(&front, front.rsp_cons, &got[n]);
                front.rsp_cons++;
                n++;
            }
            if (n)
                break;
            RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
            if (!more)
                break;
        }
        done += n;
    }
    return done;
}

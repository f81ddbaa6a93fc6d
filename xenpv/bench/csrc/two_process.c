/*
 * Benchmark anchor: frontend and backend in two processes over a shared memfd, woken by
 * eventfds under the ring's event-index protocol, driven by Xen's io/ring.h macros.
 *
 *   two_process SECONDS SPIN_US BATCH [FRONT_CPU BACK_CPU]
 *
 * With the CPU numbers the frontend (parent) and backend (child) are pinned there, so the
 * placement is known (different vCPUs: every sleep costs a cross-CPU wake-up).
 * The frontend keeps up to BATCH requests in flight; the backend answers every request it
 * copies out.  A side that finds nothing to do polls the ring for up to SPIN_US microseconds,
 * then does the final check (re-arm) and sleeps in read(eventfd).  A push notifies the peer
 * only when the macros say the peer asked for it.  Prints one line:
 *   completed front_notifies back_notifies front_sleeps back_sleeps elapsed_ns
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* tools interface: ring.h then leaves xen_mb/xen_rmb/xen_wmb to us */
#define __XEN_TOOLS__
#define xen_mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/ring.h>

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

#define ENTRY 112
#define PAGE 4096

struct bench_entry { uint8_t b[ENTRY]; };
DEFINE_RING_TYPES(bench, struct bench_entry, struct bench_entry);

struct control {          /* second page of the memfd */
    volatile uint32_t stop;
    volatile long long back_notifies, back_sleeps;
};

static void pin(int cpu)
{
    cpu_set_t set;
    if (cpu < 0)
        return;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);  /* best effort */
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void kick(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) != sizeof(one))
        exit(3);
}

static void sleep_on(int fd)
{
    uint64_t v;
    if (read(fd, &v, sizeof(v)) != sizeof(v))
        exit(3);
}

static void backend(struct bench_sring *s, struct control *c, int wake_me, int wake_peer,
                    long long spin_ns, int batch)
{
    struct bench_back_ring back;
    struct bench_entry got[64], rsp;
    int n, notify, more;

    memset(&rsp, 0xa5, sizeof(rsp));
    BACK_RING_INIT(&back, s, PAGE);
    while (!c->stop) {
        RING_IDX rp = back.sring->req_prod, rc = back.req_cons;
        if (RING_REQUEST_PROD_OVERFLOW(&back, rp))
            exit(4);
        xen_rmb();
        n = 0;
        while (rc != rp && n < batch && !RING_REQUEST_CONS_OVERFLOW(&back, rc)) {
            RING_COPY_REQUEST(&back, rc, &got[n]);
            back.req_cons = ++rc;
            n++;
        }
        if (n == 0) {
            long long until = now_ns() + spin_ns;
            while (spin_ns && !RING_HAS_UNCONSUMED_REQUESTS(&back) && !c->stop &&
                   now_ns() < until)
                cpu_relax();
            RING_FINAL_CHECK_FOR_REQUESTS(&back, more);
            if (!more && !c->stop) {
                c->back_sleeps++;
                sleep_on(wake_me);
            }
            continue;
        }
        for (int i = 0; i < n; i++) {
            memcpy(RING_GET_RESPONSE(&back, back.rsp_prod_pvt), &rsp, ENTRY);
            back.rsp_prod_pvt++;
        }
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
        if (notify) {
            c->back_notifies++;
            kick(wake_peer);
        }
    }
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    long long spin_ns = (argc > 2 ? atoll(argv[2]) : 50) * 1000;
    int batch = argc > 3 ? atoi(argv[3]) : 32;
    int front_cpu = argc > 5 ? atoi(argv[4]) : -1, back_cpu = argc > 5 ? atoi(argv[5]) : -1;
    int mfd = memfd_create("xenpv-bench-ring", 0);
    int to_back = eventfd(0, 0), to_front = eventfd(0, 0);
    long long done = 0, front_notifies = 0, front_sleeps = 0, start, deadline, end;
    struct bench_entry req, got[64];
    struct bench_front_ring front;
    struct bench_sring *s;
    struct control *c;
    pid_t child;
    int notify, more, n;

    if (batch > 64)
        batch = 64;
    if (mfd < 0 || to_back < 0 || to_front < 0 || ftruncate(mfd, 2 * PAGE) < 0)
        return 2;
    s = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (s == MAP_FAILED)
        return 2;
    c = (struct control *)((char *)s + PAGE);
    SHARED_RING_INIT(s);
    FRONT_RING_INIT(&front, s, PAGE);

    child = fork();
    if (child < 0)
        return 2;
    if (child == 0) {
        pin(back_cpu);
        backend(s, c, to_back, to_front, spin_ns, batch);
        _exit(0);
    }

    pin(front_cpu);
    memset(&req, 0x5a, sizeof(req));
    start = now_ns();
    deadline = start + (long long)(seconds * 1e9);
    while (now_ns() < deadline) {
        n = (int)RING_FREE_REQUESTS(&front);
        if (n > batch)
            n = batch;
        if (n) {
            for (int i = 0; i < n; i++) {
                memcpy(RING_GET_REQUEST(&front, front.req_prod_pvt), &req, ENTRY);
                front.req_prod_pvt++;
            }
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
            if (notify) {
                front_notifies++;
                kick(to_back);
            }
        }
        RING_IDX rp = front.sring->rsp_prod;
        if (RING_RESPONSE_PROD_OVERFLOW(&front, rp))
            return 4;
        xen_rmb();
        n = 0;
        while (front.rsp_cons != rp && n < batch) {
            RING_COPY_RESPONSE(&front, front.rsp_cons, &got[n]);
            front.rsp_cons++;
            n++;
        }
        done += n;
        if (n == 0 && RING_FREE_REQUESTS(&front) == 0) {
            long long until = now_ns() + spin_ns;
            while (spin_ns && !RING_HAS_UNCONSUMED_RESPONSES(&front) && now_ns() < until)
                cpu_relax();
            RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
            if (!more) {
                front_sleeps++;
                sleep_on(to_front);
            }
        }
    }
    end = now_ns();
    c->stop = 1;
    xen_mb();
    kick(to_back);
    waitpid(child, NULL, 0);
    printf("%lld %lld %lld %lld %lld %lld\n", done, front_notifies, c->back_notifies,
           front_sleeps, c->back_sleeps, end - start);
    return 0;
}

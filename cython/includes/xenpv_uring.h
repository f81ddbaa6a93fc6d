/* A minimal io_uring submission/completion core on the raw system calls.
 *
 * Only what the block backend needs: READ/WRITE (one buffer) and READV/WRITEV (several),
 * submitted in batches with one io_uring_enter, completions reaped from the shared CQ
 * ring, an eventfd signalled for completions that did not finish during submission.
 * Written against the kernel's UAPI header only (linux/io_uring.h), so nothing but a C
 * compiler and the kernel headers is needed to build it.
 *
 * Ring memory ordering follows the io_uring ABI: the kernel reads the SQ tail with acquire
 * semantics, so the SQ array and entries are written before the tail is released; the CQ
 * tail is loaded with acquire before the entries are read, and the head is released after.
 */
#ifndef XENPV_URING_H
#define XENPV_URING_H

#include <errno.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define XU_IOV_POOL 4096

typedef struct xu_ring {
    int fd;
    unsigned features;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_entries, *sq_flags, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask, *cq_flags; /* cq_flags: NULL before 5.8 */
    struct io_uring_cqe *cqes;
    struct io_uring_sqe *sqes;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
    unsigned local_tail; /* SQEs prepared (published at flush) */
    struct iovec *iovs;  /* iovec arrays of prepared, not yet submitted SQEs */
    unsigned iov_used;
} xu_ring;

static inline unsigned xu_load_acquire(const unsigned *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void xu_store_release(unsigned *p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline int xu_enter(int fd, unsigned submit, unsigned min_complete, unsigned flags)
{
    long r = syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, NULL, 0);
    return r < 0 ? -errno : (int)r;
}

/* Every feature the engine relies on: one mmap for both rings, no dropped completions,
 * iovecs consumed during submission, IORING_OP_READ/WRITE (5.6+). */
#define XU_NEEDED_FEATURES (IORING_FEAT_SINGLE_MMAP | IORING_FEAT_NODROP | \
                            IORING_FEAT_SUBMIT_STABLE | IORING_FEAT_RW_CUR_POS)

static void xu_unmap(xu_ring *r)
{
    if (r->sqes && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_len);
    if (r->sq_map && r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_map_len);
    r->sqes = NULL;
    r->sq_map = r->cq_map = NULL;
    free(r->iovs);
    r->iovs = NULL;
}

/* Set up a ring of `entries` SQEs and `cq_entries` CQEs; 0 or -errno.  -ENOTSUP: the
 * kernel lacks a needed feature. */
static int xu_setup(xu_ring *r, unsigned entries, unsigned cq_entries, unsigned extra_flags)
{
    struct io_uring_params p;
    memset(r, 0, sizeof(*r));
    r->fd = -1;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_CQSIZE | extra_flags;
    p.cq_entries = cq_entries;
    long fd = syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0)
        return -errno;
    r->fd = (int)fd;
    r->features = p.features;
    if ((p.features & XU_NEEDED_FEATURES) != XU_NEEDED_FEATURES) {
        close(r->fd);
        r->fd = -1;
        return -ENOTSUP;
    }
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    r->sq_map_len = sq_len > cq_len ? sq_len : cq_len;
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED) goto fail;
    r->cq_map = r->sq_map;
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) goto fail;
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_entries = (unsigned *)(sq + p.sq_off.ring_entries);
    r->sq_flags = (unsigned *)(sq + p.sq_off.flags);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cq_flags = p.cq_off.flags ? (unsigned *)(cq + p.cq_off.flags) : NULL;
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->local_tail = *r->sq_tail;
    r->iovs = calloc(XU_IOV_POOL, sizeof(struct iovec));
    if (!r->iovs) { errno = ENOMEM; goto fail; }
    return 0;
fail: {
        int err = errno;
        xu_unmap(r);
        close(r->fd);
        r->fd = -1;
        return -err;
    }
}

static void xu_close(xu_ring *r)
{
    if (r->fd < 0) return;
    xu_unmap(r);
    close(r->fd);
    r->fd = -1;
}

/* SQEs prepared or published and not yet taken by the kernel. */
static inline unsigned xu_unsubmitted(const xu_ring *r)
{
    return r->local_tail - xu_load_acquire(r->sq_head);
}

/* Publish the prepared SQEs and submit them; the number the kernel took, or -errno. */
static int xu_submit(xu_ring *r, unsigned wait_nr)
{
    xu_store_release(r->sq_tail, r->local_tail);
    unsigned todo = xu_unsubmitted(r);
    unsigned flags = wait_nr ? IORING_ENTER_GETEVENTS : 0;
    if (!todo && !wait_nr) {
        if (*(volatile unsigned *)r->sq_flags & IORING_SQ_CQ_OVERFLOW)
            return xu_enter(r->fd, 0, 0, IORING_ENTER_GETEVENTS);
        return 0;
    }
    int n = xu_enter(r->fd, todo, wait_nr, flags);
    if (xu_unsubmitted(r) == 0)
        r->iov_used = 0; /* every iovec array was consumed (IORING_FEAT_SUBMIT_STABLE) */
    return n;
}

/* A free SQE (submitting what is prepared first if the SQ or the iovec pool is full), or
 * NULL if the kernel takes nothing (completion backlog). */
static struct io_uring_sqe *xu_get_sqe(xu_ring *r, unsigned iovs_needed)
{
    unsigned entries = *r->sq_entries;
    if (xu_unsubmitted(r) >= entries || r->iov_used + iovs_needed > XU_IOV_POOL) {
        xu_submit(r, 0);
        if (xu_unsubmitted(r) >= entries || r->iov_used + iovs_needed > XU_IOV_POOL)
            return NULL;
    }
    unsigned idx = r->local_tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof(*sqe));
    r->sq_array[idx] = idx;
    r->local_tail++;
    return sqe;
}

/* Prepare a read (write=0) or write of `n` buffers at `offset`; 0, or -EBUSY when no SQE
 * can be had now, or -E2BIG for more buffers than the pool holds. */
static int xu_prep_rw(xu_ring *r, int write, int fd, void *const *bufs, const size_t *lens,
                      unsigned n, uint64_t offset, uint64_t user_data)
{
    if (n == 0 || n > XU_IOV_POOL) return -E2BIG;
    struct io_uring_sqe *sqe = xu_get_sqe(r, n > 1 ? n : 0);
    if (!sqe) return -EBUSY;
    sqe->fd = fd;
    sqe->off = offset;
    sqe->user_data = user_data;
    if (n == 1) {
        sqe->opcode = write ? IORING_OP_WRITE : IORING_OP_READ;
        sqe->addr = (uint64_t)(uintptr_t)bufs[0];
        sqe->len = (uint32_t)lens[0];
    } else {
        struct iovec *iov = &r->iovs[r->iov_used];
        for (unsigned i = 0; i < n; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = lens[i];
        }
        r->iov_used += n;
        sqe->opcode = write ? IORING_OP_WRITEV : IORING_OP_READV;
        sqe->addr = (uint64_t)(uintptr_t)iov;
        sqe->len = n;
    }
    return 0;
}

/* Copy up to `max` completions out (user_data, res); how many. */
static unsigned xu_reap(xu_ring *r, uint64_t *user_data, int32_t *res, unsigned max)
{
    unsigned head = *r->cq_head, got = 0;
    unsigned tail = xu_load_acquire(r->cq_tail);
    unsigned mask = *r->cq_mask;
    while (head != tail && got < max) {
        struct io_uring_cqe *c = &r->cqes[head & mask];
        user_data[got] = c->user_data;
        res[got] = c->res;
        got++;
        head++;
    }
    xu_store_release(r->cq_head, head);
    return got;
}

/* Stop (0) or resume (1) eventfd signals; 0, or -ENOTSUP if the kernel cannot. */
static int xu_eventfd_enable(xu_ring *r, int on)
{
    if (!r->cq_flags) return -ENOTSUP;
    unsigned f = *r->cq_flags;
    f = on ? (f & ~IORING_CQ_EVENTFD_DISABLED) : (f | IORING_CQ_EVENTFD_DISABLED);
    xu_store_release(r->cq_flags, f);
    return 0;
}

static int xu_register_eventfd(xu_ring *r, int efd, int async_only)
{
    long rc = syscall(__NR_io_uring_register, r->fd,
                      async_only ? IORING_REGISTER_EVENTFD_ASYNC : IORING_REGISTER_EVENTFD,
                      &efd, 1);
    return rc < 0 ? -errno : 0;
}

#endif

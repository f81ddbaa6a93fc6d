/*
 * libxenforeignmemory.so.1 for the loopback emulator: dom0 maps guest frames of other
 * domains (what /dev/xen/privcmd's MMAPBATCH_V2 gives Xen's library).
 *
 * Theory of operation
 * -------------------
 * Every emulated domain has a guest-frame namespace: pages it allocated with FRAME_ALLOC
 * (docs/loopback-protocol.md §4.2b), named by gfns.  xenforeignmemory_map2 reserves the
 * whole range as one PROT_NONE region (at addr, with MAP_FIXED if asked), then asks the
 * daemon to map the frames with FOREIGN_MAP and places the pages it sends over the
 * reservation (lb_place_pages, as libxengnttab does for grants), so the caller sees
 * `pages` contiguous pages in the order of arr[].  prot is honoured: without PROT_WRITE
 * the mapping is read-only and the daemon sends read-only descriptors.
 *
 * FOREIGN_MAP is all or nothing and names the first frame that failed; Xen's library
 * instead reports one error per frame in err[] and still returns the mapping.  So a
 * failed frame is recorded (err[i] = -errno, its page stays PROT_NONE, as an unmapped
 * privcmd page stays unusable), the frames before it are mapped as one request and the
 * walk continues after it: at most three requests per bad frame, bounded work.  With
 * err == NULL any failed frame fails the whole call (errno from that frame), as in Xen.
 * Errors about the domain or the caller (ESRCH, EPERM, ENOSPC) fail the whole call.
 *
 * One mapping may own several daemon handles (chunks of at most 1024 frames, smaller
 * when a chunk would need more than 250 descriptors).  xenforeignmemory_unmap munmaps
 * and releases them; a record whose memory the caller munmapped directly is found stale
 * when the kernel hands its range out again (its handles are released then), and closing
 * the handle releases what is left; the memory itself stays mapped until unmapped.
 *
 * Resource mappings (map_resource: ioreq pages, grant-table frames) have no emulation:
 * they fail with EOPNOTSUPP, which QEMU takes as "use the older interfaces".
 */
#define _GNU_SOURCE
#include "xenpv_shim.h"
#include "xenpv_xentypes.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* grant_table.h: GNTST_bad_page, what FOREIGN_MAP reports for a frame it cannot map. */
#define GNTST_bad_page (-9)
/* Largest FOREIGN_MAP reply: handle, count, nfds, then (fd_index, page) per frame. */
#define FMAP_REPLY_MAX (12 + 8 * LB_MAX_REFS)

struct fmem_region {
    struct fmem_region *next;
    unsigned char *addr;
    size_t pages;
    size_t nhandles;
    uint32_t handles[]; /* daemon handles, one per chunk */
};

struct xenforeignmemory_handle {
    struct lb_conn *conn;
    pthread_mutex_t lock; /* protects regions */
    struct fmem_region *regions;
    uint32_t restricted; /* domain the handle is restricted to, or UINT32_MAX */
};

XENPV_EXPORT xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger,
                                                            unsigned open_flags);
XENPV_EXPORT int xenforeignmemory_close(xenforeignmemory_handle *fmem);
XENPV_EXPORT void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot,
                                        size_t pages, const xen_pfn_t arr[], int err[]);
XENPV_EXPORT void *xenforeignmemory_map2(xenforeignmemory_handle *fmem, uint32_t dom,
                                         void *addr, int prot, int flags, size_t pages,
                                         const xen_pfn_t arr[], int err[]);
XENPV_EXPORT int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr,
                                        size_t pages);
XENPV_EXPORT int xenforeignmemory_restrict(xenforeignmemory_handle *fmem, domid_t domid);
XENPV_EXPORT xenforeignmemory_resource_handle *xenforeignmemory_map_resource(
    xenforeignmemory_handle *fmem, domid_t domid, unsigned int type, unsigned int id,
    unsigned long frame, unsigned long nr_frames, void **paddr, int prot, int flags);
XENPV_EXPORT int xenforeignmemory_unmap_resource(xenforeignmemory_handle *fmem,
                                                 xenforeignmemory_resource_handle *fres);
XENPV_EXPORT int xenforeignmemory_resource_size(xenforeignmemory_handle *fmem, domid_t domid,
                                                unsigned int type, unsigned int id,
                                                size_t *size);

/* ------------------------------------------------------------------ records */

static void release_handles(xenforeignmemory_handle *fmem, const uint32_t *handles, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char req[4];
        lb_put32(req, handles[i]);
        if (lb_call_simple(fmem->conn, LB_GNT_UNMAP, req, sizeof(req), NULL, 0, NULL) < 0)
            lb_debug("GNT_UNMAP %u: %s", handles[i], strerror(errno));
    }
}

/* Unlink the records overlapping [addr, addr + pages) (exact: only one starting at addr
 * with that many pages or fewer) and return them as a list. */
static struct fmem_region *take_regions(xenforeignmemory_handle *fmem, const void *addr,
                                        size_t pages, int exact)
{
    const unsigned char *lo = addr, *hi = lo + pages * XEN_PAGE_SIZE;
    struct fmem_region *taken = NULL;
    pthread_mutex_lock(&fmem->lock);
    for (struct fmem_region **pp = &fmem->regions; *pp;) {
        struct fmem_region *r = *pp;
        const unsigned char *rhi = r->addr + r->pages * XEN_PAGE_SIZE;
        int hit = exact ? (r->addr == lo && r->pages <= pages) : (r->addr < hi && lo < rhi);
        if (hit) {
            *pp = r->next;
            r->next = taken;
            taken = r;
        } else {
            pp = &r->next;
        }
    }
    pthread_mutex_unlock(&fmem->lock);
    return taken;
}

static void free_regions(xenforeignmemory_handle *fmem, struct fmem_region *r)
{
    while (r) {
        struct fmem_region *next = r->next;
        release_handles(fmem, r->handles, r->nhandles);
        free(r);
        r = next;
    }
}

/* ------------------------------------------------------------------ handles */

xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger,
                                               unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    xenforeignmemory_handle *fmem = calloc(1, sizeof(*fmem));
    if (!fmem)
        return NULL;
    fmem->conn = lb_connect(-1);
    if (!fmem->conn) {
        int err = errno;
        free(fmem);
        errno = err;
        return NULL;
    }
    fmem->restricted = UINT32_MAX;
    pthread_mutex_init(&fmem->lock, NULL);
    return fmem;
}

int xenforeignmemory_close(xenforeignmemory_handle *fmem)
{
    if (!fmem)
        return 0;
    /* As closing privcmd: the daemon lets go, the caller's memory stays mapped. */
    free_regions(fmem, fmem->regions);
    lb_disconnect(fmem->conn);
    pthread_mutex_destroy(&fmem->lock);
    free(fmem);
    return 0;
}

int xenforeignmemory_restrict(xenforeignmemory_handle *fmem, domid_t domid)
{
    fmem->restricted = domid; /* privcmd RESTRICT: from now on only this domain */
    return 0;
}

/* ------------------------------------------------------------------ mapping */

/* FOREIGN_MAP n frames of dom at dst and record the daemon handle in r.  0, or -1 with
 * errno; *bad is the index of the frame the daemon refused with GNTST_bad_page, or -1. */
static int map_frames(xenforeignmemory_handle *fmem, struct fmem_region *r, unsigned char *dst,
                      uint32_t dom, const xen_pfn_t *arr, uint32_t n, int prot, long *bad)
{
    unsigned char hdr[12];
    unsigned char *gfns = malloc((size_t)n * 4);
    unsigned char *rbuf = malloc(FMAP_REPLY_MAX);
    int rc = -1, err = ENOMEM;
    *bad = -1;
    if (!gfns || !rbuf)
        goto out;
    lb_put32(hdr, dom);
    lb_put32(hdr + 4, (prot & PROT_WRITE) ? LB_GNT_WRITABLE : 0);
    lb_put32(hdr + 8, n);
    for (uint32_t i = 0; i < n; i++) {
        if (arr[i] > UINT32_MAX) { /* beyond the emulator's frame numbers */
            *bad = i;
            err = EINVAL;
            goto out;
        }
        lb_put32(gfns + 4 * i, (uint32_t)arr[i]);
    }
    struct lb_reply rep = {.payload = rbuf, .cap = FMAP_REPLY_MAX};
    if (lb_call(fmem->conn, LB_FOREIGN_MAP, hdr, sizeof(hdr), gfns, (size_t)n * 4, &rep) < 0) {
        err = errno;
        goto out;
    }
    if (rep.status < 0) {
        err = -rep.status;
        /* docs/loopback-protocol.md §4.2b: payload <Ii (index, GNTST_bad_page) */
        if (rep.len >= 8 && (int32_t)lb_get32(rbuf + 4) == GNTST_bad_page &&
            lb_get32(rbuf) < n)
            *bad = lb_get32(rbuf);
        goto out;
    }
    err = EPROTO;
    if (rep.len != 12 + (size_t)n * 8 || lb_get32(rbuf + 4) != n ||
        lb_get32(rbuf + 8) != (uint32_t)rep.nfds) {
        if (rep.len >= 4) /* the mapping exists on the daemon side: drop it */
            release_handles(fmem, (uint32_t[]){lb_get32(rbuf)}, 1);
        lb_close_fds(&rep);
        goto out;
    }
    r->handles[r->nhandles++] = lb_get32(rbuf);
    rc = lb_place_pages(dst, rbuf + 12, n, &rep, prot);
    err = errno;
    lb_close_fds(&rep);
out:
    free(gfns);
    free(rbuf);
    if (rc < 0)
        errno = err;
    return rc;
}

/* Map every frame it can; returns 0 or -1 with errno (nothing stays mapped then). */
static int map_all(xenforeignmemory_handle *fmem, struct fmem_region *r, uint32_t dom,
                   int prot, const xen_pfn_t arr[], int err[])
{
    size_t chunk = LB_MAX_REFS, limit = SIZE_MAX;
    for (size_t i = 0; i < r->pages;) {
        size_t n = r->pages - i;
        n = n < chunk ? n : chunk;
        n = n < limit ? n : limit;
        long bad;
        limit = SIZE_MAX;
        if (map_frames(fmem, r, r->addr + i * XEN_PAGE_SIZE, dom, arr + i, (uint32_t)n, prot,
                       &bad) == 0) {
            memset(err + i, 0, n * sizeof(int));
            i += n;
        } else if (bad > 0) {
            limit = (size_t)bad; /* map the frames before the refused one first */
        } else if (bad == 0) {
            err[i++] = -errno; /* this frame stays PROT_NONE */
        } else if (errno == E2BIG && n > 1) {
            chunk = n / 2; /* too many descriptors for one reply */
        } else {
            return -1;
        }
    }
    return 0;
}

void *xenforeignmemory_map2(xenforeignmemory_handle *fmem, uint32_t dom, void *addr, int prot,
                            int flags, size_t pages, const xen_pfn_t arr[], int err[])
{
    /* flags go to mmap in Xen's library; only MAP_FIXED matters for a placement */
    if (!fmem || pages == 0 || pages > (1u << 20) || !arr) {
        errno = EINVAL;
        return NULL;
    }
    if (fmem->restricted != UINT32_MAX && dom != fmem->restricted) {
        errno = EPERM;
        return NULL;
    }
    int *errs = err ? err : calloc(pages, sizeof(int));
    struct fmem_region *r = calloc(1, sizeof(*r) + sizeof(uint32_t) * pages);
    void *p = MAP_FAILED;
    int e = ENOMEM;
    if (!errs || !r)
        goto fail;
    p = mmap(addr, pages * XEN_PAGE_SIZE, PROT_NONE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (flags & MAP_FIXED), -1, 0);
    if (p == MAP_FAILED) {
        e = errno;
        goto fail;
    }
    r->addr = p;
    r->pages = pages;
    /* Records overlapping the new range were munmapped by the caller: let them go. */
    free_regions(fmem, take_regions(fmem, p, pages, 0));
    if (map_all(fmem, r, dom, prot, arr, errs) < 0) {
        e = errno;
        goto fail;
    }
    if (!err) { /* xenforeignmemory_map2 without err[]: any failed frame fails it all */
        for (size_t i = 0; i < pages; i++)
            if (errs[i]) {
                e = -errs[i];
                goto fail;
            }
        free(errs);
    }
    pthread_mutex_lock(&fmem->lock);
    r->next = fmem->regions;
    fmem->regions = r;
    pthread_mutex_unlock(&fmem->lock);
    return p;
fail:
    if (p != MAP_FAILED)
        munmap(p, pages * XEN_PAGE_SIZE);
    if (r)
        release_handles(fmem, r->handles, r->nhandles);
    free(r);
    if (errs != err)
        free(errs);
    errno = e;
    return NULL;
}

void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot, size_t pages,
                           const xen_pfn_t arr[], int err[])
{
    return xenforeignmemory_map2(fmem, dom, NULL, prot, 0, pages, arr, err);
}

int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages)
{
    if (!fmem || !addr || pages == 0) {
        errno = EINVAL;
        return -1;
    }
    /* Xen's library munmaps; here the daemon also lets go of the frames the range held
     * (munmap first, so the caller's view is gone before the frames may be freed). */
    int rc = munmap(addr, pages * XEN_PAGE_SIZE);
    int e = errno;
    free_regions(fmem, take_regions(fmem, addr, pages, 1));
    errno = e;
    return rc;
}

/* ------------------------------------------------------------------ resources */

xenforeignmemory_resource_handle *xenforeignmemory_map_resource(
    xenforeignmemory_handle *fmem, domid_t domid, unsigned int type, unsigned int id,
    unsigned long frame, unsigned long nr_frames, void **paddr, int prot, int flags)
{
    (void)fmem;
    (void)domid;
    (void)type;
    (void)id;
    (void)frame;
    (void)nr_frames;
    (void)paddr;
    (void)prot;
    (void)flags;
    errno = EOPNOTSUPP;
    return NULL;
}

int xenforeignmemory_unmap_resource(xenforeignmemory_handle *fmem,
                                    xenforeignmemory_resource_handle *fres)
{
    (void)fmem;
    return fres ? (errno = EINVAL, -1) : 0;
}

int xenforeignmemory_resource_size(xenforeignmemory_handle *fmem, domid_t domid,
                                   unsigned int type, unsigned int id, size_t *size)
{
    (void)fmem;
    (void)domid;
    (void)type;
    (void)id;
    (void)size;
    errno = EOPNOTSUPP;
    return -1;
}

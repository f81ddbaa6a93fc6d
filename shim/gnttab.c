/*
 * libxengnttab.so.1 for the loopback emulator: xengnttab_* (map grants of other domains,
 * like /dev/xen/gntdev) and xengntshr_* (share pages, like /dev/xen/gntalloc).
 *
 * Theory of operation
 * -------------------
 * Handles talk to the daemon over the process's control connection (common.c); the
 * daemon owns the grant tables and hands out memory as memfds
 * (docs/loopback-protocol.md §4.2–4.7).
 *
 * Mapping (GNT_MAP): the reply names, per ref, a descriptor and a page within it.  A run
 * of N pages is first reserved as one PROT_NONE anonymous region, then each stretch of
 * refs that lies consecutively in one descriptor is placed over it with MAP_FIXED, so the
 * caller gets N contiguous pages in ref order, as with gntdev.  Requests are split into
 * chunks of at most 1024 refs (and smaller when the daemon answers E2BIG because a chunk
 * would need more than 250 descriptors); one local mapping may therefore own several
 * daemon handles.  Failure of any chunk unwinds the chunks already mapped (R9).
 *
 * Sharing (GNT_SHARE): the daemon allocates zeroed pages, grants them and returns one
 * memfd, which is mapped MAP_SHARED; xengntshr_unshare munmaps and ends the grants
 * (deferred while the peer still maps them, as gntalloc does).
 *
 * Unmap notifications (GNT_SET_NOTIFY) are kept by the daemon, so they fire on unmap,
 * unshare, handle close and process death alike.
 *
 * Callers may release memory with plain munmap (libxenvchan does so for the ring pages it
 * shares).  The daemon cannot see that, so the grants stay alive until the handle is
 * closed (closing releases everything the handle created).  The records kept here may
 * then be stale: when the kernel hands out an address range that overlaps a recorded
 * region, that region was necessarily munmapped already, so its record is dropped and its
 * daemon handles are released.  Closing a handle never munmaps anything: as with the real
 * devices, mappings stay usable until the caller unmaps them.
 */
#define _GNU_SOURCE
#include "xenpv_shim.h"
#include "xenpv_xentypes.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum region_kind { REGION_MAP, REGION_SHARE };

struct region {
    struct region *next;
    unsigned char *addr;
    uint32_t count; /* pages */
    enum region_kind kind;
    uint32_t nhandles;
    uint32_t handles[]; /* daemon handles (one per chunk) */
};

struct xengntdev_handle {
    struct lb_conn *conn;
    pthread_mutex_t lock; /* protects regions */
    struct region *regions;
};

/* Largest reply of GNT_MAP / GNT_SHARE: header words plus 8 bytes per ref. */
#define MAP_REPLY_MAX (12 + 8 * LB_MAX_REFS)

XENPV_EXPORT xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger,
                                              unsigned open_flags);
XENPV_EXPORT int xengnttab_close(xengnttab_handle *xgt);
XENPV_EXPORT int xengnttab_fd(xengnttab_handle *xgt);
XENPV_EXPORT void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid,
                                           uint32_t ref, int prot);
XENPV_EXPORT void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count,
                                            uint32_t *domids, uint32_t *refs, int prot);
XENPV_EXPORT void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count,
                                                   uint32_t domid, uint32_t *refs, int prot);
XENPV_EXPORT void *xengnttab_map_grant_ref_notify(xengnttab_handle *xgt, uint32_t domid,
                                                  uint32_t ref, int prot,
                                                  uint32_t notify_offset,
                                                  evtchn_port_t notify_port);
XENPV_EXPORT int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);
XENPV_EXPORT int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants);
XENPV_EXPORT int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count,
                                      xengnttab_grant_copy_segment_t *segs);
XENPV_EXPORT int xengnttab_dmabuf_exp_from_refs(xengnttab_handle *xgt, uint32_t domid,
                                                uint32_t flags, uint32_t count,
                                                const uint32_t *refs, uint32_t *fd);
XENPV_EXPORT int xengnttab_dmabuf_exp_wait_released(xengnttab_handle *xgt, uint32_t fd,
                                                    uint32_t wait_to_ms);
XENPV_EXPORT int xengnttab_dmabuf_imp_to_refs(xengnttab_handle *xgt, uint32_t domid,
                                              uint32_t fd, uint32_t count, uint32_t *refs);
XENPV_EXPORT int xengnttab_dmabuf_imp_release(xengnttab_handle *xgt, uint32_t fd);
XENPV_EXPORT xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger,
                                              unsigned open_flags);
XENPV_EXPORT int xengntshr_close(xengntshr_handle *xgs);
XENPV_EXPORT int xengntshr_fd(xengntshr_handle *xgs);
XENPV_EXPORT void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count,
                                         uint32_t *refs, int writable);
XENPV_EXPORT void *xengntshr_share_page_notify(xengntshr_handle *xgs, uint32_t domid,
                                               uint32_t *ref, int writable,
                                               uint32_t notify_off,
                                               evtchn_port_t notify_port);
XENPV_EXPORT int xengntshr_unshare(xengntshr_handle *xgs, void *start_address,
                                   uint32_t count);

/* ------------------------------------------------------------------ handles and records */

static void release_handles(struct xengntdev_handle *h, const uint32_t *handles, uint32_t n);

static struct xengntdev_handle *handle_open(void)
{
    struct xengntdev_handle *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->conn = lb_connect(-1);
    if (!h->conn) {
        int err = errno;
        free(h);
        errno = err;
        return NULL;
    }
    pthread_mutex_init(&h->lock, NULL);
    return h;
}

static int handle_close(struct xengntdev_handle *h)
{
    if (!h)
        return 0;
    /* Release what this handle created, as closing the device would; the memory stays
     * mapped until the caller unmaps it. */
    for (struct region *r = h->regions, *next; r; r = next) {
        next = r->next;
        release_handles(h, r->handles, r->nhandles);
        free(r);
    }
    lb_disconnect(h->conn);
    pthread_mutex_destroy(&h->lock);
    free(h);
    return 0;
}

static void release_handles(struct xengntdev_handle *h, const uint32_t *handles, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        unsigned char req[4];
        lb_put32(req, handles[i]);
        if (lb_call_simple(h->conn, LB_GNT_UNMAP, req, sizeof(req), NULL, 0, NULL) < 0)
            lb_debug("GNT_UNMAP %u: %s", handles[i], strerror(errno));
    }
}

/* munmap a region taken off the list and release its daemon handles (which fires the
 * unmap notifications; munmap first, so the cleared byte is what the peer sees last). */
static void release_region(struct xengntdev_handle *h, struct region *r)
{
    munmap(r->addr, (size_t)r->count * XEN_PAGE_SIZE);
    release_handles(h, r->handles, r->nhandles);
    free(r);
}

/* Drop records overlapping [addr, addr + pages): their memory was munmapped by the caller
 * (the kernel just handed the range out again), so release their daemon handles. */
static void drop_stale(struct xengntdev_handle *h, const unsigned char *addr, uint32_t pages)
{
    const unsigned char *end = addr + (size_t)pages * XEN_PAGE_SIZE;
    pthread_mutex_lock(&h->lock);
    struct region **pp = &h->regions;
    while (*pp) {
        struct region *r = *pp;
        const unsigned char *rend = r->addr + (size_t)r->count * XEN_PAGE_SIZE;
        if (r->addr < end && addr < rend) {
            *pp = r->next;
            lb_debug("dropping stale record %p (%u pages)", (void *)r->addr, r->count);
            release_handles(h, r->handles, r->nhandles);
            free(r);
        } else {
            pp = &r->next;
        }
    }
    pthread_mutex_unlock(&h->lock);
}

static void add_region(struct xengntdev_handle *h, struct region *r)
{
    pthread_mutex_lock(&h->lock);
    r->next = h->regions;
    h->regions = r;
    pthread_mutex_unlock(&h->lock);
}

/* Unlink and return the record starting at addr, of the given kind, or NULL. */
static struct region *take_region(struct xengntdev_handle *h, const void *addr,
                                  enum region_kind kind)
{
    pthread_mutex_lock(&h->lock);
    struct region **pp = &h->regions;
    while (*pp && ((*pp)->addr != addr || (*pp)->kind != kind))
        pp = &(*pp)->next;
    struct region *r = *pp;
    if (r)
        *pp = r->next;
    pthread_mutex_unlock(&h->lock);
    return r;
}

static struct region *new_region(uint32_t count, enum region_kind kind)
{
    uint32_t maxchunks = count; /* chunks can shrink to one page each */
    struct region *r = calloc(1, sizeof(*r) + sizeof(uint32_t) * maxchunks);
    if (r) {
        r->count = count;
        r->kind = kind;
    }
    return r;
}

/* Reserve address space for pages; returns NULL with errno set on failure. */
static unsigned char *reserve(uint32_t pages)
{
    void *p = mmap(NULL, (size_t)pages * XEN_PAGE_SIZE, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* ------------------------------------------------------------------------- mapping */

/* Map one chunk of n (domid, ref) pairs at dst; on success record the daemon handle.
 * Returns 0, or -1 with errno set (E2BIG: retry with a smaller chunk). */
static int map_chunk(struct xengntdev_handle *h, struct region *r, unsigned char *dst,
                     const uint32_t *domids, uint32_t domid_step, const uint32_t *refs,
                     uint32_t n, int prot)
{
    unsigned char hdr[8];
    unsigned char *pairs = malloc((size_t)n * 8);
    unsigned char *rbuf = malloc(MAP_REPLY_MAX);
    int rc = -1, err = ENOMEM;
    if (!pairs || !rbuf)
        goto out;
    lb_put32(hdr, (prot & PROT_WRITE) ? LB_GNT_WRITABLE : 0);
    lb_put32(hdr + 4, n);
    for (uint32_t i = 0; i < n; i++) {
        lb_put32(pairs + 8 * i, domids[i * domid_step]);
        lb_put32(pairs + 8 * i + 4, refs[i]);
    }
    struct lb_reply rep = {.payload = rbuf, .cap = MAP_REPLY_MAX};
    if (lb_call(h->conn, LB_GNT_MAP, hdr, sizeof(hdr), pairs, (size_t)n * 8, &rep) < 0) {
        err = errno;
        goto out;
    }
    if (rep.status < 0) {
        err = -rep.status;
        goto out;
    }
    err = EPROTO;
    if (rep.len != 12 + (size_t)n * 8 || lb_get32(rbuf + 4) != n ||
        lb_get32(rbuf + 8) != (uint32_t)rep.nfds) {
        if (rep.len >= 4) /* the mapping exists on the daemon side: drop it */
            release_handles(h, (uint32_t[]){lb_get32(rbuf)}, 1);
        lb_close_fds(&rep);
        goto out;
    }
    r->handles[r->nhandles++] = lb_get32(rbuf);
    if (lb_place_pages(dst, rbuf + 12, n, &rep, prot) < 0) {
        err = errno;
        lb_close_fds(&rep);
        goto out;
    }
    lb_close_fds(&rep);
    rc = 0;
out:
    free(pairs);
    free(rbuf);
    if (rc < 0)
        errno = err;
    return rc;
}

/* Map count refs contiguously; returns the new (recorded) region or NULL with errno. */
static struct region *map_region(struct xengntdev_handle *h, uint32_t count,
                                 const uint32_t *domids, uint32_t domid_step,
                                 const uint32_t *refs, int prot)
{
    if (!h || count == 0 || count > (1u << 20) || !refs) {
        errno = EINVAL;
        return NULL;
    }
    struct region *r = new_region(count, REGION_MAP);
    if (!r)
        return NULL;
    r->addr = reserve(count);
    if (!r->addr) {
        free(r);
        return NULL;
    }
    drop_stale(h, r->addr, count);
    uint32_t chunk = LB_MAX_REFS;
    for (uint32_t done = 0; done < count;) {
        uint32_t n = count - done < chunk ? count - done : chunk;
        if (map_chunk(h, r, r->addr + (size_t)done * XEN_PAGE_SIZE,
                      domids + (size_t)done * domid_step, domid_step, refs + done, n,
                      prot) < 0) {
            if (errno == E2BIG && n > 1) {
                chunk = n / 2; /* too many descriptors for one reply */
                continue;
            }
            int err = errno;
            release_region(h, r);
            errno = err;
            return NULL;
        }
        done += n;
    }
    add_region(h, r);
    return r;
}

static void *map_refs(struct xengntdev_handle *h, uint32_t count, const uint32_t *domids,
                      uint32_t domid_step, const uint32_t *refs, int prot)
{
    struct region *r = map_region(h, count, domids, domid_step, refs, prot);
    return r ? r->addr : NULL;
}

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    return handle_open();
}

int xengnttab_close(xengnttab_handle *xgt)
{
    return handle_close(xgt);
}

int xengnttab_fd(xengnttab_handle *xgt)
{
    return xgt->conn->fd;
}

void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
    return map_refs(xgt, 1, &domid, 0, &ref, prot);
}

void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t *domids,
                               uint32_t *refs, int prot)
{
    if (!domids) {
        errno = EINVAL;
        return NULL;
    }
    return map_refs(xgt, count, domids, 1, refs, prot);
}

void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot)
{
    return map_refs(xgt, count, &domid, 0, refs, prot);
}

/* GNT_SET_NOTIFY for daemon handle `handle`; offset / port of -1 mean "no such action". */
static int set_notify(struct xengntdev_handle *h, uint32_t handle, uint32_t offset,
                      uint32_t port)
{
    uint32_t action = 0;
    if (offset != (uint32_t)-1)
        action |= LB_NOTIFY_CLEAR_BYTE;
    if (port != (uint32_t)-1)
        action |= LB_NOTIFY_SEND_EVENT;
    if (!action)
        return 0;
    unsigned char req[16];
    lb_put32(req, handle);
    lb_put32(req + 4, offset == (uint32_t)-1 ? 0 : offset);
    lb_put32(req + 8, port == (uint32_t)-1 ? 0 : port);
    lb_put32(req + 12, action);
    return lb_call_simple(h->conn, LB_GNT_SET_NOTIFY, req, sizeof(req), NULL, 0, NULL);
}

/* Attach the notification to a one-page region just made; on failure undo the region. */
static void *with_notify(struct xengntdev_handle *h, struct region *r, uint32_t offset,
                         uint32_t port)
{
    if (!r)
        return NULL;
    if (set_notify(h, r->handles[0], offset, port) < 0) {
        int err = errno;
        release_region(h, take_region(h, r->addr, r->kind));
        errno = err;
        return NULL;
    }
    return r->addr;
}

void *xengnttab_map_grant_ref_notify(xengnttab_handle *xgt, uint32_t domid, uint32_t ref,
                                     int prot, uint32_t notify_offset,
                                     evtchn_port_t notify_port)
{
    if (notify_offset != (uint32_t)-1 && notify_offset >= XEN_PAGE_SIZE) {
        errno = EINVAL;
        return NULL;
    }
    return with_notify(xgt, map_region(xgt, 1, &domid, 0, &ref, prot), notify_offset,
                       notify_port);
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
    struct region *r = take_region(xgt, start_address, REGION_MAP);
    if (!r) {
        errno = EINVAL;
        return -1;
    }
    if (r->count != count) {
        add_region(xgt, r); /* as gntdev: the count must match the mapping */
        errno = EINVAL;
        return -1;
    }
    release_region(xgt, r);
    return 0;
}

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
    return 0; /* no per-handle limit beyond the daemon's own */
}

/* ------------------------------------------------------------------------ grant copy */

/* Wire segment (§4.7): 24 bytes. */
static void put_segment(unsigned char *p, const xengnttab_grant_copy_segment_t *s)
{
    memset(p, 0, 24);
    if (s->flags & GNTCOPY_source_gref) {
        lb_put32(p, s->source.foreign.ref);
        lb_put16(p + 4, s->source.foreign.domid);
        lb_put16(p + 6, s->source.foreign.offset);
    }
    if (s->flags & GNTCOPY_dest_gref) {
        lb_put32(p + 8, s->dest.foreign.ref);
        lb_put16(p + 12, s->dest.foreign.domid);
        lb_put16(p + 14, s->dest.foreign.offset);
    }
    lb_put16(p + 16, s->len);
    lb_put16(p + 18, s->flags);
}

/* Data per GNT_COPY call (§4.7: keep <= 64 KiB), unless one segment alone is larger. */
#define COPY_DATA_MAX 65536u

static int copy_batch(struct xengntdev_handle *h, xengnttab_grant_copy_segment_t *segs,
                      uint32_t n, size_t srclen, unsigned char *buf, unsigned char *rbuf)
{
    unsigned char hdr[8];
    lb_put32(hdr, n);
    lb_put32(hdr + 4, 0);
    size_t off = (size_t)n * 24;
    for (uint32_t i = 0; i < n; i++) {
        put_segment(buf + 24 * i, &segs[i]);
        if (!(segs[i].flags & GNTCOPY_source_gref)) {
            memcpy(buf + off, segs[i].source.virt, segs[i].len);
            off += segs[i].len;
        }
    }
    struct lb_reply rep = {.payload = rbuf, .cap = LB_MAX_MESSAGE};
    if (lb_call(h->conn, LB_GNT_COPY, hdr, sizeof(hdr), buf, (size_t)n * 24 + srclen, &rep) < 0)
        return -1;
    lb_close_fds(&rep);
    if (rep.status < 0) {
        errno = -rep.status;
        return -1;
    }
    if (rep.len < 8 + (size_t)n * 4 || lb_get32(rbuf) != n) {
        errno = EPROTO;
        return -1;
    }
    size_t doff = 8 + (size_t)n * 4;
    for (uint32_t i = 0; i < n; i++) {
        segs[i].status = (int16_t)(int32_t)lb_get32(rbuf + 8 + 4 * i);
        if (!(segs[i].flags & GNTCOPY_dest_gref)) {
            if (doff + segs[i].len > rep.len) {
                errno = EPROTO;
                return -1;
            }
            if (segs[i].status == GNTST_okay)
                memcpy(segs[i].dest.virt, rbuf + doff, segs[i].len);
            doff += segs[i].len;
        }
    }
    return 0;
}

int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count,
                         xengnttab_grant_copy_segment_t *segs)
{
    unsigned char *buf = malloc(LB_MAX_MESSAGE), *rbuf = malloc(LB_MAX_MESSAGE);
    int rc = -1;
    if (!buf || !rbuf)
        goto out;
    if (count == 0) { /* capability probe: ask the daemon, as the ioctl would */
        rc = copy_batch(xgt, segs, 0, 0, buf, rbuf);
        goto out;
    }
    for (uint32_t start = 0; start < count;) {
        uint32_t n = 0;
        size_t src = 0, dst = 0;
        while (start + n < count && n < 1024) {
            const xengnttab_grant_copy_segment_t *s = &segs[start + n];
            size_t ns = src + ((s->flags & GNTCOPY_source_gref) ? 0 : s->len);
            size_t nd = dst + ((s->flags & GNTCOPY_dest_gref) ? 0 : s->len);
            if (n > 0 && (ns > COPY_DATA_MAX || nd > COPY_DATA_MAX))
                break;
            src = ns;
            dst = nd;
            n++;
        }
        if (copy_batch(xgt, segs + start, n, src, buf, rbuf) < 0)
            goto out;
        start += n;
    }
    rc = 0;
out:
    free(buf);
    free(rbuf);
    return rc;
}

/* dma-buf export/import needs a kernel device; the emulator has none. */
int xengnttab_dmabuf_exp_from_refs(xengnttab_handle *xgt, uint32_t domid, uint32_t flags,
                                   uint32_t count, const uint32_t *refs, uint32_t *fd)
{
    errno = EOPNOTSUPP;
    return -1;
}

int xengnttab_dmabuf_exp_wait_released(xengnttab_handle *xgt, uint32_t fd,
                                       uint32_t wait_to_ms)
{
    errno = EOPNOTSUPP;
    return -1;
}

int xengnttab_dmabuf_imp_to_refs(xengnttab_handle *xgt, uint32_t domid, uint32_t fd,
                                 uint32_t count, uint32_t *refs)
{
    errno = EOPNOTSUPP;
    return -1;
}

int xengnttab_dmabuf_imp_release(xengnttab_handle *xgt, uint32_t fd)
{
    errno = EOPNOTSUPP;
    return -1;
}

/* ------------------------------------------------------------------------- sharing */

/* Share one chunk of n pages at dst; fills refs, records the daemon handle. */
static int share_chunk(struct xengntdev_handle *h, struct region *r, unsigned char *dst,
                       uint32_t domid, uint32_t n, uint32_t *refs, int writable)
{
    unsigned char req[8];
    unsigned char *rbuf = malloc(MAP_REPLY_MAX);
    if (!rbuf)
        return -1;
    lb_put16(req, (uint16_t)domid);
    lb_put16(req + 2, writable ? LB_GNT_WRITABLE : 0);
    lb_put32(req + 4, n);
    struct lb_reply rep = {.payload = rbuf, .cap = MAP_REPLY_MAX};
    int rc = -1, err = EPROTO;
    if (lb_call(h->conn, LB_GNT_SHARE, req, sizeof(req), NULL, 0, &rep) < 0) {
        err = errno;
        goto out;
    }
    if (rep.status < 0) {
        err = -rep.status;
        goto out;
    }
    if (rep.len != 8 + (size_t)n * 4 || lb_get32(rbuf + 4) != n || rep.nfds != 1) {
        if (rep.len >= 4)
            release_handles(h, (uint32_t[]){lb_get32(rbuf)}, 1);
        goto out;
    }
    r->handles[r->nhandles++] = lb_get32(rbuf);
    void *p = mmap(dst, (size_t)n * XEN_PAGE_SIZE, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_FIXED, rep.fds[0], 0);
    if (p == MAP_FAILED) {
        err = errno;
        goto out;
    }
    for (uint32_t i = 0; i < n; i++)
        refs[i] = lb_get32(rbuf + 8 + 4 * i);
    rc = 0;
out:
    lb_close_fds(&rep);
    free(rbuf);
    if (rc < 0)
        errno = err;
    return rc;
}

xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    return handle_open();
}

int xengntshr_close(xengntshr_handle *xgs)
{
    return handle_close(xgs);
}

int xengntshr_fd(xengntshr_handle *xgs)
{
    return xgs->conn->fd;
}

/* Share count pages; returns the new (recorded) region or NULL with errno. */
static struct region *share_region(struct xengntdev_handle *xgs, uint32_t domid, int count,
                                   uint32_t *refs, int writable)
{
    if (!xgs || count <= 0 || count > (1 << 20) || !refs) {
        errno = EINVAL;
        return NULL;
    }
    struct region *r = new_region((uint32_t)count, REGION_SHARE);
    if (!r)
        return NULL;
    r->addr = reserve((uint32_t)count);
    if (!r->addr) {
        free(r);
        return NULL;
    }
    drop_stale(xgs, r->addr, (uint32_t)count);
    for (uint32_t done = 0; done < (uint32_t)count;) {
        uint32_t n = (uint32_t)count - done;
        if (n > LB_MAX_REFS)
            n = LB_MAX_REFS;
        if (share_chunk(xgs, r, r->addr + (size_t)done * XEN_PAGE_SIZE, domid, n, refs + done,
                        writable) < 0) {
            int err = errno;
            release_region(xgs, r);
            errno = err;
            return NULL;
        }
        done += n;
    }
    add_region(xgs, r);
    return r;
}

void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                            int writable)
{
    struct region *r = share_region(xgs, domid, count, refs, writable);
    return r ? r->addr : NULL;
}

void *xengntshr_share_page_notify(xengntshr_handle *xgs, uint32_t domid, uint32_t *ref,
                                  int writable, uint32_t notify_off,
                                  evtchn_port_t notify_port)
{
    if (notify_off != (uint32_t)-1 && notify_off >= XEN_PAGE_SIZE) {
        errno = EINVAL;
        return NULL;
    }
    return with_notify(xgs, share_region(xgs, domid, 1, ref, writable), notify_off,
                       notify_port);
}

int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count)
{
    struct region *r = take_region(xgs, start_address, REGION_SHARE);
    if (!r) {
        /* Not ours (or already released): behave like munmap of the range. */
        return munmap(start_address, (size_t)count * XEN_PAGE_SIZE);
    }
    /* GNT_UNMAP of a share handle ends its grants (deferred while mapped) and fires the
     * share's unmap notification. */
    release_region(xgs, r);
    return 0;
}

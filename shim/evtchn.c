/*
 * libxenevtchn.so.1 for the loopback emulator: event channels with /dev/xen/evtchn
 * semantics.
 *
 * Theory of operation
 * -------------------
 * A handle uses the process's control connection (common.c) and owns one epoll instance,
 * which is the pollable descriptor xenevtchn_fd() returns (docs/loopback-protocol.md
 * §4.8).
 *
 * Every local port has an *inbox* eventfd created by the daemon; whoever signals the port
 * adds 1 to it.  The inbox is registered in the epoll set edge-triggered (EPOLLIN |
 * EPOLLET) with the port number as data: every write queues the port once, epoll_wait
 * hands it out once, so the counter is never drained on the hot path.  Masking is a flag
 * per port:
 *   pending  = epoll_wait for one event; an unmasked port is masked and returned; a
 *              masked one (notified while masked) is only marked deferred, and we look
 *              again.  It first takes an event already queued (timeout 0); only when
 *              none is does it read O_NONBLOCK of the descriptor, and then fails with
 *              EAGAIN or sleeps in epoll_wait, as read() on the device would;
 *   unmask   = clear the mask; only if the port was deferred, write 1 to its own inbox,
 *              which queues it again, so it fires at once (also for pollers of the fd);
 *   coalesce = edges: one wake-up however many signals arrived before epoll_wait.
 * So a delivery of a queued port costs one epoll_wait and a notification one write.
 *
 * Notifying the remote end does not go through the daemon on the hot path: an
 * interdomain port caches the remote port's inbox (its *outbox*) and the port's
 * generation.  The daemon publishes a generation per port in a read-only memfd received
 * with HELLO and bumps it whenever the remote end changes; while the published value
 * equals the cached one, notify is one write() to the outbox, otherwise EVT_NOTIFY asks
 * the daemon (which signals and returns the fresh outbox and generation).
 */
#define _GNU_SOURCE
#include "xenpv_shim.h"
#include "xenpv_xentypes.h"

#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

struct port {
    int inbox;  /* -1: not a port of this handle */
    int outbox; /* cached remote inbox, or -1 */
    uint32_t gen;
    bool masked;   /* delivered by pending, not unmasked yet */
    bool deferred; /* notified while masked */
};

struct xenevtchn_handle {
    struct lb_conn *conn;
    int epfd;
    const volatile uint32_t *gens; /* port generations (read-only mapping), or NULL */
    size_t gens_len;
    pthread_mutex_t lock; /* protects ports */
    uint32_t nports;      /* = max_ports from HELLO */
    struct port *ports;
};

XENPV_EXPORT xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger,
                                              unsigned int flags);
XENPV_EXPORT xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger, int fd,
                                                unsigned open_flags);
XENPV_EXPORT int xenevtchn_close(xenevtchn_handle *xce);
XENPV_EXPORT int xenevtchn_fd(xenevtchn_handle *xce);
XENPV_EXPORT int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
XENPV_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce,
                                                                   uint32_t domid);
XENPV_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce,
                                                                  uint32_t domid,
                                                                  evtchn_port_t remote_port);
XENPV_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce,
                                                           unsigned int virq);
XENPV_EXPORT int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
XENPV_EXPORT xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
XENPV_EXPORT int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
XENPV_EXPORT int xenevtchn_restrict(xenevtchn_handle *xce, domid_t domid);

static void unbind_remote(xenevtchn_handle *h, uint32_t port);

static xenevtchn_handle *open_handle(int fd, unsigned flags)
{
    xenevtchn_handle *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->epfd = -1;
    h->conn = lb_connect(fd);
    if (!h->conn) {
        int err = errno;
        free(h);
        errno = err;
        return NULL;
    }
    int err = ENOMEM;
    h->nports = h->conn->max_ports;
    h->ports = malloc(sizeof(struct port) * h->nports);
    if (!h->ports)
        goto fail;
    for (uint32_t i = 0; i < h->nports; i++)
        h->ports[i] = (struct port){.inbox = -1, .outbox = -1};
    h->gens_len = ((size_t)h->nports * 4 + LB_PAGE_SIZE - 1) & ~(size_t)(LB_PAGE_SIZE - 1);
    void *g = h->gens_len && h->conn->gen_fd >= 0
                  ? mmap(NULL, h->gens_len, PROT_READ, MAP_SHARED, h->conn->gen_fd, 0)
                  : MAP_FAILED;
    if (g == MAP_FAILED) {
        /* No fast path: every notify goes through the daemon. */
        lb_debug("no port-generation page: %s", strerror(errno));
        h->gens = NULL;
    } else {
        h->gens = g;
    }
    h->epfd = epoll_create1((flags & XENEVTCHN_NO_CLOEXEC) ? 0 : EPOLL_CLOEXEC);
    if (h->epfd < 0) {
        err = errno;
        goto fail;
    }
    pthread_mutex_init(&h->lock, NULL);
    return h;
fail:
    lb_disconnect(h->conn);
    free(h->ports);
    free(h);
    errno = err;
    return NULL;
}

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    return open_handle(-1, flags);
}

/* The descriptor must be a connected control socket (for example inherited from a parent
 * that connected it); the handle takes it over. */
xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger, int fd,
                                   unsigned open_flags)
{
    if (fd < 0) {
        errno = EBADF;
        return NULL;
    }
    return open_handle(fd, open_flags);
}

static void drop_port(xenevtchn_handle *h, struct port *p)
{
    if (p->inbox >= 0) {
        epoll_ctl(h->epfd, EPOLL_CTL_DEL, p->inbox, NULL);
        close(p->inbox);
    }
    if (p->outbox >= 0)
        close(p->outbox);
    *p = (struct port){.inbox = -1, .outbox = -1};
}

int xenevtchn_close(xenevtchn_handle *xce)
{
    if (!xce)
        return 0;
    /* Close this handle's ports, as closing the device would (remote ends become
     * unbound); the connection is shared with the process's other handles. */
    for (uint32_t i = 0; i < xce->nports; i++)
        if (xce->ports[i].inbox >= 0) {
            drop_port(xce, &xce->ports[i]);
            unbind_remote(xce, i);
        }
    lb_disconnect(xce->conn);
    if (xce->epfd >= 0)
        close(xce->epfd);
    if (xce->gens)
        munmap((void *)xce->gens, xce->gens_len);
    pthread_mutex_destroy(&xce->lock);
    free(xce->ports);
    free(xce);
    return 0;
}

int xenevtchn_fd(xenevtchn_handle *xce)
{
    return xce->epfd;
}

/* Port p of this handle, or NULL (errno EINVAL).  Call with the lock held. */
static struct port *own_port(xenevtchn_handle *h, evtchn_port_t port)
{
    if (port == 0 || port >= h->nports || h->ports[port].inbox < 0) {
        errno = EINVAL;
        return NULL;
    }
    return &h->ports[port];
}

/* Register the inbox of port in the epoll set (a pending inbox is queued at once). */
static int arm(xenevtchn_handle *h, struct port *p, evtchn_port_t port)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u32 = port};
    return epoll_ctl(h->epfd, EPOLL_CTL_ADD, p->inbox, &ev);
}

/* Queue a port again: a write to its inbox is an edge.  A counter a hostile peer
 * saturated takes no write, so drain it first then. */
static void requeue(struct port *p)
{
    uint64_t v = 1;
    if (write(p->inbox, &v, sizeof(v)) == (ssize_t)sizeof(v) || errno != EAGAIN)
        return;
    if (read(p->inbox, &v, sizeof(v)) == (ssize_t)sizeof(v)) {
        v = 1;
        if (write(p->inbox, &v, sizeof(v)) < 0)
            return; /* saturated again at once: that peer silences its own port */
    }
}

/* Register a new port's descriptors; closes them on failure.  Returns the port or -1. */
static int add_port(xenevtchn_handle *h, uint32_t port, int inbox, int outbox, uint32_t gen)
{
    pthread_mutex_lock(&h->lock);
    if (port == 0 || port >= h->nports || h->ports[port].inbox >= 0) {
        pthread_mutex_unlock(&h->lock);
        close(inbox);
        if (outbox >= 0)
            close(outbox);
        errno = EPROTO;
        return -1;
    }
    struct port *p = &h->ports[port];
    *p = (struct port){.inbox = inbox, .outbox = outbox, .gen = gen};
    if (arm(h, p, port) < 0) {
        int err = errno;
        drop_port(h, p);
        pthread_mutex_unlock(&h->lock);
        errno = err;
        return -1;
    }
    pthread_mutex_unlock(&h->lock);
    return (int)port;
}

/* Undo a port the daemon created when it cannot be used locally. */
static void unbind_remote(xenevtchn_handle *h, uint32_t port)
{
    unsigned char req[4];
    lb_put32(req, port);
    lb_call_simple(h->conn, LB_EVT_UNBIND, req, sizeof(req), NULL, 0, NULL);
}

/* EVT_ALLOC_UNBOUND / EVT_BIND_INTERDOMAIN: the reply is the port (and, for interdomain,
 * its generation) with the inbox (and outbox) descriptors. */
static xenevtchn_port_or_error_t bind_port(xenevtchn_handle *h, uint32_t op,
                                           const unsigned char *req, size_t reqlen,
                                           int interdomain)
{
    unsigned char buf[16];
    size_t want_len = interdomain ? 8 : 4;
    int want_fds = interdomain ? 2 : 1;
    struct lb_reply rep = {.payload = buf, .cap = sizeof(buf)};
    if (lb_call(h->conn, op, req, reqlen, NULL, 0, &rep) < 0)
        return -1;
    if (rep.status < 0) {
        errno = -rep.status;
        return -1;
    }
    if (rep.len != want_len || rep.nfds != want_fds) {
        lb_close_fds(&rep);
        if (rep.len >= 4)
            unbind_remote(h, lb_get32(buf));
        errno = EPROTO;
        return -1;
    }
    uint32_t port = lb_get32(buf);
    int rc = add_port(h, port, rep.fds[0], interdomain ? rep.fds[1] : -1,
                      interdomain ? lb_get32(buf + 4) : 0);
    if (rc < 0) {
        int err = errno;
        unbind_remote(h, port);
        errno = err;
    }
    return rc;
}

xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid)
{
    unsigned char req[4];
    lb_put32(req, domid);
    return bind_port(xce, LB_EVT_ALLOC_UNBOUND, req, sizeof(req), 0);
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port)
{
    unsigned char req[8];
    lb_put32(req, domid);
    lb_put32(req + 4, remote_port);
    return bind_port(xce, LB_EVT_BIND_INTERDOMAIN, req, sizeof(req), 1);
}

/* EVT_BIND_VIRQ: only VIRQ_DOM_EXC exists in the emulator (ENOSYS for the others); it
 * fires in the privileged domain when a domain shuts down or is destroyed. */
xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq)
{
    unsigned char req[4];
    lb_put32(req, virq);
    return bind_port(xce, LB_EVT_BIND_VIRQ, req, sizeof(req), 0);
}

int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
    pthread_mutex_lock(&xce->lock);
    struct port *p = own_port(xce, port);
    if (!p) {
        pthread_mutex_unlock(&xce->lock);
        return -1;
    }
    drop_port(xce, p);
    pthread_mutex_unlock(&xce->lock);
    unsigned char req[4];
    lb_put32(req, port);
    return lb_call_simple(xce->conn, LB_EVT_UNBIND, req, sizeof(req), NULL, 0, NULL);
}

/* Slow path: the daemon signals the remote end and returns the fresh outbox. */
static int notify_slow(xenevtchn_handle *h, evtchn_port_t port)
{
    unsigned char req[4], buf[16];
    lb_put32(req, port);
    struct lb_reply rep = {.payload = buf, .cap = sizeof(buf)};
    if (lb_call(h->conn, LB_EVT_NOTIFY, req, sizeof(req), NULL, 0, &rep) < 0)
        return -1;
    if (rep.status < 0) {
        errno = -rep.status;
        return -1;
    }
    uint32_t has_outbox = rep.len == 8 ? lb_get32(buf + 4) : 0;
    if (rep.len != 8 || rep.nfds != (has_outbox ? 1 : 0)) {
        lb_close_fds(&rep);
        errno = EPROTO;
        return -1;
    }
    pthread_mutex_lock(&h->lock);
    struct port *p = own_port(h, port);
    if (p) {
        if (p->outbox >= 0)
            close(p->outbox);
        p->outbox = has_outbox ? rep.fds[0] : -1;
        p->gen = lb_get32(buf);
        rep.nfds = 0;
    }
    pthread_mutex_unlock(&h->lock);
    lb_close_fds(&rep);
    return 0;
}

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
    pthread_mutex_lock(&xce->lock);
    struct port *p = own_port(xce, port);
    if (!p) {
        pthread_mutex_unlock(&xce->lock);
        return -1;
    }
    /* Fast path: the cached outbox is current while the published generation is
     * unchanged.  The acquire load pairs with the daemon's update of the generation. */
    if (p->outbox >= 0 && xce->gens &&
        __atomic_load_n((const uint32_t *)&xce->gens[port], __ATOMIC_ACQUIRE) == p->gen) {
        uint64_t one = 1;
        ssize_t n = write(p->outbox, &one, sizeof(one));
        pthread_mutex_unlock(&xce->lock);
        if (n == (ssize_t)sizeof(one) || (n < 0 && errno == EAGAIN))
            return 0; /* EAGAIN: the counter is saturated, the peer is signalled already */
        return notify_slow(xce, port);
    }
    pthread_mutex_unlock(&xce->lock);
    return notify_slow(xce, port);
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    for (;;) {
        /* A port already queued is taken without asking how the descriptor is set: the
         * common case (the caller polled the fd, it was readable) is one epoll_wait. */
        struct epoll_event ev;
        int n = epoll_wait(xce->epfd, &ev, 1, 0);
        if (n == 0) {
            /* Nothing queued: now the call would block.  A descriptor the caller made
             * non-blocking makes pending non-blocking, as read() on the device.  The flag
             * is read here, at the moment it matters, never cached: the caller may switch
             * it at any time with fcntl on xenevtchn_fd(). */
            int fl = fcntl(xce->epfd, F_GETFL);
            if (fl >= 0 && (fl & O_NONBLOCK)) {
                errno = EAGAIN;
                return -1;
            }
            n = epoll_wait(xce->epfd, &ev, 1, -1);
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        evtchn_port_t port = ev.data.u32;
        pthread_mutex_lock(&xce->lock);
        struct port *p = own_port(xce, port);
        bool deliver = p && !p->masked;
        if (deliver)
            p->masked = true;
        else if (p)
            p->deferred = true; /* notified while masked: fires on unmask */
        pthread_mutex_unlock(&xce->lock);
        if (deliver)
            return (xenevtchn_port_or_error_t)port;
        /* Masked, or unbound between the wake-up and now: look again. */
    }
}

int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
    pthread_mutex_lock(&xce->lock);
    struct port *p = own_port(xce, port);
    if (p) {
        p->masked = false;
        if (p->deferred) {
            p->deferred = false;
            requeue(p);
        }
    }
    pthread_mutex_unlock(&xce->lock);
    return p ? 0 : -1;
}

int xenevtchn_restrict(xenevtchn_handle *xce, domid_t domid)
{
    unsigned char req[4];
    lb_put32(req, domid);
    return lb_call_simple(xce->conn, LB_EVT_RESTRICT, req, sizeof(req), NULL, 0, NULL);
}

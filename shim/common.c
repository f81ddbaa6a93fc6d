/*
 * Client side of the loopback control protocol, shared by the replacement libraries.
 *
 * Theory of operation
 * -------------------
 * The handles a library opens in one process (xengnttab_open and xengntshr_open in
 * libxengnttab; xenevtchn_open; xc_interface_open) share one SOCK_SEQPACKET connection
 * to the daemon's RUNDIR/dom<N>/control socket, named by $XENPV_LOOPBACK_SOCKET.  The
 * connection *is* the domain's identity and owns everything created through it, so
 * process death releases it all (docs/loopback-protocol.md §2); the daemon keeps a port
 * that an unmap notification names alive until the notification fired, so the order in
 * which a dead process's connections are released does not matter.  Closing one handle
 * releases that handle's objects explicitly (each library does it in its close call).
 * A request is one message (12-byte header + payload); the reply is one message (16-byte
 * header + payload) with any descriptors in one SCM_RIGHTS control message (§3).  Requests
 * on a connection are serialised with a mutex, so the libraries are thread-safe per handle
 * like Xen's.  When the daemon is gone (EOF, ECONNRESET, EPIPE) or answers nonsense, the
 * connection is marked broken and every later call fails with ENOTCONN / EPROTO; nothing
 * retries forever.
 */
#include "xenpv_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

void lb_debug(const char *fmt, ...)
{
    static int enabled = -1;
    if (enabled < 0)
        enabled = getenv("XENPV_SHIM_DEBUG") != NULL;
    if (!enabled)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "xenpv-shim[%d]: ", (int)getpid());
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void lb_close_fds(struct lb_reply *rep)
{
    for (int i = 0; i < rep->nfds; i++)
        if (rep->fds[i] >= 0)
            close(rep->fds[i]);
    rep->nfds = 0;
}

int lb_place_pages(unsigned char *dst, const unsigned char *table, uint32_t n,
                   const struct lb_reply *rep, int prot)
{
    for (uint32_t i = 0; i < n;) {
        uint32_t fdi = lb_get32(table + 8 * i), page = lb_get32(table + 8 * i + 4);
        uint32_t run = 1;
        while (i + run < n && lb_get32(table + 8 * (i + run)) == fdi &&
               lb_get32(table + 8 * (i + run) + 4) == page + run)
            run++;
        if (fdi >= (uint32_t)rep->nfds) {
            errno = EPROTO;
            return -1;
        }
        void *p = mmap(dst + (size_t)i * LB_PAGE_SIZE, (size_t)run * LB_PAGE_SIZE,
                       prot & (PROT_READ | PROT_WRITE), MAP_SHARED | MAP_FIXED,
                       rep->fds[fdi], (off_t)page * LB_PAGE_SIZE);
        if (p == MAP_FAILED)
            return -1;
        i += run;
    }
    return 0;
}

/* Errors that mean the daemon (or our connection to it) is gone. */
static int is_gone(int err)
{
    return err == ECONNRESET || err == EPIPE || err == ENOTCONN || err == ECONNREFUSED ||
           err == ENOENT;
}

static int fail_conn(struct lb_conn *c, int err)
{
    c->broken = 1;
    errno = err;
    return -1;
}

static int do_call(struct lb_conn *c, uint32_t op, const void *req, size_t reqlen,
                   const void *extra, size_t extralen, struct lb_reply *rep)
{
    unsigned char hdr[LB_REP_HEADER];
    rep->nfds = 0;
    rep->len = 0;
    if (c->broken)
        return fail_conn(c, ENOTCONN);
    if (LB_REQ_HEADER + reqlen + extralen > LB_MAX_MESSAGE) {
        errno = E2BIG;
        return -1;
    }
    uint32_t seq = ++c->seq;
    lb_put32(hdr, op);
    lb_put32(hdr + 4, seq);
    lb_put32(hdr + 8, (uint32_t)(reqlen + extralen));
    struct iovec iov[3] = {
        {hdr, LB_REQ_HEADER},
        {(void *)req, reqlen},
        {(void *)extra, extralen},
    };
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 3};
    ssize_t n;
    do
        n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return fail_conn(c, is_gone(errno) ? ENOTCONN : errno);

    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * LB_RECV_FDS)];
    } cbuf;
    struct iovec riov[2] = {{hdr, LB_REP_HEADER}, {rep->payload, rep->cap}};
    struct msghdr rmsg = {
        .msg_iov = riov,
        .msg_iovlen = 2,
        .msg_control = cbuf.buf,
        .msg_controllen = sizeof(cbuf.buf),
    };
    do
        n = recvmsg(c->fd, &rmsg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return fail_conn(c, is_gone(errno) ? ENOTCONN : errno);
    if (n == 0)
        return fail_conn(c, ENOTCONN);
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&rmsg); cm; cm = CMSG_NXTHDR(&rmsg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k && rep->nfds < LB_RECV_FDS; i++)
            memcpy(&rep->fds[rep->nfds++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
    }
    if ((rmsg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) || n < LB_REP_HEADER ||
        lb_get32(hdr) != op || lb_get32(hdr + 4) != seq ||
        lb_get32(hdr + 12) != (uint32_t)n - LB_REP_HEADER) {
        lb_debug("malformed reply to op %u (flags %#x, %zd bytes)", op, rmsg.msg_flags, n);
        lb_close_fds(rep);
        return fail_conn(c, EPROTO);
    }
    rep->status = (int32_t)lb_get32(hdr + 8);
    rep->len = (size_t)n - LB_REP_HEADER;
    if (rep->status < 0)
        lb_close_fds(rep); /* §3: none are sent with an error; be safe */
    return 0;
}

int lb_call(struct lb_conn *c, uint32_t op, const void *req, size_t reqlen, const void *extra,
            size_t extralen, struct lb_reply *rep)
{
    pthread_mutex_lock(&c->lock);
    int rc = do_call(c, op, req, reqlen, extra, extralen, rep);
    pthread_mutex_unlock(&c->lock);
    if (rc < 0)
        lb_debug("op %u failed: %s", op, strerror(errno));
    else if (rep->status < 0)
        lb_debug("op %u refused: %s", op, strerror(-rep->status));
    return rc;
}

int lb_call_simple(struct lb_conn *c, uint32_t op, const void *req, size_t reqlen, void *out,
                   size_t outcap, size_t *outlen)
{
    unsigned char buf[256];
    struct lb_reply rep = {.payload = buf, .cap = sizeof(buf)};
    if (lb_call(c, op, req, reqlen, NULL, 0, &rep) < 0)
        return -1;
    lb_close_fds(&rep);
    if (rep.status < 0) {
        errno = -rep.status;
        return -1;
    }
    if (out) {
        if (rep.len < outcap) {
            errno = EPROTO;
            return -1;
        }
        memcpy(out, buf, outcap);
    }
    if (outlen)
        *outlen = rep.len;
    return 0;
}

static void lb_close(struct lb_conn *c)
{
    if (c->gen_fd >= 0)
        close(c->gen_fd);
    c->gen_fd = -1;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->broken = 1;
    pthread_mutex_destroy(&c->lock);
}

static int lb_open(struct lb_conn *c, int fd)
{
    memset(c, 0, sizeof(*c));
    c->gen_fd = -1;
    c->pid = (int)getpid();
    if (fd < 0) {
        const char *path = getenv("XENPV_LOOPBACK_SOCKET");
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (!path || !*path) {
            lb_debug("XENPV_LOOPBACK_SOCKET is not set");
            errno = ENOENT; /* like a missing /dev/xen device */
            return -1;
        }
        if (strlen(path) >= sizeof(sa.sun_path)) {
            errno = ENAMETOOLONG;
            return -1;
        }
        strcpy(sa.sun_path, path);
        strcpy(c->path, path);
        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -1;
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            int err = errno;
            lb_debug("connect %s: %s", path, strerror(err));
            close(fd);
            errno = is_gone(err) ? ENOTCONN : err;
            return -1;
        }
    }
    c->fd = fd;
    pthread_mutex_init(&c->lock, NULL);

    unsigned char req[4], buf[64];
    lb_put32(req, LB_PROTOCOL_VERSION);
    struct lb_reply rep = {.payload = buf, .cap = sizeof(buf)};
    int rc = lb_call(c, LB_HELLO, req, sizeof(req), NULL, 0, &rep);
    if (rc == 0)
        rc = rep.status;
    else
        rc = -errno;
    if (rc == 0 && rep.len >= 24) {
        c->domid = lb_get32(buf + 4);
        c->privileged = lb_get32(buf + 8);
        c->max_grants = lb_get32(buf + 12);
        c->max_ports = lb_get32(buf + 16);
        if (lb_get32(buf + 20) != LB_PAGE_SIZE || rep.nfds != 1) {
            lb_close_fds(&rep);
            rc = -EPROTO;
        } else {
            c->gen_fd = rep.fds[0];
            rep.nfds = 0;
        }
    } else if (rc == 0) {
        lb_close_fds(&rep);
        rc = -EPROTO;
    }
    if (rc < 0) {
        lb_close(c);
        errno = -rc;
        return -1;
    }
    lb_debug("connected as domain %u (max_grants %u, max_ports %u)", c->domid, c->max_grants,
             c->max_ports);
    return 0;
}


static pthread_mutex_t shared_lock = PTHREAD_MUTEX_INITIALIZER;
static struct lb_conn *shared; /* this process's connection, or NULL */

static struct lb_conn *new_conn(int fd)
{
    struct lb_conn *c = malloc(sizeof(*c));
    if (!c)
        return NULL;
    if (lb_open(c, fd) < 0) {
        int err = errno;
        free(c);
        errno = err;
        return NULL;
    }
    c->refs = 1;
    return c;
}

struct lb_conn *lb_connect(int fd)
{
    if (fd >= 0)
        return new_conn(fd);
    pthread_mutex_lock(&shared_lock);
    /* A broken connection, one inherited across fork, or one to another socket than
     * $XENPV_LOOPBACK_SOCKET now names stays with the handles that still use it; new
     * handles get a new one. */
    const char *path = getenv("XENPV_LOOPBACK_SOCKET");
    if (shared && (shared->broken || shared->pid != (int)getpid() || !path ||
                   strcmp(path, shared->path) != 0))
        shared = NULL;
    if (shared)
        shared->refs++;
    else
        shared = new_conn(-1);
    struct lb_conn *c = shared;
    pthread_mutex_unlock(&shared_lock);
    return c;
}

void lb_disconnect(struct lb_conn *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&shared_lock);
    int last = --c->refs == 0;
    if (last && shared == c)
        shared = NULL;
    pthread_mutex_unlock(&shared_lock);
    if (last) {
        lb_close(c);
        free(c);
    }
}

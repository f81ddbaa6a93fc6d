/*
 * Client side of the loopback control protocol (docs/loopback-protocol.md), shared by the
 * replacement libraries.  Everything declared here is internal: the version scripts keep it
 * out of the libraries' dynamic symbol tables.
 */
#ifndef XENPV_SHIM_H
#define XENPV_SHIM_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* docs/loopback-protocol.md §3: framing limits and constants. */
#define LB_PROTOCOL_VERSION 1
#define LB_MAX_MESSAGE 131072
#define LB_MAX_FDS 250
#define LB_RECV_FDS 253
#define LB_REQ_HEADER 12
#define LB_REP_HEADER 16
#define LB_MAX_REFS 1024
#define LB_PAGE_SIZE 4096

/* docs/loopback-protocol.md §4: operation numbers. */
enum lb_op {
    LB_HELLO = 1,
    LB_GNT_SHARE = 2,
    LB_GNT_END = 3,
    LB_GNT_MAP = 4,
    LB_GNT_UNMAP = 5,
    LB_GNT_SET_NOTIFY = 6,
    LB_GNT_COPY = 7,
    LB_EVT_ALLOC_UNBOUND = 8,
    LB_EVT_BIND_INTERDOMAIN = 9,
    LB_EVT_UNBIND = 10,
    LB_EVT_NOTIFY = 11,
    LB_EVT_RESTRICT = 12,
    LB_EVT_STATUS = 13,
    LB_DOMAIN_LIST = 14,
    LB_FRAME_ALLOC = 20,
    LB_FOREIGN_MAP = 21,
    LB_EVT_BIND_VIRQ = 23,
    LB_DOMAIN_SHUTDOWN = 24,
    LB_DOMAIN_INFO = 25,
};

#define LB_GNT_WRITABLE 1u
#define LB_NOTIFY_CLEAR_BYTE 1u
#define LB_NOTIFY_SEND_EVENT 2u
#define LB_DOMFLAG_PRIVILEGED 1u
#define LB_DOMFLAG_DYING 2u
#define LB_DOMFLAG_RUNNING 4u
#define LB_DOMFLAG_SHUTDOWN 8u
/* DOMAIN_INFO entry: domid, flags, shutdown reason (u32 each), uuid (16 bytes). */
#define LB_DOMAIN_INFO_ENTRY 28

/* One connection to RUNDIR/dom<N>/control, shared by the handles of a process. */
struct lb_conn {
    int fd;
    int refs;         /* handles using it (lb_connect / lb_disconnect) */
    int pid;          /* process that connected it (a forked child connects anew) */
    char path[108];   /* socket path it was connected to ("" for a given descriptor) */
    int broken;       /* the daemon went away or broke the protocol: every call fails */
    uint32_t seq;
    pthread_mutex_t lock; /* one request in flight per connection (§2) */
    /* From HELLO. */
    uint32_t domid;
    uint32_t privileged;
    uint32_t max_grants;
    uint32_t max_ports;
    int gen_fd;       /* port-generation memfd, or -1 when closed */
};

/* A reply: header fields, payload and received descriptors. */
struct lb_reply {
    int32_t status;   /* 0 or -errno */
    void *payload;    /* caller-provided buffer */
    size_t cap;       /* its size */
    size_t len;       /* bytes received */
    int fds[LB_RECV_FDS];
    int nfds;
};

/* A reference to this process's connection to $XENPV_LOOPBACK_SOCKET (made, with HELLO,
 * on first use, or anew after a fork or when the daemon went away), or, if fd >= 0, a new
 * private connection over that already connected socket.  NULL with errno on failure. */
struct lb_conn *lb_connect(int fd);
/* Drop a reference; the last one closes the connection (the daemon then releases
 * everything still owned through it). */
void lb_disconnect(struct lb_conn *c);
/* Send one request (header + two payload pieces) and receive its reply into rep.  Returns
 * 0 (the daemon's verdict is rep->status) or, when the connection failed, -1 with errno set
 * (ENOTCONN when the daemon is gone, EPROTO on a malformed reply).  The rep->nfds
 * descriptors belong to the caller (always 0 unless the status is 0). */
int lb_call(struct lb_conn *c, uint32_t op, const void *req, size_t reqlen, const void *extra,
            size_t extralen, struct lb_reply *rep);
/* For replies without descriptors: like lb_call, but returns 0 or -1 with errno set
 * (errno = -status on refusal); copies the payload to out (outlen may be NULL). */
int lb_call_simple(struct lb_conn *c, uint32_t op, const void *req, size_t reqlen, void *out,
                   size_t outcap, size_t *outlen);
void lb_close_fds(struct lb_reply *rep);
/* Place the n pages of a successful GNT_MAP / FOREIGN_MAP reply (§4.4) at dst, which the
 * caller reserved: table is the reply's (fd_index, page) list, fds are rep's.  Runs of
 * consecutive pages of one descriptor become one MAP_FIXED mmap.  0, or -1 with errno
 * (EPROTO for a table naming a descriptor that did not arrive).  Closes nothing. */
int lb_place_pages(unsigned char *dst, const unsigned char *table, uint32_t n,
                   const struct lb_reply *rep, int prot);
/* Print a diagnostic when XENPV_SHIM_DEBUG is set. */
void lb_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Little-endian field access (x86-64 is little-endian; these keep the layout explicit). */
static inline void lb_put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}
static inline void lb_put16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}
static inline uint32_t lb_get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#endif

/*
 * libxenctrl.so.4.17 for the loopback emulator: the few calls Xen's PV tools and
 * xenstoreds make.
 *
 * vchan-socket-proxy asks xc_domain_getinfo whether the server domain still exists;
 * xenconsoled lists domains with it and checks its console ports with xc_evtchn_status;
 * C xenstored asks it, on each VIRQ_DOM_EXC, whether an introduced domain shut down or
 * died.  Domains come from the daemon's DOMAIN_INFO (flags, shutdown reason, uuid),
 * ports from EVT_STATUS (docs/loopback-protocol.md §4.8–4.9), over the process's
 * control connection.  The host-wide answers (xc_version, xc_physinfo,
 * xc_get_max_cpus) describe a Xen 4.17 machine with this host's CPUs and memory.
 */
#include "xenpv_shim.h"
#include "xenpv_xentypes.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct xc_interface_core {
    struct lb_conn *conn;
};

/* Room for the largest DOMAIN_LIST reply. */
#define DOMLIST_MAX LB_MAX_MESSAGE

XENPV_EXPORT xc_interface *xc_interface_open(struct xentoollog_logger *logger,
                                             struct xentoollog_logger *dombuild_logger,
                                             unsigned open_flags);
XENPV_EXPORT int xc_interface_close(xc_interface *xch);
XENPV_EXPORT int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid,
                                   unsigned int max_doms, xc_dominfo_t *info);
XENPV_EXPORT int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain,
                                       unsigned int max_domains, xc_domaininfo_t *info);
XENPV_EXPORT int xc_domain_get_guest_width(xc_interface *xch, uint32_t domid,
                                           unsigned int *guest_width);
XENPV_EXPORT int xc_version(xc_interface *xch, int cmd, void *arg);
XENPV_EXPORT int xc_get_max_cpus(xc_interface *xch);
XENPV_EXPORT int xc_physinfo(xc_interface *xch, xc_physinfo_t *info);
XENPV_EXPORT int xc_evtchn_status(xc_interface *xch, xc_evtchn_status_t *status);
XENPV_EXPORT int xc_readconsolering(xc_interface *xch, char *buffer, unsigned int *pnr_chars,
                                    int clear, int incremental, uint32_t *pindex);

xc_interface *xc_interface_open(struct xentoollog_logger *logger,
                                struct xentoollog_logger *dombuild_logger,
                                unsigned open_flags)
{
    xc_interface *xch = calloc(1, sizeof(*xch));
    if (!xch)
        return NULL;
    xch->conn = lb_connect(-1);
    if (!xch->conn) {
        int err = errno;
        free(xch);
        errno = err;
        return NULL;
    }
    return xch;
}

int xc_interface_close(xc_interface *xch)
{
    if (xch) {
        lb_disconnect(xch->conn);
        free(xch);
    }
    return 0;
}

/* One domain of a DOMAIN_INFO reply. */
struct dom_entry {
    uint32_t domid, flags, reason;
    uint8_t uuid[16];
};

static int cmp_domid(const void *a, const void *b)
{
    const struct dom_entry *x = a, *y = b;
    return x->domid < y->domid ? -1 : x->domid > y->domid;
}

/* Every live domain, in domid order: the count (and *out, to free), or -1 with errno. */
static int list_domains(xc_interface *xch, struct dom_entry **out)
{
    unsigned char *buf = malloc(DOMLIST_MAX);
    if (!buf)
        return -1;
    struct lb_reply rep = {.payload = buf, .cap = DOMLIST_MAX};
    int rc = -1;
    if (lb_call(xch->conn, LB_DOMAIN_INFO, NULL, 0, NULL, 0, &rep) < 0)
        goto out;
    lb_close_fds(&rep);
    if (rep.status < 0) {
        errno = -rep.status;
        goto out;
    }
    uint32_t count = rep.len >= 4 ? lb_get32(buf) : 0;
    if (rep.len != 4 + (size_t)count * LB_DOMAIN_INFO_ENTRY) {
        errno = EPROTO;
        goto out;
    }
    struct dom_entry *d = calloc(count ? count : 1, sizeof(*d));
    if (!d)
        goto out;
    for (uint32_t i = 0; i < count; i++) {
        const unsigned char *e = buf + 4 + (size_t)i * LB_DOMAIN_INFO_ENTRY;
        d[i].domid = lb_get32(e);
        d[i].flags = lb_get32(e + 4);
        d[i].reason = lb_get32(e + 8);
        memcpy(d[i].uuid, e + 12, 16);
    }
    qsort(d, count, sizeof(*d), cmp_domid);
    *out = d;
    rc = (int)count;
out:
    free(buf);
    return rc;
}

/* Nominal figures: the emulator does not account guest memory or time. */
#define NOMINAL_PAGES 256
#define NOMINAL_MAXMEM_KB 1024

/* Up to max_doms live domains with domid >= first_domid, in domid order. */
int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid, unsigned int max_doms,
                      xc_dominfo_t *info)
{
    struct dom_entry *doms;
    int count = list_domains(xch, &doms);
    if (count < 0)
        return -1;
    unsigned int n = 0;
    for (int i = 0; i < count && n < max_doms; i++) {
        const struct dom_entry *e = &doms[i];
        if (e->domid < first_domid)
            continue;
        xc_dominfo_t *d = &info[n++];
        memset(d, 0, sizeof(*d));
        d->domid = e->domid;
        d->dying = !!(e->flags & LB_DOMFLAG_DYING);
        d->running = !!(e->flags & LB_DOMFLAG_RUNNING) && !(e->flags & LB_DOMFLAG_SHUTDOWN);
        d->blocked = !d->running && !d->dying;
        if (e->flags & LB_DOMFLAG_SHUTDOWN) {
            /* libxc reports a crash as crashed, not shutdown */
            d->shutdown_reason = e->reason;
            d->crashed = e->reason == SHUTDOWN_crash;
            d->shutdown = !d->crashed;
        }
        memcpy(d->handle, e->uuid, sizeof(d->handle));
        d->nr_online_vcpus = 1;
        d->max_vcpu_id = 0;
        d->nr_pages = NOMINAL_PAGES;
        d->max_memkb = NOMINAL_MAXMEM_KB;
        d->cpupool = 0;
    }
    free(doms);
    return (int)n;
}

/* The domctl view of the same domains (XEN_DOMCTL_getdomaininfo records). */
int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain, unsigned int max_domains,
                          xc_domaininfo_t *info)
{
    struct dom_entry *doms;
    int count = list_domains(xch, &doms);
    if (count < 0)
        return -1;
    unsigned int n = 0;
    for (int i = 0; i < count && n < max_domains; i++) {
        const struct dom_entry *e = &doms[i];
        if (e->domid < first_domain)
            continue;
        xc_domaininfo_t *d = &info[n++];
        memset(d, 0, sizeof(*d));
        d->domain = (domid_t)e->domid;
        uint32_t flags = 0;
        if (e->flags & LB_DOMFLAG_DYING)
            flags |= XEN_DOMINF_dying;
        if (e->flags & LB_DOMFLAG_SHUTDOWN)
            flags |= XEN_DOMINF_shutdown |
                     (e->reason & XEN_DOMINF_shutdownmask) << XEN_DOMINF_shutdownshift;
        else if (e->flags & LB_DOMFLAG_RUNNING)
            flags |= XEN_DOMINF_running;
        else
            flags |= XEN_DOMINF_blocked;
        d->flags = flags;
        d->tot_pages = NOMINAL_PAGES;
        d->max_pages = NOMINAL_MAXMEM_KB / 4;
        d->nr_online_vcpus = 1;
        d->max_vcpu_id = 0;
        memcpy(d->handle, e->uuid, sizeof(d->handle));
    }
    free(doms);
    return (int)n;
}

/* Every emulated domain is a 64-bit PV guest: 8-byte words.  ESRCH for an unknown one. */
int xc_domain_get_guest_width(xc_interface *xch, uint32_t domid, unsigned int *guest_width)
{
    xc_dominfo_t d;
    int n = xc_domain_getinfo(xch, domid, 1, &d);
    if (n < 0)
        return -1;
    if (n == 0 || d.domid != domid) {
        errno = ESRCH;
        return -1;
    }
    *guest_width = 8;
    return 0;
}

static void copy_text(void *dst, size_t cap, const char *text)
{
    memset(dst, 0, cap);
    strncpy(dst, text, cap - 1);
}

/* XENVER_*: the Xen 4.17 (Debian 4.17.7) that these libraries stand in for. */
int xc_version(xc_interface *xch, int cmd, void *arg)
{
    switch (cmd) {
    case XENVER_version:
        return (4 << 16) | 17;
    case XENVER_extraversion:
        copy_text(arg, 16, ".7");
        return 0;
    case XENVER_compile_info: {
        xen_compile_info_t *ci = arg;
        copy_text(ci->compiler, sizeof(ci->compiler), "xenpv loopback emulator");
        copy_text(ci->compile_by, sizeof(ci->compile_by), "xenpv");
        copy_text(ci->compile_domain, sizeof(ci->compile_domain), "");
        copy_text(ci->compile_date, sizeof(ci->compile_date), "");
        return 0;
    }
    case XENVER_capabilities:
        copy_text(arg, 1024, "xen-3.0-x86_64");
        return 0;
    case XENVER_changeset:
        copy_text(arg, 64, "xenpv loopback");
        return 0;
    case XENVER_platform_parameters:
        ((xen_platform_parameters_t *)arg)->virt_start = 0xffff800000000000UL;
        return 0;
    case XENVER_get_features: {
        xen_feature_info_t *fi = arg;
        fi->submap = 0; /* no optional PV features */
        return 0;
    }
    case XENVER_pagesize:
        return LB_PAGE_SIZE;
    case XENVER_guest_handle: {
        /* the caller's own domain handle (uuid) */
        xc_dominfo_t d;
        uint32_t self = xch->conn->domid;
        if (xc_domain_getinfo(xch, self, 1, &d) != 1 || d.domid != self)
            return -1;
        memcpy(arg, d.handle, 16);
        return 0;
    }
    case XENVER_commandline:
        copy_text(arg, 1024, "");
        return 0;
    default:
        errno = ENOSYS;
        return -1;
    }
}

static unsigned int host_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_CONF);
    return n > 0 ? (unsigned int)n : 1;
}

int xc_get_max_cpus(xc_interface *xch)
{
    return (int)host_cpus();
}

/* One node, one socket holding the host's CPUs; memory as the host reports it. */
int xc_physinfo(xc_interface *xch, xc_physinfo_t *info)
{
    memset(info, 0, sizeof(*info));
    unsigned int cpus = host_cpus();
    info->threads_per_core = 1;
    info->cores_per_socket = cpus;
    info->nr_cpus = cpus;
    info->max_cpu_id = cpus - 1;
    info->nr_nodes = 1;
    info->max_node_id = 0;
    info->cpu_khz = 1000000;
    long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
    long psize = sysconf(_SC_PAGESIZE);
    if (pages > 0 && psize > 0) {
        info->total_pages = (uint64_t)pages * (uint64_t)psize / LB_PAGE_SIZE;
        info->max_mfn = info->total_pages - 1;
    }
    if (avail > 0 && psize > 0)
        info->free_pages = (uint64_t)avail * (uint64_t)psize / LB_PAGE_SIZE;
    return 0;
}

int xc_evtchn_status(xc_interface *xch, xc_evtchn_status_t *status)
{
    unsigned char req[8], out[12];
    uint32_t dom = status->dom == DOMID_SELF ? xch->conn->domid : status->dom;
    if (status->port >= xch->conn->max_ports) {
        /* Xen: EVTCHNOP_status of a port beyond the domain's port space is EINVAL (tools
         * such as lsevtchn scan ports until this error). */
        errno = EINVAL;
        return -1;
    }
    lb_put32(req, dom);
    lb_put32(req + 4, status->port);
    if (lb_call_simple(xch->conn, LB_EVT_STATUS, req, sizeof(req), out, sizeof(out), NULL) < 0)
        return -1;
    uint32_t state = lb_get32(out), rdom = lb_get32(out + 4), rport = lb_get32(out + 8);
    status->status = state;
    status->vcpu = 0;
    memset(&status->u, 0, sizeof(status->u));
    if (state == EVTCHNSTAT_unbound) {
        status->u.unbound.dom = (domid_t)rdom;
    } else if (state == EVTCHNSTAT_interdomain) {
        status->u.interdomain.dom = (domid_t)rdom;
        status->u.interdomain.port = rport;
    }
    return 0;
}

/* The hypervisor's own console ring does not exist here. */
int xc_readconsolering(xc_interface *xch, char *buffer, unsigned int *pnr_chars, int clear,
                       int incremental, uint32_t *pindex)
{
    errno = EOPNOTSUPP;
    return -1;
}

/*
 * Device-model calls QEMU (xen-qemu-system-i386) links against.  Its PV backends
 * (-machine xenpv) never reach them, but the loader needs every imported symbol
 * (BIND_NOW).  The emulator has no physical devices, interrupts or HVM parameters:
 * each fails with EOPNOTSUPP, as a hypervisor without that feature would
 * (xc_domain_shutdown excepted: the emulator shuts domains down).
 */
XENPV_EXPORT int xc_domain_bind_pt_pci_irq(xc_interface *xch, uint32_t domid,
                                           uint8_t machine_irq, uint8_t bus, uint8_t device,
                                           uint8_t intx);
XENPV_EXPORT int xc_domain_iomem_permission(xc_interface *xch, uint32_t domid,
                                            unsigned long first_mfn, unsigned long nr_mfns,
                                            uint8_t allow_access);
XENPV_EXPORT int xc_domain_ioport_mapping(xc_interface *xch, uint32_t domid,
                                          uint32_t first_gport, uint32_t first_mport,
                                          uint32_t nr_ports, uint32_t add_mapping);
XENPV_EXPORT int xc_domain_memory_mapping(xc_interface *xch, uint32_t domid,
                                          unsigned long first_gfn, unsigned long first_mfn,
                                          unsigned long nr_mfns, uint32_t add_mapping);
XENPV_EXPORT int xc_domain_populate_physmap_exact(xc_interface *xch, uint32_t domid,
                                                  unsigned long nr_extents,
                                                  unsigned int extent_order,
                                                  unsigned int mem_flags,
                                                  xen_pfn_t *extent_start);
XENPV_EXPORT int xc_domain_shutdown(xc_interface *xch, uint32_t domid, int reason);
XENPV_EXPORT int xc_domain_unbind_msi_irq(xc_interface *xch, uint32_t domid, uint32_t gvec,
                                          uint32_t pirq, uint32_t gflags);
XENPV_EXPORT int xc_domain_unbind_pt_irq(xc_interface *xch, uint32_t domid,
                                         uint8_t machine_irq, uint8_t irq_type, uint8_t bus,
                                         uint8_t device, uint8_t intx, uint8_t isa_irq);
XENPV_EXPORT int xc_domain_update_msi_irq(xc_interface *xch, uint32_t domid, uint32_t gvec,
                                          uint32_t pirq, uint32_t gflags, uint64_t gtable);
XENPV_EXPORT int xc_get_hvm_param(xc_interface *handle, uint32_t dom, int param,
                                  unsigned long *value);
XENPV_EXPORT int xc_set_hvm_param(xc_interface *handle, uint32_t dom, int param,
                                  unsigned long value);
XENPV_EXPORT int xc_physdev_map_pirq(xc_interface *xch, uint32_t domid, int index, int *pirq);
XENPV_EXPORT int xc_physdev_map_pirq_msi(xc_interface *xch, uint32_t domid, int index,
                                         int *pirq, int devfn, int bus, int entry_nr,
                                         uint64_t table_base);
XENPV_EXPORT int xc_physdev_unmap_pirq(xc_interface *xch, uint32_t domid, int pirq);

static int unsupported(void)
{
    errno = EOPNOTSUPP;
    return -1;
}

int xc_domain_bind_pt_pci_irq(xc_interface *xch, uint32_t domid, uint8_t machine_irq,
                              uint8_t bus, uint8_t device, uint8_t intx)
{
    return unsupported();
}

int xc_domain_iomem_permission(xc_interface *xch, uint32_t domid, unsigned long first_mfn,
                               unsigned long nr_mfns, uint8_t allow_access)
{
    return unsupported();
}

int xc_domain_ioport_mapping(xc_interface *xch, uint32_t domid, uint32_t first_gport,
                             uint32_t first_mport, uint32_t nr_ports, uint32_t add_mapping)
{
    return unsupported();
}

int xc_domain_memory_mapping(xc_interface *xch, uint32_t domid, unsigned long first_gfn,
                             unsigned long first_mfn, unsigned long nr_mfns,
                             uint32_t add_mapping)
{
    return unsupported();
}

int xc_domain_populate_physmap_exact(xc_interface *xch, uint32_t domid,
                                     unsigned long nr_extents, unsigned int extent_order,
                                     unsigned int mem_flags, xen_pfn_t *extent_start)
{
    return unsupported();
}

/* DOMAIN_SHUTDOWN: the domain is marked shut down with reason and VIRQ_DOM_EXC fires. */
int xc_domain_shutdown(xc_interface *xch, uint32_t domid, int reason)
{
    unsigned char req[8];
    if (reason < 0) {
        errno = EINVAL;
        return -1;
    }
    lb_put32(req, domid);
    lb_put32(req + 4, (uint32_t)reason);
    return lb_call_simple(xch->conn, LB_DOMAIN_SHUTDOWN, req, sizeof(req), NULL, 0, NULL);
}

int xc_domain_unbind_msi_irq(xc_interface *xch, uint32_t domid, uint32_t gvec, uint32_t pirq,
                             uint32_t gflags)
{
    return unsupported();
}

int xc_domain_unbind_pt_irq(xc_interface *xch, uint32_t domid, uint8_t machine_irq,
                            uint8_t irq_type, uint8_t bus, uint8_t device, uint8_t intx,
                            uint8_t isa_irq)
{
    return unsupported();
}

int xc_domain_update_msi_irq(xc_interface *xch, uint32_t domid, uint32_t gvec, uint32_t pirq,
                             uint32_t gflags, uint64_t gtable)
{
    return unsupported();
}

int xc_get_hvm_param(xc_interface *handle, uint32_t dom, int param, unsigned long *value)
{
    return unsupported();
}

int xc_set_hvm_param(xc_interface *handle, uint32_t dom, int param, unsigned long value)
{
    return unsupported();
}

int xc_physdev_map_pirq(xc_interface *xch, uint32_t domid, int index, int *pirq)
{
    return unsupported();
}

int xc_physdev_map_pirq_msi(xc_interface *xch, uint32_t domid, int index, int *pirq, int devfn,
                            int bus, int entry_nr, uint64_t table_base)
{
    return unsupported();
}

int xc_physdev_unmap_pirq(xc_interface *xch, uint32_t domid, int pirq)
{
    return unsupported();
}

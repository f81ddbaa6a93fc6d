/*
 * libxenctrl.so.4.17 for the loopback emulator: the few calls Xen's PV tools make.
 *
 * vchan-socket-proxy asks xc_domain_getinfo whether the server domain still exists;
 * xenconsoled lists domains with it and checks its console ports with xc_evtchn_status.
 * Both are answered from the daemon (DOMAIN_LIST, EVT_STATUS in
 * docs/loopback-protocol.md §4.8–4.9) over the process's control connection.
 */
#include "xenpv_shim.h"
#include "xenpv_xentypes.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

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

static int cmp_domid(const void *a, const void *b)
{
    uint32_t x = lb_get32(a), y = lb_get32(b);
    return x < y ? -1 : x > y;
}

/* Up to max_doms live domains with domid >= first_domid, in domid order. */
int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid, unsigned int max_doms,
                      xc_dominfo_t *info)
{
    unsigned char *buf = malloc(DOMLIST_MAX);
    if (!buf)
        return -1;
    struct lb_reply rep = {.payload = buf, .cap = DOMLIST_MAX};
    int rc = -1;
    if (lb_call(xch->conn, LB_DOMAIN_LIST, NULL, 0, NULL, 0, &rep) < 0)
        goto out;
    lb_close_fds(&rep);
    if (rep.status < 0) {
        errno = -rep.status;
        goto out;
    }
    uint32_t count = rep.len >= 4 ? lb_get32(buf) : 0;
    if (rep.len != 4 + (size_t)count * 8) {
        errno = EPROTO;
        goto out;
    }
    qsort(buf + 4, count, 8, cmp_domid);
    unsigned int n = 0;
    for (uint32_t i = 0; i < count && n < max_doms; i++) {
        uint32_t domid = lb_get32(buf + 4 + 8 * i), flags = lb_get32(buf + 8 + 8 * i);
        if (domid < first_domid)
            continue;
        xc_dominfo_t *d = &info[n++];
        memset(d, 0, sizeof(*d));
        d->domid = domid;
        d->dying = !!(flags & LB_DOMFLAG_DYING);
        d->running = !!(flags & LB_DOMFLAG_RUNNING);
        d->blocked = !d->running && !d->dying;
        d->nr_online_vcpus = 1;
        d->max_vcpu_id = 0;
        d->nr_pages = 256; /* nominal: the emulator does not account guest memory */
        d->max_memkb = 1024;
        d->cpupool = 0;
    }
    rc = (int)n;
out:
    free(buf);
    return rc;
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
 * each fails with EOPNOTSUPP, as a hypervisor without that feature would.
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

int xc_domain_shutdown(xc_interface *xch, uint32_t domid, int reason)
{
    return unsupported();
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

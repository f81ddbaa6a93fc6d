/*
 * libxendevicemodel.so.1 for the loopback emulator.
 *
 * PV backends in a device model (QEMU) open a device-model handle at start-up but use it
 * only for HVM guests (ioreq servers, interrupts, dirty tracking), which the emulator does
 * not have.  Opening returns a dummy handle; every operation fails with EOPNOTSUPP.
 */
#include "xenpv_xentypes.h"

#include <errno.h>
#include <stdlib.h>

struct xendevicemodel_handle {
    domid_t restricted;
};
struct xen_dm_op_modified_memory_extent;

XENPV_EXPORT xendevicemodel_handle *xendevicemodel_open(struct xentoollog_logger *logger,
                                                        unsigned int open_flags)
{
    return calloc(1, sizeof(xendevicemodel_handle));
}

XENPV_EXPORT int xendevicemodel_close(xendevicemodel_handle *dmod)
{
    free(dmod);
    return 0;
}

XENPV_EXPORT int xendevicemodel_restrict(xendevicemodel_handle *dmod, domid_t domid)
{
    dmod->restricted = domid;
    return 0;
}

/* An operation the emulator does not provide: fail with EOPNOTSUPP. */
#define UNSUPPORTED(name, ...)                                                               \
    XENPV_EXPORT int xendevicemodel_##name(xendevicemodel_handle *dmod, domid_t domid,       \
                                           __VA_ARGS__)                                      \
    {                                                                                        \
        errno = EOPNOTSUPP;                                                                  \
        return -1;                                                                           \
    }

UNSUPPORTED(create_ioreq_server, int handle_bufioreq, ioservid_t *id)
UNSUPPORTED(get_ioreq_server_info, ioservid_t id, xen_pfn_t *ioreq_gfn,
            xen_pfn_t *bufioreq_gfn, evtchn_port_t *bufioreq_port)
UNSUPPORTED(map_io_range_to_ioreq_server, ioservid_t id, int is_mmio, uint64_t start,
            uint64_t end)
UNSUPPORTED(unmap_io_range_from_ioreq_server, ioservid_t id, int is_mmio, uint64_t start,
            uint64_t end)
UNSUPPORTED(map_mem_type_to_ioreq_server, ioservid_t id, uint16_t type, uint32_t flags)
UNSUPPORTED(map_pcidev_to_ioreq_server, ioservid_t id, uint16_t segment, uint8_t bus,
            uint8_t device, uint8_t function)
UNSUPPORTED(unmap_pcidev_from_ioreq_server, ioservid_t id, uint16_t segment, uint8_t bus,
            uint8_t device, uint8_t function)
UNSUPPORTED(destroy_ioreq_server, ioservid_t id)
UNSUPPORTED(set_ioreq_server_state, ioservid_t id, int enabled)
UNSUPPORTED(set_pci_intx_level, uint16_t segment, uint8_t bus, uint8_t device, uint8_t intx,
            unsigned int level)
UNSUPPORTED(set_isa_irq_level, uint8_t irq, unsigned int level)
UNSUPPORTED(set_irq_level, unsigned int irq, unsigned int level)
UNSUPPORTED(set_pci_link_route, uint8_t link, uint8_t irq)
UNSUPPORTED(inject_msi, uint64_t msi_addr, uint32_t msi_data)
UNSUPPORTED(track_dirty_vram, uint64_t first_pfn, uint32_t nr, unsigned long *dirty_bitmap)
UNSUPPORTED(modified_memory, uint64_t first_pfn, uint32_t nr)
UNSUPPORTED(modified_memory_bulk, struct xen_dm_op_modified_memory_extent *extents,
            uint32_t nr)
UNSUPPORTED(set_mem_type, int mem_type, uint64_t first_pfn, uint32_t nr)
UNSUPPORTED(inject_event, int vcpu, uint8_t vector, uint8_t type, uint32_t error_code,
            uint8_t insn_len, uint64_t extra)
UNSUPPORTED(shutdown, unsigned int reason)
UNSUPPORTED(relocate_memory, uint32_t size, uint64_t src_gfn, uint64_t dst_gfn)
UNSUPPORTED(pin_memory_cacheattr, uint64_t start, uint64_t end, uint32_t type)
UNSUPPORTED(nr_vcpus, unsigned int *vcpus)

/*
 * libxenforeignmemory.so.1 for the loopback emulator.
 *
 * The emulator gives domains no guest-frame namespace, so foreign mappings of guest frames
 * cannot be served: opening succeeds with a dummy handle (QEMU and xenconsoled open one at
 * start-up and only map through it as a fallback), and every mapping fails with EOPNOTSUPP,
 * which the callers treat as "this frame cannot be mapped".
 */
#include "xenpv_xentypes.h"

#include <errno.h>
#include <stdlib.h>

struct xenforeignmemory_handle {
    domid_t restricted; /* 0 = not restricted */
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

xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger,
                                               unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return calloc(1, sizeof(xenforeignmemory_handle));
}

int xenforeignmemory_close(xenforeignmemory_handle *fmem)
{
    free(fmem);
    return 0;
}

void *xenforeignmemory_map2(xenforeignmemory_handle *fmem, uint32_t dom, void *addr, int prot,
                            int flags, size_t pages, const xen_pfn_t arr[], int err[])
{
    (void)fmem;
    (void)dom;
    (void)addr;
    (void)prot;
    (void)flags;
    (void)arr;
    if (err)
        for (size_t i = 0; i < pages; i++)
            err[i] = -EOPNOTSUPP;
    errno = EOPNOTSUPP;
    return NULL;
}

void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot, size_t pages,
                           const xen_pfn_t arr[], int err[])
{
    return xenforeignmemory_map2(fmem, dom, NULL, prot, 0, pages, arr, err);
}

int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages)
{
    (void)fmem;
    (void)addr;
    (void)pages;
    errno = EINVAL; /* nothing was ever mapped */
    return -1;
}

int xenforeignmemory_restrict(xenforeignmemory_handle *fmem, domid_t domid)
{
    fmem->restricted = domid;
    return 0;
}

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

/*
 * Public types and prototypes of Xen's stable tool libraries, as far as the xenpv
 * replacement libraries implement them.  Written for xenpv from the documented ABI of
 * Xen 4.17 (type sizes and structure layouts are fixed by that ABI; see shim/README.md).
 * Consumers never include this file: they were compiled against Xen's own headers, and
 * this file only has to agree with those on sizes, layouts and calling conventions.
 */
#ifndef XENPV_XENTYPES_H
#define XENPV_XENTYPES_H

#include <stddef.h>
#include <stdint.h>

#define XENPV_EXPORT __attribute__((visibility("default")))

typedef uint16_t domid_t;
typedef uint32_t evtchn_port_t;
typedef uint32_t grant_ref_t;
typedef unsigned long xen_pfn_t;
typedef uint16_t ioservid_t;

struct xentoollog_logger;

/* ---- libxengnttab (xengnttab.h) ------------------------------------------------------ */
typedef struct xengntdev_handle xengnttab_handle;
typedef struct xengntdev_handle xengntshr_handle;

/* xengnttab.h: struct xengnttab_grant_copy_segment (24 bytes on x86-64). */
typedef struct xengnttab_grant_copy_segment {
    union xengnttab_copy_ptr {
        void *virt;
        struct {
            uint32_t ref;
            uint16_t offset;
            uint16_t domid;
        } foreign;
    } source, dest;
    uint16_t len;
    uint16_t flags;
    int16_t status;
} xengnttab_grant_copy_segment_t;

/* grant_table.h: GNTCOPY_* flags and GNTST_* status codes. */
#define GNTCOPY_source_gref 1
#define GNTCOPY_dest_gref 2
#define GNTST_okay 0
#define GNTST_general_error (-1)
#define GNTST_bad_domain (-2)
#define GNTST_bad_gntref (-3)
#define GNTST_permission_denied (-8)
#define GNTST_bad_copy_arg (-10)

#define XEN_PAGE_SHIFT 12
#define XEN_PAGE_SIZE 4096u

/* ---- libxenevtchn (xenevtchn.h) ------------------------------------------------------ */
typedef struct xenevtchn_handle xenevtchn_handle;
typedef int xenevtchn_port_or_error_t;
#define XENEVTCHN_NO_CLOEXEC (1 << 0)

/* ---- libxenctrl (xenctrl.h) ----------------------------------------------------------- */
typedef struct xc_interface_core xc_interface;

/* arch-x86/xen.h: struct xen_arch_domainconfig (Xen 4.17, x86): two uint32_t. */
struct xenpv_arch_domainconfig {
    uint32_t emulation_flags;
    uint32_t misc_flags;
};

/* xenctrl.h: xc_dominfo_t (Xen 4.17, x86-64; 112 bytes). */
typedef struct xc_dominfo {
    uint32_t domid;
    uint32_t ssidref;
    unsigned int dying : 1, crashed : 1, shutdown : 1, paused : 1, blocked : 1, running : 1,
        hvm : 1, debugged : 1, xenstore : 1, hap : 1;
    unsigned int shutdown_reason;
    unsigned long nr_pages;
    unsigned long nr_outstanding_pages;
    unsigned long nr_shared_pages;
    unsigned long nr_paged_pages;
    unsigned long shared_info_frame;
    uint64_t cpu_time;
    unsigned long max_memkb;
    unsigned int nr_online_vcpus;
    unsigned int max_vcpu_id;
    uint8_t handle[16];
    unsigned int cpupool;
    uint8_t gpaddr_bits;
    struct xenpv_arch_domainconfig arch_config;
} xc_dominfo_t;

/* domctl.h: struct xen_domctl_getdomaininfo = xc_domaininfo_t (Xen 4.17, x86-64; 112
 * bytes), and its XEN_DOMINF_* flags. */
#define XEN_DOMINF_dying (1u << 0)
#define XEN_DOMINF_shutdown (1u << 2)
#define XEN_DOMINF_blocked (1u << 4)
#define XEN_DOMINF_running (1u << 5)
#define XEN_DOMINF_shutdownshift 16
#define XEN_DOMINF_shutdownmask 255u
typedef struct xen_domctl_getdomaininfo {
    domid_t domain;
    uint16_t pad1;
    uint32_t flags;
    uint64_t tot_pages;
    uint64_t max_pages;
    uint64_t outstanding_pages;
    uint64_t shr_pages;
    uint64_t paged_pages;
    uint64_t shared_info_frame;
    uint64_t cpu_time;
    uint32_t nr_online_vcpus;
    uint32_t max_vcpu_id;
    uint32_t ssidref;
    uint8_t handle[16];
    uint32_t cpupool;
    uint8_t gpaddr_bits;
    uint8_t pad2[7];
    struct xenpv_arch_domainconfig arch_config;
} xc_domaininfo_t;

/* sysctl.h: struct xen_sysctl_physinfo = xc_physinfo_t (Xen 4.17; 112 bytes). */
typedef struct xen_sysctl_physinfo {
    uint32_t threads_per_core;
    uint32_t cores_per_socket;
    uint32_t nr_cpus;
    uint32_t max_cpu_id;
    uint32_t nr_nodes;
    uint32_t max_node_id;
    uint32_t cpu_khz;
    uint32_t capabilities;
    uint32_t arch_capabilities;
    uint32_t pad;
    uint64_t total_pages;
    uint64_t free_pages;
    uint64_t scrub_pages;
    uint64_t outstanding_pages;
    uint64_t max_mfn;
    uint32_t hw_cap[8];
} xc_physinfo_t;

/* version.h: XENVER_* commands of xc_version and their argument types. */
#define XENVER_version 0
#define XENVER_extraversion 1
#define XENVER_compile_info 2
#define XENVER_capabilities 3
#define XENVER_changeset 4
#define XENVER_platform_parameters 5
#define XENVER_get_features 6
#define XENVER_pagesize 7
#define XENVER_guest_handle 8
#define XENVER_commandline 9
typedef struct xen_compile_info {
    char compiler[64];
    char compile_by[16];
    char compile_domain[32];
    char compile_date[32];
} xen_compile_info_t;
typedef struct xen_feature_info {
    unsigned int submap_idx;
    uint32_t submap;
} xen_feature_info_t;
typedef struct xen_platform_parameters {
    unsigned long virt_start;
} xen_platform_parameters_t;

/* sched.h: the shutdown reasons (SCHEDOP_shutdown). */
#define SHUTDOWN_crash 3

/* xen.h: the one virtual IRQ the emulator raises. */
#define VIRQ_DOM_EXC 3

/* event_channel.h: struct evtchn_status (EVTCHNOP_status; 24 bytes). */
#define EVTCHNSTAT_closed 0
#define EVTCHNSTAT_unbound 1
#define EVTCHNSTAT_interdomain 2
#define EVTCHNSTAT_pirq 3
#define EVTCHNSTAT_virq 4
#define EVTCHNSTAT_ipi 5
#define DOMID_SELF ((domid_t)0x7FF0U)

typedef struct evtchn_status {
    domid_t dom;
    evtchn_port_t port;
    uint32_t status;
    uint32_t vcpu;
    union {
        struct {
            domid_t dom;
        } unbound;
        struct {
            domid_t dom;
            evtchn_port_t port;
        } interdomain;
        uint32_t pirq;
        uint32_t virq;
    } u;
} xc_evtchn_status_t;

/* ---- libxenforeignmemory / libxendevicemodel ------------------------------------------ */
typedef struct xenforeignmemory_handle xenforeignmemory_handle;
typedef struct xenforeignmemory_resource_handle xenforeignmemory_resource_handle;
typedef struct xendevicemodel_handle xendevicemodel_handle;

/* ---- libxentoolcore (xentoolcore_internal.h) ------------------------------------------ */
typedef struct Xentoolcore__Active_Handle Xentoolcore__Active_Handle;
typedef int Xentoolcore__Restrict_Callback(Xentoolcore__Active_Handle *, domid_t);
/* Only the first member is used here; the rest belongs to the registering library. */
struct Xentoolcore__Active_Handle {
    Xentoolcore__Restrict_Callback *restrict_callback;
};

#if defined(__x86_64__)
_Static_assert(sizeof(xc_dominfo_t) == 112, "xc_dominfo_t layout");
_Static_assert(offsetof(xc_dominfo_t, handle) == 80, "xc_dominfo_t.handle offset");
_Static_assert(sizeof(xc_evtchn_status_t) == 24, "evtchn_status layout");
_Static_assert(sizeof(xc_domaininfo_t) == 112, "xen_domctl_getdomaininfo layout");
_Static_assert(offsetof(xc_domaininfo_t, handle) == 76, "getdomaininfo.handle offset");
_Static_assert(sizeof(xc_physinfo_t) == 112, "xen_sysctl_physinfo layout");
_Static_assert(sizeof(xengnttab_grant_copy_segment_t) == 24, "grant copy segment layout");
#endif

#endif

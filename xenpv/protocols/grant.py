"""Grant tables (``xen/grant_table.h``): entries, flags, operations, status codes.

A grant reference indexes the *granter's* table; v1 entries are 8 bytes (512 per page), v2
entries 16 bytes with the same 4-byte header.  The ``gnttab_*`` records are the hypercall
argument structs (x86-64 layout), used by the loopback emulator's grant operations and for
reference; userspace on real Xen goes through the gntdev/gntalloc ioctls
(:mod:`xenpv.protocols.ioctl`).  Statuses are ``GNTST_*`` (i16); anything but
``GNTST_okay`` is a failure (R9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from xenpv.protocols import ProtocolError
from xenpv.protocols.layout import (
    XEN_PAGE_SIZE,
    Field,
    Layout,
    Record,
    c_struct,
    pad,
    parse_xs_uint,
)

# xen.h: reserved domain ids
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF
DOMID_MASK = 0x7FFF

# grant_table.h: reserved entries
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

# grant_table.h: entry flags
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
_GTF_readonly = 2
GTF_readonly = 1 << _GTF_readonly
_GTF_reading = 3
GTF_reading = 1 << _GTF_reading
_GTF_writing = 4
GTF_writing = 1 << _GTF_writing
_GTF_PWT = 5
GTF_PWT = 1 << _GTF_PWT
_GTF_PCD = 6
GTF_PCD = 1 << _GTF_PCD
_GTF_PAT = 7
GTF_PAT = 1 << _GTF_PAT
_GTF_sub_page = 8
GTF_sub_page = 1 << _GTF_sub_page
_GTF_transfer_committed = 2
GTF_transfer_committed = 1 << _GTF_transfer_committed
_GTF_transfer_completed = 3
GTF_transfer_completed = 1 << _GTF_transfer_completed

# grant_table.h: hypercall commands
GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6
GNTTABOP_unmap_and_replace = 7
GNTTABOP_set_version = 8
GNTTABOP_get_status_frames = 9
GNTTABOP_get_version = 10
GNTTABOP_swap_grant_ref = 11
GNTTABOP_cache_flush = 12

# grant_table.h: map flags
_GNTMAP_device_map = 0
GNTMAP_device_map = 1 << _GNTMAP_device_map
_GNTMAP_host_map = 1
GNTMAP_host_map = 1 << _GNTMAP_host_map
_GNTMAP_readonly = 2
GNTMAP_readonly = 1 << _GNTMAP_readonly
_GNTMAP_application_map = 3
GNTMAP_application_map = 1 << _GNTMAP_application_map
_GNTMAP_contains_pte = 4
GNTMAP_contains_pte = 1 << _GNTMAP_contains_pte
_GNTMAP_guest_avail0 = 16
GNTMAP_guest_avail_mask = (0xFFFFFFFF << _GNTMAP_guest_avail0) & 0xFFFFFFFF

# grant_table.h: copy flags
_GNTCOPY_source_gref = 0
GNTCOPY_source_gref = 1 << _GNTCOPY_source_gref
_GNTCOPY_dest_gref = 1
GNTCOPY_dest_gref = 1 << _GNTCOPY_dest_gref

# grant_table.h: cache flush ops
GNTTAB_CACHE_CLEAN = 1 << 0
GNTTAB_CACHE_INVAL = 1 << 1
GNTTAB_CACHE_SOURCE_GREF = 1 << 31

# grant_table.h: status codes
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13

#: Status code -> name (without the ``GNTST_`` prefix).
GNTST_NAMES: dict[int, str] = {
    v: k[len("GNTST_") :] for k, v in dict(globals()).items() if k.startswith("GNTST_") and isinstance(v, int)
}

#: v1 entries per 4096-byte table page.
GRANT_ENTRIES_V1_PER_PAGE = XEN_PAGE_SIZE // 8
#: Largest grant reference (grant_ref_t is u32).
GRANT_REF_MAX = 0xFFFFFFFF


def gntst_name(status: int) -> str:
    """Name of a ``GNTST_*`` status (``"unknown(-99)"`` for others)."""
    return GNTST_NAMES.get(status, f"unknown({status})")


ENTRY_V1_LAYOUT = c_struct(
    "grant_entry_v1",
    [Field("flags", "H"), Field("domid", "H"), Field("frame", "I")],
)
_V2_HDR = [Field("flags", "H", c="hdr.flags"), Field("domid", "H", c="hdr.domid")]
ENTRY_V2_FULL_PAGE_LAYOUT = c_struct(
    "grant_entry_v2.full_page",
    [
        Field("flags", "H", c="full_page.hdr.flags"),
        Field("domid", "H", c="full_page.hdr.domid"),
        pad(4),
        Field("frame", "Q", c="full_page.frame"),
    ],
    kind="union",
)
ENTRY_V2_SUB_PAGE_LAYOUT = c_struct(
    "grant_entry_v2.sub_page",
    [
        *_V2_HDR,
        Field("page_off", "H", c="sub_page.page_off"),
        Field("length", "H", c="sub_page.length"),
        Field("frame", "Q", c="sub_page.frame"),
    ],
    kind="union",
)
ENTRY_V2_TRANSITIVE_LAYOUT = c_struct(
    "grant_entry_v2.transitive",
    [
        *_V2_HDR,
        Field("trans_domid", "H", c="transitive.trans_domid"),
        pad(2),
        Field("gref", "I", c="transitive.gref"),
        pad(4),
    ],
    kind="union",
)
MAP_GRANT_REF_LAYOUT = c_struct(
    "gnttab_map_grant_ref",
    [
        Field("host_addr", "Q"),
        Field("flags", "I"),
        Field("ref", "I"),
        Field("dom", "H"),
        Field("status", "h"),
        Field("handle", "I"),
        Field("dev_bus_addr", "Q"),
    ],
)
UNMAP_GRANT_REF_LAYOUT = c_struct(
    "gnttab_unmap_grant_ref",
    [Field("host_addr", "Q"), Field("dev_bus_addr", "Q"), Field("handle", "I"), Field("status", "h"), pad(2)],
)
COPY_LAYOUT = c_struct(
    "gnttab_copy",
    [
        Field("source_u", "Q", c="source.u.gmfn"),
        Field("source_domid", "H", c="source.domid"),
        Field("source_offset", "H", c="source.offset"),
        pad(4),
        Field("dest_u", "Q", c="dest.u.gmfn"),
        Field("dest_domid", "H", c="dest.domid"),
        Field("dest_offset", "H", c="dest.offset"),
        pad(4),
        Field("len", "H"),
        Field("flags", "H"),
        Field("status", "h"),
        pad(2),
    ],
)


@dataclass(frozen=True)
class GrantEntryV1(Record):
    """``struct grant_entry_v1``: ``domid`` may access frame ``frame`` as ``flags`` say."""

    LAYOUT: ClassVar[Layout] = ENTRY_V1_LAYOUT
    flags: int
    domid: int
    frame: int


@dataclass(frozen=True)
class GrantEntryV2FullPage(Record):
    """``grant_entry_v2.full_page``."""

    LAYOUT: ClassVar[Layout] = ENTRY_V2_FULL_PAGE_LAYOUT
    flags: int
    domid: int
    frame: int


@dataclass(frozen=True)
class GrantEntryV2SubPage(Record):
    """``grant_entry_v2.sub_page`` (``GTF_sub_page``: copy-only byte range)."""

    LAYOUT: ClassVar[Layout] = ENTRY_V2_SUB_PAGE_LAYOUT
    flags: int
    domid: int
    page_off: int
    length: int
    frame: int


@dataclass(frozen=True)
class GrantEntryV2Transitive(Record):
    """``grant_entry_v2.transitive`` (``GTF_transitive``)."""

    LAYOUT: ClassVar[Layout] = ENTRY_V2_TRANSITIVE_LAYOUT
    flags: int
    domid: int
    trans_domid: int
    gref: int


@dataclass(frozen=True)
class GnttabMapGrantRef(Record):
    """``struct gnttab_map_grant_ref`` (IN host_addr, flags, ref, dom; OUT status, handle, dev_bus_addr)."""

    LAYOUT: ClassVar[Layout] = MAP_GRANT_REF_LAYOUT
    host_addr: int
    flags: int
    ref: int
    dom: int
    status: int = 0
    handle: int = 0
    dev_bus_addr: int = 0


@dataclass(frozen=True)
class GnttabUnmapGrantRef(Record):
    """``struct gnttab_unmap_grant_ref``."""

    LAYOUT: ClassVar[Layout] = UNMAP_GRANT_REF_LAYOUT
    host_addr: int
    dev_bus_addr: int
    handle: int
    status: int = 0


@dataclass(frozen=True)
class GnttabCopy(Record):
    """``struct gnttab_copy``; ``source_u``/``dest_u`` is a grant ref or a frame, per ``flags``."""

    LAYOUT: ClassVar[Layout] = COPY_LAYOUT
    source_u: int
    source_domid: int
    source_offset: int
    dest_u: int
    dest_domid: int
    dest_offset: int
    len: int
    flags: int
    status: int = 0


def check_copy(op: GnttabCopy) -> int:
    """Copy arguments must not cross a page on either side; returns ``GNTST_okay`` or
    ``GNTST_bad_copy_arg`` (the status the operation reports)."""
    if op.source_offset + op.len > XEN_PAGE_SIZE or op.dest_offset + op.len > XEN_PAGE_SIZE:
        return GNTST_bad_copy_arg
    return GNTST_okay


def parse_grant_ref(value: str | bytes, what: str = "grant ref") -> int:
    """Parse a peer-written grant ref (xenstore ``ring-ref`` etc.): decimal u32 (scenario 18)."""
    return parse_xs_uint(value, what, GRANT_REF_MAX)


def validate_grant_ref(ref: int, table_size: int | None = None) -> None:
    """A peer-supplied grant ref must be a u32 and below the table size when known."""
    if not 0 <= ref <= GRANT_REF_MAX or (table_size is not None and ref >= table_size):
        raise ProtocolError(f"grant ref {ref} out of range")

"""Linux Xen char-device ioctls: ``/dev/xen/gntdev``, ``/dev/xen/gntalloc``, ``/dev/xen/evtchn``.

Numbers are computed with :func:`_IOC` exactly as the kernel headers (``xen/sys/*.h``) do
-- direction ``_IOC_NONE``, type ``'G'`` or ``'E'``, the ioctl number and the size of the
argument struct -- never written down as magic values.  Argument structs are native x86-64
layouts; the variable-length ones (map refs, alloc grefs) have helpers building and reading
the whole buffer, since the kernel reads ``count`` entries past the fixed part.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from xenpv.errors import LocalError
from xenpv.protocols.layout import Field, Layout, Record, c_struct, pad

# asm-generic/ioctl.h: field widths and positions
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type: str, nr: int, size: int) -> int:
    """Encode an ioctl request number (asm-generic ``_IOC``)."""
    if not 0 <= size < 1 << _IOC_SIZEBITS or not 0 <= nr < 1 << _IOC_NRBITS:
        raise LocalError(f"ioctl nr {nr} / size {size} out of range")
    return (
        direction << _IOC_DIRSHIFT
        | ord(type) << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
        | size << _IOC_SIZESHIFT
    )


# -- gntdev ----------------------------------------------------------------------------------

UNMAP_NOTIFY_CLEAR_BYTE = 0x1
UNMAP_NOTIFY_SEND_EVENT = 0x2
GNTDEV_DMA_FLAG_WC = 1 << 0
GNTDEV_DMA_FLAG_COHERENT = 1 << 1

GNTDEV_GRANT_REF_LAYOUT = c_struct("ioctl_gntdev_grant_ref", [Field("domid", "I"), Field("ref", "I")])
#: Fixed part plus room for one ref, as the kernel header declares it (refs[1]).
GNTDEV_MAP_GRANT_REF_LAYOUT = c_struct(
    "ioctl_gntdev_map_grant_ref",
    [
        Field("count", "I"),
        Field("pad", "I"),
        Field("index", "Q"),
        Field("refs", "", 1, sub=GNTDEV_GRANT_REF_LAYOUT),
    ],
)
GNTDEV_UNMAP_GRANT_REF_LAYOUT = c_struct(
    "ioctl_gntdev_unmap_grant_ref",
    [Field("index", "Q"), Field("count", "I"), Field("pad", "I")],
)
GNTDEV_GET_OFFSET_FOR_VADDR_LAYOUT = c_struct(
    "ioctl_gntdev_get_offset_for_vaddr",
    [Field("vaddr", "Q"), Field("offset", "Q"), Field("count", "I"), Field("pad", "I")],
)
GNTDEV_SET_MAX_GRANTS_LAYOUT = c_struct("ioctl_gntdev_set_max_grants", [Field("count", "I")])
#: gntdev and gntalloc share the unmap-notify argument's fields.
_UNMAP_NOTIFY_FIELDS = [Field("index", "Q"), Field("action", "I"), Field("event_channel_port", "I")]
GNTDEV_UNMAP_NOTIFY_LAYOUT = c_struct("ioctl_gntdev_unmap_notify", _UNMAP_NOTIFY_FIELDS)
#: A copy segment with both sides in the "foreign" form; for a local side the 8-byte union
#: holds a virtual address instead (see :func:`virt_side`).
GNTDEV_GRANT_COPY_SEGMENT_LAYOUT = c_struct(
    "ioctl_gntdev_grant_copy_segment",
    [
        Field("source_ref", "I", c="source.foreign.ref"),
        Field("source_offset", "H", c="source.foreign.offset"),
        Field("source_domid", "H", c="source.foreign.domid"),
        Field("dest_ref", "I", c="dest.foreign.ref"),
        Field("dest_offset", "H", c="dest.foreign.offset"),
        Field("dest_domid", "H", c="dest.foreign.domid"),
        Field("len", "H"),
        Field("flags", "H"),
        Field("status", "h"),
        pad(2),
    ],
)
GNTDEV_GRANT_COPY_LAYOUT = c_struct(
    "ioctl_gntdev_grant_copy",
    [Field("count", "I"), pad(4), Field("segments", "Q")],
)

GNTDEV_DMABUF_EXP_FROM_REFS_LAYOUT = c_struct(
    "ioctl_gntdev_dmabuf_exp_from_refs",
    [Field("flags", "I"), Field("count", "I"), Field("fd", "I"), Field("domid", "I"), Field("refs", "I", 1)],
)
GNTDEV_DMABUF_EXP_WAIT_RELEASED_LAYOUT = c_struct(
    "ioctl_gntdev_dmabuf_exp_wait_released",
    [Field("fd", "I"), Field("wait_to_ms", "I")],
)
GNTDEV_DMABUF_IMP_TO_REFS_LAYOUT = c_struct(
    "ioctl_gntdev_dmabuf_imp_to_refs",
    [Field("fd", "I"), Field("count", "I"), Field("domid", "I"), Field("reserved", "I"), Field("refs", "I", 1)],
)
GNTDEV_DMABUF_IMP_RELEASE_LAYOUT = c_struct(
    "ioctl_gntdev_dmabuf_imp_release",
    [Field("fd", "I"), Field("reserved", "I")],
)

IOCTL_GNTDEV_MAP_GRANT_REF = _IOC(_IOC_NONE, "G", 0, GNTDEV_MAP_GRANT_REF_LAYOUT.size)
IOCTL_GNTDEV_UNMAP_GRANT_REF = _IOC(_IOC_NONE, "G", 1, GNTDEV_UNMAP_GRANT_REF_LAYOUT.size)
IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR = _IOC(_IOC_NONE, "G", 2, GNTDEV_GET_OFFSET_FOR_VADDR_LAYOUT.size)
IOCTL_GNTDEV_SET_MAX_GRANTS = _IOC(_IOC_NONE, "G", 3, GNTDEV_SET_MAX_GRANTS_LAYOUT.size)
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = _IOC(_IOC_NONE, "G", 7, GNTDEV_UNMAP_NOTIFY_LAYOUT.size)
IOCTL_GNTDEV_GRANT_COPY = _IOC(_IOC_NONE, "G", 8, GNTDEV_GRANT_COPY_LAYOUT.size)
# Optional dma-buf export/import (not used by xenpv's drivers).
IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS = _IOC(_IOC_NONE, "G", 9, GNTDEV_DMABUF_EXP_FROM_REFS_LAYOUT.size)
IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED = _IOC(_IOC_NONE, "G", 10, GNTDEV_DMABUF_EXP_WAIT_RELEASED_LAYOUT.size)
IOCTL_GNTDEV_DMABUF_IMP_TO_REFS = _IOC(_IOC_NONE, "G", 11, GNTDEV_DMABUF_IMP_TO_REFS_LAYOUT.size)
IOCTL_GNTDEV_DMABUF_IMP_RELEASE = _IOC(_IOC_NONE, "G", 12, GNTDEV_DMABUF_IMP_RELEASE_LAYOUT.size)

# -- gntalloc --------------------------------------------------------------------------------

GNTALLOC_FLAG_WRITABLE = 1

GNTALLOC_ALLOC_GREF_LAYOUT = c_struct(
    "ioctl_gntalloc_alloc_gref",
    [
        Field("domid", "H"),
        Field("flags", "H"),
        Field("count", "I"),
        Field("index", "Q"),
        Field("gref_ids", "I", 1),
        pad(4),
    ],
)
GNTALLOC_DEALLOC_GREF_LAYOUT = c_struct(
    "ioctl_gntalloc_dealloc_gref",
    [Field("index", "Q"), Field("count", "I"), pad(4)],
)
GNTALLOC_UNMAP_NOTIFY_LAYOUT = c_struct("ioctl_gntalloc_unmap_notify", _UNMAP_NOTIFY_FIELDS)

IOCTL_GNTALLOC_ALLOC_GREF = _IOC(_IOC_NONE, "G", 5, GNTALLOC_ALLOC_GREF_LAYOUT.size)
IOCTL_GNTALLOC_DEALLOC_GREF = _IOC(_IOC_NONE, "G", 6, GNTALLOC_DEALLOC_GREF_LAYOUT.size)
IOCTL_GNTALLOC_SET_UNMAP_NOTIFY = _IOC(_IOC_NONE, "G", 7, GNTALLOC_UNMAP_NOTIFY_LAYOUT.size)

# -- evtchn ----------------------------------------------------------------------------------

def _evtchn_arg(name: str, *fields: Field) -> Layout:
    """Layout of ``struct ioctl_evtchn_<name>``."""
    return c_struct(f"ioctl_evtchn_{name}", fields)


EVTCHN_BIND_VIRQ_LAYOUT = _evtchn_arg("bind_virq", Field("virq", "I"))
EVTCHN_BIND_INTERDOMAIN_LAYOUT = _evtchn_arg(
    "bind_interdomain", Field("remote_domain", "I"), Field("remote_port", "I")
)
EVTCHN_BIND_UNBOUND_PORT_LAYOUT = _evtchn_arg("bind_unbound_port", Field("remote_domain", "I"))
EVTCHN_UNBIND_LAYOUT = _evtchn_arg("unbind", Field("port", "I"))
EVTCHN_NOTIFY_LAYOUT = _evtchn_arg("notify", Field("port", "I"))
EVTCHN_RESTRICT_DOMID_LAYOUT = _evtchn_arg("restrict_domid", Field("domid", "H"))
#: Newer kernels only (not in Xen 4.17's copy of the header): bind a static port.
EVTCHN_BIND_STATIC_LAYOUT = Layout("ioctl_evtchn_bind_static", [Field("port", "I")])

IOCTL_EVTCHN_BIND_VIRQ = _IOC(_IOC_NONE, "E", 0, EVTCHN_BIND_VIRQ_LAYOUT.size)
IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC(_IOC_NONE, "E", 1, EVTCHN_BIND_INTERDOMAIN_LAYOUT.size)
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _IOC(_IOC_NONE, "E", 2, EVTCHN_BIND_UNBOUND_PORT_LAYOUT.size)
IOCTL_EVTCHN_UNBIND = _IOC(_IOC_NONE, "E", 3, EVTCHN_UNBIND_LAYOUT.size)
IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, "E", 4, EVTCHN_NOTIFY_LAYOUT.size)
IOCTL_EVTCHN_RESET = _IOC(_IOC_NONE, "E", 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID = _IOC(_IOC_NONE, "E", 6, EVTCHN_RESTRICT_DOMID_LAYOUT.size)
IOCTL_EVTCHN_BIND_STATIC = _IOC(_IOC_NONE, "E", 7, EVTCHN_BIND_STATIC_LAYOUT.size)


# -- records and variable-length helpers -----------------------------------------------------


@dataclass(frozen=True)
class GntdevUnmapGrantRef(Record):
    """``struct ioctl_gntdev_unmap_grant_ref``."""

    LAYOUT: ClassVar[Layout] = GNTDEV_UNMAP_GRANT_REF_LAYOUT
    index: int
    count: int
    pad: int = 0


@dataclass(frozen=True)
class GntdevGetOffsetForVaddr(Record):
    """``struct ioctl_gntdev_get_offset_for_vaddr`` (IN vaddr; OUT offset, count)."""

    LAYOUT: ClassVar[Layout] = GNTDEV_GET_OFFSET_FOR_VADDR_LAYOUT
    vaddr: int
    offset: int = 0
    count: int = 0
    pad: int = 0


@dataclass(frozen=True)
class UnmapNotify(Record):
    """``struct ioctl_gntdev_unmap_notify`` / ``ioctl_gntalloc_unmap_notify`` (same layout)."""

    LAYOUT: ClassVar[Layout] = GNTDEV_UNMAP_NOTIFY_LAYOUT
    index: int
    action: int
    event_channel_port: int = 0


@dataclass(frozen=True)
class GntallocDeallocGref(Record):
    """``struct ioctl_gntalloc_dealloc_gref``."""

    LAYOUT: ClassVar[Layout] = GNTALLOC_DEALLOC_GREF_LAYOUT
    index: int
    count: int


@dataclass(frozen=True)
class GrantCopySegment(Record):
    """``struct ioctl_gntdev_grant_copy_segment`` (both sides in the foreign form)."""

    LAYOUT: ClassVar[Layout] = GNTDEV_GRANT_COPY_SEGMENT_LAYOUT
    source_ref: int
    source_offset: int
    source_domid: int
    dest_ref: int
    dest_offset: int
    dest_domid: int
    len: int
    flags: int
    status: int = 0


def virt_side(addr: int) -> tuple[int, int, int]:
    """A local virtual address as the (ref, offset, domid) words of a copy segment side.

    The union is 8 bytes; on little-endian x86-64 the address's low 32 bits land in
    ``ref``, the next 16 in ``offset`` and the top 16 in ``domid``.
    """
    if not 0 <= addr < 1 << 64:
        raise LocalError(f"address {addr:#x} is not a u64")
    return addr & 0xFFFFFFFF, (addr >> 32) & 0xFFFF, addr >> 48


def gntdev_map_grant_ref_arg(refs: Sequence[tuple[int, int]]) -> bytearray:
    """The MAP_GRANT_REF buffer for ``refs`` = [(domid, ref), ...] (all entries, not just one)."""
    if not refs:
        raise LocalError("map_grant_ref needs at least one ref")
    buf = bytearray(16 + 8 * len(refs))
    struct.pack_into("<II", buf, 0, len(refs), 0)
    for k, (domid, ref) in enumerate(refs):
        struct.pack_into("<II", buf, 16 + 8 * k, domid, ref)
    return buf


def gntdev_map_grant_ref_index(buf: bytes | bytearray) -> int:
    """The mmap offset (``index``) the kernel wrote back into a MAP_GRANT_REF buffer."""
    (index,) = struct.unpack_from("<Q", buf, 8)
    return int(index)


def gntalloc_alloc_gref_arg(domid: int, count: int, writable: bool = True) -> bytearray:
    """The ALLOC_GREF buffer for ``count`` pages granted to ``domid`` (room for every gref)."""
    if count < 1:
        raise LocalError("alloc_gref needs count >= 1")
    buf = bytearray(16 + 4 * max(count, 2))
    struct.pack_into("<HHI", buf, 0, domid, GNTALLOC_FLAG_WRITABLE if writable else 0, count)
    return buf


def gntalloc_alloc_gref_result(buf: bytes | bytearray, count: int) -> tuple[int, tuple[int, ...]]:
    """``(index, gref_ids)`` the kernel wrote back into an ALLOC_GREF buffer."""
    (index,) = struct.unpack_from("<Q", buf, 8)
    return int(index), tuple(struct.unpack_from(f"<{count}I", buf, 16))


def grant_copy_arg(count: int, segments_addr: int) -> bytes:
    """The GRANT_COPY buffer: ``count`` segments at user address ``segments_addr``."""
    return GNTDEV_GRANT_COPY_LAYOUT.pack((count, segments_addr))

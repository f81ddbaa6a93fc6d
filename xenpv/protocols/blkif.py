"""Block device protocol (``xen/io/blkif.h``): requests, responses, ABIs, validation, vdev names.

Theory of operation
-------------------
A blkif ring slot holds one request (read/write, discard or indirect: three layouts of the
same slot, told apart by ``operation``) or one response.  The layout depends on the ABI the
frontend names in its ``protocol`` key: ``x86_64-abi`` and ``arm-abi`` align u64 fields to 8
(request 112 bytes, response 16), ``x86_32-abi`` aligns them to 4 (request 108, response
12).  Every record therefore has one :class:`~xenpv.protocols.layout.Layout` per ABI and
``parse``/``pack`` take the ABI; the parsed values are the same for all ABIs.

A backend copies each request out of the ring once (:func:`parse_request`), then checks the
copy with :func:`validate_request`; a bad request raises :class:`BlkifRequestError` carrying
the request id and the status to answer with (``BLKIF_RSP_ERROR`` or
``BLKIF_RSP_EOPNOTSUPP``), so the backend can fail just that request (hostile scenario 4).
A frontend checks responses with :func:`validate_response`.

Sectors are always 512-byte units (``sector_number``, ``first_sect``/``last_sect``,
``nr_sectors``), as upstream blkif.h clarifies and Linux has always done.
"""

from __future__ import annotations

import contextlib
import re
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Self

import numpy as np

from xenpv.compiled import compiled_attr
from xenpv.errors import LocalError
from xenpv.protocols import ProtocolError
from xenpv.protocols.layout import (
    XEN_PAGE_SIZE,
    Buffer,
    Field,
    Layout,
    Record,
    RingLayout,
    c_struct,
    pad,
)
from xenpv.xenstore.values import parse_xs_number

# io/blkif.h: operations
BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

# io/blkif.h: limits
BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
#: Segment records per indirect page (PAGE_SIZE / sizeof(struct blkif_request_segment)).
BLKIF_SEGMENTS_PER_INDIRECT_FRAME = XEN_PAGE_SIZE // 8
#: Hard upper bound of an indirect request's nr_segments (8 pages of 512 segments).
BLKIF_MAX_INDIRECT_SEGMENTS = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGMENTS_PER_INDIRECT_FRAME
#: Sectors in one page; first_sect/last_sect are 0..7.
SECTORS_PER_PAGE = XEN_PAGE_SIZE // 512
SECTOR_SHIFT = 9

# io/blkif.h: discard flag
BLKIF_DISCARD_SECURE = 1 << 0

# io/blkif.h: response status
BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

# io/blkif.h: VDISK_* bits of the backend's `info` key
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# io/protocols.h
XEN_IO_PROTO_ABI_X86_32 = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM = "arm-abi"
#: The native ABI of this build (x86-64).
XEN_IO_PROTO_ABI_NATIVE = XEN_IO_PROTO_ABI_X86_64

# Backend keys (io/blkif.h, §6.3)
KEY_FEATURE_BARRIER = "feature-barrier"
KEY_FEATURE_FLUSH_CACHE = "feature-flush-cache"
KEY_FEATURE_DISCARD = "feature-discard"
KEY_DISCARD_GRANULARITY = "discard-granularity"
KEY_DISCARD_ALIGNMENT = "discard-alignment"
KEY_DISCARD_SECURE = "discard-secure"
KEY_DISCARD_ENABLE = "discard-enable"
KEY_FEATURE_PERSISTENT = "feature-persistent"
KEY_FEATURE_MAX_INDIRECT_SEGMENTS = "feature-max-indirect-segments"
KEY_MAX_RING_PAGE_ORDER = "max-ring-page-order"
KEY_MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
KEY_SECTORS = "sectors"
KEY_SECTOR_SIZE = "sector-size"
KEY_PHYSICAL_SECTOR_SIZE = "physical-sector-size"
KEY_INFO = "info"
KEY_PARAMS = "params"
KEY_MODE = "mode"
KEY_TYPE = "type"
KEY_PHYSICAL_DEVICE = "physical-device"
KEY_PHYSICAL_DEVICE_PATH = "physical-device-path"
KEY_DIRECT_IO_SAFE = "direct-io-safe"
KEY_HOTPLUG_STATUS = "hotplug-status"
# Frontend keys (§6.4)
KEY_RING_REF = "ring-ref"
KEY_RING_PAGE_ORDER = "ring-page-order"
KEY_NUM_RING_PAGES = "num-ring-pages"
KEY_EVENT_CHANNEL = "event-channel"
KEY_PROTOCOL = "protocol"
KEY_MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"
KEY_VIRTUAL_DEVICE = "virtual-device"
KEY_DEVICE_TYPE = "device-type"
KEY_TRUSTED = "trusted"


def ring_ref_key(page: int) -> str:
    """Name of the frontend key holding ring page ``page`` when ``ring-page-order`` > 0."""
    return f"ring-ref{page}"


class ABI(Enum):
    """The request/response layout a frontend uses, named by its ``protocol`` key."""

    X86_32 = XEN_IO_PROTO_ABI_X86_32
    X86_64 = XEN_IO_PROTO_ABI_X86_64
    ARM = XEN_IO_PROTO_ABI_ARM


#: The ABI of this machine (x86-64), assumed when the frontend writes no `protocol` key.
NATIVE_ABI = ABI.X86_64


def abi_from_protocol(value: str | bytes | None, native: ABI = NATIVE_ABI) -> ABI:
    """The ABI named by a frontend's ``protocol`` value (absent: ``native``); unknown -> peer error."""
    if value is None:
        return native
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    for abi in ABI:
        if abi.value == text:
            return abi
    raise ProtocolError(f"unknown blkif protocol {text[:40]!r}")


# -- layouts ---------------------------------------------------------------------------------

SEGMENT_LAYOUT = c_struct(
    "blkif_request_segment",
    [Field("gref", "I"), Field("first_sect", "B"), Field("last_sect", "B"), pad(2)],
)


def _gap(abi: ABI) -> list[Field]:
    """Padding before the u64 ``id``: 4 bytes where u64 is 8-aligned, none on i386."""
    return [] if abi is ABI.X86_32 else [pad(4)]


def _request_kind(abi: ABI, kind: str, head: list[Field], tail: list[Field]) -> Layout:
    """A request layout: ``operation``, two ``head`` fields, ``id``, ``sector_number``, ``tail``."""
    return c_struct(
        f"{kind}[{abi.value}]",
        [
            Field("operation", "B"),
            *head,
            *_gap(abi),
            Field("id", "Q"),
            Field("sector_number", "Q"),
            *tail,
        ],
    )


def _request_layout(abi: ABI) -> Layout:
    return _request_kind(
        abi,
        "blkif_request",
        [Field("nr_segments", "B"), Field("handle", "H")],
        [Field("seg", "", BLKIF_MAX_SEGMENTS_PER_REQUEST, sub=SEGMENT_LAYOUT)],
    )


def _discard_layout(abi: ABI) -> Layout:
    return _request_kind(
        abi,
        "blkif_request_discard",
        [Field("flag", "B"), Field("handle", "H")],
        [Field("nr_sectors", "Q")],
    )


def _indirect_layout(abi: ABI) -> Layout:
    # io/blkif.h: x86_64 pads the struct to 64 implicitly, i386 with an explicit u64 `pad`.
    return _request_kind(
        abi,
        "blkif_request_indirect",
        [Field("indirect_op", "B"), Field("nr_segments", "H")],
        [
            Field("handle", "H"),
            pad(2),
            Field("indirect_grefs", "I", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
            pad(8) if abi is ABI.X86_32 else pad(4),
        ],
    )


def _response_layout(abi: ABI) -> Layout:
    tail = [] if abi is ABI.X86_32 else [pad(4)]
    return c_struct(
        f"blkif_response[{abi.value}]",
        [Field("id", "Q"), Field("operation", "B"), pad(1), Field("status", "h"), *tail],
    )


@dataclass(frozen=True)
class BlkifLayouts:
    """All blkif layouts of one ABI, plus its ring geometry."""

    abi: ABI
    request: Layout
    discard: Layout
    indirect: Layout
    response: Layout
    ring: RingLayout

    @property
    def request_dtype(self) -> np.dtype[Any]:
        """Read/write requests viewed over a batch of ring slots (itemsize = slot size)."""
        return self.request.dtype_for(self.ring.slot_size)

    @property
    def response_dtype(self) -> np.dtype[Any]:
        """Responses viewed over a batch of ring slots (itemsize = slot size)."""
        return self.response.dtype_for(self.ring.slot_size)


def _layouts(abi: ABI) -> BlkifLayouts:
    req, rsp = _request_layout(abi), _response_layout(abi)
    return BlkifLayouts(
        abi,
        req,
        _discard_layout(abi),
        _indirect_layout(abi),
        rsp,
        RingLayout(f"blkif[{abi.value}]", req.size, rsp.size),
    )


LAYOUTS: dict[ABI, BlkifLayouts] = {abi: _layouts(abi) for abi in ABI}


def layouts(abi: ABI = NATIVE_ABI) -> BlkifLayouts:
    """The layouts of ``abi``."""
    return LAYOUTS[abi]


def RING_SIZE(pages: int = 1, abi: ABI = NATIVE_ABI) -> int:
    """Slots of a blkif ring over ``pages`` pages (32 for one page, either ABI)."""
    return LAYOUTS[abi].ring.nr_ents(pages)


# -- records ---------------------------------------------------------------------------------


class _AbiRecord(Record):
    """A blkif record whose layout depends on the ABI."""

    _KIND: ClassVar[str]

    @classmethod
    def layout(cls, abi: ABI = NATIVE_ABI) -> Layout:
        """This record's layout under ``abi``."""
        layout: Layout = getattr(LAYOUTS[abi], cls._KIND)
        return layout

    @classmethod
    def parse(cls, buf: Buffer, offset: int = 0, abi: ABI = NATIVE_ABI) -> Self:
        """Copy one record out of ``buf`` at ``offset`` (no validation)."""
        return cls.from_raw(cls.layout(abi).unpack_from(buf, offset))

    def pack(self, abi: ABI = NATIVE_ABI) -> bytes:
        """Encode the record for ``abi``, padding zeroed."""
        return self.layout(abi).pack(self.raw())

    def pack_into(self, buf: Buffer, offset: int = 0, abi: ABI = NATIVE_ABI) -> None:
        """Encode the record for ``abi`` into ``buf`` at ``offset``, padding zeroed."""
        self.layout(abi).pack_into(buf, offset, self.raw())


@dataclass(frozen=True)
class Segment(Record):
    """``struct blkif_request_segment``: a granted page and an inclusive sector range in it."""

    LAYOUT: ClassVar[Layout] = SEGMENT_LAYOUT

    gref: int
    first_sect: int
    last_sect: int

    @property
    def nr_sectors(self) -> int:
        """Sectors this segment transfers (valid segments only)."""
        return self.last_sect - self.first_sect + 1


_NO_SEGMENT = [0, 0, 0]


@dataclass(frozen=True)
class BlkifRequest(_AbiRecord):
    """``struct blkif_request`` (read, write, barrier, flush).

    ``seg`` holds the first ``min(nr_segments, 11)`` segments of the slot; unused segment
    bytes are packed as zeros.
    """

    _KIND: ClassVar[str] = "request"
    LAYOUT: ClassVar[Layout] = LAYOUTS[NATIVE_ABI].request

    operation: int
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    seg: tuple[Segment, ...] = ()

    @classmethod
    def from_raw(cls, raw: tuple[Any, ...]) -> Self:
        """Build from raw values, keeping only the segments ``nr_segments`` names."""
        op, nr, handle, rid, sector, segs = raw
        used = min(nr, BLKIF_MAX_SEGMENTS_PER_REQUEST)
        return cls(op, nr, handle, rid, sector, tuple(Segment(*s) for s in segs[:used]))

    @classmethod
    def parse(cls, buf: Buffer, offset: int = 0, abi: ABI = NATIVE_ABI) -> Self:
        """Copy one request out of ``buf`` at ``offset`` (no validation).  Every ring pass
        parses one per request, so the flat field order (operation, nr_segments, handle,
        id, sector_number, then gref/first/last per segment) is read straight from the
        layout's struct instead of through the generic nested grouping."""
        st = cls.layout(abi).struct
        if offset < 0 or offset + st.size > len(memoryview(buf).cast("B")):
            return super().parse(buf, offset, abi)  # the generic error
        v = st.unpack_from(buf, offset)
        nr = v[1]
        segs = tuple(Segment(v[k], v[k + 1], v[k + 2])
                     for k in range(5, 5 + 3 * min(nr, BLKIF_MAX_SEGMENTS_PER_REQUEST), 3))
        return cls(v[0], nr, v[2], v[3], v[4], segs)

    def pack(self, abi: ABI = NATIVE_ABI) -> bytes:
        """Encode for ``abi`` (padding and unused segments zero); the flat fast path of
        :meth:`parse`, the generic encoder for anything unusual (and its errors)."""
        seg = self.seg
        if len(seg) <= BLKIF_MAX_SEGMENTS_PER_REQUEST and all(type(s) is Segment for s in seg):
            flat = [self.operation, self.nr_segments, self.handle, self.id, self.sector_number]
            for s in seg:
                flat += (s.gref, s.first_sect, s.last_sect)
            flat += _NO_SEGMENT * (BLKIF_MAX_SEGMENTS_PER_REQUEST - len(seg))
            with contextlib.suppress(struct.error):
                return self.layout(abi).struct.pack(*flat)
        return super().pack(abi)

    @classmethod
    def rw(cls, operation: int, handle: int, id: int, sector_number: int, seg: tuple[Segment, ...]) -> Self:
        """A request with ``nr_segments`` set from ``seg``."""
        if len(seg) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise LocalError(f"at most {BLKIF_MAX_SEGMENTS_PER_REQUEST} segments, got {len(seg)}")
        return cls(operation, len(seg), handle, id, sector_number, tuple(seg))


@dataclass(frozen=True)
class BlkifRequestDiscard(_AbiRecord):
    """``struct blkif_request_discard`` (operation ``BLKIF_OP_DISCARD``)."""

    _KIND: ClassVar[str] = "discard"
    LAYOUT: ClassVar[Layout] = LAYOUTS[NATIVE_ABI].discard

    operation: int
    flag: int
    handle: int
    id: int
    sector_number: int
    nr_sectors: int


@dataclass(frozen=True)
class BlkifRequestIndirect(_AbiRecord):
    """``struct blkif_request_indirect`` (operation ``BLKIF_OP_INDIRECT``).

    ``indirect_grefs`` holds all 8 grant refs of the slot; only the first
    :func:`indirect_pages` ``(nr_segments)`` are meaningful.
    """

    _KIND: ClassVar[str] = "indirect"
    LAYOUT: ClassVar[Layout] = LAYOUTS[NATIVE_ABI].indirect

    operation: int
    indirect_op: int
    nr_segments: int
    id: int
    sector_number: int
    handle: int
    indirect_grefs: tuple[int, ...] = (0,) * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST


@dataclass(frozen=True)
class BlkifResponse(_AbiRecord):
    """``struct blkif_response``."""

    _KIND: ClassVar[str] = "response"
    LAYOUT: ClassVar[Layout] = LAYOUTS[NATIVE_ABI].response

    id: int
    operation: int
    status: int


AnyRequest = BlkifRequest | BlkifRequestDiscard | BlkifRequestIndirect


def parse_request(buf: Buffer, offset: int = 0, abi: ABI = NATIVE_ABI) -> AnyRequest:
    """Copy the request in a slot out once, choosing the layout by its ``operation`` byte."""
    layout = LAYOUTS[abi].request
    mv = memoryview(buf).cast("B")
    if offset < 0 or offset + layout.size > len(mv):
        raise LocalError(f"blkif request: buffer too short at {offset}")
    slot = bytes(mv[offset : offset + layout.size])  # the single fetch (R1)
    op = slot[0]
    if op == BLKIF_OP_DISCARD:
        return BlkifRequestDiscard.parse(slot, 0, abi)
    if op == BLKIF_OP_INDIRECT:
        return BlkifRequestIndirect.parse(slot, 0, abi)
    return BlkifRequest.parse(slot, 0, abi)


# -- indirect pages --------------------------------------------------------------------------


def indirect_pages(nr_segments: int) -> int:
    """Indirect pages holding ``nr_segments`` segment records (512 per page)."""
    return -(-nr_segments // BLKIF_SEGMENTS_PER_INDIRECT_FRAME)


def parse_indirect_segments(pages: list[Buffer], nr_segments: int) -> tuple[Segment, ...]:
    """Copy ``nr_segments`` segments out of indirect pages (segment k: page k//512, offset (k%512)*8).

    ``nr_segments`` must already be validated; ``pages`` must hold :func:`indirect_pages` pages.
    """
    need = indirect_pages(nr_segments)
    if len(pages) < need:
        raise LocalError(f"{nr_segments} indirect segments need {need} pages, got {len(pages)}")
    out: list[Segment] = []
    for k in range(nr_segments):
        page, slot = divmod(k, BLKIF_SEGMENTS_PER_INDIRECT_FRAME)
        out.append(Segment.parse(pages[page], slot * SEGMENT_LAYOUT.size))
    return tuple(out)


#: One indirect segment record (io/blkif.h blkif_request_segment) as a numpy dtype.
SEGMENT_DTYPE = np.dtype([("gref", "<u4"), ("first", "u1"), ("last", "u1"), ("pad", "<u2")])


def pack_indirect_columns(grefs: list[int], first: int, lasts: list[int]) -> list[bytes]:
    """:func:`pack_indirect_pages` of the segments ``(grefs[k], first, lasts[k])`` without
    a :class:`Segment` per page (the frontend's large requests): one array, one copy."""
    n = len(grefs)
    if n > BLKIF_MAX_INDIRECT_SEGMENTS:
        raise LocalError(f"at most {BLKIF_MAX_INDIRECT_SEGMENTS} indirect segments, got {n}")
    recs = np.zeros(indirect_pages(n) * BLKIF_SEGMENTS_PER_INDIRECT_FRAME, dtype=SEGMENT_DTYPE)
    recs["gref"][:n] = grefs
    recs["first"][:n] = first
    recs["last"][:n] = lasts
    raw = recs.tobytes()
    return [raw[k:k + XEN_PAGE_SIZE] for k in range(0, len(raw), XEN_PAGE_SIZE)]


def pack_indirect_pages(segments: tuple[Segment, ...] | list[Segment]) -> list[bytes]:
    """Encode segments into zero-filled 4096-byte indirect pages."""
    if len(segments) > BLKIF_MAX_INDIRECT_SEGMENTS:
        raise LocalError(f"at most {BLKIF_MAX_INDIRECT_SEGMENTS} indirect segments, got {len(segments)}")
    pages: list[bytes] = []
    per = BLKIF_SEGMENTS_PER_INDIRECT_FRAME
    for first in range(0, len(segments), per):
        chunk = b"".join(s.pack() for s in segments[first : first + per])
        pages.append(chunk + bytes(XEN_PAGE_SIZE - len(chunk)))
    return pages


# -- validation ------------------------------------------------------------------------------


class BlkifRequestError(ProtocolError):
    """A frontend's request is invalid; answer request ``id`` with ``status``, do no I/O."""

    def __init__(self, message: str, id: int, operation: int, status: int = BLKIF_RSP_ERROR) -> None:
        super().__init__(message)
        self.id = id
        self.operation = operation
        self.status = status


def validate_segment(seg: Segment) -> int:
    """Check ``first_sect <= last_sect <= 7`` and return the segment's sector count."""
    if seg.last_sect >= SECTORS_PER_PAGE or seg.first_sect > seg.last_sect:
        raise ProtocolError(
            f"bad segment sectors first={seg.first_sect} last={seg.last_sect} (gref {seg.gref})"
        )
    return seg.nr_sectors


def _check_range(req: AnyRequest, first: int, count: int, disk_sectors: int | None) -> None:
    """Refuse ``count`` sectors from ``first`` unless they lie inside the disk.  No sectors
    touch nothing and are never refused: a flush or barrier without segments may name any
    sector (Linux's blkfront sends (u64)-1 there, and Linux's and QEMU's backends check
    the range only of requests that carry data)."""
    if disk_sectors is not None and count > 0 and count > disk_sectors - first:
        raise BlkifRequestError(
            f"sectors {first}+{count} beyond disk of {disk_sectors}", req.id, req.operation
        )


def validate_segments(req: AnyRequest, segs: tuple[Segment, ...], disk_sectors: int | None) -> int:
    """Check every segment of ``req`` and the whole sector range; return the total sectors."""
    total = 0
    for s in segs:
        try:
            total += validate_segment(s)
        except ProtocolError as e:
            raise BlkifRequestError(str(e), req.id, req.operation) from None
    _check_range(req, req.sector_number, total, disk_sectors)
    return total


def validate_request(
    req: AnyRequest,
    *,
    max_indirect_segments: int = 0,
    disk_sectors: int | None = None,
    supported_ops: frozenset[int] | None = None,
) -> None:
    """Check a parsed request; raise :class:`BlkifRequestError` if the backend must refuse it.

    * read/write: ``nr_segments`` 1..11, every segment ``first_sect <= last_sect <= 7``;
    * barrier/flush: ``nr_segments`` 0..11 (segments checked likewise);
    * indirect: ``indirect_op`` read or write, ``nr_segments`` 1..``max_indirect_segments``
      (what the backend advertised; 0 = indirect not offered);
    * discard: ``flag`` only ``BLKIF_DISCARD_SECURE``, ``nr_sectors`` > 0;
    * with ``disk_sectors``, every range must lie inside the disk;
    * unknown or unsupported (``supported_ops``) operations answer ``BLKIF_RSP_EOPNOTSUPP``.

    Indirect segments live in separate pages; check them with :func:`validate_segments`
    after :func:`parse_indirect_segments`.
    """
    op = req.operation
    if supported_ops is not None and op not in supported_ops:
        raise BlkifRequestError(f"operation {op} not supported", req.id, op, BLKIF_RSP_EOPNOTSUPP)
    if isinstance(req, BlkifRequestDiscard):
        if req.flag & ~BLKIF_DISCARD_SECURE:
            raise BlkifRequestError(f"discard flag {req.flag:#x} unknown", req.id, op)
        if req.nr_sectors == 0:
            raise BlkifRequestError("discard of 0 sectors", req.id, op)
        _check_range(req, req.sector_number, req.nr_sectors, disk_sectors)
        return
    if isinstance(req, BlkifRequestIndirect):
        if max_indirect_segments <= 0:
            raise BlkifRequestError("indirect requests not offered", req.id, op, BLKIF_RSP_EOPNOTSUPP)
        if req.indirect_op not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise BlkifRequestError(f"indirect_op {req.indirect_op} not read/write", req.id, op)
        limit = min(max_indirect_segments, BLKIF_MAX_INDIRECT_SEGMENTS)
        if not 1 <= req.nr_segments <= limit:
            raise BlkifRequestError(f"indirect nr_segments {req.nr_segments} not in 1..{limit}", req.id, op)
        return
    if op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        low = 1
    elif op in (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
        low = 0
    else:
        raise BlkifRequestError(f"unknown operation {op}", req.id, op, BLKIF_RSP_EOPNOTSUPP)
    if not low <= req.nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise BlkifRequestError(
            f"nr_segments {req.nr_segments} not in {low}..{BLKIF_MAX_SEGMENTS_PER_REQUEST}", req.id, op
        )
    validate_segments(req, req.seg, disk_sectors)


def validate_response(rsp: BlkifResponse, expected_operation: int | None = None) -> None:
    """Check a backend's response: known status, and the echoed operation if given."""
    if rsp.status not in (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP):
        raise ProtocolError(f"blkif response {rsp.id}: unknown status {rsp.status}")
    if expected_operation is not None and rsp.operation != expected_operation:
        raise ProtocolError(
            f"blkif response {rsp.id}: operation {rsp.operation} != request's {expected_operation}"
        )


# -- batch accept (the backend's fast path) ---------------------------------------------------

#: One accepted READ/WRITE: ``(id, operation, byte offset, byte length, segments)``, each
#: segment ``(gref, start, end)`` in bytes within its granted page.
AcceptedRW = tuple[int, int, int, int, tuple[tuple[int, int, int], ...]]


def scan_rw_reference(batch: Buffer, count: int, abi: ABI, disk_sectors: int, *,
                      readonly: bool = False, sector_size: int = 512
                      ) -> list[AcceptedRW | None]:
    """The readable twin of the compiled :func:`scan_rw`: for each of ``count`` request
    slots in ``batch`` (already a private copy), the accepted READ/WRITE (see
    :data:`AcceptedRW`) if it passes :func:`validate_request` against ``disk_sectors``,
    is not a write to a ``readonly`` disk and covers whole ``sector_size`` sectors (start,
    length and every segment); else None, and the caller validates that slot in full
    (which answers it)."""
    slot = LAYOUTS[abi].ring.slot_size
    mask = (sector_size >> SECTOR_SHIFT) - 1
    out: list[AcceptedRW | None] = []
    for j in range(count):
        req = parse_request(batch, j * slot, abi)
        accepted: AcceptedRW | None = None
        if isinstance(req, BlkifRequest) and req.operation in (BLKIF_OP_READ, BLKIF_OP_WRITE) \
                and not (readonly and req.operation == BLKIF_OP_WRITE):
            try:
                validate_request(req, disk_sectors=disk_sectors)
            except BlkifRequestError:
                pass
            else:
                total = sum(s.nr_sectors for s in req.seg)
                if not (req.sector_number & mask or total & mask
                        or any(s.first_sect & mask or s.nr_sectors & mask for s in req.seg)):
                    accepted = (req.id, req.operation, req.sector_number << SECTOR_SHIFT,
                                total << SECTOR_SHIFT,
                                tuple((s.gref, s.first_sect << SECTOR_SHIFT,
                                       (s.last_sect + 1) << SECTOR_SHIFT) for s in req.seg))
        out.append(accepted)
    return out


def _compiled_scan() -> Any:
    """The compiled scan, or None where the twin serves: not built, or
    ``XENPV_PURE_PYTHON=1`` (:func:`xenpv.compiled.pure_python`)."""
    return compiled_attr("xenpv.protocols._blkscan", "scan_rw")


_SCAN = _compiled_scan()


def scan_rw(batch: Buffer, count: int, abi: ABI, disk_sectors: int, *,
            readonly: bool = False, sector_size: int = 512) -> list[AcceptedRW | None]:
    """:func:`scan_rw_reference`, compiled (``cython/blkscan.pyx``: one pass over the batch,
    no per-field Python objects) where built."""
    if _SCAN is None:
        return scan_rw_reference(batch, count, abi, disk_sectors, readonly=readonly,
                                 sector_size=sector_size)
    result: list[AcceptedRW | None] = _SCAN(
        batch, count, LAYOUTS[abi].ring.slot_size, 4 if abi is ABI.X86_32 else 8,
        disk_sectors, readonly, sector_size)
    return result


# -- virtual-device numbers (xen-vbd-interface) ----------------------------------------------

XVD_MAJOR = 202
SCSI_DISK0_MAJOR = 8
IDE0_MAJOR = 3
IDE1_MAJOR = 22
#: Bit 28 marks the extended xvd encoding (disk << 8 | partition).
VDEV_EXTENDED = 1 << 28
_MAX_EXT_DISK = (1 << 20) - 1

_NAME_RE = re.compile(r"(xvd|sd|hd)([a-z]{1,5})([0-9]{0,3})")
_DP_RE = re.compile(r"d([0-9]{1,7})(?:p([0-9]{1,3}))?")


def _letters_to_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def _index_to_letters(index: int) -> str:
    out = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def vdev_encode(name: str) -> int:
    """Encode a virtual-device name (``xvda``, ``xvdb1``, ``sdc``, ``hda2``, ``d5p1``) as a number.

    Raises :class:`LocalError` for names that cannot be encoded (this is toolstack input).
    """
    m = _DP_RE.fullmatch(name)
    if m:
        kind, disk, part = "xvd", int(m.group(1)), int(m.group(2) or 0)
    else:
        m = _NAME_RE.fullmatch(name)
        if not m:
            raise LocalError(f"not a virtual-device name: {name!r}")
        kind, disk, part = m.group(1), _letters_to_index(m.group(2)), int(m.group(3) or 0)
        if m.group(3).startswith("0"):
            raise LocalError(f"bad partition in {name!r}")
    if kind == "xvd":
        if disk <= 15 and part <= 15:
            return XVD_MAJOR << 8 | disk << 4 | part
        if disk > _MAX_EXT_DISK or part > 255:
            raise LocalError(f"{name!r}: disk or partition too large")
        return VDEV_EXTENDED | disk << 8 | part
    if kind == "sd":
        if disk > 15 or part > 15:
            raise LocalError(f"{name!r}: sd disk/partition > 15")
        return SCSI_DISK0_MAJOR << 8 | disk << 4 | part
    if disk > 3 or part > 63:
        raise LocalError(f"{name!r}: hd disk > 3 or partition > 63")
    if disk < 2:
        return IDE0_MAJOR << 8 | disk << 6 | part
    return IDE1_MAJOR << 8 | (disk - 2) << 6 | part


def vdev_decode(number: int) -> str:
    """Name of a virtual-device number (``51712`` -> ``xvda``); unknown encodings are peer errors."""
    if number < 0 or number >= 1 << 29:
        raise ProtocolError(f"virtual-device {number} out of range")
    if number & VDEV_EXTENDED:
        disk, part = (number >> 8) & _MAX_EXT_DISK, number & 0xFF
        kind = "xvd"
    else:
        major = number >> 8
        if major == XVD_MAJOR:
            kind, disk, part = "xvd", (number >> 4) & 0xF, number & 0xF
        elif major == SCSI_DISK0_MAJOR:
            kind, disk, part = "sd", (number >> 4) & 0xF, number & 0xF
        elif major in (IDE0_MAJOR, IDE1_MAJOR):
            kind, disk, part = "hd", (number >> 6) & 0x3, number & 0x3F
            if disk > 1:
                raise ProtocolError(f"virtual-device {number}: bad hd disk")
            disk += 2 if major == IDE1_MAJOR else 0
        else:
            raise ProtocolError(f"virtual-device {number}: unknown major {major}")
    return f"{kind}{_index_to_letters(disk)}{part if part else ''}"


def parse_virtual_device(value: str | bytes) -> int:
    """Parse a ``virtual-device`` xenstore value (a decimal number) and check it decodes."""
    number = parse_xs_number(value, "virtual-device", hi=(1 << 29) - 1, error=ProtocolError)
    vdev_decode(number)
    return number

"""Shared machinery of the protocol modules: record layouts, parsed records, ring geometry.

Theory of operation
-------------------
Every fixed-size record of a Xen protocol is declared once, as an ordered list of
:class:`Field` s with *explicit* padding (no implicit C alignment is ever assumed).  From
that list :class:`Layout` derives everything else:

* a little-endian ``struct.Struct`` (``<`` with ``x`` pad bytes, so ``pack`` zeroes the
  padding -- hostile-inputs R7),
* a numpy structured ``dtype`` with explicit offsets and ``itemsize`` (for batch views over
  ring slots: ``np.frombuffer(batch, dtype=layout.dtype_for(slot_size))``),
* the offset of every field, and the list of leaves (the layout tests compare each leaf
  with ``offsetof``/``sizeof`` computed by a C compiler from Xen's own headers; a field's
  ``c`` path is its member designator in the C struct).

A layout that mirrors a C type of Xen's headers is declared with :func:`c_struct`, which
names the C type after the layout (``"netif_extra_info.gso"`` reads ``struct
netif_extra_info``), so the layout tests know what to compile it against.

A :class:`Record` is an immutable (frozen dataclass) parsed copy of one record:
``parse(buf, offset)`` copies the bytes out once (R1) and ``pack()``/``pack_into()`` write
them back with zeroed padding.  Parsing never validates: validation helpers in the device
modules check the parsed copy and raise :class:`~xenpv.protocols.ProtocolError`.

:class:`RingLayout` is the geometry of one ``DEFINE_RING_TYPES`` ring (``io/ring.h``): a
64-byte header followed by a power-of-two number of slots, each the size of the larger of
the request and the response.  The console, xenstore and vchan byte rings count in
free-running u32 indexes instead; :func:`byte_ring_fill` and its two readings are shared by
them.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

from xenpv.errors import LocalError

#: Every ring protocol counts in 4096-byte Xen pages, whatever the guest's page size.
XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT

#: io/ring.h: req_prod, req_event, rsp_prod, rsp_event, pvt (4), __pad (44), then ring[].
SRING_HEADER_SIZE = 64

#: struct code -> (numpy scalar type, byte size, signed)
_CODES: dict[str, tuple[str, int, bool]] = {
    "B": ("u1", 1, False),
    "b": ("i1", 1, True),
    "H": ("<u2", 2, False),
    "h": ("<i2", 2, True),
    "I": ("<u4", 4, False),
    "i": ("<i4", 4, True),
    "Q": ("<u8", 8, False),
    "q": ("<i8", 8, True),
    "s": ("u1", 1, False),
}

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Buffer
else:
    Buffer = object  # any object exporting the buffer protocol (bytes, mmap, numpy arrays, ...)


@dataclass(frozen=True)
class Field:
    """One member of a record.

    ``code`` is a ``struct`` code (``B b H h I i Q q``), ``"s"`` for raw bytes (``count``
    bytes, parsed as :class:`bytes`), ``"x"`` for padding (``count`` bytes), or ``""`` with
    ``sub`` set for an array of ``count`` nested records.  Scalar fields with ``count > 1``
    parse as tuples.  ``c`` is the C member designator when it differs from ``name``.
    """

    name: str
    code: str
    count: int = 1
    c: str | None = None
    sub: Layout | None = None

    @property
    def c_path(self) -> str:
        """The C member designator of this field (``u.gso.size``)."""
        return self.c if self.c is not None else self.name

    @property
    def size(self) -> int:
        """Bytes the field occupies."""
        if self.sub is not None:
            return self.sub.size * self.count
        if self.code == "x":
            return self.count
        return _CODES[self.code][1] * self.count


def pad(n: int) -> Field:
    """``n`` bytes of padding (always packed as zeros)."""
    return Field("", "x", n)


@dataclass(frozen=True)
class Leaf:
    """A scalar (or scalar array, or byte string) member at a fixed offset, for layout checks."""

    name: str
    c_path: str
    offset: int
    code: str
    count: int

    @property
    def size(self) -> int:
        """Bytes the member occupies."""
        return _CODES[self.code][1] * self.count

    @property
    def signed(self) -> bool:
        """Whether the member's element type is signed."""
        return _CODES[self.code][2]


class Layout:
    """Byte layout of one fixed-size record, built from an ordered field list.

    ``pad_to`` appends tail padding up to that size (e.g. a 16-byte kbd event in its 40-byte
    union).  ``c_type`` names the C type this layout mirrors (for the layout tests).
    """

    def __init__(
        self,
        name: str,
        fields: Sequence[Field],
        *,
        c_type: str | None = None,
        pad_to: int | None = None,
    ) -> None:
        self.name = name
        self.c_type = c_type
        flist = list(fields)
        size = sum(f.size for f in flist)
        if pad_to is not None:
            if pad_to < size:
                raise LocalError(f"{name}: pad_to {pad_to} < size {size}")
            if pad_to > size:
                flist.append(pad(pad_to - size))
        self.fields: tuple[Field, ...] = tuple(flist)
        self.struct = struct.Struct("<" + self._fmt_body())
        self.size: int = self.struct.size
        offsets: dict[str, int] = {}
        off = 0
        for f in self.fields:
            if f.name:
                offsets[f.name] = off
            off += f.size
        self.offsets = offsets
        #: Names of the data fields, in order (the parsed record's constructor arguments).
        self.names: tuple[str, ...] = tuple(f.name for f in self.fields if f.code != "x")
        if self.struct.size != off:
            raise LocalError(f"{name}: struct size {self.struct.size} != field sum {off}")

    def _fmt_body(self) -> str:
        parts: list[str] = []
        for f in self.fields:
            if f.sub is not None:
                parts.append(f.sub._fmt_body() * f.count)
            elif f.code in ("x", "s"):
                parts.append(f"{f.count}{f.code}")
            elif f.count == 1:
                parts.append(f.code)
            else:
                parts.append(f"{f.count}{f.code}")
        return "".join(parts)

    def __repr__(self) -> str:
        return f"Layout({self.name!r}, size={self.size})"

    # -- numpy -------------------------------------------------------------------------------

    @functools.cached_property
    def dtype(self) -> np.dtype[Any]:
        """A structured dtype of this record (built on first use: numpy is imported only by
        the users of batch views, not by every process that speaks a protocol)."""
        return self.dtype_for(self.size)

    def dtype_for(self, itemsize: int) -> np.dtype[Any]:
        """A structured dtype of this record with the given ``itemsize`` (e.g. the slot size)."""
        if itemsize < self.size:
            raise LocalError(f"{self.name}: itemsize {itemsize} < record size {self.size}")
        import numpy as np  # here: protocol users that never ask for a dtype go without it

        names: list[str] = []
        formats: list[Any] = []
        offs: list[int] = []
        for f in self.fields:
            if not f.name:
                continue
            if f.sub is not None:
                fmt: Any = (f.sub.dtype, (f.count,))
            elif f.code == "s" or f.count > 1:
                fmt = (_CODES[f.code][0], (f.count,))
            else:
                fmt = _CODES[f.code][0]
            names.append(f.name)
            formats.append(fmt)
            offs.append(self.offsets[f.name])
        return np.dtype({"names": names, "formats": formats, "offsets": offs, "itemsize": itemsize})

    # -- introspection -----------------------------------------------------------------------

    def leaves(self, prefix: str = "", c_prefix: str = "", base: int = 0) -> Iterator[Leaf]:
        """Every scalar member with its absolute offset, nested arrays expanded per element."""
        off = base
        for f in self.fields:
            if f.sub is not None:
                for k in range(f.count):
                    yield from f.sub.leaves(
                        f"{prefix}{f.name}[{k}].", f"{c_prefix}{f.c_path}[{k}].", off + k * f.sub.size
                    )
            elif f.code != "x":
                yield Leaf(prefix + f.name, c_prefix + f.c_path, off, f.code, f.count)
            off += f.size

    def padding(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every padding run, nested ones included."""
        runs: list[tuple[int, int]] = []
        off = 0
        for f in self.fields:
            if f.sub is not None:
                for k in range(f.count):
                    runs.extend((off + k * f.sub.size + o, n) for o, n in f.sub.padding())
            elif f.code == "x":
                runs.append((off, f.count))
            off += f.size
        return runs

    # -- values ------------------------------------------------------------------------------

    def _group(self, it: Iterator[Any]) -> tuple[Any, ...]:
        out: list[Any] = []
        for f in self.fields:
            if f.sub is not None:
                sub = f.sub
                out.append(tuple(sub._group(it) for _ in range(f.count)))
            elif f.code == "x":
                continue
            elif f.code == "s" or f.count == 1:
                out.append(next(it))
            else:
                out.append(tuple(next(it) for _ in range(f.count)))
        return tuple(out)

    def _flatten(self, values: Sequence[Any], out: list[Any]) -> None:
        data = [f for f in self.fields if f.code != "x"]
        if len(values) != len(data):
            raise LocalError(f"{self.name}: expected {len(data)} values, got {len(values)}")
        for f, v in zip(data, values, strict=True):
            if f.sub is not None:
                items = list(v)
                if len(items) > f.count:
                    raise LocalError(f"{self.name}.{f.name}: at most {f.count} entries, got {len(items)}")
                for item in items:
                    f.sub._flatten(item.raw() if isinstance(item, Record) else item, out)
                out.extend(f.sub.struct.unpack(bytes(f.sub.size)) * (f.count - len(items)))
            elif f.code == "s":
                if len(v) > f.count:
                    raise LocalError(f"{self.name}.{f.name}: at most {f.count} bytes, got {len(v)}")
                out.append(bytes(v))
            elif f.count == 1:
                out.append(v)
            else:
                items = list(v)
                if len(items) > f.count:
                    raise LocalError(f"{self.name}.{f.name}: at most {f.count} entries, got {len(items)}")
                out.extend(items)
                out.extend([0] * (f.count - len(items)))

    def unpack_from(self, buf: Buffer, offset: int = 0) -> tuple[Any, ...]:
        """Copy one record out of ``buf`` (single fetch) as nested raw values."""
        if offset < 0:
            raise LocalError(f"{self.name}: negative offset {offset}")
        try:
            flat = self.struct.unpack_from(buf, offset)
        except struct.error as e:
            raise LocalError(f"{self.name}: cannot read {self.size} bytes at {offset}: {e}") from None
        return self._group(iter(flat))

    def pack(self, values: Sequence[Any]) -> bytes:
        """Encode raw values (as returned by :meth:`unpack_from`); padding is zero."""
        flat: list[Any] = []
        self._flatten(values, flat)
        try:
            return self.struct.pack(*flat)
        except struct.error as e:
            raise LocalError(f"{self.name}: value out of range: {e}") from None

    def pack_into(self, buf: Buffer, offset: int, values: Sequence[Any]) -> None:
        """Encode raw values into ``buf`` at ``offset``; padding is zero."""
        data = self.pack(values)
        mv = memoryview(buf).cast("B")
        if offset < 0 or offset + self.size > len(mv):
            raise LocalError(f"{self.name}: buffer too short for {self.size} bytes at {offset}")
        try:
            mv[offset : offset + self.size] = data
        except TypeError as e:  # read-only buffer
            raise LocalError(f"{self.name}: cannot write to buffer: {e}") from None


def c_struct(
    name: str, fields: Sequence[Field], *, pad_to: int | None = None, kind: str = "struct"
) -> Layout:
    """The layout of a record that mirrors a C type of Xen's headers, named after it.

    The C type (checked by the layout tests) is ``kind`` and ``name`` up to its first
    ``.`` or ``[``: ``"netif_extra_info.gso"`` is one reading of ``struct netif_extra_info``,
    ``"blkif_response[x86_32]"`` one ABI's ``struct blkif_response``.
    """
    tag = re.split(r"[.\[]", name, maxsplit=1)[0]
    return Layout(name, fields, c_type=f"{kind} {tag}", pad_to=pad_to)


class Record:
    """Base of the immutable parsed records (subclasses are frozen dataclasses).

    The dataclass fields must be the layout's data fields, in order (``LAYOUT.names``).
    Records with nested arrays override :meth:`from_raw`/:meth:`raw`.
    """

    LAYOUT: ClassVar[Layout]
    #: Where the record sits in its shared page, for records that are part of one.
    PAGE_OFFSET: ClassVar[int] = 0

    @classmethod
    def from_page(cls, page: Buffer) -> Self:
        """Copy the record out of a shared page at :attr:`PAGE_OFFSET`."""
        return cls.parse(page, cls.PAGE_OFFSET)

    @classmethod
    def from_raw(cls, raw: tuple[Any, ...]) -> Self:
        """Build the record from raw values as returned by :meth:`Layout.unpack_from`."""
        return cls(*raw)

    def raw(self) -> tuple[Any, ...]:
        """The record's values in layout order, as accepted by :meth:`Layout.pack`."""
        return tuple(getattr(self, n) for n in self.LAYOUT.names)

    @classmethod
    def parse(cls, buf: Buffer, offset: int = 0) -> Self:
        """Copy one record out of ``buf`` at ``offset`` (no validation)."""
        return cls.from_raw(cls.LAYOUT.unpack_from(buf, offset))

    def pack(self) -> bytes:
        """Encode the record (``LAYOUT.size`` bytes), padding zeroed."""
        return self.LAYOUT.pack(self.raw())

    def pack_into(self, buf: Buffer, offset: int = 0) -> None:
        """Encode the record into ``buf`` at ``offset``, padding zeroed."""
        self.LAYOUT.pack_into(buf, offset, self.raw())


# -- ring geometry (io/ring.h) ---------------------------------------------------------------


def ring_nr_ents(ring_bytes: int, slot_size: int) -> int:
    """Slots in a shared ring of ``ring_bytes``: largest power of two <= (bytes - 64) // E.

    io/ring.h: ``__CONST_RING_SIZE`` / ``__RD32`` round down to a power of two.
    """
    if slot_size <= 0:
        raise LocalError(f"slot size must be positive, got {slot_size}")
    n = max(ring_bytes - SRING_HEADER_SIZE, 0) // slot_size
    return 1 << (n.bit_length() - 1) if n else 0


@dataclass(frozen=True)
class RingLayout:
    """Geometry of one ``DEFINE_RING_TYPES`` ring: a 64-byte header and N equal slots."""

    name: str
    request_size: int
    response_size: int

    @property
    def slot_size(self) -> int:
        """Bytes per slot: the union of request and response (io/ring.h ``union X_sring_entry``)."""
        return max(self.request_size, self.response_size)

    def nr_ents(self, pages: int = 1) -> int:
        """Slots in a ring spanning ``pages`` contiguous 4096-byte pages."""
        if pages < 1:
            raise LocalError(f"{self.name}: a ring needs at least one page, got {pages}")
        return ring_nr_ents(pages * XEN_PAGE_SIZE, self.slot_size)

    def slot_offset(self, idx: int, pages: int = 1) -> int:
        """Byte offset of the slot used by free-running index ``idx``."""
        return SRING_HEADER_SIZE + (idx & (self.nr_ents(pages) - 1)) * self.slot_size


# -- byte rings with free-running u32 indexes (console, xenstore, vchan) ----------------------


def byte_ring_fill(prod: int, cons: int) -> int:
    """Bytes between two free-running u32 indexes (``prod - cons`` modulo 2**32).

    More than the ring's size means the indexes are corrupt; each protocol decides what
    that costs (xenstore: an error; console and vchan: the ring reads as empty or full).
    """
    return (prod - cons) & 0xFFFFFFFF


def byte_ring_avail(prod: int, cons: int, size: int) -> int:
    """Readable bytes of a byte ring of ``size``; a corrupt index pair reads as 0."""
    n = byte_ring_fill(prod, cons)
    return n if n <= size else 0


def byte_ring_space(prod: int, cons: int, size: int) -> int:
    """Free bytes of a byte ring of ``size``; a corrupt index pair reads as 0 (full)."""
    n = byte_ring_fill(prod, cons)
    return size - n if n <= size else 0


__all__ = [
    "SRING_HEADER_SIZE",
    "XEN_PAGE_SHIFT",
    "XEN_PAGE_SIZE",
    "Field",
    "Layout",
    "Leaf",
    "Record",
    "RingLayout",
    "byte_ring_avail",
    "byte_ring_fill",
    "byte_ring_space",
    "c_struct",
    "pad",
    "ring_nr_ents",
]

"""Hypothesis strategies for every record layout in ``xenpv.protocols``.

:func:`layout_values` derives a strategy from a :class:`~xenpv.protocols.layout.Layout`'s
field list (so it follows the layouts as they change): every scalar over its whole range,
byte fields of their exact size, nested arrays element by element.  The raw values are
what :meth:`Layout.pack` accepts, so ``layout_bytes`` gives well-formed record bytes and
:func:`slot_bytes` arbitrary bytes of a slot.  :func:`all_layouts` finds every layout the
protocol modules define (module-level ``*_LAYOUT`` names and the blkif ABI tables), and
:func:`records` builds the parsed record classes.  Use them for valid, valid-but-nasty
(edge values are drawn often: Hypothesis favours 0, the maximum and the sign boundary)
and byte-level tests alike.

:class:`EdgeSpec` and :func:`edge_cases` are for *one field at a time at both edges*: a
strategy of valid inputs (named integer fields, list elements named ``seg3.last`` and so
on), the valid range of each field with the others fixed, and the range its type can hold;
:func:`edge_cases` turns one valid input into every single-field perturbation to
``min - 1``, ``min``, ``max`` and ``max + 1`` (values the type cannot hold dropped), for
every field and every list element, each marked inside or outside the valid range.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from xenpv.protocols.layout import Field, Layout, Record

__all__ = ["Edge", "EdgeSpec", "all_layouts", "edge_cases", "layout_bytes", "layout_values", "records", "slot_bytes"]

PROTOCOL_MODULES = ("blkif", "console", "kbdif", "netif", "usbif", "vchan", "xsring")

_RANGES: dict[str, tuple[int, int]] = {
    "B": (0, 0xFF), "b": (-0x80, 0x7F), "H": (0, 0xFFFF), "h": (-0x8000, 0x7FFF),
    "I": (0, 0xFFFFFFFF), "i": (-0x80000000, 0x7FFFFFFF),
    "Q": (0, 0xFFFFFFFFFFFFFFFF), "q": (-(1 << 63), (1 << 63) - 1),
}


def _field(f: Field) -> st.SearchStrategy[Any]:
    if f.sub is not None:
        return st.lists(layout_values(f.sub), min_size=f.count, max_size=f.count).map(tuple)
    if f.code == "s":
        return st.binary(min_size=f.count, max_size=f.count)
    lo, hi = _RANGES[f.code]
    one = st.integers(lo, hi)
    if f.count == 1:
        return one
    return st.lists(one, min_size=f.count, max_size=f.count).map(tuple)


def layout_values(layout: Layout) -> st.SearchStrategy[tuple[Any, ...]]:
    """Raw value tuples of ``layout`` (as :meth:`Layout.unpack_from` returns them)."""
    return st.tuples(*(_field(f) for f in layout.fields if f.code != "x"))


def layout_bytes(layout: Layout) -> st.SearchStrategy[bytes]:
    """Well-formed encodings of ``layout`` (padding zero)."""
    return layout_values(layout).map(layout.pack)


def slot_bytes(size: int) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes of one ring slot (anything a hostile peer can write)."""
    return st.binary(min_size=size, max_size=size)


def records(cls: type[Record]) -> st.SearchStrategy[Record]:
    """Parsed records of ``cls`` (via its layout, so nested arrays are handled by the class)."""
    return layout_values(cls.LAYOUT).map(cls.from_raw)


def all_layouts() -> dict[str, Layout]:
    """Every layout the protocol modules define, by a unique name."""
    out: dict[str, Layout] = {}
    for name in PROTOCOL_MODULES:
        mod = importlib.import_module(f"xenpv.protocols.{name}")
        for attr, value in vars(mod).items():
            if isinstance(value, Layout):
                out[f"{name}.{attr}"] = value
        if name == "blkif":
            for abi, lays in mod.LAYOUTS.items():
                for kind in ("request", "discard", "indirect", "response"):
                    out[f"blkif.{kind}[{abi.value}]"] = getattr(lays, kind)
    return out


#: A valid input as named integer fields.
Fields = dict[str, int]


@dataclass(frozen=True)
class Edge:
    """One perturbation of a valid input: ``field`` set to ``value`` (``inside`` its range)."""

    field: str
    value: int
    inside: bool
    fields: Fields


@dataclass(frozen=True)
class EdgeSpec:
    """How to perturb one kind of input one field at a time.

    ``valid`` draws valid inputs; ``bounds(fields)`` gives each perturbable field's valid
    range ``(lo, hi)`` with the other fields as they are; ``holds(name)`` the range the
    field's type can hold (a u8 cannot be -1).
    """

    name: str
    valid: st.SearchStrategy[Fields]
    bounds: Callable[[Fields], dict[str, tuple[int, int]]]
    holds: Callable[[str], tuple[int, int]]


def edge_cases(spec: EdgeSpec, fields: Fields) -> Iterator[Edge]:
    """Every single-field edge perturbation of valid ``fields`` (min-1, min, max, max+1)."""
    for name, (lo, hi) in spec.bounds(fields).items():
        type_lo, type_hi = spec.holds(name)
        for value in dict.fromkeys((lo - 1, lo, hi, hi + 1)):
            if type_lo <= value <= type_hi:
                yield Edge(name, value, lo <= value <= hi, {**fields, name: value})

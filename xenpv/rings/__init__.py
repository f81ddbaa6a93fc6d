"""Shared request/response rings and byte rings (Xen's ``io/ring.h`` semantics).

``IMPLEMENTATION`` is ``"cython"`` when the compiled core is in use, ``"reference"`` when the
pure-Python twin (``xenpv.rings._reference``) serves instead: because the extension is not
built, or because ``XENPV_PURE_PYTHON=1`` forces it.

The chosen implementation's names are exported here:

* :class:`FrontRing`, :class:`BackRing`: the two ends of a shared request/response ring over
  any writable buffer (one or more contiguous 4 KiB pages), with batch calls that copy each
  entry out of shared memory exactly once (``take_requests``, ``put_responses`` …).
* :class:`ByteRing`: one direction of a byte ring (xenstore, console, vchan) or a fixed-unit
  modulo ring (kbdif), placed by the offsets of its indexes and data area.
* :func:`ring_size`: slots of a ring of a given size (io/ring.h ``__RING_SIZE``).
* :func:`atomic_or8`, :func:`atomic_fetch_and_clear8`, :func:`full_barrier`,
  :func:`load_u32`, :func:`store_u32`: shared-memory primitives for protocol code.

:func:`implementation` returns either implementation by name (tests run both).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

from xenpv.compiled import pure_python
from xenpv.errors import LocalError

__all__ = [
    "HEADER_BYTES",
    "IMPLEMENTATION",
    "BackRing",
    "ByteRing",
    "FrontRing",
    "atomic_fetch_and_clear8",
    "atomic_or8",
    "full_barrier",
    "implementation",
    "load_u32",
    "ring_size",
    "store_u32",
]

_NAMES = ("FrontRing", "BackRing", "ByteRing", "ring_size", "atomic_or8",
          "atomic_fetch_and_clear8", "full_barrier", "load_u32", "store_u32")


def implementation(name: str) -> SimpleNamespace:
    """The ring classes and helpers of one implementation: ``"cython"`` or ``"reference"``.

    The namespace has ``name`` and the attributes listed in ``xenpv.rings.__all__`` (minus
    ``IMPLEMENTATION`` and ``implementation``).  Asking for ``"cython"`` when the extension
    is not built raises ImportError.
    """
    if name == "reference":
        from xenpv.rings import _reference as ref

        return SimpleNamespace(name=name, HEADER_BYTES=ref.HEADER_BYTES,
                               **{n: getattr(ref, n) for n in _NAMES})
    if name == "cython":
        from xenpv.rings import _atomic, _bytering, _sring

        return SimpleNamespace(
            name=name, HEADER_BYTES=_sring.HEADER_BYTES,
            FrontRing=_sring.FrontRing, BackRing=_sring.BackRing, ring_size=_sring.ring_size,
            ByteRing=_bytering.ByteRing, atomic_or8=_atomic.atomic_or8,
            atomic_fetch_and_clear8=_atomic.atomic_fetch_and_clear8,
            full_barrier=_atomic.full_barrier, load_u32=_atomic.load_u32,
            store_u32=_atomic.store_u32)
    raise LocalError(f"unknown ring implementation {name!r} (cython or reference)")


IMPLEMENTATION: str
if pure_python():
    IMPLEMENTATION = "reference"
else:
    try:
        from xenpv.rings import _atomic, _bytering, _sring  # noqa: F401

        IMPLEMENTATION = "cython"
    except ImportError:
        IMPLEMENTATION = "reference"

if TYPE_CHECKING:
    # Both implementations have this API; type checkers see the reference's annotations.
    from xenpv.rings._reference import (
        HEADER_BYTES,
        BackRing,
        ByteRing,
        FrontRing,
        atomic_fetch_and_clear8,
        atomic_or8,
        full_barrier,
        load_u32,
        ring_size,
        store_u32,
    )
else:
    _chosen = implementation(IMPLEMENTATION)
    HEADER_BYTES = _chosen.HEADER_BYTES
    FrontRing = _chosen.FrontRing
    BackRing = _chosen.BackRing
    ByteRing = _chosen.ByteRing
    ring_size = _chosen.ring_size
    atomic_or8 = _chosen.atomic_or8
    atomic_fetch_and_clear8 = _chosen.atomic_fetch_and_clear8
    full_barrier = _chosen.full_barrier
    load_u32 = _chosen.load_u32
    store_u32 = _chosen.store_u32

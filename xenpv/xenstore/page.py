"""The xenstore page (``xenstore_domain_interface``, io/xs_wire.h), for either side; sans-IO.

Its layout (xen-protocols.md §4.9): two byte rings of 1024 bytes with free-running u32
indexes — ``req`` (guest → xenstored) and ``rsp`` (xenstored → guest) — then
``server_features``, ``connection`` and ``error``.  :class:`XsRingPage` reads and writes
both rings over :class:`~xenpv.rings.ByteRing` and the three words with single aligned
loads and stores.  The transports over it are in :mod:`xenpv.xenstore.ring` (guest) and
:mod:`xenpv.xenstore.ringserver` (server); :mod:`xenpv.protocols.xsring` and the
compiled server pass (``cython/xsring.pyx``, when it is imported) take its constants from
here.
"""

from __future__ import annotations

from typing import Any

from xenpv.errors import LocalError
from xenpv.rings import ByteRing, full_barrier, load_u32, store_u32

__all__ = [
    "CONNECTION_OFFSET",
    "ERROR_COMM",
    "ERROR_NONE",
    "ERROR_OFFSET",
    "ERROR_PROTO",
    "ERROR_RINGIDX",
    "FEATURES_OFFSET",
    "FEATURE_ERROR",
    "FEATURE_RECONNECTION",
    "GNTTAB_RESERVED_XENSTORE",
    "INTERFACE_SIZE",
    "REQ_CONS_OFFSET",
    "REQ_OFFSET",
    "REQ_PROD_OFFSET",
    "RING_SIZE",
    "RSP_CONS_OFFSET",
    "RSP_OFFSET",
    "RSP_PROD_OFFSET",
    "XS_CONNECTED",
    "XS_RECONNECT",
    "XsRingPage",
]

#: io/xs_wire.h XENSTORE_RING_SIZE: bytes in each direction.
RING_SIZE = 1024
REQ_OFFSET = 0
RSP_OFFSET = 1024
REQ_CONS_OFFSET = 2048
REQ_PROD_OFFSET = 2052
RSP_CONS_OFFSET = 2056
RSP_PROD_OFFSET = 2060
FEATURES_OFFSET = 2064
CONNECTION_OFFSET = 2068
ERROR_OFFSET = 2072
#: sizeof(struct xenstore_domain_interface) in Xen 4.17.
INTERFACE_SIZE = 2076
#: server_features bits.
FEATURE_RECONNECTION = 1
FEATURE_ERROR = 2
#: connection values.
XS_CONNECTED = 0
XS_RECONNECT = 1
#: error values (valid when FEATURE_ERROR is advertised).
ERROR_NONE = 0
ERROR_COMM = 1
ERROR_RINGIDX = 2
ERROR_PROTO = 3
#: grant_table.h: the grant ref the domain builder reserves for the xenstore page.
GNTTAB_RESERVED_XENSTORE = 1


class XsRingPage:
    """The two byte rings and three control words of one xenstore page, for one side.

    ``server=False`` (the guest): :meth:`write` produces requests into ``req``,
    :meth:`read` consumes ``rsp``; ``server=True`` the other way round.  A corrupt index
    pair raises :class:`~xenpv.errors.RingOverflowError` from :meth:`read` /
    :meth:`write` and keeps doing so until :meth:`reset_indexes`.
    """

    def __init__(self, mem: Any, *, server: bool) -> None:
        """Place the rings in ``mem`` (a writable buffer of at least 2076 bytes)."""
        if len(memoryview(mem)) < INTERFACE_SIZE:
            raise LocalError(f"a xenstore page needs {INTERFACE_SIZE} bytes")
        self.mem = mem
        self.server = server
        self._rx, self._tx = self._rings()

    def _rings(self) -> tuple[ByteRing, ByteRing]:
        req = ByteRing(self.mem, data_offset=REQ_OFFSET, size=RING_SIZE,
                       prod_offset=REQ_PROD_OFFSET, cons_offset=REQ_CONS_OFFSET)
        rsp = ByteRing(self.mem, data_offset=RSP_OFFSET, size=RING_SIZE,
                       prod_offset=RSP_PROD_OFFSET, cons_offset=RSP_CONS_OFFSET)
        return (req, rsp) if self.server else (rsp, req)

    # -- data
    def read(self, max_n: int = -1) -> bytes:
        """Take up to ``max_n`` bytes (all there are for -1) from the ring we consume."""
        return self._rx.read(max_n)

    def read_into(self, dst: Any, max_n: int = -1) -> int:
        """Take bytes into ``dst``; the count."""
        return self._rx.read_into(dst, max_n)

    def read_wake(self, max_n: int = -1) -> tuple[bytes, bool]:
        """:meth:`read`, and whether the producer must be signalled: it may have found
        the ring full and be waiting for room.  Judged, as a guest's xenbus driver does,
        from the producer index read *after* the new consumer index was published: the
        producer may have filled the ring while the bytes were being taken, so "the read
        took a whole ring" is not enough (a producer that filled it just after the index
        was sampled would wait for ever)."""
        old = self._rx.cons
        data = self._rx.read(max_n)
        return data, self._producer_waits(old, len(data))

    def read_into_wake(self, dst: Any, max_n: int = -1) -> tuple[int, bool]:
        """:meth:`read_into` with :meth:`read_wake`'s signal rule."""
        old = self._rx.cons
        n = self._rx.read_into(dst, max_n)
        return n, self._producer_waits(old, n)

    def _producer_waits(self, old_cons: int, taken: int) -> bool:
        """After a read of ``taken`` bytes from consumer index ``old_cons`` (its new index
        already published): whether the producer may be waiting for room, i.e. its index,
        read now, is a whole ring past ``old_cons``."""
        if not taken:
            return False
        full_barrier()  # our published index before the producer's index we read
        return ((self._rx.prod - old_cons) & 0xFFFFFFFF) >= RING_SIZE

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy as much of ``data`` as fits into the ring we produce; the count."""
        return self._tx.write(data)

    def write_wake(self, data: bytes | bytearray | memoryview) -> tuple[int, bool]:
        """:meth:`write`, and whether the consumer must be signalled: it had taken
        everything before this write (so it may be asleep), judged from its index read
        *after* the new producer index was published.  A consumer that had not caught
        up will find these bytes in the same pass that takes the older ones."""
        tx = self._tx
        old = tx.prod
        n = tx.write(data)
        if not n:
            return 0, False
        full_barrier()
        return n, tx.cons == old

    def readable(self) -> int:
        """Bytes waiting in the ring we consume."""
        return self._rx.available()

    def writable(self) -> int:
        """Free bytes in the ring we produce."""
        return self._tx.free()

    @property
    def broken(self) -> bool:
        """True once a corrupt index pair was seen (until :meth:`reset_indexes`)."""
        return bool(self._rx.broken or self._tx.broken)

    # -- control words (each one aligned 32-bit load or store)
    @property
    def features(self) -> int:
        """``server_features``."""
        return load_u32(self.mem, FEATURES_OFFSET)

    def add_features(self, bits: int) -> None:
        """Set feature ``bits`` (server only; bits are never cleared)."""
        store_u32(self.mem, FEATURES_OFFSET, self.features | bits)

    @property
    def connection(self) -> int:
        """``connection`` (:data:`XS_CONNECTED` or :data:`XS_RECONNECT`)."""
        return load_u32(self.mem, CONNECTION_OFFSET)

    @connection.setter
    def connection(self, value: int) -> None:
        full_barrier()  # everything before it is visible first
        store_u32(self.mem, CONNECTION_OFFSET, value)

    @property
    def error(self) -> int:
        """``error`` (one of the ``ERROR_*`` values)."""
        return load_u32(self.mem, ERROR_OFFSET)

    @error.setter
    def error(self, value: int) -> None:
        store_u32(self.mem, ERROR_OFFSET, value)

    def reset_indexes(self) -> None:
        """Empty both rings (all four indexes 0) and forget a broken state (server only,
        during a reconnection)."""
        for off in (REQ_CONS_OFFSET, REQ_PROD_OFFSET, RSP_CONS_OFFSET, RSP_PROD_OFFSET):
            store_u32(self.mem, off, 0)
        full_barrier()
        self.release()
        self._rx, self._tx = self._rings()

    def release(self) -> None:
        """Let go of the page memory held by the ring objects (idempotent)."""
        self._rx.release()
        self._tx.release()

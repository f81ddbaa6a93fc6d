"""The vchan data path over mapped memory: two byte rings, notify bits, live bytes (sans-IO).

Theory of operation
-------------------
A vchan endpoint owns one control page (``vchan_interface``, xen-protocols.md §10.1) and
two byte rings: the one it *reads* and the one it *writes*.  The server reads the left ring
and writes the right one; the client the other way round.  :class:`VchanRings` does all
shared-memory work of one endpoint and nothing else: it never signals an event channel,
never waits and never touches xenstore.  Every call returns what happened, and
:attr:`VchanRings.kick` tells the caller whether the peer asked to be signalled (the
caller then notifies the event channel), in the style of Mirage's
``push_requests_and_check_notify``; or, with :attr:`VchanRings.on_kick` set, the rings
call it themselves (the endpoint sets the event channel's notify there, so its data path
is one call per write or read: :meth:`VchanRings.write_some`, :meth:`VchanRings.recv_into`).

Indexes.  Both indexes of a ring are free-running u32 counters in the control page.  The
index this side advances (``cons`` of the ring it reads, ``prod`` of the ring it writes)
is kept privately and only *stored* to the page; the peer's index is *loaded* once per
pass (R1).  Each pass also loads our own index back: a peer that rewrote it, or a peer
index more than the ring size away from ours (R2, scenario 26), is an insane state.  An
insane pass reads as 0 bytes available / 0 bytes free (so nothing is ever copied beyond
the ring, and nothing outside it is touched), and :attr:`VchanRings.broken` records the
reason; the endpoint then reports a :class:`~xenpv.vchan.errors.VchanBroken` peer error
and the rings stay locked for good (R4).

This pure-Python class is the readable specification; ``_vring.pyx`` is its compiled twin
with the same API, used when built (``IMPLEMENTATION``; ``XENPV_PURE_PYTHON=1`` forces
this one).  Copies are at most two slice copies per call (the data may wrap at the end of the ring),
64 KiB at a time or whatever fits, so a bulk transfer costs a handful of Python calls per
chunk.  Barriers follow libxenvchan's placement (§10.2): full barrier between loading the
indexes and writing data, write barrier before publishing ``prod``, read barrier after
loading ``prod``, full barrier before publishing ``cons`` and before consulting the notify
byte.  The notify bytes are changed with atomic byte operations from :mod:`xenpv.rings`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from xenpv.vchan import _vring

from xenpv.compiled import pure_python
from xenpv.protocols.vchan import (
    VCHAN_CLI_LIVE_OFFSET,
    VCHAN_CLI_NOTIFY_OFFSET,
    VCHAN_LEFT_CONS_OFFSET,
    VCHAN_LEFT_PROD_OFFSET,
    VCHAN_NOTIFY_READ,
    VCHAN_NOTIFY_WRITE,
    VCHAN_RIGHT_CONS_OFFSET,
    VCHAN_RIGHT_PROD_OFFSET,
    VCHAN_SRV_LIVE_OFFSET,
    VCHAN_SRV_NOTIFY_OFFSET,
)
from xenpv.rings import atomic_fetch_and_clear8, atomic_or8, full_barrier

__all__ = ["IMPLEMENTATION", "MASK32", "ReferenceVchanRings", "VchanRings", "implementation"]

MASK32 = 0xFFFFFFFF


class VchanRings:
    """Shared-memory operations of one vchan endpoint.

    ``ctrl`` is a writable view of the control page; ``rd_data``/``wr_data`` views of the
    ring this side reads (may be read-only) and the ring it writes, of sizes ``rd_size``
    and ``wr_size`` (powers of two).  ``is_server`` selects which indexes and bytes are
    whose.  The own indexes start from the values currently in the page.
    """

    def __init__(
        self,
        ctrl: memoryview,
        rd_data: memoryview,
        rd_size: int,
        wr_data: memoryview,
        wr_size: int,
        *,
        is_server: bool,
    ) -> None:
        self.is_server = is_server
        self._ctrl: memoryview | None = ctrl
        self._words: memoryview | None = ctrl[:16].cast("I")
        self._rd: memoryview | None = rd_data[:rd_size]
        self._wr: memoryview | None = wr_data[:wr_size]
        self.rd_size = rd_size
        self.wr_size = wr_size
        if is_server:  # server reads left, writes right
            self._rd_cons_i, self._rd_prod_i = VCHAN_LEFT_CONS_OFFSET // 4, VCHAN_LEFT_PROD_OFFSET // 4
            self._wr_cons_i, self._wr_prod_i = VCHAN_RIGHT_CONS_OFFSET // 4, VCHAN_RIGHT_PROD_OFFSET // 4
            self._my_notify, self._peer_notify = VCHAN_SRV_NOTIFY_OFFSET, VCHAN_CLI_NOTIFY_OFFSET
            self._my_live, self._peer_live = VCHAN_SRV_LIVE_OFFSET, VCHAN_CLI_LIVE_OFFSET
        else:  # client reads right, writes left
            self._rd_cons_i, self._rd_prod_i = VCHAN_RIGHT_CONS_OFFSET // 4, VCHAN_RIGHT_PROD_OFFSET // 4
            self._wr_cons_i, self._wr_prod_i = VCHAN_LEFT_CONS_OFFSET // 4, VCHAN_LEFT_PROD_OFFSET // 4
            self._my_notify, self._peer_notify = VCHAN_CLI_NOTIFY_OFFSET, VCHAN_SRV_NOTIFY_OFFSET
            self._my_live, self._peer_live = VCHAN_CLI_LIVE_OFFSET, VCHAN_SRV_LIVE_OFFSET
        w = self._words
        self._rd_cons = int(w[self._rd_cons_i])
        self._wr_prod = int(w[self._wr_prod_i])
        #: Why the rings locked up (``None`` while sane).
        self.broken: str | None = None
        #: Set when the peer asked to be signalled after our last action; the caller
        #: notifies the event channel and clears it.  Not used while :attr:`on_kick` is set.
        self.kick = False
        #: Called (no arguments) instead of setting :attr:`kick` when the peer asked to be
        #: signalled, e.g. the event channel's notify: the data path then needs no check
        #: of :attr:`kick` after each call.
        self.on_kick: Callable[[], object] | None = None
        #: Times the peer asked to be signalled (both ways of reporting it).
        self.kicks = 0
        #: Insane passes seen (a hostile or broken peer).
        self.insane_count = 0

    # -- bookkeeping ------------------------------------------------------------------
    def release(self) -> None:
        """Drop every view of the shared memory; later calls see a broken, empty vchan."""
        for view in (self._words, self._rd, self._wr):
            if view is not None:
                view.release()
        self._ctrl = self._words = self._rd = self._wr = None
        if self.broken is None:
            self.broken = "released"

    @property
    def released(self) -> bool:
        """True after :meth:`release`."""
        return self._ctrl is None

    def _insane(self, why: str) -> int:
        self.insane_count += 1
        if self.broken is None:
            self.broken = why
        return 0

    # -- live and notify bytes --------------------------------------------------------
    def peer_live(self) -> int:
        """The peer's live byte (server: ``cli_live`` 2/1/0; client: ``srv_live`` 1/0).

        0 once released."""
        ctrl = self._ctrl
        return 0 if ctrl is None else int(ctrl[self._peer_live])

    def set_live(self, value: int) -> None:
        """Store our own live byte."""
        if self._ctrl is not None:
            self._ctrl[self._my_live] = value

    def request_notify(self, bit: int) -> None:
        """Ask the peer to signal us after its next action of kind ``bit`` (OR into the
        peer's check byte), then a full barrier so that the re-check that follows sees
        everything published before the request."""
        if self._ctrl is not None:
            atomic_or8(self._ctrl, self._peer_notify, bit)
            full_barrier()

    def _send_notify(self, bit: int) -> None:
        full_barrier()  # our index store is visible before we look at the request bit
        if atomic_fetch_and_clear8(self._ctrl, self._my_notify, bit) & bit:
            self.kicks += 1
            if self.on_kick is None:
                self.kick = True
            else:
                self.on_kick()

    # -- waiting ----------------------------------------------------------------------
    def _ready(self, reading: bool, writing: bool) -> bool:
        if self._ctrl is None or self.broken is not None:
            return True
        if (reading and self.data_ready()) or (writing and self.buffer_space()):
            return True
        return self.broken is not None or not self.peer_live()

    def wait_ready(self, reading: bool, writing: bool, spin_ns: int) -> bool:
        """Poll for up to ``spin_ns`` nanoseconds until data is readable (``reading``),
        room is writable (``writing``), the peer's live byte is 0, or the rings are broken
        (True); False if none of that happened in time.  Never sleeps, never notifies.

        This is the busy-wait of the blocking API (poll tens of microseconds before asking
        for a notification: waking a halted vCPU costs more, machine-baseline.md); the
        compiled twin runs the loop in C."""
        if self._ready(reading, writing):
            return True
        if spin_ns <= 0:
            return False
        end = time.perf_counter_ns() + spin_ns
        while time.perf_counter_ns() < end:
            if self._ready(reading, writing):
                return True
        return self._ready(reading, writing)

    # -- the ring we read -------------------------------------------------------------
    def data_ready(self) -> int:
        """Bytes readable now (0 for an insane state, which locks the rings)."""
        w = self._words
        if w is None or self.broken is not None:
            return 0
        prod = int(w[self._rd_prod_i])
        cons = self._rd_cons
        if int(w[self._rd_cons_i]) != cons:
            return self._insane(f"peer rewrote our consumer index ({cons} -> {w[self._rd_cons_i]})")
        ready = (prod - cons) & MASK32
        if ready > self.rd_size:
            return self._insane(
                f"read ring prod {prod} cons {cons} claims {ready} bytes in a ring of {self.rd_size}"
            )
        return ready

    def recv_into(self, buf: Buffer, want: int = -1, spin_ns: int = 0) -> int:
        """Move up to ``want`` (default: ``len(buf)``) available bytes into ``buf``; with
        nothing available, first poll for up to ``spin_ns`` nanoseconds (:meth:`wait_ready`).

        After consuming, the peer is kicked if it asked (:attr:`kick`).  Asking for a
        notification is the caller's business, right before it sleeps
        (:meth:`request_notify` ``VCHAN_NOTIFY_WRITE``, then re-check): asking only then,
        not on every empty poll, keeps the writer from signalling while we spin."""
        out = memoryview(buf).cast("B")
        if want < 0 or want > len(out):
            want = len(out)
        ready = self.data_ready()
        if not ready and want > 0 and spin_ns > 0 and self.wait_ready(True, False, spin_ns):
            ready = self.data_ready()
        n = min(ready, want)
        if n == 0:
            return 0
        rd = self._rd
        assert rd is not None
        size = self.rd_size
        start = self._rd_cons & (size - 1)
        first = min(n, size - start)
        # (read barrier: the prod load above is a separate C call, done before these copies)
        out[:first] = rd[start : start + first]
        if n > first:
            out[first:n] = rd[: n - first]
        cons = (self._rd_cons + n) & MASK32
        full_barrier()  # finish reading the data before the producer may overwrite it
        self._words[self._rd_cons_i] = cons  # type: ignore[index]
        self._rd_cons = cons
        self._send_notify(VCHAN_NOTIFY_READ)
        return n

    def discard(self) -> int:
        """Consume and drop everything readable now; returns the bytes dropped."""
        n = self.data_ready()
        if n:
            cons = (self._rd_cons + n) & MASK32
            full_barrier()
            self._words[self._rd_cons_i] = cons  # type: ignore[index]
            self._rd_cons = cons
            self._send_notify(VCHAN_NOTIFY_READ)
        return n

    # -- the ring we write ------------------------------------------------------------
    def buffer_space(self) -> int:
        """Bytes writable now (0 for an insane state, which locks the rings)."""
        w = self._words
        if w is None or self.broken is not None:
            return 0
        cons = int(w[self._wr_cons_i])
        prod = self._wr_prod
        if int(w[self._wr_prod_i]) != prod:
            return self._insane(f"peer rewrote our producer index ({prod} -> {w[self._wr_prod_i]})")
        used = (prod - cons) & MASK32
        if used > self.wr_size:
            return self._insane(
                f"write ring prod {prod} cons {cons} claims {used} bytes in a ring of {self.wr_size}"
            )
        return self.wr_size - used

    def send(self, data: Buffer, spin_ns: int = 0) -> int:
        """Copy as much of ``data`` as fits into the ring we write and publish it; with no
        room, first poll for up to ``spin_ns`` nanoseconds (:meth:`wait_ready`).

        Returns the bytes written; after writing, the peer is kicked if it asked
        (:attr:`kick`).  A caller about to sleep for room requests ``VCHAN_NOTIFY_READ``
        first and re-checks."""
        src = memoryview(data).cast("B")
        want = len(src)
        room = self.buffer_space()
        if not room and want > 0 and spin_ns > 0 and self.wait_ready(False, True, spin_ns):
            room = self.buffer_space()
        n = min(room, want)
        if n == 0:
            return 0
        wr = self._wr
        assert wr is not None
        size = self.wr_size
        start = self._wr_prod & (size - 1)
        first = min(n, size - start)
        full_barrier()  # indexes read before we overwrite data the consumer released
        wr[start : start + first] = src[:first]
        if n > first:
            wr[: n - first] = src[first:n]
        # (write barrier: the copies above are separate C calls, done before this store)
        prod = (self._wr_prod + n) & MASK32
        self._words[self._wr_prod_i] = prod  # type: ignore[index]
        self._wr_prod = prod
        self._send_notify(VCHAN_NOTIFY_WRITE)
        return n

    def write_some(self, data: Buffer, offset: int = 0, spin_ns: int = 0) -> int:
        """:meth:`send` of ``data`` from byte ``offset`` on, but only while the peer's live
        byte says connected (1): -1, with nothing written, when it does not or the rings are
        released or broken (the caller's slow path sorts that out).

        The blocking API's one call per write: a write larger than the ring continues at
        ``offset`` without slicing ``data``."""
        ctrl = self._ctrl
        if ctrl is None or self.broken is not None or ctrl[self._peer_live] != 1:
            return -1
        src = memoryview(data).cast("B")
        if not 0 <= offset <= len(src):
            raise ValueError(f"offset {offset} outside a buffer of {len(src)} bytes")
        return self.send(src[offset:], spin_ns)


#: The pure-Python class above, always available (tests compare both).
ReferenceVchanRings = VchanRings

IMPLEMENTATION = "reference"
if not TYPE_CHECKING and not pure_python():
    try:
        from xenpv.vchan._vring import VchanRings  # the compiled twin

        IMPLEMENTATION = "cython"
    except ImportError:
        pass


def implementation(name: str) -> type[ReferenceVchanRings] | type[_vring.VchanRings]:
    """The ``VchanRings`` class of one implementation: ``"cython"`` or ``"reference"``
    (ImportError if the extension is not built)."""
    if name == "reference":
        return ReferenceVchanRings
    if name == "cython":
        from xenpv.vchan._vring import VchanRings as compiled

        return compiled
    raise ValueError(f"unknown vchan ring implementation {name!r}")

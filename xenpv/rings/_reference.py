"""Pure-Python twin of the compiled rings: the executable specification.

Theory of operation
-------------------
This module is written to be read next to Xen's ``io/ring.h`` and xen-protocols.md §1, §4.9,
§8.1, §9.1 and §10.2.  It has the same public API as the Cython classes in
``xenpv.rings._sring``, ``_bytering`` and ``_atomic``, produces the same bytes in shared
memory and the same return values for every call (the differential tests check this after
every operation), and serves when the extension is missing or ``XENPV_PURE_PYTHON=1``.

Shared-memory rules kept here exactly as in the compiled core:

* Every shared index is read with one aligned 32-bit load and written with one aligned
  32-bit store through ``memoryview.cast("I")``.  ``struct.pack_into`` is never used for an
  index: it zero-fills before writing, so a polling peer could see the index drop to 0.
* All index arithmetic is free-running u32: every subtraction is masked with ``& MASK32``.
* A peer's index is loaded once per call and validated before it is used; a violation raises
  :class:`~xenpv.errors.RingOverflowError` and the ring stays broken.
* Pure Python has no memory fence.  A lock acquire/release pair stands in for one (CPython's
  lock operations are full barriers in the C code underneath); read and write barriers need
  only program order, which CPython keeps because each buffer access is a separate C call.

Entries are copied one slot at a time (the loop *is* the spec); the compiled core copies
the same bytes with at most two ``memcpy`` calls per batch.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from xenpv.errors import LocalError, RingOverflowError

MASK32 = 0xFFFFFFFF

# io/ring.h: struct __name##_sring field offsets.
OFF_REQ_PROD = 0
OFF_REQ_EVENT = 4
OFF_RSP_PROD = 8
OFF_RSP_EVENT = 12
OFF_PVT = 16
HEADER_BYTES = 64

_fence_lock = threading.Lock()


def full_barrier() -> None:
    """A full memory fence: the portable stand-in is a lock acquire/release pair."""
    with _fence_lock:
        pass


def _rmb() -> None:
    """Read barrier: CPython performs each buffer load in program order (one C call each)."""


def _wmb() -> None:
    """Write barrier: CPython performs each buffer store in program order (one C call each)."""


def _words(buf: Any) -> tuple[memoryview, memoryview]:
    """A writable byte view of ``buf`` and a u32 view of its first whole words.

    Hook: an object with a ``shared_views()`` method (the fuzzers' instrumented memory,
    :mod:`xenpv.fuzz.memory`) supplies both views itself, so every access can be logged.
    """
    hook = getattr(buf, "shared_views", None)
    if hook is not None:
        views: tuple[memoryview, memoryview] = hook()
        return views
    raw = memoryview(buf).cast("B")
    if raw.readonly:
        raise LocalError("ring memory must be writable")
    words = raw[: len(raw) - len(raw) % 4].cast("I")
    return raw, words


def _word_index(raw: memoryview, offset: int) -> int:
    """Index of the aligned u32 at byte ``offset`` (LocalError if misaligned or outside)."""
    if offset < 0 or offset + 4 > len(raw) or offset % 4:
        raise LocalError(f"index offset {offset} is not an aligned word of the {len(raw)}-byte buffer")
    return offset // 4


def ring_size(nbytes: int, slot_size: int) -> int:
    """Number of slots N of a ring of ``nbytes`` bytes with ``slot_size``-byte slots.

    io/ring.h __RING_SIZE: the largest power of two <= (nbytes - 64) // slot_size, or 0.
    """
    if slot_size <= 0:
        raise LocalError(f"slot size must be positive, not {slot_size}")
    if nbytes <= HEADER_BYTES:
        return 0
    k = min((nbytes - HEADER_BYTES) // slot_size, MASK32)
    return 1 << (k.bit_length() - 1) if k else 0


class _Ring:
    """One end of a shared ring: the held memory, the geometry and the generic operations.

    Both ends are the same machine seen from two sides.  ``_prod_pvt`` counts the entries
    this end produced (published or not) and ``_cons`` those it consumed; ``_out_*`` are the
    shared producer index and event field of what this end produces, ``_in_*`` of what it
    consumes.  Subclasses name things as io/ring.h does and define :meth:`_room` (how many
    entries this end may produce) and :meth:`_avail` (the validated count of entries the
    peer published).
    """

    _out_prod = _out_event = _in_prod = _in_event = 0

    def __init__(self, buf: Any, slot_size: int, start: int) -> None:
        raw, words = _words(buf)
        n = ring_size(len(raw), slot_size)
        if n == 0:
            raise LocalError(
                f"a {len(raw)}-byte buffer holds no {slot_size}-byte slot after the "
                f"{HEADER_BYTES}-byte header")
        self._raw: memoryview | None = raw
        self._words: memoryview | None = words
        self.slot_size = slot_size
        self.nr_ents = n
        self._broken: str | None = None
        self._prod_pvt = start & MASK32
        self._cons = start & MASK32

    def release(self) -> None:
        """Let go of the ring memory (an mmap can then be closed); later calls raise LocalError."""
        if self._words is not None:
            self._words.release()
        if self._raw is not None:
            self._raw.release()
        self._raw = self._words = None

    @property
    def broken(self) -> bool:
        """True once the peer was caught violating the protocol (the ring is then dead)."""
        return self._broken is not None

    def _mem(self) -> tuple[memoryview, memoryview]:
        if self._broken is not None:
            raise RingOverflowError(self._broken)
        if self._raw is None or self._words is None:
            raise LocalError("the ring memory was released")
        return self._raw, self._words

    def _fail(self, message: str) -> None:
        self._broken = message
        raise RingOverflowError(message)

    def _load(self, offset: int) -> int:
        """One aligned 32-bit load of a header index."""
        return int(self._mem()[1][offset // 4])

    def _store(self, offset: int, value: int) -> None:
        """One aligned 32-bit store of a header index (never struct.pack_into)."""
        self._mem()[1][offset // 4] = value & MASK32

    def _slot(self, idx: int) -> int:
        """Byte offset of the slot used by ring index ``idx`` (xen-protocols.md §1.2)."""
        return HEADER_BYTES + (idx & (self.nr_ents - 1)) * self.slot_size

    # -- the two things FrontRing and BackRing define -------------------------------------
    def _room(self) -> int:
        """Entries this end may produce now."""
        raise NotImplementedError

    def _avail(self) -> int:
        """Validated number of entries the peer published for us (one load of its index)."""
        raise NotImplementedError

    # -- producing -------------------------------------------------------------------------
    def _put(self, src: Any, n: int, strict: bool) -> int:
        """Copy up to ``n`` entries (all of ``src`` if n < 0) into the slots; not pushed."""
        self._mem()
        room = self._room()
        with memoryview(src) as view:
            data = view.cast("B")
            n = self._entries(data, n)
            if n > room:
                if strict:
                    raise LocalError(f"{n} entries do not fit: room for {room}")
                n = room
            self._copy_in(data, n)
        return n

    def _entries(self, data: memoryview, n: int) -> int:
        """How many entries a call on ``data`` asked for: all of it if n < 0; LocalError if
        the buffer holds fewer than ``n``."""
        have = len(data) // self.slot_size
        if n < 0:
            return have
        if n > have:
            raise LocalError(
                f"{n} entries asked for but the buffer holds {have} of {self.slot_size} bytes")
        return n

    def _copy_in(self, data: memoryview, n: int) -> None:
        """Copy the first n entries of ``data`` into the slots _prod_pvt .. _prod_pvt+n-1."""
        raw = self._mem()[0]
        e = self.slot_size
        for j in range(n):
            at = self._slot(self._prod_pvt + j)
            raw[at : at + e] = data[j * e : (j + 1) * e]
        self._prod_pvt = (self._prod_pvt + n) & MASK32

    def _put_one(self, data: Any) -> None:
        """Queue one entry of at most slot_size bytes; the rest of the slot is zeroed."""
        raw = self._mem()[0]
        if self._room() == 0:
            raise LocalError("no room for another entry")
        with memoryview(data) as view:
            entry = view.cast("B")
            if len(entry) > self.slot_size:
                raise LocalError(
                    f"a {len(entry)}-byte entry does not fit a {self.slot_size}-byte slot")
            at = self._slot(self._prod_pvt)
            raw[at : at + len(entry)] = entry
            raw[at + len(entry) : at + self.slot_size] = bytes(self.slot_size - len(entry))
        self._prod_pvt = (self._prod_pvt + 1) & MASK32

    def _push_plain(self) -> None:
        """io/ring.h RING_PUSH_*: publish what was queued."""
        _wmb()  # the peer must see the slots before the index that covers them
        self._store(self._out_prod, self._prod_pvt)

    def _push(self) -> bool:
        """io/ring.h RING_PUSH_*_AND_CHECK_NOTIFY: publish, say if the peer asked to be told."""
        new = self._prod_pvt
        old = self._load(self._out_prod)
        _wmb()  # the peer must see the slots before the index that covers them
        self._store(self._out_prod, new)
        full_barrier()  # the index store must be visible before we read the peer's event
        event = self._load(self._out_event)
        # Notify exactly when the peer's wake-up point lies in (old, new] (mod 2^32).
        return (new - event) & MASK32 < (new - old) & MASK32

    # -- consuming -------------------------------------------------------------------------
    def _copy_out(self, n: int, out: memoryview) -> None:
        """Copy entries _cons .. _cons+n-1 out of shared memory, each exactly once."""
        raw = self._mem()[0]
        e = self.slot_size
        for j in range(n):
            at = self._slot(self._cons + j)
            out[j * e : (j + 1) * e] = raw[at : at + e]
        self._cons = (self._cons + n) & MASK32

    def _take_into(self, dst: Any, max_n: int, avail: int) -> int:
        """Copy up to min(max_n, avail, what fits dst) entries out; advance _cons."""
        with memoryview(dst) as view:
            out = view.cast("B")
            if out.readonly:
                raise LocalError("destination buffer must be writable")
            n = len(out) // self.slot_size
            if 0 <= max_n < n:
                n = max_n
            n = min(n, avail)
            self._copy_out(n, out)
        return n

    def _take(self, max_n: int, dtype: Any) -> Any:
        """Copy up to ``max_n`` waiting entries out: bytes, or a numpy array of ``dtype``."""
        n = self._avail()
        if 0 <= max_n < n:
            n = max_n
        out = bytearray(n * self.slot_size)
        self._copy_out(n, memoryview(out))
        if dtype is None:
            return bytes(out)
        import numpy

        return numpy.frombuffer(out, dtype=dtype)

    def _rearm(self) -> None:
        """Ask for a notification on the very next entry (io/ring.h RING_FINAL_CHECK_*)."""
        self._store(self._in_event, self._cons + 1)
        full_barrier()  # the event store must be visible before re-reading the peer's index

    def _poll_into(self, dst: Any, max_n: int, spin_ns: int) -> int:
        """Take waiting entries (spinning up to ``spin_ns`` for them); when there are none,
        re-arm the event field and take what arrived meanwhile (RING_FINAL_CHECK_*)."""
        n = self._take_into(dst, max_n, self.spin(spin_ns))
        if n == 0 and max_n != 0:
            self._rearm()
            n = self._take_into(dst, max_n, self._avail())
        return n

    def _final_check(self) -> bool:
        if self._avail():
            return True
        self._rearm()
        return self._avail() != 0

    def spin(self, max_ns: int) -> int:
        """Poll the peer's producer index for up to ``max_ns`` nanoseconds (a busy-wait, no
        sleeping, no re-arm) and return how many entries are waiting (0: time ran out).
        Drivers spin briefly after the last entry before they re-arm and sleep."""
        n = self._avail()
        if n or max_ns <= 0:
            return n
        until = time.monotonic_ns() + max_ns
        while True:
            if self._load(self._in_prod) != self._cons:  # something changed: check it fully
                return self._avail()
            if time.monotonic_ns() >= until:
                return self._avail()

    def _set_event(self, value: int) -> None:
        self._store(self._in_event, value)
        full_barrier()

    # -- diagnostics -----------------------------------------------------------------------
    @property
    def req_prod(self) -> int:
        """The shared ``req_prod`` (one load; diagnostics)."""
        return self._load(OFF_REQ_PROD)

    @property
    def req_event(self) -> int:
        """The shared ``req_event`` (one load; diagnostics)."""
        return self._load(OFF_REQ_EVENT)

    @property
    def rsp_prod(self) -> int:
        """The shared ``rsp_prod`` (one load; diagnostics)."""
        return self._load(OFF_RSP_PROD)

    @property
    def rsp_event(self) -> int:
        """The shared ``rsp_event`` (one load; diagnostics)."""
        return self._load(OFF_RSP_EVENT)


class FrontRing(_Ring):
    """The frontend's view of a shared ring: produces requests, consumes responses.

    ``FrontRing(buf, slot_size, start=0, init=True)``: with ``init`` the shared header is
    initialised (io/ring.h SHARED_RING_INIT, with both producer indexes at ``start`` and both
    event fields at ``start + 1``); without it the ring is only attached (a frontend
    reconnecting to a page whose header is already set up, io/ring.h FRONT_RING_ATTACH).
    ``buf`` is any writable, 4-byte aligned buffer; it is held, never copied.
    """

    _out_prod, _out_event = OFF_REQ_PROD, OFF_REQ_EVENT
    _in_prod, _in_event = OFF_RSP_PROD, OFF_RSP_EVENT

    def __init__(self, buf: Any, slot_size: int, start: int = 0, *, init: bool = True) -> None:
        super().__init__(buf, slot_size, start)
        if init:
            self._store(OFF_REQ_PROD, start)
            self._store(OFF_RSP_PROD, start)
            self._store(OFF_REQ_EVENT, start + 1)
            self._store(OFF_RSP_EVENT, start + 1)
            self._mem()[0][OFF_PVT:HEADER_BYTES] = bytes(HEADER_BYTES - OFF_PVT)

    def _room(self) -> int:
        return self.nr_ents - ((self._prod_pvt - self._cons) & MASK32)

    def _avail(self) -> int:
        prod = self._load(OFF_RSP_PROD)  # the one snapshot of the peer's index for this call
        n = (prod - self._cons) & MASK32
        outstanding = (self._prod_pvt - self._cons) & MASK32
        # io/ring.h RING_RESPONSE_PROD_OVERFLOW, tightened to the requests outstanding.
        if n > outstanding:
            self._fail(
                f"backend rsp_prod {prod} claims {n} responses with rsp_cons {self._cons}, "
                f"{outstanding} requests outstanding, ring of {self.nr_ents}")
        _rmb()  # the index load comes before the slot loads it covers
        return n

    @property
    def req_prod_pvt(self) -> int:
        """Private index of the next request slot to fill."""
        return self._prod_pvt

    @property
    def rsp_cons(self) -> int:
        """Private index of the next response to consume."""
        return self._cons

    def free_requests(self) -> int:
        """io/ring.h RING_FREE_REQUESTS: slots the frontend may still fill."""
        self._mem()
        return self._room()

    def full(self) -> bool:
        """io/ring.h RING_FULL."""
        return self.free_requests() == 0

    def put_request(self, data: Any) -> None:
        """Queue one request (``slot_size`` bytes or fewer; the rest of the slot is zeroed)."""
        self._put_one(data)

    def put_requests(self, src: Any, n: int = -1) -> int:
        """Copy up to ``n`` requests (default: all of ``src``) into free slots; not pushed yet.

        ``src`` is any buffer of whole ``slot_size``-byte entries.  Returns how many fitted.
        """
        return self._put(src, n, False)

    def push_requests(self) -> None:
        """io/ring.h RING_PUSH_REQUESTS: publish queued requests without the notify check."""
        self._push_plain()

    def push_requests_and_check_notify(self) -> bool:
        """io/ring.h RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish; True if the backend asked
        to be notified (the caller signals the event channel)."""
        return self._push()

    def submit_requests(self, src: Any, n: int = -1) -> bool:
        """Queue ``n`` requests (default: all of ``src``) and push them in one call; returns
        ``notify``.  A LocalError if they do not all fit (see :meth:`free_requests`)."""
        self._put(src, n, True)
        return self._push()

    def unconsumed_responses(self) -> int:
        """io/ring.h RING_HAS_UNCONSUMED_RESPONSES, after the overflow check."""
        return self._avail()

    def final_check_for_responses(self) -> bool:
        """io/ring.h RING_FINAL_CHECK_FOR_RESPONSES: True if responses are waiting; otherwise
        re-arm ``rsp_event`` for the next response and check once more."""
        return self._final_check()

    def set_rsp_event(self, value: int) -> None:
        """Custom re-arm: ask to be notified when ``rsp_prod`` passes ``value``."""
        self._set_event(value)

    def take_responses_into(self, dst: Any, max_n: int = -1, spin_ns: int = 0) -> int:
        """Copy up to ``max_n`` waiting responses (as many as fit ``dst``) into ``dst``; with
        ``spin_ns``, busy-wait up to that long (see :meth:`spin`) when none are waiting."""
        return self._take_into(dst, max_n, self.spin(spin_ns))

    def poll_responses_into(self, dst: Any, max_n: int = -1, spin_ns: int = 0) -> int:
        """Take waiting responses into ``dst`` (with ``spin_ns``, busy-wait up to that long
        for them first); when there are none, re-arm ``rsp_event`` and take what arrived
        meanwhile.  0 means the ring is empty and armed: safe to sleep."""
        return self._poll_into(dst, max_n, spin_ns)

    def take_responses(self, max_n: int = -1, dtype: Any = None) -> Any:
        """Copy out up to ``max_n`` waiting responses: ``bytes`` of k * slot_size, or a numpy
        array of ``dtype`` (itemsize = slot_size) over a private copy."""
        return self._take(max_n, dtype)

    def take_response(self) -> bytes | None:
        """Copy out the next response (``bytes``), or None if there is none."""
        return self._take(1, None) or None

    def take_and_submit(self, dst: Any, src: Any, n: int = -1, max_n: int = -1,
                        spin_ns: int = 0) -> tuple[int, int, bool]:
        """The frontend's turn in one call: take responses, then queue and push requests.

        1. Responses: up to ``max_n`` (as many as fit ``dst``) are copied into ``dst``.  When
           this call can queue nothing (``n`` is 0 or the ring is full) it waits for them as
           :meth:`poll_responses_into` does: spins up to ``spin_ns``, then re-arms
           ``rsp_event`` and looks once more (RING_FINAL_CHECK_FOR_RESPONSES).  Otherwise
           it takes only what is already there.
        2. Requests: up to ``n`` entries of ``src`` (default: all), as many as fit now
           (the responses just taken freed their slots), are queued and pushed with the
           notify check (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY).

        Returns ``(taken, queued, notify)``; the caller signals the event channel when
        ``notify``.  ``(0, 0, False)`` means nothing came, nothing could be sent and
        ``rsp_event`` is armed: safe to sleep (unless ``max_n`` is 0 or ``dst`` holds no
        whole entry: then nothing is taken and, with ``max_n`` 0, nothing re-armed, as in
        :meth:`poll_responses_into`).  ``src`` is checked before anything is
        taken (a LocalError if it holds fewer than ``n`` entries).  A ring driven by this
        call alone turns a batch of responses into the next batch of requests without
        returning to Python in between, as a frontend written in C does.
        """
        self._mem()
        with memoryview(src) as view:
            data = view.cast("B")
            n = self._entries(data, n)
            if n == 0 or self._room() == 0:
                taken = self._poll_into(dst, max_n, spin_ns)
            else:
                taken = self._take_into(dst, max_n, self._avail())
            queued = min(n, self._room())
            notify = False
            if queued:
                self._copy_in(data, queued)
                notify = self._push()
        return taken, queued, notify


class BackRing(_Ring):
    """The backend's view of a shared ring: consumes requests, produces responses.

    ``BackRing(buf, slot_size, start=0)`` attaches to a ring the frontend initialised
    (io/ring.h BACK_RING_ATTACH); ``start`` is where both private indexes begin (0 on a
    fresh ring, the current index when re-attaching after a reconnect).
    """

    _out_prod, _out_event = OFF_RSP_PROD, OFF_RSP_EVENT
    _in_prod, _in_event = OFF_REQ_PROD, OFF_REQ_EVENT

    def __init__(self, buf: Any, slot_size: int, start: int = 0) -> None:
        super().__init__(buf, slot_size, start)

    def _room(self) -> int:
        return (self._cons - self._prod_pvt) & MASK32

    def _avail(self) -> int:
        prod = self._load(OFF_REQ_PROD)  # the one snapshot of the peer's index for this call
        ahead = (prod - self._prod_pvt) & MASK32
        consumed = (self._cons - self._prod_pvt) & MASK32
        # io/ring.h RING_REQUEST_PROD_OVERFLOW (upper bound), and prod may not fall behind
        # requests already consumed (lower bound).
        if ahead > self.nr_ents or ahead < consumed:
            self._fail(
                f"frontend req_prod {prod} is outside the ring: req_cons {self._cons}, "
                f"rsp_prod_pvt {self._prod_pvt}, ring of {self.nr_ents}")
        _rmb()  # the index load comes before the slot loads it covers
        return ahead - consumed

    @property
    def req_cons(self) -> int:
        """Private index of the next request to consume."""
        return self._cons

    @property
    def rsp_prod_pvt(self) -> int:
        """Private index of the next response slot to fill."""
        return self._prod_pvt

    def unconsumed_requests(self) -> int:
        """io/ring.h RING_HAS_UNCONSUMED_REQUESTS, after the overflow check."""
        return self._avail()

    def final_check_for_requests(self) -> bool:
        """io/ring.h RING_FINAL_CHECK_FOR_REQUESTS: True if requests are waiting; otherwise
        re-arm ``req_event`` for the next request and check once more."""
        return self._final_check()

    def set_req_event(self, value: int) -> None:
        """Custom re-arm: ask to be notified when ``req_prod`` passes ``value``."""
        self._set_event(value)

    def take_requests_into(self, dst: Any, max_n: int = -1, spin_ns: int = 0) -> int:
        """Copy up to ``max_n`` waiting requests (as many as fit ``dst``) into ``dst``; with
        ``spin_ns``, busy-wait up to that long (see :meth:`spin`) when none are waiting."""
        return self._take_into(dst, max_n, self.spin(spin_ns))

    def poll_requests_into(self, dst: Any, max_n: int = -1, spin_ns: int = 0) -> int:
        """Take waiting requests into ``dst`` (with ``spin_ns``, busy-wait up to that long
        for them first); when there are none, re-arm ``req_event`` and take what arrived
        meanwhile.  0 means the ring is empty and armed: safe to sleep."""
        return self._poll_into(dst, max_n, spin_ns)

    def take_requests(self, max_n: int = -1, dtype: Any = None) -> Any:
        """Copy out up to ``max_n`` waiting requests: ``bytes`` of k * slot_size, or a numpy
        array of ``dtype`` (itemsize = slot_size) over a private copy."""
        return self._take(max_n, dtype)

    def take_request(self) -> bytes | None:
        """Copy out the next request (``bytes``), or None if there is none."""
        return self._take(1, None) or None

    def pending_responses(self) -> int:
        """Requests consumed but not answered yet (responses that may still be queued)."""
        self._mem()
        return self._room()

    def put_response(self, data: Any) -> None:
        """Queue one response (``slot_size`` bytes or fewer; the rest of the slot is zeroed)."""
        self._put_one(data)

    def put_responses(self, src: Any, n: int = -1) -> int:
        """Copy ``n`` responses (default: all of ``src``) into the slots of consumed requests;
        not pushed yet.  More responses than consumed requests is a LocalError."""
        return self._put(src, n, True)

    def push_responses(self) -> None:
        """io/ring.h RING_PUSH_RESPONSES: publish queued responses without the notify check."""
        self._push_plain()

    def push_responses_and_check_notify(self) -> bool:
        """io/ring.h RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish; True if the frontend asked
        to be notified (the caller signals the event channel)."""
        return self._push()

    def submit_responses(self, src: Any, n: int = -1) -> bool:
        """Queue ``n`` responses (default: all of ``src``) and push them in one call; returns
        ``notify``.  More responses than consumed requests is a LocalError."""
        self._put(src, n, True)
        return self._push()

    def take_and_respond(self, dst: Any, responses: Any, max_n: int = -1,
                         spin_ns: int = 0) -> tuple[int, bool]:
        """One call for backends whose answers are known before the requests are read (an
        echo, a null device, benchmarks): take up to ``max_n`` requests into ``dst`` (as
        :meth:`poll_requests_into`: spinning up to ``spin_ns`` for them, re-arming when
        empty), queue the first k entries of ``responses`` as their answers and push.
        Returns ``(k, notify)``; ``(0, False)`` means the ring is empty and armed.
        ``responses`` may be ``dst`` itself (echo)."""
        k = self._poll_into(dst, max_n, spin_ns)
        if k == 0:
            return 0, False
        self._put(responses, k, True)
        return k, self._push()


class ByteRing:
    """One direction of a byte (or fixed-unit) ring laid out inside ``buf``.

    ``ByteRing(buf, *, data_offset, size, prod_offset, cons_offset, slot=1, on_insane="error",
    data_buffer=None)`` where ``size`` is the number of units (bytes when ``slot`` is 1) and
    the offsets are byte offsets into ``buf``; with ``data_buffer`` the data area is in that
    buffer instead (vchan rings of order >= 12 live in their own pages).  Unit ``i`` lives at
    ``data_offset + (i % size) * slot``.  When
    ``prod - cons`` exceeds ``size`` the peer is insane: ``on_insane="error"`` raises
    RingOverflowError and the ring stays broken (xenstore); ``"zero"`` reports 0 units
    available / free and counts ``insane_count`` (vchan, console).
    The producer calls :meth:`write`, the consumer :meth:`read` / :meth:`read_into`.
    """

    def __init__(self, buf: Any, *, data_offset: int, size: int, prod_offset: int,
                 cons_offset: int, slot: int = 1, on_insane: str = "error",
                 data_buffer: Any = None) -> None:
        if on_insane not in ("error", "zero"):
            raise LocalError(f"on_insane must be 'error' or 'zero', not {on_insane!r}")
        if size <= 0 or size > 0x80000000 or slot <= 0:
            raise LocalError(f"bad ring geometry: {size} units of {slot} bytes")
        raw, words = _words(buf)
        data = raw if data_buffer is None else _words(data_buffer)[0]
        end = data_offset + size * slot
        if data_offset < 0 or end > len(data):
            raise LocalError(
                f"data area [{data_offset}, {end}) is outside the {len(data)}-byte buffer")
        for off in (prod_offset, cons_offset):
            _word_index(raw, off)
            if data_buffer is None and off + 4 > data_offset and off < end:
                raise LocalError(f"index offset {off} overlaps the data area")
        if prod_offset == cons_offset:
            raise LocalError("prod and cons cannot share one word")
        self._raw: memoryview | None = raw
        self._words: memoryview | None = words
        self._data: memoryview | None = data
        self._data_offset = data_offset
        self._prod = prod_offset // 4
        self._cons = cons_offset // 4
        self.size = size
        self.slot = slot
        self.on_insane = on_insane
        self.insane_count = 0
        self._broken: str | None = None

    def release(self) -> None:
        """Let go of the ring memory; later calls raise LocalError."""
        for view in (self._words, self._raw, self._data):
            if view is not None:
                view.release()
        self._raw = self._words = self._data = None

    @property
    def broken(self) -> bool:
        """True once an insane index state was seen with ``on_insane="error"``."""
        return self._broken is not None

    def _mem(self) -> tuple[memoryview, memoryview]:
        """(data bytes, index words) of a usable ring."""
        if self._broken is not None:
            raise RingOverflowError(self._broken)
        if self._data is None or self._words is None:
            raise LocalError("the ring memory was released")
        return self._data, self._words

    @property
    def prod(self) -> int:
        """The shared producer index (one load)."""
        return int(self._mem()[1][self._prod])

    @property
    def cons(self) -> int:
        """The shared consumer index (one load)."""
        return int(self._mem()[1][self._cons])

    def _snapshot(self) -> tuple[int, int, int | None]:
        """Load prod and cons once; return them and the units used (None: insane, treat as 0)."""
        words = self._mem()[1]
        prod = int(words[self._prod])
        cons = int(words[self._cons])
        used = (prod - cons) & MASK32
        if used > self.size:
            if self.on_insane == "zero":
                self.insane_count += 1
                return prod, cons, None
            self._broken = (f"ring indexes prod {prod} cons {cons} claim {used} units "
                            f"in a ring of {self.size}")
            raise RingOverflowError(self._broken)
        return prod, cons, used

    def available(self) -> int:
        """Units the consumer may read now (0 for an insane state under ``"zero"``)."""
        used = self._snapshot()[2]
        return 0 if used is None else used

    def free(self) -> int:
        """Units the producer may write now (0 for an insane state under ``"zero"``)."""
        used = self._snapshot()[2]
        return 0 if used is None else self.size - used

    def _unit(self, idx: int) -> int:
        """Byte offset of unit ``idx`` (u32 index taken modulo ``size``, as the peers do)."""
        return self._data_offset + ((idx & MASK32) % self.size) * self.slot

    def _runs(self, idx: int, n: int) -> list[tuple[int, int]]:
        """(buffer offset, units) pieces covering units idx .. idx+n-1 in ring order."""
        if self.size & (self.size - 1):
            return [(self._unit(idx + j), 1) for j in range(n)]  # modulo ring (kbdif)
        first = idx & (self.size - 1)
        run = min(n, self.size - first)  # up to the end of the data area, then wrap
        pieces = [(self._data_offset + first * self.slot, run)]
        if n > run:
            pieces.append((self._data_offset, n - run))
        return pieces

    def write(self, data: Any) -> int:
        """Copy as many whole units of ``data`` as fit, publish them; returns units written."""
        prod, _cons, used = self._snapshot()
        if used is None:
            return 0
        full_barrier()  # index loads before overwriting data the consumer has just released
        area, words = self._mem()
        with memoryview(data) as view:
            src = view.cast("B")
            n = min(len(src) // self.slot, self.size - used)
            at = 0
            for off, units in self._runs(prod, n):
                area[off : off + units * self.slot] = src[at : at + units * self.slot]
                at += units * self.slot
        _wmb()  # the consumer must see the data before the index that covers it
        words[self._prod] = (prod + n) & MASK32
        return n

    def _read(self, max_n: int, out: memoryview | None) -> tuple[int, bytes]:
        _prod, cons, used = self._snapshot()
        n = 0 if used is None else used
        if out is not None:
            n = min(n, len(out) // self.slot)
        if 0 <= max_n < n:
            n = max_n
        _rmb()  # the prod load comes before the data loads it covers
        area, words = self._mem()
        chunks = [bytes(area[off : off + units * self.slot]) for off, units in self._runs(cons, n)]
        data = b"".join(chunks)
        if out is not None:
            out[: len(data)] = data
        if n:
            full_barrier()  # finish reading the data before the producer may overwrite it
            words[self._cons] = (cons + n) & MASK32
        return n, data

    def read_into(self, dst: Any, max_n: int = -1) -> int:
        """Move up to ``max_n`` available units (as many as fit ``dst``) into ``dst``."""
        with memoryview(dst) as view:
            out = view.cast("B")
            if out.readonly:
                raise LocalError("destination buffer must be writable")
            return self._read(max_n, out)[0]

    def read(self, max_n: int = -1) -> bytes:
        """Move up to ``max_n`` available units out of the ring and return them as bytes."""
        return self._read(max_n, None)[1]


_atomic_lock = threading.Lock()


def _byte_at(buf: Any, offset: int) -> memoryview:
    raw = memoryview(buf).cast("B")
    if offset < 0 or offset >= len(raw):
        raise LocalError(f"offset {offset} is outside the {len(raw)}-byte buffer")
    return raw


def atomic_or8(buf: Any, offset: int, bits: int) -> int:
    """OR ``bits`` into ``buf[offset]``; returns the old byte.

    Reference fallback: atomic only against other threads of this process (a lock), not
    against another process or domain; the compiled core uses a real atomic instruction.
    """
    raw = _byte_at(buf, offset)
    with _atomic_lock:
        old = raw[offset]
        raw[offset] = old | (bits & 0xFF)
    return int(old)


def atomic_fetch_and_clear8(buf: Any, offset: int, bits: int) -> int:
    """Clear ``bits`` in ``buf[offset]``; returns the old byte (same caveat as atomic_or8)."""
    raw = _byte_at(buf, offset)
    with _atomic_lock:
        old = raw[offset]
        raw[offset] = old & ~bits & 0xFF
    return int(old)


def load_u32(buf: Any, offset: int) -> int:
    """One aligned 32-bit load of a shared index at ``buf[offset]``."""
    raw, words = _words(buf)
    return int(words[_word_index(raw, offset)])


def store_u32(buf: Any, offset: int, value: int) -> None:
    """One aligned 32-bit store of a shared index at ``buf[offset]`` (value taken mod 2^32)."""
    raw, words = _words(buf)
    words[_word_index(raw, offset)] = value & MASK32

"""Instrumented shared memory: pages whose every access is logged and whose reads can race.

Theory of operation
-------------------
A hostile peer owns the other half of every shared page, so the bytes a driver reads may
change between any two loads.  Python 3.11 objects cannot intercept reads made through the
buffer protocol, so :class:`InstrumentedMemory` does not export one.  Instead it offers the
small part of the ``memoryview`` API that the pure-Python ring core
(:mod:`xenpv.rings._reference`) and protocol code use on shared memory:

* ``mem.views()`` -> ``(bytes_view, words_view)``: what ``memoryview(buf).cast("B")`` and
  ``.cast("I")`` give for a real buffer (the reference ring asks for them through its
  ``shared_views`` hook);
* byte views: ``len``, ``readonly``, integer and slice get/set, ``tobytes()``, ``cast("I")``,
  ``release()``;
* word views: integer get/set of aligned u32 (one logged 4-byte access each), ``len``.

Every access made *by the driver* through these views is appended to :attr:`log` as an
:class:`Access` (sequence number, ``"r"``/``"w"``, offset, length).  Writes made *by the
peer* (:meth:`poke`, :meth:`poke_u32`) are not logged: they are the hostile input.

Racing: before a driver read is served, every :class:`Race` registered with :meth:`race`
whose byte range overlaps the read may rewrite its range (a new value per read).  That is
the "racing page" of hostile-inputs.md scenarios 2, 3 and 12: a driver that reads a field
twice sees two different values, and the access log shows that it did.

Reads or writes outside the memory raise ``IndexError`` (never silently clamp, so an
out-of-bounds access by a driver is a visible invariant violation), and :meth:`limit`
caps the accesses of one service call (a driver looping on a hostile index is stopped).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Access",
    "AccessBudgetExceeded",
    "ByteView",
    "InstrumentedMemory",
    "Race",
    "WordView",
]

_U32 = struct.Struct("<I")


class AccessBudgetExceeded(RuntimeError):
    """A driver made more shared-memory accesses than the fuzzer allowed (unbounded work)."""


@dataclass(frozen=True, slots=True)
class Access:
    """One driver access to instrumented memory."""

    seq: int
    kind: str  # "r" or "w"
    offset: int
    length: int

    @property
    def end(self) -> int:
        """One past the last byte touched."""
        return self.offset + self.length

    def overlaps(self, offset: int, length: int) -> bool:
        """Whether this access touches any byte of ``[offset, offset + length)``."""
        return self.offset < offset + length and offset < self.end


@dataclass
class Race:
    """Rewrite ``length`` bytes at ``offset`` before each driver read that overlaps them.

    ``values`` is a callable given the number of overlapping reads served so far (0 for
    the first) that returns the bytes to place there (or ``None`` to leave them).
    """

    offset: int
    length: int
    values: Callable[[int], bytes | None]
    reads: int = 0


class InstrumentedMemory:
    """``size`` bytes of shared memory (zeroed, or a copy of ``data``) with an access log."""

    def __init__(self, size: int = 4096, data: bytes | None = None, *, log: bool = True) -> None:
        if data is not None:
            self.backing = bytearray(data)
        else:
            if size <= 0:
                raise ValueError(f"instrumented memory needs a positive size, not {size}")
            self.backing = bytearray(size)
        self.logging = log
        self.log: list[Access] = []
        self.races: list[Race] = []
        self._seq = 0
        self._budget: int | None = None

    def __len__(self) -> int:
        return len(self.backing)

    # -- the driver side ---------------------------------------------------------------
    def shared_views(self) -> tuple[ByteView, WordView]:
        """The (byte, u32) views the reference ring uses instead of memoryviews."""
        return ByteView(self, 0, len(self.backing)), WordView(self)

    def views(self) -> tuple[ByteView, WordView]:
        """Alias of :meth:`shared_views`."""
        return self.shared_views()

    def limit(self, accesses: int | None) -> None:
        """Allow at most ``accesses`` more driver accesses (None: no limit).

        Beyond it every access raises :class:`AccessBudgetExceeded`: a driver looping on
        peer-controlled indexes is stopped (and reported) instead of hanging the fuzzer.
        """
        self._budget = None if accesses is None else self._seq + accesses

    def _record(self, kind: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self.backing):
            raise IndexError(
                f"access [{offset}, {offset + length}) outside {len(self.backing)}-byte memory")
        if self._budget is not None and self._seq >= self._budget:
            raise AccessBudgetExceeded(f"more than the allowed shared-memory accesses (at {offset})")
        if kind == "r" and self.races:
            for race in self.races:
                if race.offset < offset + length and offset < race.offset + race.length:
                    value = race.values(race.reads)
                    race.reads += 1
                    if value is not None:
                        self.backing[race.offset : race.offset + len(value)] = value
        if self.logging:
            self._seq += 1
            self.log.append(Access(self._seq, kind, offset, length))

    def read(self, offset: int, length: int) -> bytes:
        """A logged driver read of ``length`` bytes at ``offset``."""
        self._record("r", offset, length)
        return bytes(self.backing[offset : offset + length])

    def write(self, offset: int, data: Any) -> None:
        """A logged driver write of ``data`` at ``offset``."""
        raw = bytes(data)
        self._record("w", offset, len(raw))
        self.backing[offset : offset + len(raw)] = raw

    # -- the peer side (not logged) ----------------------------------------------------
    def poke(self, offset: int, data: bytes) -> None:
        """The peer writes ``data`` at ``offset`` (clipped to the memory; never logged)."""
        if offset < 0 or offset >= len(self.backing):
            return
        chunk = data[: len(self.backing) - offset]
        self.backing[offset : offset + len(chunk)] = chunk

    def poke_u32(self, offset: int, value: int) -> None:
        """The peer stores a u32 index at ``offset``."""
        if 0 <= offset <= len(self.backing) - 4:
            _U32.pack_into(self.backing, offset, value & 0xFFFFFFFF)

    def peek(self, offset: int, length: int) -> bytes:
        """The peer reads bytes (never logged)."""
        return bytes(self.backing[offset : offset + length])

    def peek_u32(self, offset: int) -> int:
        """The peer loads a u32 (never logged)."""
        return int(_U32.unpack_from(self.backing, offset)[0])

    def race(self, offset: int, length: int, values: Callable[[int], bytes | None]) -> Race:
        """Make ``[offset, offset + length)`` change before every overlapping driver read."""
        r = Race(offset, length, values)
        self.races.append(r)
        return r

    def race_cycle(self, offset: int, choices: Iterable[bytes]) -> Race:
        """Serve the given byte strings at ``offset`` in turn, one per overlapping read."""
        seq = [bytes(c) for c in choices]
        if not seq:
            raise ValueError("race_cycle needs at least one value")
        length = max(len(c) for c in seq)
        return self.race(offset, length, lambda n: seq[n % len(seq)])

    def clear_races(self) -> None:
        """Stop every race."""
        self.races.clear()

    # -- log queries -------------------------------------------------------------------
    def mark(self) -> int:
        """A position in the log (pass it to the queries to look only at later accesses)."""
        return len(self.log)

    def accesses(self, since: int = 0, kind: str | None = None) -> list[Access]:
        """Accesses logged after ``since`` (of one kind if given)."""
        return [a for a in self.log[since:] if kind is None or a.kind == kind]

    def read_count(self, offset: int, length: int, since: int = 0) -> int:
        """Driver reads since ``since`` that touched any byte of the range."""
        return sum(1 for a in self.log[since:] if a.kind == "r" and a.overlaps(offset, length))

    def byte_read_counts(self, offset: int, length: int, since: int = 0) -> list[int]:
        """For each byte of the range: how many driver reads since ``since`` covered it."""
        counts = [0] * length
        for a in self.log[since:]:
            if a.kind != "r" or not a.overlaps(offset, length):
                continue
            lo = max(a.offset, offset) - offset
            hi = min(a.end, offset + length) - offset
            for k in range(lo, hi):
                counts[k] += 1
        return counts

    def fetches_over(self, offset: int, length: int, since: int = 0) -> int:
        """The most times any single byte of the range was read since ``since`` (0 if none)."""
        end = offset + length
        edges: list[tuple[int, int]] = []
        for a in self.log[since:]:
            if a.kind == "r" and a.offset < end and offset < a.end:
                edges.append((max(a.offset, offset), 1))
                edges.append((min(a.end, end), -1))
        edges.sort()  # at equal offsets the -1 (an end) sorts first: ranges are half-open
        depth = best = 0
        for _, step in edges:
            depth += step
            best = max(best, depth)
        return best

    def clear_log(self) -> None:
        """Forget the log (sequence numbers continue)."""
        self.log.clear()


class ByteView:
    """A ``memoryview``-like byte window ``[start, stop)`` of :class:`InstrumentedMemory`."""

    readonly = False
    format = "B"
    itemsize = 1

    def __init__(self, mem: InstrumentedMemory, start: int, stop: int) -> None:
        self._mem = mem
        self._start = start
        self._stop = stop

    def __len__(self) -> int:
        return self._stop - self._start

    @property
    def nbytes(self) -> int:
        """Length in bytes."""
        return len(self)

    def _range(self, key: slice) -> tuple[int, int]:
        # Stricter than memoryview on purpose: a slice reaching past the end is an access
        # outside the shared memory (IndexError), not a silently shortened read.
        start, stop, step = key.indices(1 << 62)
        if step != 1:
            raise ValueError("instrumented memory supports contiguous slices only")
        if stop > len(self) and stop > start:
            raise IndexError(f"slice [{start}, {stop}) outside a {len(self)}-byte view")
        return self._start + start, max(0, min(stop, len(self)) - start)

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            off, n = self._range(key)
            return self._mem.read(off, n)
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError(f"byte {key} outside a {len(self)}-byte view")
        return self._mem.read(self._start + key, 1)[0]

    def __setitem__(self, key: int | slice, value: Any) -> None:
        if isinstance(key, slice):
            off, n = self._range(key)
            data = bytes(value)
            if len(data) != n:
                raise ValueError(f"slice of {n} bytes assigned {len(data)} bytes")
            self._mem.write(off, data)
            return
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError(f"byte {key} outside a {len(self)}-byte view")
        self._mem.write(self._start + key, bytes((value & 0xFF,)))

    def tobytes(self) -> bytes:
        """All bytes of the view (one logged read)."""
        return self._mem.read(self._start, len(self))

    def cast(self, fmt: str) -> Any:
        """``"B"`` gives the view itself; ``"I"`` a u32 view (the window must start at 0)."""
        if fmt == "B":
            return self
        if fmt == "I" and self._start == 0:
            return WordView(self._mem, len(self) // 4)
        raise ValueError(f"instrumented memory cannot cast to {fmt!r} here")

    def release(self) -> None:
        """Nothing to release (kept for memoryview compatibility)."""

    def __enter__(self) -> ByteView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class WordView:
    """A ``memoryview.cast("I")``-like view: element ``k`` is the u32 at byte ``4 * k``."""

    readonly = False
    format = "I"
    itemsize = 4

    def __init__(self, mem: InstrumentedMemory, words: int | None = None) -> None:
        self._mem = mem
        self._n = len(mem) // 4 if words is None else words

    def __len__(self) -> int:
        return self._n

    def _check(self, k: int) -> int:
        if k < 0:
            k += self._n
        if not 0 <= k < self._n:
            raise IndexError(f"word {k} outside a {self._n}-word view")
        return k

    def __getitem__(self, k: int) -> int:
        k = self._check(k)
        return int(_U32.unpack(self._mem.read(4 * k, 4))[0])

    def __setitem__(self, k: int, value: int) -> None:
        k = self._check(k)
        self._mem.write(4 * k, _U32.pack(value & 0xFFFFFFFF))

    def release(self) -> None:
        """Nothing to release (kept for memoryview compatibility)."""

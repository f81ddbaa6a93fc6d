"""Turning fuzz input bytes into decisions (one decoder for every engine).

Every fuzz target is a function of one ``bytes`` input: atheris mutates it with coverage
feedback, the built-in engine mutates it at random, Hypothesis draws it with
``st.binary()``, and a reproducer file stores it.  :class:`ByteSource` reads that input as
a stream of small decisions (an operation code, a count, an index value).  When the input
runs out every read returns zeros, so any input (even empty) is a complete, deterministic
run: short inputs are short operation lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["ByteSource"]

T = TypeVar("T")


class ByteSource:
    """Sequential reader of fuzz input; exhausted reads give zeros."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        """Input bytes not read yet."""
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (zero-padded when the input runs out)."""
        n = max(0, n)
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk + bytes(n - len(chunk))

    def uint(self, nbytes: int) -> int:
        """An unsigned little-endian integer of ``nbytes`` bytes."""
        return int.from_bytes(self.take(nbytes), "little")

    def u8(self) -> int:
        """One byte."""
        return self.uint(1)

    def u16(self) -> int:
        """Two bytes, little-endian."""
        return self.uint(2)

    def u32(self) -> int:
        """Four bytes, little-endian."""
        return self.uint(4)

    def boolean(self) -> bool:
        """One bit of decision (one byte of input)."""
        return bool(self.u8() & 1)

    def below(self, n: int) -> int:
        """An integer in ``[0, n)`` (``n`` >= 1); up to 255 one byte, else four."""
        if n <= 1:
            return 0
        return (self.u8() if n <= 256 else self.u32()) % n

    def choice(self, items: Sequence[T]) -> T:
        """One element of a non-empty sequence."""
        return items[self.below(len(items))]

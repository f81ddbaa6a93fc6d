"""What an input source hands a keyboard backend, and the programmatic source.

Theory of operation
-------------------
A source (a USB HID device, an evdev node, a program) produces :data:`InputEvent` values
in device-neutral terms: a key or button with its Linux code (:class:`KeyInput`),
relative motion (:class:`RelInput`), an absolute position in the source's own range
(:class:`AbsInput`) or a multi-touch step (:class:`TouchInput`).  The keyboard backend
turns them into kbdif events for what the frontend negotiated (scaling absolute values
to its ``width``/``height``, or to relative motion when it did not ask for absolute
positions).  Every source is an :class:`InputSource`: ``events()`` is an async iterator
that ends when the source ends (a device unplugged, a programmatic source closed), and
``close()`` ends it from outside.

:class:`ProgrammaticSource` is the API source (and ``xenpv hid inject``): calls queue
events in a bounded queue (R11: a full queue refuses the call with ``False``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from xenpv.errors import LocalError

__all__ = [
    "TOUCH_KINDS",
    "AbsInput",
    "InputEvent",
    "InputSource",
    "KeyInput",
    "ProgrammaticSource",
    "RelInput",
    "TouchInput",
]


@dataclass(frozen=True)
class KeyInput:
    """A key or button (Linux input code) pressed or released."""

    code: int
    pressed: bool


@dataclass(frozen=True)
class RelInput:
    """Relative pointer motion; ``wheel`` in kbdif's sign (``rel_z``: negative = up)."""

    dx: int
    dy: int
    wheel: int = 0


@dataclass(frozen=True)
class AbsInput:
    """An absolute position ``x`` in ``0..x_max``, ``y`` in ``0..y_max`` (the source's
    range; the backend scales it), with a wheel step."""

    x: int
    y: int
    x_max: int
    y_max: int
    wheel: int = 0


#: Multi-touch steps, in kbdif's sub-type order.
TOUCH_KINDS = ("down", "up", "move", "frame", "shape", "orient")


@dataclass(frozen=True)
class TouchInput:
    """One multi-touch step of contact ``contact``: ``down``/``move`` carry a position in
    ``0..x_max``/``0..y_max``; ``up``; ``frame`` ends a group of steps; ``shape`` carries
    the contact ellipse (``major``, ``minor``, in the source's position units);
    ``orient`` its orientation in degrees (-180 … 180)."""

    kind: str
    contact: int
    x: int = 0
    y: int = 0
    x_max: int = 1
    y_max: int = 1
    major: int = 0
    minor: int = 0
    orientation: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TOUCH_KINDS:
            raise LocalError(f"touch kind must be one of {TOUCH_KINDS}, not {self.kind!r}")


InputEvent = KeyInput | RelInput | AbsInput | TouchInput


@runtime_checkable
class InputSource(Protocol):
    """Anything that feeds a keyboard backend or a focus router."""

    name: str

    def events(self) -> AsyncIterator[InputEvent]:
        """The source's events; the iteration ends when the source ends."""
        ...

    async def close(self) -> None:
        """End the source (its iteration ends; idempotent)."""
        ...


class ProgrammaticSource:
    """Events from code: :meth:`put` (or the helpers) queue them, :meth:`events` yields
    them.  The queue holds at most ``limit`` events; past that :meth:`put` returns False
    and counts the event in ``stats["refused"]``."""

    def __init__(self, name: str = "api", limit: int = 4096) -> None:
        """An open source with an empty queue."""
        self.name = name
        self.limit = limit
        # one place more than ``limit``: room for the end marker of :meth:`close`
        self._queue: asyncio.Queue[InputEvent | None] = asyncio.Queue(limit + 1)
        self._closed = False
        self.stats = {"queued": 0, "refused": 0}

    def put(self, event: InputEvent) -> bool:
        """Queue ``event``; False if the source is closed or the queue is full."""
        if self._closed:
            return False
        if self._queue.qsize() >= self.limit:
            self.stats["refused"] += 1
            return False
        self._queue.put_nowait(event)
        self.stats["queued"] += 1
        return True

    def press(self, code: int) -> bool:
        """Key or button ``code`` down."""
        return self.put(KeyInput(code, True))

    def release(self, code: int) -> bool:
        """Key or button ``code`` up."""
        return self.put(KeyInput(code, False))

    def tap(self, code: int) -> bool:
        """Press and release ``code``."""
        return self.press(code) and self.release(code)

    def move(self, dx: int, dy: int, wheel: int = 0) -> bool:
        """Relative motion."""
        return self.put(RelInput(dx, dy, wheel))

    def move_to(self, x: int, y: int, x_max: int, y_max: int, wheel: int = 0) -> bool:
        """Absolute position in ``0..x_max`` by ``0..y_max``."""
        return self.put(AbsInput(x, y, x_max, y_max, wheel))

    def touch(self, kind: str, contact: int, **fields: int) -> bool:
        """One multi-touch step (see :class:`TouchInput`)."""
        return self.put(TouchInput(kind, contact, **fields))

    async def events(self) -> AsyncIterator[InputEvent]:
        """Queued events in order; ends once the source is closed and drained."""
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    async def close(self) -> None:
        """Close: queued events are still delivered, then the iteration ends."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

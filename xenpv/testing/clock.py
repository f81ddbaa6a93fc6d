"""A scripted clock for tests of bounded polling loops.

:class:`ScriptedClock` stands in for the ``time`` module inside a module under test: every
reading advances by a fixed step, and a peer's ``action`` runs just before the ``at``-th
reading (1-based; 0: never), so a test can place the peer's move at any point of a
polling budget and count how often the loop looked at the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest


class ScriptedClock:
    """Readings ``start + step``, ``start + 2*step``, …; ``action`` runs at reading ``at``."""

    def __init__(self, step: int, at: int = 0, action: Callable[[], Any] | None = None,
                 start: int = 10**9) -> None:
        self.now, self.step, self.at, self.action, self.reads = start, step, at, action, 0

    def _read(self) -> int:
        self.reads += 1
        if self.reads == self.at and self.action is not None:
            self.action()
        self.now += self.step
        return self.now

    def monotonic_ns(self) -> int:
        """The next reading (as :func:`time.monotonic_ns`)."""
        return self._read()

    def perf_counter_ns(self) -> int:
        """The next reading (as :func:`time.perf_counter_ns`)."""
        return self._read()


def clock_installer(monkeypatch: pytest.MonkeyPatch, module: Any
                    ) -> Callable[..., ScriptedClock]:
    """A function ``install(step, at=0, action=None)`` that puts a fresh
    :class:`ScriptedClock` in place of ``module.time`` for the rest of the test."""

    def install(step: int, at: int = 0, action: Callable[[], Any] | None = None
                ) -> ScriptedClock:
        fake = ScriptedClock(step, at, action)
        monkeypatch.setattr(module, "time", fake)
        return fake

    return install

"""Adversarial peer helpers on the loopback emulator: held grants and event storms.

Two faults of hostile-inputs.md's harness notes that live in the platform rather than in
shared memory:

* :func:`held_grant` keeps a grant "still mapped by the peer" (the emulator's hold-mapped
  fault) for the duration of a ``with`` block, so the granting side's end of access fails
  with :class:`~xenpv.platforms.base.GrantInUse` and the quarantine path can be tested
  (R8, scenarios 13 and 17);
* :class:`EventStorm` drives an event channel at any rate (as fast as possible, or paced)
  from a background thread, for a number of notifications or a time, so late-EOI and
  spurious-event accounting can be tested (R10, scenarios 8 and 16).

Both work with any machine of :mod:`xenpv.platforms.loopback.harness` (in-process or the
daemon) and any :class:`~xenpv.platforms.base.EventChannels`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from xenpv.errors import PlatformError

__all__ = ["EventStorm", "held_grant"]


@contextlib.contextmanager
def held_grant(machine: Any, domid: int, ref: int) -> Iterator[None]:
    """Within the block, grant ``(domid, ref)`` stays pinned as if the peer kept it mapped."""
    machine.hold_mapped(domid, ref)
    try:
        yield
    finally:
        with contextlib.suppress(PlatformError):  # the grant may be gone already
            machine.release_hold(domid, ref)


class EventStorm:
    """Notify ``port`` of ``events`` repeatedly from a thread.

    ``count`` notifications (or until :meth:`stop`, or ``seconds``), at most ``rate`` per
    second when given (otherwise as fast as the platform allows).  :attr:`sent` counts the
    notifications made; :attr:`error` holds the exception that ended the storm early (the
    port was closed under it, for instance), if any.
    """

    def __init__(self, events: Any, port: int, *, count: int | None = None,
                 seconds: float | None = None, rate: float | None = None) -> None:
        if count is None and seconds is None:
            raise ValueError("an event storm needs a count or a duration")
        self.events = events
        self.port = port
        self.count = count
        self.seconds = seconds
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"event-storm-{port}", daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        interval = 1.0 / self.rate if self.rate else 0.0
        try:
            while not self._stop.is_set():
                if self.count is not None and self.sent >= self.count:
                    return
                now = time.monotonic()
                if self.seconds is not None and now - start >= self.seconds:
                    return
                if interval:
                    due = start + self.sent * interval
                    if due > now:
                        self._stop.wait(due - now)
                        continue
                self.events.notify(self.port)
                self.sent += 1
        except Exception as e:  # the storm ends; the test looks at .error
            self.error = e

    def start(self) -> EventStorm:
        """Start the storm; returns self."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> int:
        """Stop (or wait for the end of) the storm; returns notifications sent."""
        self._stop.set()
        self._thread.join(timeout)
        return self.sent

    def join(self, timeout: float = 30.0) -> int:
        """Wait for the storm to finish by itself; returns notifications sent."""
        self._thread.join(timeout)
        return self.sent

    def __enter__(self) -> EventStorm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

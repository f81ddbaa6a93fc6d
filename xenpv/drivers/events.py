"""Event handling shared by drivers: a per-port event budget and the pump behind it.

Theory of operation
-------------------
A driver's port is delivered through the handle's
:class:`~xenpv.platforms.dispatch.PortDispatcher` (one per event-channel handle, shared
by every driver on it).  :class:`EventPump` watches one port there with late unmask: a
delivered port arrives masked and is unmasked at once while an
:class:`EventRateLimiter` budget lasts (R10); past it, it stays masked until the period
ends and the ring is examined once more then.  Each delivery runs the driver's service
pass; one that moved nothing is counted as spurious.  The console's frontend transport
and backend sessions are pumps; a request-ring service has its own wake-up policy
(:mod:`xenpv.drivers.ringservice`) but takes the same budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from xenpv.errors import LocalError, PlatformError
from xenpv.platforms.base import EventChannels
from xenpv.platforms.dispatch import PortDispatcher

__all__ = ["RATE_LIMIT_ALLOWANCE", "RATE_LIMIT_PERIOD", "EventPump", "EventRateLimiter"]

#: xenconsoled's event budget: 30 events per 200 ms, then the port stays masked.
RATE_LIMIT_ALLOWANCE = 30
RATE_LIMIT_PERIOD = 0.2


class EventRateLimiter:
    """Per-port event budget (R10): ``allowance`` events per ``period`` seconds.

    :meth:`admit` is called for each delivered event; it returns True while the budget
    lasts (unmask at once) and False once it is spent (leave the port masked until
    :meth:`period_end`).  ``clock`` is injectable for tests.
    """

    def __init__(self, allowance: int = RATE_LIMIT_ALLOWANCE, period: float = RATE_LIMIT_PERIOD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """A fresh budget."""
        if allowance < 1 or period <= 0:
            raise LocalError("rate limit needs allowance >= 1 and period > 0")
        self.allowance = allowance
        self.period = period
        self._clock = clock
        self._start = clock()
        self.count = 0
        #: Events seen in total, and periods in which the budget ran out.
        self.events = 0
        self.limited_periods = 0

    def period_end(self) -> float:
        """Clock time at which the current period ends."""
        return self._start + self.period

    def admit(self) -> bool:
        """Account one event; False means "stay masked until :meth:`period_end`"."""
        now = self._clock()
        if now >= self._start + self.period:
            self._start = now
            self.count = 0
        self.events += 1
        self.count += 1
        if self.count == self.allowance + 1:
            self.limited_periods += 1
        return self.count <= self.allowance


class EventPump:
    """Event handling of one port with a budget (R10, late unmask).

    Subclasses set ``events``, ``port``, ``limiter``, ``stats`` (with ``events``,
    ``rate_limited``, ``spurious``, ``notifies``) and provide :attr:`_stopped`,
    :meth:`_pump_loop` and :meth:`_service`; they call :meth:`_watch_port` when they
    start and :meth:`_unwatch_port` when they stop.
    """

    events: EventChannels
    port: int
    limiter: EventRateLimiter
    stats: dict[str, int]
    _unmask_handle: asyncio.TimerHandle | None = None
    _pump_scheduled = False
    _dispatch: PortDispatcher | None = None

    @property
    def _stopped(self) -> bool:
        raise NotImplementedError

    def _service(self) -> bool:
        """One pass over the ring(s); True if anything moved."""
        raise NotImplementedError

    def _pump_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop serving the port (None before it started)."""
        raise NotImplementedError

    def _watch_port(self) -> None:
        # the port reaches _event still masked: the event budget decides when to unmask
        dispatch = PortDispatcher.attach(self.events)
        try:
            dispatch.watch(self.port, self._event, unmask=False)
        except BaseException:
            dispatch.detach()
            raise
        self._dispatch = dispatch

    def _unwatch_port(self) -> None:
        if self._dispatch is not None:
            dispatch, self._dispatch = self._dispatch, None
            dispatch.detach(self.port)
        if self._unmask_handle is not None:
            self._unmask_handle.cancel()
            self._unmask_handle = None

    def _event(self) -> None:
        if self._stopped:
            return
        self.stats["events"] += 1
        if self.limiter.admit():
            self._unmask()
        else:
            self.stats["rate_limited"] += 1
            loop = self._pump_loop()
            if self._unmask_handle is None and loop is not None:
                delay = max(0.0, self.limiter.period_end() - time.monotonic())
                self._unmask_handle = loop.call_later(delay, self._period_over)
        if not self._service():
            self.stats["spurious"] += 1

    def _period_over(self) -> None:
        self._unmask_handle = None
        if not self._stopped:
            self._unmask()
            self._service()

    def _unmask(self) -> None:
        with contextlib.suppress(LocalError, PlatformError, OSError):
            self.events.unmask(self.port)

    def _notify(self) -> None:
        self.stats["notifies"] += 1
        with contextlib.suppress(PlatformError, OSError):
            self.events.notify(self.port)

    def _schedule_pump(self) -> None:
        """Queue one service pass in the loop (at most one at a time)."""
        loop = self._pump_loop()
        if not self._pump_scheduled and not self._stopped and loop is not None:
            self._pump_scheduled = True
            loop.call_soon(self._pumped_pass)

    def _pumped_pass(self) -> None:
        self._pump_scheduled = False
        self._service()

"""The block backend's I/O engines: io_uring, a thread pool, or inline in the ring pass.

:func:`effective_engine` turns the configured choice into the engine that serves:

* ``"io_uring"``: reads and writes go to an io_uring (:class:`UringEngine`, one per
  queue, on the raw system calls through the compiled ``xenpv.backends._uring``) straight
  between the image and the mapped grant pages; every request a ring pass takes is
  submitted with one ``io_uring_enter``, completions that finish during submission are
  answered in the same pass, the rest when the ring's eventfd fires.  Flushes, barriers
  and discards still go to the thread pool (rare, and ``fdatasync`` may take long);
* ``"threads"``: ``os.preadv``/``os.pwritev`` in a pool of threads, everything;
* ``"inline"``: everything in the ring pass (no concurrency at all);
* ``"mixed"``: reads and writes up to ``inline_max`` inline, larger ones in the pool.

``"auto"`` is io_uring where the kernel allows it and ``"mixed"`` elsewhere (measured:
see docs/block.md "I/O engines").  When io_uring is asked for (or chosen by ``"auto"``)
and the kernel refuses it (no io_uring before Linux 5.6, ``kernel.io_uring_disabled``, a
seccomp filter), :func:`effective_engine` says why once in the log and serves with the
portable engine instead; :func:`uring_unavailable` gives the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from xenpv.compiled import pure_python

__all__ = [
    "ENGINES",
    "LANE_BIT",
    "UringEngine",
    "effective_engine",
    "uring_unavailable",
]

log = logging.getLogger(__name__)

#: What a backend may be configured with.
ENGINES = ("auto", "io_uring", "threads", "inline")

#: Set in the tokens of the compiled lane's requests (``_uring.LANE_BIT``; the engine's
#: own tokens stay below 2**48).
LANE_BIT = 1 << 63

_probe: list[str | None] = []
_warned: set[str] = set()


def _load() -> Any:
    from xenpv.backends import _uring

    return _uring


def uring_unavailable() -> str | None:
    """None if this process can use io_uring, else why not (probed once)."""
    if not _probe:
        reason: str | None = None
        try:
            ring = _load().Uring(8, 16)
            ring.close()
        except ImportError as exc:
            reason = f"the compiled io_uring module is missing ({exc}); run " \
                     "'python setup.py build_ext --inplace'"
        except OSError as exc:
            why = {1: "forbidden (seccomp filter or kernel.io_uring_disabled)",
                   38: "not in this kernel"}.get(exc.errno or 0, "refused")
            reason = f"io_uring {why}: {exc.strerror or exc}"
        _probe.append(reason)
    return _probe[0]


def effective_engine(requested: str) -> str:
    """The engine that serves for the configured ``requested`` one: ``"io_uring"``,
    ``"threads"``, ``"inline"`` or ``"mixed"`` (logs once why io_uring is not used)."""
    if requested in ("threads", "inline"):
        return requested
    reason = uring_unavailable()
    if reason is None:
        return "io_uring"
    fallback = "threads" if requested == "io_uring" else "mixed"
    if requested not in _warned:
        _warned.add(requested)
        log.warning("%s; serving with the %s engine instead", reason,
                    "thread-pool" if fallback == "threads" else "inline/thread-pool")
    return fallback


class UringEngine:
    """One io_uring with its eventfd watched by ``loop``.

    :meth:`start` queues a read or write and the function to call with its result (bytes
    moved or ``-errno``); :meth:`submit` hands the queue to the kernel; :meth:`complete`
    calls the functions of every finished request.  Completions that do not finish during
    submission wake the loop through the eventfd, which submits and completes again and
    then calls ``on_wakeup``.  The buffers of a request must stay mapped until its
    function is called; :meth:`close` waits for every request still in flight.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, entries: int = 256) -> None:
        """Set up the ring (raises :class:`OSError` if the kernel refuses)."""
        self.ring = _load().Uring(entries, entries * 4)
        self.loop = loop
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.ring.register_eventfd(self.efd)
        except OSError:
            self.ring.close()
            os.close(self.efd)
            raise
        loop.add_reader(self.efd, self._on_event)
        self.waiting: dict[int, Callable[[int], None]] = {}
        self.on_wakeup: Callable[[], None] | None = None
        #: The block backend's compiled fast lane on this ring (``_uring.RwLane``), and
        #: what is called with each of its completions the lane does not answer itself
        #: (token, result).
        self.lane: Any = None
        self.on_lane: Callable[[int, int], None] | None = None
        self._next = 0
        self.stats = {"submitted": 0, "enters": 0, "jammed": 0}

    @property
    def inflight(self) -> int:
        """Requests started and not completed."""
        return len(self.waiting) + (self.lane.inflight if self.lane is not None else 0)

    def open_lane(self, fd: int, pages: dict[int, Any], rsp_size: int, slot_size: int
                  ) -> Any:
        """Attach the compiled fast lane (``_uring.RwLane``) for reads and writes of
        ``fd`` into the kept pages ``pages`` (gref -> mapping with ``mem``), responses of
        ``rsp_size`` bytes in slots of ``slot_size``; None (no lane: every request takes
        the readable path) when ``XENPV_PURE_PYTHON=1``."""
        if pure_python():
            return None
        self.lane = _load().RwLane(self.ring, fd, pages, rsp_size, slot_size)
        return self.lane

    def start(self, write: bool, fd: int, views: list[memoryview], offset: int,
              done: Callable[[int], None]) -> bool:
        """Queue one transfer; False if the ring has no room now (nothing queued)."""
        token = self._next = (self._next + 1) & 0xFFFFFFFFFFFF
        if not self.ring.prep(write, fd, views, offset, token):
            self.stats["jammed"] += 1
            return False
        self.waiting[token] = done
        self.stats["submitted"] += 1
        return True

    def submit(self) -> None:
        """Hand every queued request to the kernel."""
        if self.ring.unsubmitted:
            self.stats["enters"] += 1
            self.ring.submit()

    def submit_and_complete(self) -> int:
        """:meth:`submit` then :meth:`complete`, with the eventfd quiet meanwhile (what
        finishes during submission is answered here, not by a wakeup); how many."""
        quiet = self.ring.eventfd_enable(False)
        try:
            self.submit()
            n = self.complete()
        finally:
            if quiet:
                self.ring.eventfd_enable(True)
        return n + self.complete() if quiet else n  # what finished while quiet

    def complete(self) -> int:
        """Call the function of every finished request (which may start more); how many."""
        n = 0
        lane = self.lane
        while True:
            if lane is None:
                finished = self.ring.reap()
                answered = 0
            else:  # the lane answers its own; the rest comes out as usual
                before = lane.nout
                finished = lane.reap()
                answered = lane.nout - before
            if not finished and not answered:
                return n
            n += answered
            for token, res in finished:
                if token & LANE_BIT:
                    if self.on_lane is not None:
                        n += 1
                        self.on_lane(token, res)
                    continue
                done = self.waiting.pop(token, None)
                if done is not None:
                    n += 1
                    done(res)
            self.submit()

    def _on_event(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.efd)
        self.submit()
        if self.complete() and self.on_wakeup is not None:
            self.on_wakeup()

    def close(self) -> None:
        """Wait for every request in flight (their functions are called), then release
        the ring and its eventfd (idempotent)."""
        if self.ring.fd < 0:
            return
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.efd)
        while self.inflight:
            try:
                self.ring.submit(1)
            except OSError as exc:  # the ring itself broke: nothing more will complete
                log.error("io_uring: %s with %d requests in flight", exc, len(self.waiting))
                break
            self.complete()
        self.ring.close()
        os.close(self.efd)

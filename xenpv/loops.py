"""Which asyncio event loop xenpv's daemons run on.

The daemons (``xenpv xenstored``, ``xenpv loopback up``) spend most of each request in
the event loop's own machinery — the ``epoll`` wait, finding the ready callback, calling
it — rather than in xenpv's code.  uvloop implements that machinery in C, which roughly
halves the daemon's CPU time per xenstore round trip, so the daemons use it when it is
installed (it is a dependency on Linux).  ``asyncio`` selects the standard loop (every
daemon works the same on both; the test suite runs the xenstore daemon on each).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from xenpv.errors import LocalError

__all__ = ["LOOPS", "default_loop_name", "loop_factory", "run"]

T = TypeVar("T")

#: The choices of ``--loop``.
LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(kind: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a factory of new event loops of ``kind`` (see :data:`LOOPS`).

    ``auto`` is uvloop when it can be imported, else asyncio's default loop; ``uvloop``
    without uvloop installed is a :class:`LocalError`.
    """
    if kind not in LOOPS:
        raise LocalError(f"unknown event loop {kind!r} (choose from {', '.join(LOOPS)})")
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise LocalError("the uvloop event loop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def default_loop_name() -> str:
    """The loop ``auto`` picks here: ``"uvloop"`` or ``"asyncio"``."""
    return "asyncio" if loop_factory("auto") is asyncio.new_event_loop else "uvloop"


def run(main: Coroutine[Any, Any, T], kind: str = "auto") -> T:
    """``asyncio.run(main)`` on a loop of ``kind``."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)

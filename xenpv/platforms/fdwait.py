"""Waiting for a file descriptor in asyncio, for every platform's event-channel handle."""

from __future__ import annotations

import asyncio

__all__ = ["wait_readable"]


async def wait_readable(fd: int, timeout: float | None = None) -> None:
    """Wait until ``fd`` is readable (``loop.add_reader``); :class:`TimeoutError` after
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def _ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, _ready)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)

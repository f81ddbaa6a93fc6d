"""Console output throughput on the in-process loopback emulator (used by ``bench vchan``).

Both console halves are needed here, and a backend must not import its frontend, so the
measurement lives with the benchmarks rather than in either driver.
"""

from __future__ import annotations

import asyncio
import os
import time

from xenpv.backends.console import ConsoleConfig, serve_console
from xenpv.drivers.events import EventRateLimiter
from xenpv.frontends.console import PrimaryConsole
from xenpv.platforms.base import GNTTAB_RESERVED_CONSOLE

__all__ = ["bench_console_mbps"]

def bench_console_mbps(total: int = 8 << 20, *, chunk: int = 4096, timeout: float = 60.0
                       ) -> dict[str, float]:
    """Console output throughput on the in-process loopback emulator.

    A guest (dom1) writes ``total`` bytes through its primary console stream; a backend
    (dom0) consumes them into a counting sink.  The event budget is lifted on both sides:
    this measures the data path (with xenconsoled's 30 events per 200 ms a console moves
    about 0.3 MB/s, by design).  Returns ``{"console_mbps": …, "bytes": …, "seconds": …}``
    (MB/s = 10^6 bytes per second).
    """
    return asyncio.run(_bench(total, chunk, timeout))


async def _bench(total: int, chunk: int, timeout: float) -> dict[str, float]:
    from xenpv.platforms.loopback.harness import InProcessMachine

    machine = InProcessMachine()
    got = 0
    done = asyncio.Event()

    def sink(data: bytes) -> None:
        nonlocal got
        got += len(data)
        if got >= total:
            done.set()

    try:
        guest, dom0 = machine.domain(1), machine.domain(0)
        console = PrimaryConsole(guest, 0).setup()
        cfg = ConsoleConfig(pty=False, rate_allowance=1 << 30)
        session = serve_console(dom0, 1, GNTTAB_RESERVED_CONSOLE, console.port, cfg, "bench",
                                sink)
        _reader, writer = await console.open(limiter=EventRateLimiter(1 << 30, 1.0))
        block = os.urandom(chunk)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            writer.write(block)
            sent += len(block)
            await writer.drain()
        await asyncio.wait_for(done.wait(), timeout)
        seconds = time.perf_counter() - start
        session.close()
        console.close()
        return {"console_mbps": got / seconds / 1e6, "bytes": float(got), "seconds": seconds}
    finally:
        machine.close()

"""Fault injection and accounting through the daemon (cross-process clients)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ClientPlatform, ControlConnection
from xenpv.platforms.loopback.core import FAULT_DROP_NOTIFY
from xenpv.platforms.loopback.harness import start_daemon, stop_daemon
from xenpv.xenstore.client import connect


def test_dropped_notification_fault_applies_to_fast_path_clients(tmp_path: Path) -> None:
    d = tmp_path / "run"
    proc = start_daemon(d, domains=(1,))
    ctl = ControlConnection(d / "dom0" / "control")
    a, b = ClientPlatform.for_domain(d, 0), ClientPlatform.for_domain(d, 1)
    try:
        pb = b.events.alloc_unbound(0)
        pa = a.events.bind_interdomain(1, pb)
        assert a.events.pending(5) == pa
        a.events.notify(pa)  # caches the outbox: later notifies bypass the daemon
        assert b.events.pending(5) == pb
        b.events.unmask(pb)
        ctl.call(proto.Op.FAULT, proto.U32x4.pack(FAULT_DROP_NOTIFY, 0, 0, 1))
        a.events.notify(pa)  # dropped by the fault
        assert b.events.pending(0.2) is None
        a.events.notify(pa)  # the fault is used up
        assert b.events.pending(5) == pb
    finally:
        a.close()
        b.close()
        ctl.close()
        assert stop_daemon(proc) == 0


def test_stats_count_xenstore_watches(tmp_path: Path) -> None:
    d = tmp_path / "run"
    proc = start_daemon(d, domains=(1,))
    ctl = ControlConnection(d / "dom0" / "control")

    def watches() -> int:
        out, _ = ctl.call(proto.Op.STATS, proto.U32.pack(1))
        return int(proto.STATS_REPLY.unpack(out)[6])

    async def scenario() -> None:
        xs = await connect(str(d / "dom1" / "xenstore"))
        try:
            async with xs.watch("data"):
                assert watches() == 1
        finally:
            await xs.close()

    try:
        assert watches() == 0
        asyncio.run(scenario())
        assert watches() == 0
    finally:
        ctl.close()
        assert stop_daemon(proc) == 0

"""Event-channel semantics every platform mode must give (``/dev/xen/evtchn`` rules)."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from xenpv.errors import PlatformError
from xenpv.platforms.base import PortError


def test_bind_leaves_the_new_port_pending_exactly_once(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pb = b.events.alloc_unbound(0)
    pa = a.events.bind_interdomain(1, pb)
    assert pa != 0 and pb != 0
    assert a.events.pending(5) == pa
    a.events.unmask(pa)
    assert a.events.pending(0.05) is None
    assert b.events.pending(0) is None  # the allocating side gets nothing


def test_notifications_coalesce_and_a_delivered_port_stays_masked(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pb = b.events.alloc_unbound(0)
    pa = a.events.bind_interdomain(1, pb)
    assert a.events.pending(5) == pa
    a.events.unmask(pa)
    for _ in range(3):
        b.events.notify(pb)
    assert a.events.pending(5) == pa
    assert a.events.pending(0.05) is None  # coalesced into one delivery
    b.events.notify(pb)  # arrives while masked
    assert a.events.pending(0.05) is None
    a.events.unmask(pa)  # re-enabled: fires at once
    assert a.events.pending(5) == pa
    a.events.unmask(pa)
    a.events.notify(pa)
    assert b.events.pending(5) == pb


def test_isolation_binding_a_port_not_offered_to_you_fails(machine: Any) -> None:
    a, b, c = machine.domain(0), machine.domain(1), machine.domain(2)
    for_c = b.events.alloc_unbound(2)
    with pytest.raises(PortError):
        a.events.bind_interdomain(1, for_c)
    with pytest.raises(PlatformError):
        a.events.bind_interdomain(1, 31)  # no such port
    pc = c.events.bind_interdomain(1, for_c)  # the domain it was offered to can
    with pytest.raises(PortError):
        a.events.bind_interdomain(1, for_c)  # already interdomain
    assert c.events.pending(5) == pc


def test_unbind_returns_the_peer_to_unbound_and_it_can_be_rebound(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pb = b.events.alloc_unbound(0)
    pa = a.events.bind_interdomain(1, pb)
    assert a.events.pending(5) == pa
    a.events.unmask(pa)
    b.events.notify(pb)
    assert a.events.pending(5) == pa
    a.events.unmask(pa)
    a.events.unbind(pa)
    b.events.notify(pb)  # unbound: a successful no-op
    pa2 = a.events.bind_interdomain(1, pb)
    assert a.events.pending(5) == pa2
    a.events.unmask(pa2)
    b.events.notify(pb)  # must reach the new binding, not the closed one
    assert a.events.pending(5) == pa2


def test_notify_on_a_port_this_handle_does_not_own_fails(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pb = b.events.alloc_unbound(0)
    with pytest.raises(PortError):
        a.events.notify(pb if pb != 0 else 1)
    with pytest.raises(PortError):
        a.events.unmask(30)


def test_port_exhaustion_is_a_clear_error_and_leaks_nothing(machine: Any) -> None:
    b = machine.domain(1)
    ports = []
    with pytest.raises(PlatformError) as info:
        for _ in range(100_000):
            ports.append(b.events.alloc_unbound(0))
    assert info.value.errno == errno.ENOSPC
    assert 0 not in ports and len(set(ports)) == len(ports)
    for p in ports:
        b.events.unbind(p)
    b.events.unbind(b.events.alloc_unbound(0))  # usable again


def test_async_wait_returns_the_port_and_times_out(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pa = a.events.alloc_unbound(1)
    pb = b.events.bind_interdomain(0, pa)
    assert b.events.pending(5) == pb
    b.events.unmask(pb)

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await a.events.wait(0.05)
        b.events.notify(pb)
        assert await a.events.wait(5) == pa

    asyncio.run(scenario())

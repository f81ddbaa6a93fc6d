"""Held grants and event storms on the in-process loopback emulator."""

from __future__ import annotations

import pytest

from xenpv.fuzz.platform import EventStorm, held_grant
from xenpv.platforms.base import GrantInUse
from xenpv.platforms.loopback.harness import InProcessMachine


def test_held_grant_refuses_end_of_access_until_released(
    inprocess_machine: InProcessMachine,
) -> None:
    front, back = inprocess_machine.domain(1), inprocess_machine.domain(2)
    pages = front.grants.grant(2, 1)
    mapping = back.grants.map(1, pages.refs)
    back.grants.unmap(mapping)
    with held_grant(inprocess_machine, 1, pages.refs[0]):
        with pytest.raises(GrantInUse):
            front.grants.end_access(pages)
    front.grants.end_access(pages)
    inprocess_machine.release()
    inprocess_machine.assert_released()


def test_event_storm_coalesces_and_the_receiver_stays_responsive(
    inprocess_machine: InProcessMachine,
) -> None:
    rx, tx = inprocess_machine.domain(1), inprocess_machine.domain(2)
    port = rx.events.alloc_unbound(2)
    peer = tx.events.bind_interdomain(1, port)
    first = rx.events.pending(0.5)  # the bind may leave the port pending once: drain it
    if first is not None:
        rx.events.unmask(first)
    storm = EventStorm(tx.events, peer, count=20000).start()
    deliveries = 0
    while storm.sent < 20000 and storm.error is None:
        got = rx.events.pending(0.05)
        if got is not None:
            assert got == port
            deliveries += 1
            rx.events.unmask(port)
    storm.join(30.0)
    assert storm.error is None
    assert storm.sent == 20000
    assert deliveries < storm.sent  # notifications coalesce while the port is masked
    inprocess_machine.release()
    inprocess_machine.assert_released()


def test_paced_storm_stops_on_request(inprocess_machine: InProcessMachine) -> None:
    rx, tx = inprocess_machine.domain(1), inprocess_machine.domain(2)
    port = rx.events.alloc_unbound(2)
    peer = tx.events.bind_interdomain(1, port)
    with EventStorm(tx.events, peer, seconds=10.0, rate=1000.0) as storm:
        assert rx.events.pending(2.0) == port
    assert 0 < storm.sent < 10000
    inprocess_machine.release()
    inprocess_machine.assert_released()


def test_storm_on_a_closed_port_ends_with_the_error(inprocess_machine: InProcessMachine) -> None:
    tx = inprocess_machine.domain(2)
    inprocess_machine.domain(1)
    storm = EventStorm(tx.events, 12345, count=10).start()
    storm.join(10.0)
    assert storm.error is not None
    inprocess_machine.release()
    inprocess_machine.assert_released()

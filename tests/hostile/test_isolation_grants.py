"""Hostile-peer grant scenarios (hostile-inputs.md 5 and 13) on both loopback modes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from xenpv.platforms.base import GntSt, GrantInUse, MapError
from xenpv.platforms.loopback.harness import DaemonMachine, InProcessMachine

PAGE = 4096
MAX_GRANTS = 64


@pytest.fixture(scope="module", params=["inprocess", "crossprocess"])
def machine(request: pytest.FixtureRequest) -> Iterator[Any]:
    m: Any = (
        InProcessMachine(max_grants=MAX_GRANTS)
        if request.param == "inprocess"
        else DaemonMachine(max_grants=MAX_GRANTS)
    )
    try:
        yield m
        m.release()
        m.assert_released()
    finally:
        m.close()


def test_scenario_05_bad_grant_refs_fail_and_unwind(machine: Any) -> None:
    """A frontend hands the backend bad refs: ≥ table size, not granted to it, read-only
    for a write, revoked before the map, or one bad ref in a batch."""
    back, front, third = machine.domain(0), machine.domain(1), machine.domain(2)
    try:
        good = front.grants.grant(0, 4)
        ro = front.grants.grant(0, 1, writable=False)
        elsewhere = front.grants.grant(2, 1)
        revoked = front.grants.grant(0, 1)
        revoked_ref = revoked.refs[0]
        front.grants.end_access(revoked)
        cases = [
            ([MAX_GRANTS], GntSt.bad_gntref),
            ([elsewhere.refs[0]], GntSt.bad_gntref),
            ([revoked_ref], GntSt.bad_gntref),
            ([*good.refs[:2], 3, *good.refs[2:]], GntSt.bad_gntref),
        ]
        for refs, status in cases:
            with pytest.raises(MapError) as info:
                back.grants.map(1, refs)
            assert info.value.status == status
        with pytest.raises(MapError) as info:
            back.grants.map(1, [*good.refs, ro.refs[0]], writable=True)
        assert (info.value.index, info.value.status) == (4, GntSt.permission_denied)
        # every failed batch was unwound: all grants can be ended at once
        for pages in (good, ro, elsewhere):
            front.grants.end_access(pages)
        del third
    finally:
        machine.release()


def test_scenario_13_held_grant_is_refused_quarantined_and_never_reused(machine: Any) -> None:
    """A backend keeps a grant mapped: end of access fails, the page is quarantined and
    no later allocation's data ever becomes visible through that grant."""
    back, front = machine.domain(0), machine.domain(1)
    try:
        pages = front.grants.grant(0, 1)
        pages.mem[0:8] = b"request!"
        held = back.grants.map(1, pages.refs)  # the hostile backend never unmaps
        with pytest.raises(GrantInUse):
            front.grants.end_access(pages)
        quarantine = [pages]
        later = [front.grants.grant(0, 1) for _ in range(8)]
        for i, p in enumerate(later):
            assert p.refs[0] != pages.refs[0]
            p.mem[0:6] = b"canary"
            p.mem[6:7] = bytes([i])
        assert bytes(held.mem[0:8]) == b"request!"
        assert b"canary" not in bytes(held.mem[0:PAGE])
        for p in later:
            front.grants.end_access(p)
        back.grants.unmap(held)  # only when the backend lets go ...
        for p in quarantine:  # ... does the retry succeed
            front.grants.end_access(p)
    finally:
        machine.release()

"""Guest frames dom0 can map foreign (``xenforeignmemory_map``), on both loopback modes."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

from xenpv.errors import PlatformError
from xenpv.platforms.base import GntSt, MapError
from xenpv.platforms.loopback.harness import DaemonMachine, InProcessMachine

PAGE = 4096


@pytest.fixture(scope="module", params=["inprocess", "crossprocess"])
def machine(request: pytest.FixtureRequest) -> Iterator[Any]:
    m: Any = InProcessMachine() if request.param == "inprocess" else DaemonMachine()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def pair(machine: Any) -> Iterator[tuple[Any, Any]]:
    # both domains in this process: frames are an extension beyond the base interfaces
    if isinstance(machine, DaemonMachine):
        from xenpv.platforms.loopback.client import ClientPlatform

        if 1 not in machine._domains():
            machine.create_domain(1)
        a = ClientPlatform.for_domain(machine.rundir, 0)
        b = ClientPlatform.for_domain(machine.rundir, 1)
    else:
        a, b = machine.domain(0), machine.domain(1)
    try:
        yield a, b
    finally:
        a.close()
        b.close()
        machine.release()
        machine.assert_released()


def test_dom0_maps_guest_frames_and_sees_the_guests_bytes(pair: tuple[Any, Any]) -> None:
    a, b = pair
    frames = b.grants.alloc_frames(2)
    assert len(frames.refs) == 2 and min(frames.refs) >= 0x10000
    frames.mem[PAGE : PAGE + 5] = b"ring!"
    m = a.grants.foreign_map(1, list(reversed(frames.refs)))
    assert bytes(m.mem[0:5]) == b"ring!"
    m.mem[PAGE : PAGE + 2] = b"ok"
    assert bytes(frames.mem[0:2]) == b"ok"
    a.grants.unmap(m)
    b.grants.free_frames(frames)


def test_only_dom0_maps_frames_and_only_existing_ones(pair: tuple[Any, Any]) -> None:
    a, b = pair
    frames = b.grants.alloc_frames(1)
    own = a.grants.alloc_frames(1)
    with pytest.raises(PlatformError) as denied:
        b.grants.foreign_map(0, own.refs)
    assert denied.value.errno == errno.EPERM
    with pytest.raises(MapError) as bad:
        a.grants.foreign_map(1, [frames.refs[0], 0x7FFFFFFF])
    assert (bad.value.index, bad.value.status) == (1, GntSt.bad_page)
    a.grants.free_frames(own)
    b.grants.free_frames(frames)


def test_freed_frames_stay_while_mapped_then_go(pair: tuple[Any, Any]) -> None:
    a, b = pair
    frames = b.grants.alloc_frames(1)
    frames.mem[0:4] = b"keep"
    gfn = frames.refs[0]
    m = a.grants.foreign_map(1, [gfn])
    b.grants.free_frames(frames)  # deferred: dom0 still maps it
    assert bytes(m.mem[0:4]) == b"keep"
    with pytest.raises(MapError):
        a.grants.foreign_map(1, [gfn])  # but it cannot be mapped anew
    a.grants.unmap(m)

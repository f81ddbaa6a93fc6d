"""The platform test suite in the real-Xen mode: :class:`~xenpv.platforms.xen.XenPlatform`
(cffi on ``libxengnttab.so.1`` / ``libxenevtchn.so.1``) driving the loopback emulator
through the replacement libraries, dom0 here and the other domains in child processes.

Every suite test (``tests/platform/test_suite_*.py``) runs here unchanged, except those
needing a feature libxengnttab's API cannot express (``xenmode.XEN_LIMITS``); for each of
those, a test below checks what the real-Xen platform does instead.
"""

from __future__ import annotations

import errno
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from xenpv.errors import PlatformError
from xenpv.platforms.base import UnmapNotify

SUITE_DIR = Path(__file__).resolve().parent.parent / "platform"
PAGE = 4096


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"xenmode_{name}", SUITE_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


xenmode = _load("xenmode")

#: suite test -> the XEN_LIMITS feature it needs
NEEDS = {
    "test_end_access_refused_while_mapped_and_page_not_reused": "strict_end_access",
    "test_hold_mapped_fault_makes_end_access_fail": "strict_end_access",
    "test_share_notify_fires_when_the_share_ends": "late_unmap_notify",
    "test_unmap_notify_clears_byte_and_signals_on_unmap": "multipage_unmap_notify",
}

for _suite in ("test_suite_grants", "test_suite_events"):
    _module = _load(_suite)
    for _name, _obj in vars(_module).items():
        if _name.startswith("test_") and callable(_obj):
            if NEEDS.get(_name) in xenmode.XEN_LIMITS:
                continue
            globals()[_name] = _obj
_bound_pair = _load("test_suite_grants")._bound_pair


@pytest.fixture(scope="module")
def machine_session() -> Iterator[Any]:
    """One real-Xen-mode machine (daemon + domain processes) for the module."""
    m = xenmode.xen_machine(max_grants=128, max_ports=32)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def machine(machine_session: Any) -> Iterator[Any]:
    """The machine; afterwards every platform is closed and nothing may be held."""
    yield machine_session
    machine_session.release()
    machine_session.assert_released()


def test_every_excluded_suite_test_exists_and_names_a_declared_limit() -> None:
    suite = {n for s in ("test_suite_grants", "test_suite_events") for n in vars(_load(s))}
    assert set(NEEDS) <= suite
    assert set(NEEDS.values()) == set(xenmode.XEN_LIMITS)


def test_end_access_while_mapped_defers_and_never_exposes_new_pages(machine: Any) -> None:
    # gntalloc semantics: ending a mapped share succeeds; the peer keeps the old page
    # until it unmaps, and later grants never reach it.
    a, b = machine.domain(0), machine.domain(1)
    pages = b.grants.grant(0, 1)
    m = a.grants.map(1, pages.refs)
    m.mem[0:6] = b"secret"
    b.grants.end_access(pages)
    fresh = b.grants.grant(0, 1)
    assert fresh.refs[0] != pages.refs[0]
    fresh.mem[0:6] = b"canary"
    assert bytes(m.mem[0:6]) == b"secret"
    assert machine.outstanding()["grants"] == 2  # the revoked one lives until unmapped
    a.grants.unmap(m)
    b.grants.end_access(fresh)


def test_hold_mapped_fault_defers_the_end_until_released(machine: Any) -> None:
    b = machine.domain(1)
    pages = b.grants.grant(0, 2)
    machine.hold_mapped(1, pages.refs[1])
    try:
        b.grants.end_access(pages)
        assert machine.outstanding()["grants"] == 1
    finally:
        machine.release_hold(1, pages.refs[1])


def test_unmap_notify_is_set_at_share_time_and_fires_when_the_share_ends(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pa, pb = _bound_pair(a, b)
    pages = b.grants.grant(0, 1, notify=UnmapNotify(3, clear_byte=True, port=pb))
    with pytest.raises(PlatformError) as info:
        b.grants.set_unmap_notify(pages, UnmapNotify(3, clear_byte=True, port=pb))
    assert info.value.errno == errno.EOPNOTSUPP
    b.grants.end_access(pages)
    assert a.events.pending(5) == pa


def test_single_page_map_notify_fires_and_multipage_is_refused(machine: Any) -> None:
    a, b = machine.domain(0), machine.domain(1)
    pa, pb = _bound_pair(a, b)
    pages = b.grants.grant(0, 2)
    with pytest.raises(PlatformError) as info:
        a.grants.map(1, pages.refs, notify=UnmapNotify(PAGE + 9, port=pa))
    assert info.value.errno == errno.EOPNOTSUPP
    m = a.grants.map(1, pages.refs[1:], notify=UnmapNotify(9, clear_byte=True, port=pa))
    m.mem[9:10] = b"\x01"
    assert b.events.pending(0) is None
    a.grants.unmap(m)
    assert b.events.pending(5) == pb
    assert bytes(pages.mem[PAGE + 9 : PAGE + 10]) == b"\x00"
    b.grants.end_access(pages)

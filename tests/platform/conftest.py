"""The platform test suite: one set of tests, run on every platform mode.

``MODES`` maps a mode name to a factory returning a *machine* (see
``xenpv.platforms.loopback.harness``): ``domain(domid)`` gives a platform acting as that
domain, plus ``kill``, ``hold_mapped``/``release_hold``, ``release`` and
``assert_released``.  Another mode is added by one registration line in ``MODES``; the
real-Xen platform on the emulator (through the replacement libraries) runs these same
tests from ``tests/interop/test_shim_platform_suite.py`` with ``xenmode.xen_machine``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xenpv.platforms.loopback.harness import DaemonMachine, InProcessMachine

# Small tables so that exhaustion tests are quick; every mode must honour these limits.
MAX_GRANTS = 128
MAX_PORTS = 32

MODES: dict[str, Callable[[], Any]] = {
    "inprocess": lambda: InProcessMachine(max_grants=MAX_GRANTS, max_ports=MAX_PORTS),
    "crossprocess": lambda: DaemonMachine(max_grants=MAX_GRANTS, max_ports=MAX_PORTS),
}


@pytest.fixture(scope="session", params=sorted(MODES))
def machine_session(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One machine per mode for the whole session (children are reused across tests)."""
    m = MODES[request.param]()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def machine(machine_session: Any) -> Iterator[Any]:
    """The mode's machine; after the test every platform is closed and the emulator
    must hold nothing any more (grants, mappings, ports, handles)."""
    yield machine_session
    machine_session.release()
    machine_session.assert_released()

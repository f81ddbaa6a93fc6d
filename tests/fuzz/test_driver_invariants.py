"""The invariants the device driver fuzz targets share (``xenpv.fuzz.xenbus_driver``) fire.

Each helper is given a breach and a clean case: an exception escaping the loop, a
frontend call that never ends or ends with an unexpected error, work that never settles,
a backend that keeps a mapping, grants held outside a frontend's quarantine; a hostile
guest's page pool revokes what it can.  A hostile key writer writes good values mostly, hostile ones else.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xenpv.errors import PeerError
from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.source import ByteSource
from xenpv.fuzz.xenbus_driver import (
    BE,
    FE,
    GuestPages,
    backend_let_go,
    calls_end,
    frontend_let_go,
    hostile_keys,
    no_escapes,
    settled,
)
from xenpv.platforms.loopback.harness import InProcessMachine


def test_loop_and_call_invariants() -> None:
    async def main() -> None:
        with no_escapes():
            asyncio.get_running_loop().call_soon(lambda: None)
            await asyncio.sleep(0)
        with pytest.raises(InvariantViolation, match=r"escaped the event loop.*ZeroDivision"):
            with no_escapes():
                asyncio.get_running_loop().call_soon(lambda: 1 // 0)
                await asyncio.sleep(0.01)

        async def fails(exc: BaseException) -> None:
            raise exc

        await calls_end([], (PeerError,))
        await calls_end([asyncio.ensure_future(fails(PeerError("x"))),
                         asyncio.ensure_future(asyncio.sleep(0))], (PeerError,))
        with pytest.raises(InvariantViolation, match=r"unexpected error.*KeyError"):
            await calls_end([asyncio.ensure_future(fails(KeyError("x")))], (PeerError,))
        never = asyncio.ensure_future(asyncio.Event().wait())
        with pytest.raises(InvariantViolation, match="1 frontend calls never ended"):
            await calls_end([never], (PeerError,), timeout=0.05)
        never.cancel()

        left = [3]

        def busy() -> bool:
            left[0] -= 1
            return left[0] > 0

        await settled(busy, lambda: "unused", 5.0)
        with pytest.raises(InvariantViolation, match=r"^the work was not done$"):
            await settled(lambda: True, lambda: "the work was not done", 0.05)

    asyncio.run(main())


class Quarantine(list[Any]):
    """A frontend's quarantine as the check sees it: its pages, and ``reap``."""

    def reap(self) -> None:
        """Nothing to reap here."""


class Frontend:
    def __init__(self, *held: Any) -> None:
        self.quarantine = Quarantine(held)


def test_teardown_invariants() -> None:
    machine = InProcessMachine()
    try:
        guest, backend = machine.domain(FE), machine.domain(BE)
        pages = GuestPages(guest, BE, 8)
        src = ByteSource(bytes(range(64)))
        refs = [pages.ref(src) for _ in range(8)]
        assert len(pages.shares) == 8 and any(r in pages.refs for r in refs)
        mapping = backend.grants.map(FE, pages.shares[0].refs)
        with pytest.raises(InvariantViolation, match="the backend left grants mapped"):
            backend_let_go(machine, pages)
        for _ in range(32):
            pages.revoke(src)  # never the mapped one
        assert pages.shares == [pages.shares[0]]
        backend.grants.unmap(mapping)
        backend_let_go(machine, pages)  # and ends it
        assert machine.outstanding()["grants"] == 0

        frontend_let_go(machine, Frontend())
        held = guest.grants.grant(BE, 1)
        with pytest.raises(InvariantViolation, match="left held after teardown"):
            frontend_let_go(machine, Frontend())
        frontend_let_go(machine, Frontend(held))  # a quarantined page may stay
        guest.grants.end_access(held)
    finally:
        machine.close()


def test_hostile_keys_write_good_values_mostly() -> None:
    class Client:
        def __init__(self) -> None:
            self.written: dict[str, str] = {}

        async def write(self, path: str, value: str) -> None:
            self.written[path] = value

    client = Client()
    choices = {f"k{i}": (["good"], ["bad"]) for i in range(64)}
    src = ByteSource(bytes(range(256)) * 4)
    asyncio.run(hostile_keys(client, "be", choices, src))  # type: ignore[arg-type]
    values = list(client.written.values())
    assert set(client.written) == {f"be/k{i}" for i in range(64)}
    assert 0 < values.count("bad") < values.count("good")

"""The hostile xenbus frontend against the asyncio backend driver (target ``xenbus:driver``)."""

from __future__ import annotations

from typing import Any

import pytest

from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.targets import get_target
from xenpv.fuzz.xenbus_driver import ToyBackend
from xenpv.xenbus import PeerKeys

#: good keys (op 3), then state Initialised (op 0, value index 3), then a pause (op 9)
CONNECTS = bytes([3, 0, 3, 9, 40])


class CountingBackend(ToyBackend):
    """The toy backend, counting its connects (to show the target reaches Connected)."""

    instances: list[CountingBackend] = []

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.connects = 0
        CountingBackend.instances.append(self)

    async def connect(self, frontend: PeerKeys) -> None:
        await super().connect(frontend)
        self.connects += 1


class LeakyBackend(ToyBackend):
    """A backend whose disconnect forgets to unmap the frontend's ring page."""

    async def disconnect(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            self.platform.events.unbind(port)
        self.mapping = None  # dropped without unmapping: the emulator still holds it


def test_honest_sequence_connects_and_everything_is_released() -> None:
    CountingBackend.instances.clear()
    get_target("xenbus:driver", CountingBackend)(CONNECTS)
    assert [b.connects for b in CountingBackend.instances] == [1]
    assert CountingBackend.instances[0].mapping is None  # closed and unmapped afterwards


def test_leaking_backend_is_caught() -> None:
    with pytest.raises(InvariantViolation, match="mapping"):
        get_target("xenbus:driver", LeakyBackend)(CONNECTS)


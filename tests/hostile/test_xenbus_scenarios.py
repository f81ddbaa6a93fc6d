"""Hostile-input scenarios 17-20 (hostile-inputs.md) against the xenbus drivers.

The hostile peer is a plain xenstore connection acting as the frontend domain (or a
backend that never moves), writing whatever it likes into its own directory; the driver
under test is the toy backend (or frontend) of the integration tests, on the embedded
xenstored and the in-process loopback emulator.  The rate limit of the xenstore server is
lifted where a scenario needs a fast peer.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_xenbus_support import (
    BE,
    FE,
    S,
    ToyBackend,
    ToyFrontend,
    World,
    both,
    eventually,
    run,
    toy_pair,
    xenstore_world,
)

from xenpv.xenbus.driver import WATCH_PENDING
from xenpv.xenstore.client import Perm
from xenpv.xenstore.store import Quotas
from xenpv.xenstore.wire import XsType

FAST = Quotas(write_rate=0)
BE_ERROR = f"/local/domain/{BE}/error/backend/toy/{FE}/0/error"
FE_ERROR = f"/local/domain/{FE}/error/device/toy/0/error"


async def hostile_backend_setup(
    w: World, close_timeout: float = 0.3
) -> tuple[ToyBackend, str, str]:
    """A device with a toy backend in InitWait and nobody driving the frontend."""
    fp, bp = await w.add()
    be = ToyBackend(w.be, bp, w.machine.domain(BE), close_timeout=close_timeout)
    await be.start()
    await be.wait_state(S.InitWait)
    return be, fp, bp


class HostileFrontend:
    """The frontend domain writing its directory by hand (with a real grant and port)."""

    def __init__(self, w: World, fp: str) -> None:
        self.w, self.fp = w, fp
        self.platform = w.machine.domain(FE)
        self.pages = self.platform.grants.grant(BE, 1)
        self.port = self.platform.events.alloc_unbound(BE)

    def good_keys(self) -> dict[str, str]:
        return {"ring-ref": str(self.pages.refs[0]), "event-channel": str(self.port)}

    async def write(self, **keys: str) -> None:
        for key, value in keys.items():
            await self.w.fe.write(f"{self.fp}/{key.replace('_', '-')}", value.encode())

    async def state(self, value: bytes) -> None:
        await self.w.fe.write(f"{self.fp}/state", value)


# ---------------------------------------------------------------- scenario 17


def test_scenario_17_dead_backend_never_leaves_initwait_connect_timeout() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            fp, bp = await w.add()
            await w.be.write(f"{bp}/state", b"2")  # the backend says InitWait, then nothing
            fe = ToyFrontend(w.fe, fp, w.machine.domain(FE), connect_timeout=0.5, close_timeout=0.3)
            await fe.start()
            await fe.wait_state(S.Closed, timeout=10)  # connect timeout, then forced close
            error = await w.read(FE_ERROR)
            assert error is not None and error.startswith(b"%d " % errno.ETIMEDOUT)
            assert fe.stats["timeouts"] == 2
            await fe.close()
            assert fe.done
            assert w.machine.outstanding()["grants"] == 0

    run(main())


def test_scenario_17_backend_dies_holding_the_grant_close_completes_and_quarantines() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            fp, bp = await w.add()
            fe, be = toy_pair(w, fp, bp, close_timeout=0.3)
            await be.start()
            await fe.start()
            await both(fe.wait_state(S.Connected), be.wait_state(S.Connected))
            ref = fe.pages.refs[0]
            w.machine.hold_mapped(FE, ref)  # the dead backend's mapping stays
            await be.abort()  # dies without any handshake
            async with asyncio.timeout(5):
                await fe.close()  # completes without the peer
            assert fe.done and fe.state is S.Closed
            assert len(fe.quarantine) == 1  # not freed, not reused (scenario 13)
            w.machine.release_hold(FE, ref)
            fe.retry_quarantine()
            assert fe.quarantine == [] and w.machine.outstanding()["grants"] == 0

    run(main())


# ---------------------------------------------------------------- scenario 18

BAD_KEYS = {
    "ring-ref-abc": ({"ring_ref": "abc"}, errno.EINVAL),
    "ring-ref-negative": ({"ring_ref": "-1"}, errno.EINVAL),
    "ring-ref-2^40": ({"ring_ref": str(2**40)}, errno.EINVAL),
    "ring-ref-reserved": ({"ring_ref": "3"}, errno.ERANGE),
    "ring-ref-not-granted": ({"ring_ref": "4000"}, errno.EINVAL),
    "event-channel-zero": ({"event_channel": "0"}, errno.ERANGE),
    "event-channel-out-of-range": ({"event_channel": "999999"}, errno.ERANGE),
    "event-channel-unbound": ({"event_channel": "30"}, errno.EINVAL),
    "ring-page-order-above-max": ({"ring_page_order": "5"}, errno.ERANGE),
    "ring-page-order-garbage": ({"ring_page_order": "1x"}, errno.EINVAL),
    "num-queues-zero": ({"multi_queue_num_queues": "0"}, errno.ERANGE),
    "num-queues-above-max": ({"multi_queue_num_queues": "2"}, errno.ERANGE),
    "protocol-unknown": ({"protocol": "x86_16-abi"}, errno.EINVAL),
    "feature-garbage": ({"feature_persistent": "yes"}, errno.EINVAL),
}


@pytest.mark.parametrize("case", BAD_KEYS)
def test_scenario_18_bad_connect_time_keys_are_refused(case: str) -> None:
    override, err = BAD_KEYS[case]

    async def main() -> None:
        async with xenstore_world() as w:
            be, fp, bp = await hostile_backend_setup(w)
            peer = HostileFrontend(w, fp)
            await peer.write(**{**peer.good_keys(), **override})
            await peer.state(b"3")
            await eventually(lambda: be.state is S.Closing)
            assert await w.read(f"{bp}/state") == b"5"
            error = await w.read(BE_ERROR)
            assert error is not None and error.startswith(b"%d " % err), error
            assert be.misbehaving and be.stats["peer_errors"] >= 1
            # nothing stays allocated for the refused frontend
            assert be.mapping is None and be.port is None
            assert w.machine.outstanding()["mappings"] == 0
            # the frontend closes: the backend follows to Closed
            await peer.state(b"6")
            await be.wait_state(S.Closed)
            await be.close()

    run(main())


# ---------------------------------------------------------------- scenario 19


def test_scenario_19_state_cycling_at_high_rate_leaks_nothing() -> None:
    async def main() -> None:
        async with xenstore_world(FAST) as w:
            be, fp, _bp = await hostile_backend_setup(w)
            peer = HostileFrontend(w, fp)
            await peer.write(**peer.good_keys())
            for _round in range(3):
                for _ in range(100):  # Initialising -> Connected -> Closed -> Connected
                    for value in (b"1", b"4", b"6", b"4"):
                        await peer.state(value)
                await peer.state(b"6")
                await eventually(lambda: be.state is S.Closed and be.mapping is None)
                assert be.port is None
                assert w.machine.outstanding()["mappings"] == 0  # leak counter back to 0
                assert not be.done and be.connects == be.disconnects
            # an honest reconnect still works afterwards
            await peer.state(b"1")
            await be.wait_state(S.InitWait)
            await peer.state(b"3")
            await be.wait_state(S.Connected)
            assert be.mapping is not None and w.machine.outstanding()["mappings"] == 1
            await peer.state(b"6")
            await be.wait_state(S.Closed)
            assert w.machine.outstanding()["mappings"] == 0
            await be.close()

    run(main())


def test_scenario_19_connected_before_the_ring_is_published() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            be, fp, _ = await hostile_backend_setup(w)
            await HostileFrontend(w, fp).state(b"4")
            await eventually(lambda: be.state is S.Closing)
            assert (await w.read(BE_ERROR) or b"").startswith(b"%d " % errno.ENOENT)
            assert be.misbehaving and be.mapping is None
            await be.close()

    run(main())


@pytest.mark.parametrize("value", [b"99", b"-1", b"\xff\xfe", b"4" * 2048, b""])
def test_scenario_19_invalid_state_value_answers_closing(value: bytes) -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            be, fp, _ = await hostile_backend_setup(w, close_timeout=3.0)
            peer = HostileFrontend(w, fp)
            await peer.state(value)
            await eventually(lambda: be.state is S.Closing)
            assert (await w.read(BE_ERROR) or b"").startswith(b"22 invalid xenbus state")
            assert be.misbehaving
            assert be.machine is not None
            writes, seen = be.stats["writes"], be.machine.peer_errors
            await w.dom0.rm(BE_ERROR)
            await peer.state(b"77")  # more garbage while closing: counted, not rewritten
            await eventually(lambda: be.machine is not None and be.machine.peer_errors > seen)
            assert be.state is S.Closing and be.stats["writes"] == writes
            assert await w.read(BE_ERROR) is None
            await peer.state(b"6")
            await be.wait_state(S.Closed)
            await be.close()

    run(main())


def test_scenario_19_invalid_transition_from_the_backend_side() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            be, fp, _bp = await hostile_backend_setup(w)
            await HostileFrontend(w, fp).state(b"7")  # Reconfiguring: not for this device
            await eventually(lambda: be.state is S.Closing)
            assert b"frontend state Reconfiguring not allowed" in (await w.read(BE_ERROR) or b"")
            await be.close()

    run(main())


# ---------------------------------------------------------------- scenario 20


def test_scenario_20_state_flood_keeps_queues_bounded() -> None:
    async def main() -> None:
        async with xenstore_world(FAST) as w:
            be, fp, _bp = await hostile_backend_setup(w)
            peer = HostileFrontend(w, fp)
            payload = f"{fp}/state".encode() + b"\0"
            pending: list[int] = []
            queued: list[int] = []
            for batch in range(100):  # 10^5 writes, pipelined 1000 at a time
                value = b"1" if batch % 2 else b"2" if batch == 50 else b"1"
                futs = [w.fe.submit(XsType.WRITE, payload + value) for _ in range(1000)]
                await asyncio.gather(*futs)
                pending += [watch.pending for watch in be._watches]
                queued.append(w.server.queued_events(BE))
            assert max(pending) <= WATCH_PENDING
            assert max(queued) <= FAST.watch_events
            # the batch of InitWait writes mid-flood was a peer error; "1" is a no-op
            await eventually(lambda: be.state is S.Closing)
            # still responsive: the frontend closes, reconnects and connects properly
            await peer.state(b"6")
            await be.wait_state(S.Closed)
            await peer.write(**peer.good_keys())
            await peer.state(b"1")
            await be.wait_state(S.InitWait)
            await peer.state(b"3")
            await be.wait_state(S.Connected)
            await peer.state(b"6")
            await be.wait_state(S.Closed)
            assert w.machine.outstanding()["mappings"] == 0
            await be.close()

    run(main(), 120)


def test_scenario_19_state_node_made_unreadable_is_a_peer_error() -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            be, fp, _ = await hostile_backend_setup(w)
            await w.fe.set_perms(f"{fp}/state", [Perm("n", FE)])  # the frontend hides it
            await w.fe.write(f"{fp}/state", b"3")
            await eventually(lambda: be.state is S.Closing)
            assert b"peer state unreadable: EACCES" in (await w.read(BE_ERROR) or b"")
            assert be.misbehaving and be.mapping is None
            await be.close()

    run(main())


@pytest.mark.parametrize(("value", "text"), [(b"3", b"backend state Initialised"),
                                             (b"99", b"invalid xenbus state")])  # fmt: skip
def test_scenario_19_mirror_hostile_backend_state_closes_the_frontend(
    value: bytes, text: bytes
) -> None:
    async def main() -> None:
        async with xenstore_world() as w:
            fp, bp = await w.add()
            fe = ToyFrontend(w.fe, fp, w.machine.domain(FE), close_timeout=0.3)
            await fe.start()
            await w.be.write(f"{bp}/state", b"2")
            await fe.wait_state(S.Initialised)
            await w.be.write(f"{bp}/state", value)
            await fe.wait_state(S.Closing, S.Closed)
            assert text in (await w.read(FE_ERROR) or b"")
            assert fe.misbehaving
            await fe.close()
            assert fe.state is S.Closed and w.machine.outstanding()["grants"] == 0

    run(main())

"""The request-ring base end to end: ring channels, the ring service and its client.

A small block-style protocol (blkif's x86_64 request header and response, 112-byte
slots) runs over the loopback emulator: the frontend grants the ring pages and writes
the keys (single ring, multi-page, multi-queue), the backend parses them strictly, maps
and binds, and a sans-IO test handler answers — some requests at once, the others later
and in reverse order.  In process (one loop, both domains) and across processes (the
backend is this file run as a program on the loopback daemon).  Hostile indexes end the
service with a peer error; teardown leaves nothing held in the emulator.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from collections.abc import Iterable
from typing import Any

import pytest

from xenpv.drivers import (
    BackChannel,
    FrontChannel,
    RingClient,
    RingPlacement,
    RingService,
    front_keys,
    read_ring_keys,
)
from xenpv.drivers.ringchannel import RingChannelPeerError
from xenpv.errors import PeerError
from xenpv.platforms.base import Platform, XenstoreClient
from xenpv.testing.vchan import InProcessVchanLab, VchanLab, read_line
from xenpv.xenbus.driver import PeerKeys

FE, BE = 1, 2
SLOT = 112  # blkif_request (x86_64) is the larger of the two entries
#: blkif_request header: operation, nr_segments, handle, (pad), id, sector_number
REQ = struct.Struct("<BBHxxxxQQ")
#: blkif_response: id, operation, (pad), status, (tail pad)
RSP = struct.Struct("<QBxhxxxx")
WAIT = 20.0


def request(rid: int, sector: int) -> bytes:
    return REQ.pack(0, 0, 0, rid, sector)


def status_for(sector: int) -> int:
    return sector % 1000


class Disk:
    """Answers a request with ``status = sector % 1000``; odd ids are held back (with
    ``defer``) and answered later by :meth:`release_held`, in reverse order."""

    def __init__(self, defer: bool = False) -> None:
        self.defer = defer
        self.held: list[bytes] = []
        self.seen = 0

    def handle(self, batch: memoryview, count: int) -> Iterable[bytes]:
        ready = []
        for j in range(count):
            op, _nseg, _handle, rid, sector = REQ.unpack_from(batch, j * SLOT)
            rsp = RSP.pack(rid, op, status_for(sector))
            (self.held if self.defer and rid % 2 else ready).append(rsp)
        self.seen += count
        return ready

    def release_held(self) -> list[bytes]:
        held, self.held = self.held[::-1], []
        return held


class Collector:
    """Frontend side: the responses received, by id."""

    def __init__(self, expect: int) -> None:
        self.got: dict[int, int] = {}
        self.order: list[int] = []
        self.expect = expect
        self.done = asyncio.Event()

    def __call__(self, batch: memoryview, count: int) -> None:
        for j in range(count):
            rid, _op, status = RSP.unpack_from(batch, j * SLOT)
            assert rid not in self.got, f"response {rid} twice"
            self.got[rid] = status
            self.order.append(rid)
        if len(self.got) >= self.expect:
            self.done.set()


async def publish(xs: XenstoreClient, path: str, keys: dict[str, str]) -> None:
    """Frontend: a directory the backend may read, with the ring keys (one transaction)."""
    await xs.write(path, "")
    await xs.set_perms(path, [f"n{FE}", f"r{BE}"])

    async def body(t: Any) -> None:
        for k, v in keys.items():
            await t.write(f"{path}/{k}", v)

    await xs.transact(body)


async def submit_all(client: RingClient, reqs: list[bytes]) -> None:
    """Submit ``reqs`` as room allows (the ring may be smaller than the load)."""
    pos = 0
    while pos < len(reqs):
        pos += client.submit(reqs[pos : pos + 50])
        await asyncio.sleep(0)


async def answer_held_later(services: list[RingService], disks: list[Disk]) -> None:
    """The held (odd) requests are answered later, in reverse order, every few ms."""
    while True:
        await asyncio.sleep(0.002)
        for s, d in zip(services, disks, strict=True):
            if d.held:
                s.respond(d.release_held())


async def run_frontend(front: Platform, *, path: str, order: int, queues: int, per_queue: int,
                       xs: XenstoreClient) -> tuple[list[FrontChannel], list[RingClient],
                                                    list[Collector]]:
    channels = [FrontChannel.create(front, BE, slot_size=SLOT, order=order)
                for _ in range(queues)]
    await publish(xs, path, front_keys(channels))
    collectors = [Collector(per_queue) for _ in range(queues)]
    clients = [RingClient(c, col) for c, col in zip(channels, collectors, strict=True)]
    for cl in clients:
        cl.start()
    return channels, clients, collectors


async def attach_backend(back: Platform, xs: XenstoreClient, path: str, *, max_order: int,
                         max_queues: int) -> list[BackChannel]:
    placements = await read_ring_keys(PeerKeys(xs, path), max_order=max_order,
                                      max_queues=max_queues)
    channels: list[BackChannel] = []
    try:
        for pl in placements:
            channels.append(BackChannel.attach(back, FE, pl, slot_size=SLOT))
    except BaseException:
        for c in channels:
            c.close()
        raise
    return channels


@pytest.fixture
def lab() -> Any:
    with InProcessVchanLab((FE, BE)) as lab:
        yield lab


@pytest.mark.parametrize(("order", "queues"), [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (0, 3), (2, 2)])
def test_requests_answered_in_process(lab: InProcessVchanLab, order: int, queues: int) -> None:
    """Every layout: all requests answered, odd ones later and out of order; nothing held
    afterwards."""
    front, back = lab.platform(FE), lab.platform(BE)
    per_queue = 300

    async def body() -> None:
        xs_f, xs_b = await front.xenstore(), await back.xenstore()
        path = f"/local/domain/{FE}/data/ring-{order}-{queues}"
        try:
            fchans, clients, cols = await run_frontend(front, path=path, order=order,
                                                       queues=queues, per_queue=per_queue,
                                                       xs=xs_f)
            keys = sorted(await xs_b.directory(path))
            if queues > 1:
                assert "multi-queue-num-queues" in keys and "event-channel" not in keys
            elif order:
                assert f"ring-ref{(1 << order) - 1}" in keys and "ring-ref" not in keys
            else:
                assert "ring-ref" in keys and "ring-page-order" not in keys
            bchans = await attach_backend(back, xs_b, path, max_order=4, max_queues=4)
            assert [c.order for c in bchans] == [order] * queues
            disks = [Disk(defer=True) for _ in bchans]
            services = [RingService(c, d) for c, d in zip(bchans, disks, strict=True)]
            for s in services:
                s.start()
            releaser = asyncio.create_task(answer_held_later(services, disks))
            for q, cl in enumerate(clients):
                await submit_all(cl, [request(q * 10000 + i, 7 * i + q)
                                      for i in range(per_queue)])
            for col in cols:
                await asyncio.wait_for(col.done.wait(), WAIT)
            releaser.cancel()
            for q, col in enumerate(cols):
                await asyncio.wait_for(col.done.wait(), WAIT)
                assert col.got == {q * 10000 + i: status_for(7 * i + q)
                                   for i in range(per_queue)}
                assert col.order != sorted(col.order)  # some came out of order
            for s in services:
                st = s.stats
                assert st["requests"] == per_queue and st["responses"] == per_queue
                assert st["peer_errors"] == 0 and s.pending == 0
                assert st["notifications_sent"] >= 1
            for cl in clients:
                assert cl.stats["responses"] == per_queue
            for s in services:
                s.stop()
            for c in bchans:
                c.close()
            for cl in clients:
                cl.stop()
            for c in fchans:
                c.close()
                assert len(c.quarantine) == 0
        finally:
            await xs_f.close()
            await xs_b.close()

    asyncio.run(body())
    lab.assert_released()


def test_hostile_request_index_is_a_peer_error_not_an_exception(lab: InProcessVchanLab) -> None:
    """A frontend that writes ``req_prod`` beyond the ring ends the service with a peer
    error (counted); the loop keeps running and teardown releases everything."""
    front, back = lab.platform(FE), lab.platform(BE)

    async def body() -> None:
        fch = FrontChannel.create(front, BE, slot_size=SLOT, order=0)
        bch = BackChannel.attach(back, FE, RingPlacement(fch.refs, fch.port), slot_size=SLOT)
        service = RingService(bch, Disk())
        service.start()
        mem = fch.res.shares[0].mem
        struct.pack_into("<I", mem, 0, fch.ring.nr_ents + 5)  # req_prod far ahead
        front.events.notify(fch.port)
        err = await asyncio.wait_for(service.wait_stopped(), WAIT)
        assert isinstance(err, PeerError)
        assert service.stats["peer_errors"] == 1 and not service.running
        info = service.info()
        assert info["error"] == str(err) and info["running"] == 0 and info["slots"] == 32
        await asyncio.sleep(0.01)  # the loop is alive
        bch.close()
        fch.close()

    asyncio.run(body())
    lab.assert_released()


def test_hostile_response_index_is_a_peer_error_for_the_client(lab: InProcessVchanLab) -> None:
    """A backend that writes ``rsp_prod`` beyond what was requested ends the frontend's
    client with a peer error, not an exception."""
    front, back = lab.platform(FE), lab.platform(BE)

    async def body() -> None:
        fch = FrontChannel.create(front, BE, slot_size=SLOT, order=0)
        bch = BackChannel.attach(back, FE, RingPlacement(fch.refs, fch.port), slot_size=SLOT)
        client = RingClient(fch, Collector(1))
        client.start()
        assert client.submit([request(1, 1)]) == 1
        struct.pack_into("<I", bch.res.mappings[0].mem, 8, 1000)  # rsp_prod far ahead
        back.events.notify(bch.port)
        err = await asyncio.wait_for(client.wait_stopped(), WAIT)
        assert isinstance(err, PeerError) and client.stats["peer_errors"] == 1
        bch.close()
        fch.close()

    asyncio.run(body())
    lab.assert_released()


def test_event_storm_costs_spurious_wakeups_and_service_goes_on(
        lab: InProcessVchanLab) -> None:
    """Thousands of notifications with no request: each wake-up finds nothing (counted as
    spurious), and real requests sent afterwards are still answered."""
    front, back = lab.platform(FE), lab.platform(BE)

    async def body() -> None:
        fch = FrontChannel.create(front, BE, slot_size=SLOT, order=0)
        bch = BackChannel.attach(back, FE, RingPlacement(fch.refs, fch.port), slot_size=SLOT)
        service = RingService(bch, Disk())
        service.start()
        for i in range(5000):
            front.events.notify(fch.port)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert service.stats["spurious_wakeups"] >= 1
        assert service.stats["requests"] == 0 and service.running
        col = Collector(20)
        client = RingClient(fch, col)
        client.start()
        client.submit([request(i, i) for i in range(20)])
        await asyncio.wait_for(col.done.wait(), WAIT)
        assert col.got == {i: status_for(i) for i in range(20)}
        client.stop()
        service.stop()
        bch.close()
        fch.close()

    asyncio.run(body())
    lab.assert_released()


def test_hostile_keys_are_refused_before_mapping(lab: InProcessVchanLab) -> None:
    """A ring-page-order beyond the advertised maximum, a queue count beyond it, or a ref
    that is not granted: a peer error, and nothing stays mapped or bound."""
    front, back = lab.platform(FE), lab.platform(BE)

    async def body() -> None:
        xs_f, xs_b = await front.xenstore(), await back.xenstore()
        try:
            base = f"/local/domain/{FE}/data"
            cases = {
                "order": {"ring-page-order": "9", "ring-ref0": "8", "event-channel": "5"},
                "queues": {"multi-queue-num-queues": "99", "queue-0/ring-ref": "8"},
                "text": {"ring-ref": "08", "event-channel": "5"},
            }
            for name, keys in cases.items():
                await publish(xs_f, f"{base}/{name}", keys)
                with pytest.raises(PeerError):
                    await read_ring_keys(PeerKeys(xs_b, f"{base}/{name}"), max_order=2,
                                         max_queues=4)
            fch = FrontChannel.create(front, BE, slot_size=SLOT)
            with pytest.raises(RingChannelPeerError):  # a ref nobody granted
                BackChannel.attach(back, FE, RingPlacement((fch.refs[0] + 100,), fch.port),
                                   slot_size=SLOT)
            with pytest.raises(RingChannelPeerError):  # a port not offered to us
                BackChannel.attach(back, FE, RingPlacement(fch.refs, fch.port + 50),
                                   slot_size=SLOT)
            with pytest.raises(RingChannelPeerError):  # three pages is no ring
                BackChannel.attach(back, FE, RingPlacement((8, 9, 10), fch.port),
                                   slot_size=SLOT)
            fch.close()
        finally:
            await xs_f.close()
            await xs_b.close()

    asyncio.run(body())
    lab.assert_released()


def test_frontend_closing_first_quarantines_until_the_backend_unmaps(
        lab: InProcessVchanLab) -> None:
    """The frontend ends its ring while the backend still maps it: the pages go to the
    channel's quarantine (not reused) and are ended once the backend lets go."""
    front, back = lab.platform(FE), lab.platform(BE)

    async def body() -> None:
        fch = FrontChannel.create(front, BE, slot_size=SLOT, order=1)
        bch = BackChannel.attach(back, FE, RingPlacement(fch.refs, fch.port), slot_size=SLOT)
        fch.close()
        assert len(fch.quarantine) == 1
        assert fch.quarantine.reap() == 1  # still mapped
        bch.close()
        assert await fch.quarantine.drain(WAIT)

    asyncio.run(body())
    lab.assert_released()


# --------------------------------------------------------------------------- processes


def test_requests_answered_across_processes() -> None:
    """The backend in its own process on the loopback daemon: multi-queue, multi-page,
    out-of-order answers; its counters come back as JSON; nothing held afterwards."""
    order, queues, per_queue = 2, 2, 500
    with VchanLab((FE, BE)) as lab:
        front = lab.platform(FE)
        path = f"/local/domain/{FE}/data/ring"

        async def body() -> dict[str, Any]:
            xs = await front.xenstore()
            try:
                fchans, clients, cols = await run_frontend(
                    front, path=path, order=order, queues=queues, per_queue=per_queue, xs=xs)
                proc = lab.spawn(BE, [sys.executable, __file__, "backend", path, str(order),
                                      str(queues)], stdin=-1, stdout=-1, bufsize=0)
                assert read_line(proc, WAIT) == "ready"
                for q, cl in enumerate(clients):
                    await submit_all(cl, [request(q * 10000 + i, 3 * i + q)
                                          for i in range(per_queue)])
                for q, col in enumerate(cols):
                    await asyncio.wait_for(col.done.wait(), WAIT)
                    assert col.got == {q * 10000 + i: status_for(3 * i + q)
                                       for i in range(per_queue)}
                assert proc.stdin is not None
                proc.stdin.close()  # the backend stops, reports and unmaps
                report: dict[str, Any] = json.loads(read_line(proc, WAIT))
                assert proc.wait(WAIT) == 0
                for cl in clients:
                    cl.stop()
                for c in fchans:
                    c.close()
                    assert await c.quarantine.drain(WAIT)
                return report
            finally:
                await xs.close()

        report = asyncio.run(body())
        assert [s["requests"] for s in report["stats"]] == [per_queue] * queues
        assert [s["responses"] for s in report["stats"]] == [per_queue] * queues
        assert all(s["peer_errors"] == 0 for s in report["stats"])
        lab.platforms.remove(front)
        front.close()
        lab.assert_released()


async def backend_main(path: str, order: int, queues: int) -> None:
    """The backend program: attach, serve (odd ids answered later), stop on stdin EOF."""
    from xenpv.platforms.loopback.client import ClientPlatform

    platform = ClientPlatform()
    xs = await platform.xenstore()
    try:
        chans = await attach_backend(platform, xs, path, max_order=order, max_queues=queues)
        disks = [Disk(defer=True) for _ in chans]
        services = [RingService(c, d) for c, d in zip(chans, disks, strict=True)]
        for s in services:
            s.start()
        print("ready", flush=True)
        releaser = asyncio.create_task(answer_held_later(services, disks))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
        releaser.cancel()
        print(json.dumps({"stats": [s.stats for s in services]}), flush=True)
        for s in services:
            s.stop()
        for c in chans:
            c.close()
    finally:
        await xs.close()
        platform.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["backend"]:
        asyncio.run(backend_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))

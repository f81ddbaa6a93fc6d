"""hostile-inputs.md blkif scenarios against the real block drivers.

Hostile frontends (1-5, 8, 9, 29) meet the real backend request handler and ring service
(:class:`~xenpv.backends.block.BlockRequests`) through a raw ring on the in-process
emulator (:class:`Rig`), or the whole backend driver through xenstore (18, 19, 29 and
the fail-closed path of 1).  Hostile backends (11-14, 16, 17) meet the real frontend
(:class:`~xenpv.frontends.block.BlockFrontend`) through our backend with its answers
tampered with.  Every test checks the image was not written where it must not be, and
that nothing is left held in the emulator.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_block_support import (
    BE,
    FE,
    NOTHING,
    VDEV,
    S,
    World,
    block_world,
    make_image,
    run,
    start_pair,
)

from xenpv.backends.block import BlockConfig, BlockImage
from xenpv.drivers import FrontChannel, RingClient
from xenpv.frontends.block import BlockError, BlockPeerError, FrontConfig
from xenpv.fuzz.block_driver import serve_raw_ring
from xenpv.platforms.base import SharedPages
from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.protocols.blkif import (
    ABI,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    Segment,
    layouts,
    pack_indirect_pages,
)
from xenpv.xenbus import add_device

MiB = 1 << 20
SECTORS = MiB // 512
WAIT = 10.0


class Rig:
    """A raw frontend ring (the attacker) and the real backend handler on one image."""

    def __init__(self, tmp: Path, *, abi: ABI = ABI.X86_64, persistent: bool = False,
                 config: BlockConfig | None = None, readonly: bool = False) -> None:
        self.m = InProcessMachine(max_grants=2048, max_ports=32)
        self.fe, self.be = self.m.domain(FE), self.m.domain(BE)
        self.path = tmp / "disk.img"
        self.data = make_image(self.path, MiB)
        self.abi = abi
        self.slot = layouts(abi).ring.slot_size
        self.config = config or BlockConfig()
        self.readonly = readonly
        self.persistent = persistent
        self.shares: list[SharedPages] = []
        self.got: dict[int, tuple[int, int]] = {}
        self.arrived = asyncio.Event()
        self.rsp = struct.Struct("<QBxh")

    async def start(self) -> Rig:
        self.image = BlockImage(str(self.path), readonly=self.readonly,
                                sector_size=self.config.sector_size)
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        self.ch, self.bch, self.pg, self.handler, self.service = serve_raw_ring(
            self.fe, self.be, self.image, self.abi, self.config,
            persistent_pages=64 if self.persistent else 0, executor=self.pool)
        self.client = RingClient(self.ch, self._on)
        self.client.start()
        return self

    def _on(self, batch: memoryview, count: int) -> None:
        for j in range(count):
            rid, op, status = self.rsp.unpack_from(batch, j * self.slot)
            self.got[rid] = (op, status)
        self.arrived.set()

    def grant(self, pages: int = 1, *, writable: bool = True, fill: bytes = b"") -> SharedPages:
        sh = self.fe.grants.grant(BE, pages, writable=writable)
        sh.mem[: len(fill)] = fill
        self.shares.append(sh)
        return sh

    def rw(self, op: int, rid: int, sector: int, segs: list[Segment], nr: int | None = None
           ) -> bytes:
        return BlkifRequest(op, len(segs) if nr is None else nr, 0, rid, sector,
                            tuple(segs[:11])).pack(self.abi)

    async def send(self, *reqs: bytes) -> list[int]:
        """Submit ``reqs`` (ids must be distinct) and wait for every answer's status."""
        ids = [struct.unpack_from("<Q", r, 8 if self.slot == 112 else 4)[0] for r in reqs]
        for rid in ids:
            self.got.pop(rid, None)
        assert self.client.submit(list(reqs)) == len(reqs)
        async with asyncio.timeout(WAIT):
            while not all(rid in self.got for rid in ids):
                self.arrived.clear()
                await self.arrived.wait()
        return [self.got[rid][1] for rid in ids]

    def image_unchanged(self) -> bool:
        return self.path.read_bytes() == self.data

    async def close(self) -> None:
        self.service.stop()
        await self.handler.drain()
        if self.pg is not None:
            self.pg.release()
        self.bch.close()
        self.client.stop()
        self.ch.close()
        for sh in self.shares:
            self.fe.grants.end_access(sh)
        self.pool.shutdown()
        self.image.close()
        out = self.m.outstanding()
        assert {k: out[k] for k in ("grants", "mappings", "ports")} == NOTHING
        self.m.close()


async def rig(tmp: Path, **kw: Any) -> Rig:
    return await Rig(tmp, **kw).start()


def set_req_prod(r: Rig, value: int) -> None:
    """The hostile frontend writes ``req_prod`` (offset 0 of the shared ring) and kicks."""
    struct.pack_into("<I", r.ch.res.shares[0].mem, 0, value & 0xFFFFFFFF)
    r.fe.events.notify(r.ch.port)


# ------------------------------------------------------------------ hostile frontends


@pytest.mark.parametrize("claim", [33, 1 << 31, 0xFFFFFFFF])
def test_scenario_01_req_prod_beyond_ring_stops_the_queue(tmp_path: Path, claim: int) -> None:
    async def body() -> None:
        r = await rig(tmp_path)
        set_req_prod(r, claim)
        err = await asyncio.wait_for(r.service.wait_stopped(), WAIT)
        assert err is not None and r.service.stats["peer_errors"] == 1
        assert r.handler.stats["reads"] + r.handler.stats["writes"] == 0
        assert r.image_unchanged()
        await r.close()

    run(body())


def test_scenario_01_ring_broken_while_io_is_in_flight(tmp_path: Path) -> None:
    """Answers of I/O that completes after the frontend broke the ring are dropped; nothing
    escapes the event loop (found by the blkback:driver fuzz target)."""
    import threading

    async def body() -> None:
        escaped: list[object] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: escaped.append(ctx))
        r = await rig(tmp_path, config=BlockConfig(engine="threads"))
        gate = threading.Event()
        for _ in range(2):  # both I/O threads busy until the gate opens
            r.pool.submit(gate.wait, WAIT)
        page = r.grant()
        r.client.submit([r.rw(BLKIF_OP_READ, 1, 0, [Segment(page.refs[0], 0, 7)])])
        async with asyncio.timeout(WAIT):
            while r.handler.inflight == 0:
                await asyncio.sleep(0.005)
        set_req_prod(r, 1 << 31)
        assert await asyncio.wait_for(r.service.wait_stopped(), WAIT) is not None
        gate.set()
        async with asyncio.timeout(WAIT):
            while r.handler.inflight:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert escaped == []
        await r.close()

    run(body())


def test_scenario_02_req_prod_backwards_stops_the_queue(tmp_path: Path) -> None:
    async def body() -> None:
        r = await rig(tmp_path)
        page = r.grant()
        assert await r.send(r.rw(BLKIF_OP_READ, 1, 0, [Segment(page.refs[0], 0, 7)])) == [0]
        set_req_prod(r, 0xFFFFFFF0)  # behind req_cons (1): "available" is huge
        assert await asyncio.wait_for(r.service.wait_stopped(), WAIT) is not None
        await r.close()

    run(body())


def test_scenario_03_slot_rewritten_after_take_is_not_seen(tmp_path: Path) -> None:
    """The frontend rewrites every slot the moment the backend has taken it: the backend
    serves the request it copied (its private copy), not the new bytes."""
    async def body() -> None:
        r = await rig(tmp_path)
        page = r.grant()
        real = r.handler.handle

        def racing(batch: memoryview, count: int) -> list[bytes]:
            ring = r.ch.res.shares[0].mem
            for k in range(32):  # every slot: operation 99, 200 segments, sector far away
                off = 64 + k * r.slot
                ring[off:off + 2] = bytes([99, 200])
                struct.pack_into("<Q", ring, off + 16, 1 << 40)
            return real(batch, count)

        r.handler.handle = racing  # type: ignore[method-assign]
        seg = [Segment(page.refs[0], 0, 7)]
        assert await r.send(r.rw(BLKIF_OP_READ, 5, 8, seg)) == [BLKIF_RSP_OKAY]
        assert bytes(page.mem[:4096]) == r.data[4096:8192]
        await r.close()

    run(body())


BAD_REQUESTS = {
    "read-0-segments": lambda r, g: r.rw(BLKIF_OP_READ, 1, 0, [], nr=0),
    "read-12-segments": lambda r, g: r.rw(BLKIF_OP_WRITE, 1, 0, [Segment(g, 0, 7)] * 11, nr=12),
    "first-after-last": lambda r, g: r.rw(BLKIF_OP_WRITE, 1, 0, [Segment(g, 5, 2)]),
    "last-sect-8": lambda r, g: r.rw(BLKIF_OP_WRITE, 1, 0, [Segment(g, 0, 8)]),
    "beyond-disk": lambda r, g: r.rw(BLKIF_OP_WRITE, 1, SECTORS - 4, [Segment(g, 0, 7)]),
    "sector-2^63": lambda r, g: r.rw(BLKIF_OP_WRITE, 1, 1 << 63, [Segment(g, 0, 0)]),
    "discard-beyond": lambda r, g: BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 0, 1, SECTORS - 1,
                                                       2).pack(r.abi),
    "discard-flag-2": lambda r, g: BlkifRequestDiscard(BLKIF_OP_DISCARD, 2, 0, 1, 0,
                                                       8).pack(r.abi),
    "discard-0": lambda r, g: BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 0, 1, 0, 0).pack(r.abi),
    "indirect-0": lambda r, g: BlkifRequestIndirect(BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, 0, 1,
                                                    0, 0, (g,) + (0,) * 7).pack(r.abi),
    "indirect-over-max": lambda r, g: BlkifRequestIndirect(
        BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, 257, 1, 0, 0, (g,) + (0,) * 7).pack(r.abi),
    "indirect-op-flush": lambda r, g: BlkifRequestIndirect(
        BLKIF_OP_INDIRECT, BLKIF_OP_FLUSH_DISKCACHE, 1, 1, 0, 0, (g,) + (0,) * 7).pack(r.abi),
}


@pytest.mark.parametrize("abi", [ABI.X86_64, ABI.X86_32])
@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_scenario_04_out_of_range_requests_get_error(tmp_path: Path, kind: str,
                                                     abi: ABI) -> None:
    async def body() -> None:
        r = await rig(tmp_path, abi=abi)
        page = r.grant(fill=b"\xee" * 4096)
        assert await r.send(BAD_REQUESTS[kind](r, page.refs[0])) == [BLKIF_RSP_ERROR]
        # the queue keeps serving good requests afterwards
        seg = [Segment(page.refs[0], 0, 7)]
        assert await r.send(r.rw(BLKIF_OP_READ, 2, 0, seg)) == [BLKIF_RSP_OKAY]
        assert r.image_unchanged()
        await r.close()

    run(body())


@pytest.mark.parametrize("op", [4, 7, 99, 255])
def test_scenario_04_unknown_operations_get_eopnotsupp(tmp_path: Path, op: int) -> None:
    async def body() -> None:
        r = await rig(tmp_path)
        page = r.grant()
        assert await r.send(r.rw(op, 1, 0, [Segment(page.refs[0], 0, 7)])) == \
            [BLKIF_RSP_EOPNOTSUPP]
        assert r.image_unchanged()
        await r.close()

    run(body())


def test_scenario_04_indirect_page_with_bad_segment(tmp_path: Path) -> None:
    async def body() -> None:
        r = await rig(tmp_path)
        data = r.grant(16)
        segs = [Segment(ref, 0, 7) for ref in data.refs]
        segs[13] = Segment(data.refs[13], 3, 9)
        ind = r.grant(1, writable=False, fill=pack_indirect_pages(segs)[0])
        req = BlkifRequestIndirect(BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, 16, 9, 0, 0,
                                   (ind.refs[0],) + (0,) * 7).pack(r.abi)
        assert await r.send(req) == [BLKIF_RSP_ERROR]
        assert r.image_unchanged()
        assert r.m.outstanding()["mappings"] == 1  # the ring only: the pages went back
        await r.close()

    run(body())


@pytest.mark.parametrize("persistent", [False, True])
def test_scenario_05_bad_grant_refs(tmp_path: Path, persistent: bool) -> None:
    async def body() -> None:
        r = await rig(tmp_path, persistent=persistent)
        good = r.grant(5)
        ro = r.grant(1, writable=False)
        other = r.fe.grants.grant(0, 1)  # granted to dom0, not to the backend
        r.shares.append(other)
        revoked = r.fe.grants.grant(BE, 1)
        revoked_ref = revoked.refs[0]
        r.fe.grants.end_access(revoked)
        cases = {
            "ref-beyond-table": [Segment(1 << 30, 0, 7)],
            "not-granted-to-backend": [Segment(other.refs[0], 0, 7)],
            "read-into-read-only-grant": [Segment(ro.refs[0], 0, 7)],
            "revoked": [Segment(revoked_ref, 0, 7)],
            "third-of-five-fails": [Segment(good.refs[0], 0, 7), Segment(good.refs[1], 0, 7),
                                    Segment(1 << 29, 0, 7), Segment(good.refs[3], 0, 7),
                                    Segment(good.refs[4], 0, 7)],
        }
        for rid, (name, segs) in enumerate(cases.items()):
            op = BLKIF_OP_READ
            assert await r.send(r.rw(op, rid, 0, segs)) == [BLKIF_RSP_ERROR], name
            if not persistent:
                assert r.m.outstanding()["mappings"] == 1, name  # nothing left mapped (R9)
        # one ring batch, a bad ref in its middle request: without persistent grants the
        # batch's pages are mapped in one call; it fails, each is mapped on its own, only
        # the bad one is refused, and nothing stays mapped once all are answered
        batch = [r.rw(BLKIF_OP_READ, 60 + k, 8 * k, [Segment(ref, 0, 7)])
                 for k, ref in enumerate((good.refs[0], 1 << 29, good.refs[1]))]
        batch.append(r.rw(BLKIF_OP_READ, 63, 0, [Segment(good.refs[2], 0, 7),
                                                 Segment(good.refs[3], 0, 7)]))
        assert await r.send(*batch) == [BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
                                        BLKIF_RSP_OKAY]
        if not persistent:
            assert r.m.outstanding()["mappings"] == 1  # nothing left mapped (R9)
        # a write from a read-only grant is fine (the backend only reads it)
        if not persistent:
            assert await r.send(r.rw(BLKIF_OP_WRITE, 50, 0, [Segment(ro.refs[0], 0, 7)])) \
                == [BLKIF_RSP_OKAY]
        await r.close()

    run(body())


def test_scenario_08_notification_flood_without_requests(tmp_path: Path) -> None:
    async def body() -> None:
        r = await rig(tmp_path)
        for i in range(20000):
            r.fe.events.notify(r.ch.port)
            if i % 1000 == 0:
                await asyncio.sleep(0)
        page = r.grant()
        assert await r.send(r.rw(BLKIF_OP_READ, 3, 0, [Segment(page.refs[0], 0, 7)])) == [0]
        assert r.service.running and r.service.error is None
        assert r.service.stats["requests"] == 1
        await r.close()

    run(body())


def test_scenario_09_reused_and_huge_ids_are_echoed(tmp_path: Path) -> None:
    async def body() -> None:
        r = await rig(tmp_path)
        page = r.grant(2)
        a, b = Segment(page.refs[0], 0, 7), Segment(page.refs[1], 0, 7)
        reqs = [r.rw(BLKIF_OP_READ, 7, 0, [a]), r.rw(BLKIF_OP_READ, 7, 8, [b]),
                r.rw(BLKIF_OP_READ, (1 << 64) - 1, 16, [b])]
        r.client.submit(reqs)
        async with asyncio.timeout(WAIT):
            while r.service.stats["responses"] < 3:
                await asyncio.sleep(0.01)
        assert set(r.got) == {7, (1 << 64) - 1}
        assert r.service.error is None
        await r.close()

    run(body())


# ------------------------------------------------------------------ xenbus-level frontends


async def hostile_frontend_keys(w: World, image: Path, keys: dict[str, str],
                                state: str = "3") -> tuple[str, str, Any]:
    info = await add_device(w.dom0, "vbd", FE, BE, VDEV,
                            backend_keys={"params": str(image), "mode": "w"})
    from xenpv.backends.block import BlockBackendDriver

    be = BlockBackendDriver(w.machine.domain(BE), w.be, info.backend_path,
                            config=BlockConfig(resize_poll=0), close_timeout=0.5)
    await be.start()
    await be.wait_state(S.InitWait, timeout=WAIT)
    fe = w.machine.domain(FE)
    for k, v in keys.items():
        await w.fe.write(f"{info.frontend_path}/{k}", v)
    await w.fe.write(f"{info.frontend_path}/state", state)
    return info.frontend_path, info.backend_path, (be, fe)


def ring_keys(w: World) -> tuple[dict[str, str], FrontChannel]:
    ch = FrontChannel.create(w.machine.domain(FE), BE, slot_size=112)
    return {"ring-ref": str(ch.refs[0]), "event-channel": str(ch.port),
            "protocol": "x86_64-abi"}, ch


BAD_KEYS = {
    "ring-ref-abc": {"ring-ref": "abc"},
    "ring-ref-minus-1": {"ring-ref": "-1"},
    "ring-ref-2^40": {"ring-ref": str(1 << 40)},
    "event-channel-unbound": {"event-channel": "31"},
    "event-channel-huge": {"event-channel": str(1 << 40)},
    "ring-page-order-5": {"ring-page-order": "5"},
    "num-queues-0": {"multi-queue-num-queues": "0"},
    "num-queues-99": {"multi-queue-num-queues": "99"},
    "protocol-x86_16": {"protocol": "x86_16-abi"},
    "feature-persistent-garbage": {"feature-persistent": "yes"},
}


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_scenario_18_bad_connect_time_keys(kind: str) -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, MiB)
            keys, ch = ring_keys(w)
            _fp, bp, (be, _fe) = await hostile_frontend_keys(w, image, {**keys, **BAD_KEYS[kind]})
            try:
                await be.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert await w.read_error(bp)
                assert be.misbehaving
                assert w.machine.outstanding()["mappings"] == 0
            finally:
                await be.close()
                ch.close()
        assert w.held() == NOTHING

    run(body())


def test_scenario_19_connected_before_publishing_a_ring() -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, MiB)
            _fp, bp, (be, _fe) = await hostile_frontend_keys(w, image, {}, state="4")
            try:
                await be.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert await w.read_error(bp)
            finally:
                await be.close()
        assert w.held() == NOTHING

    run(body())


def test_scenario_01_at_driver_level_fails_the_device_closed() -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, MiB)
            pair = await start_pair(w, image, front=FrontConfig(max_ring_order=0))
            try:
                assert await pair.frontend.read(0, 4096) == data[:4096]
                ring = pair.frontend.queues[0].channel.res.shares[0].mem
                struct.pack_into("<I", ring, 0, 1 << 31)
                pair.frontend.platform.events.notify(pair.frontend.queues[0].channel.port)
                await pair.backend.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert await w.read_error(pair.be_path)
            finally:
                await pair.close()
            assert image.read_bytes() == data
        assert w.held() == NOTHING

    run(body())


def test_scenario_29_frontend_dies_with_requests_in_flight() -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, 4 * MiB)
            pair = await start_pair(w, image, front=FrontConfig(persistent=False),
                                    close_timeout=0.5)
            fe = pair.frontend
            jobs = [asyncio.ensure_future(fe.read(i * 65536, 65536)) for i in range(48)]
            await asyncio.sleep(0)
            await fe.abort()  # no handshake: everything it held goes at once
            w.machine.kill(fe.platform)
            await asyncio.gather(*jobs, return_exceptions=True)
            # the toolstack removes the device; the backend drains and lets go
            from xenpv.xenbus import remove_device

            await remove_device(w.dom0, "vbd", FE, VDEV, BE, timeout=WAIT)
            await pair.backend.wait_done(WAIT)
            await pair.backend.close()
        assert w.held() == NOTHING

    run(body())


# ------------------------------------------------------------------ hostile backends


async def tampered_pair(w: World, tamper: Any, **front: Any) -> Any:
    """A pair whose backend's answers pass through ``tamper(responses) -> responses``."""
    image = w.tmp / "disk.img"
    make_image(image, MiB)
    pair = await start_pair(w, image, front=FrontConfig(max_ring_order=0, max_queues=1,
                                                        **front))
    svc, h = pair.backend.services[0], pair.backend.handlers[0]
    real = svc.respond

    def tampered(rsps: Any) -> int:
        return real(tamper(list(rsps)))

    svc.respond = tampered  # type: ignore[method-assign]  # answers given now
    h.respond = tampered  # answers given later
    h.respond_slots = None  # the compiled lane's answers come out as records, through here
    return pair


def _rewrite(rsp: bytes, **kw: int) -> bytes:
    rid, op, status = struct.unpack_from("<QBxh", rsp)
    out = bytearray(rsp)
    struct.pack_into("<QBxh", out, 0, kw.get("id", rid), kw.get("op", op),
                     kw.get("status", status))
    return bytes(out)


TAMPER = {
    "unknown-id": lambda rs: [_rewrite(r, id=999) for r in rs],
    "duplicate": "duplicate",
    "wrong-operation": lambda rs: [_rewrite(r, op=BLKIF_OP_WRITE) for r in rs],
    "bad-status": lambda rs: [_rewrite(r, status=7) for r in rs],
}


@pytest.fixture(params=["compiled", "twin"])
def tables(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The frontend's request table: the compiled one (built by setup.py: missing is a
    failure) or its readable twin (what ``XENPV_PURE_PYTHON=1`` picks)."""
    from xenpv.frontends import _blktable, blktable, block

    monkeypatch.setattr(block, "_TABLES", blktable if request.param == "twin" else _blktable)
    return str(request.param)


@pytest.mark.usefixtures("tables")
def test_refused_request_of_a_batch_fails_the_call_after_all_ended() -> None:
    """A batch with one request answered ERROR (a valid answer): BlockError once every
    request has ended, the other buffers hold their data, the device stays usable."""
    async def body() -> None:
        async with block_world() as w:
            calls: list[int] = []

            def refuse_one(rs: list[bytes]) -> list[bytes]:
                calls.append(len(rs))
                if len(calls) == 2:  # the batch's first answer
                    return [_rewrite(rs[0], status=BLKIF_RSP_ERROR), *rs[1:]]
                return rs

            pair = await tampered_pair(w, refuse_one)
            fe = pair.frontend
            try:
                image = (w.tmp / "disk.img").read_bytes()
                assert await fe.read(0, 3 * 4096) == image[:3 * 4096]  # 3 pool pages
                bufs = [(k * 4096, bytearray(4096)) for k in range(1, 4)]
                with pytest.raises(BlockError) as info:
                    await fe.read_many(bufs)
                assert len(fe._pool) == 3  # the batch took the pool's free pages
                assert info.value.status == BLKIF_RSP_ERROR and "1 of the 3" in str(info.value)
                good = [bytes(b) == image[o:o + 4096] for o, b in bufs]
                assert sorted(good) == [False, True, True] and fe.inflight == 0
                assert await fe.read(0, 4096) == image[:4096] and fe.error is None
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


@pytest.mark.usefixtures("tables")
@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_scenario_11_bad_responses_fail_the_frontend_closed(kind: str) -> None:
    async def body() -> None:
        async with block_world() as w:
            first: list[bytes] = []

            def duplicate(rs: list[bytes]) -> list[bytes]:
                """Answer every request after the first with the first's answer again."""
                if not first:
                    first.extend(rs)
                    return rs
                return first[: len(rs)]

            tamper = duplicate if kind == "duplicate" else TAMPER[kind]
            pair = await tampered_pair(w, tamper)
            if kind == "duplicate":
                await pair.frontend.read(0, 4096)
            fe = pair.frontend
            try:
                bufs = [(0, bytearray(4096)), (8192, bytearray(4096))]
                for r in await asyncio.gather(fe.read(0, 4096), fe.read_many(bufs),
                                              return_exceptions=True):
                    assert isinstance(r, BlockPeerError)  # one call, and one batch
                assert fe.error is not None
                await fe.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert await w.read_error(pair.fe_path)
                with pytest.raises(BlockPeerError):
                    await fe.read(0, 4096)  # failed closed: stays failed
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_scenario_12_response_rewritten_after_it_was_read() -> None:
    async def body() -> None:
        async with block_world() as w:
            pair = await tampered_pair(w, lambda rs: rs)
            fe = pair.frontend
            try:
                data = await fe.read(0, 4096)
                ring = fe.queues[0].channel.res.shares[0].mem
                for k in range(32):  # the backend scribbles over every response slot
                    struct.pack_into("<QBxh", ring, 64 + k * 112, 999, 77, 5)
                fe.queues[0].channel.res.events.notify(fe.queues[0].channel.port)
                assert await fe.read(0, 4096) == data
                assert fe.error is None
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_scenario_13_backend_keeps_a_grant_mapped() -> None:
    async def body() -> None:
        async with block_world() as w:
            pinned: list[int] = []
            pair = await tampered_pair(w, lambda rs: rs, persistent=False)
            fe = pair.frontend
            h = pair.backend.handlers[0]
            real_map = h._map_segments

            def map_and_pin(io: Any, segs: Any, *, writable: bool) -> None:
                real_map(io, segs, writable=writable)
                ref = int(segs[0][0])  # (gref, start, end) of the first segment
                w.machine.hold_mapped(FE, ref)
                pinned.append(ref)

            h._map_segments = map_and_pin  # type: ignore[method-assign]
            try:
                await fe.read(0, 4096)
                assert len(fe.quarantine) == 1  # not reused, not lost (R8)
                w.machine.release_hold(FE, pinned[0])
                assert fe.quarantine.reap() == 0
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_scenario_14_granted_pages_hold_no_leftovers() -> None:
    """Pages the frontend shares hold only the request's data (the rest zero), even when
    the guest's memory held a canary before."""
    async def body() -> None:
        async with block_world() as w:
            seen: list[bytes] = []
            pair = await tampered_pair(w, lambda rs: rs, persistent=False)
            fe = pair.frontend
            h = pair.backend.handlers[0]
            real_map = h._map_segments

            def map_and_look(io: Any, segs: Any, *, writable: bool) -> None:
                real_map(io, segs, writable=writable)
                for m in io.mappings:
                    seen.append(bytes(m.mem))

            h._map_segments = map_and_look  # type: ignore[method-assign]
            guest = fe.platform
            canary = guest.grants.grant(BE, 8)
            canary.mem[:] = b"CANARY!!" * (len(canary.mem) // 8)
            guest.grants.end_access(canary)
            try:
                await fe.write(0, b"\x11" * 512)
                await fe.read(0, 1024)
                assert seen and all(b"CANARY" not in page for page in seen)
                assert seen[0][:512] == b"\x11" * 512 and seen[0][512:] == bytes(3584)
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_scenario_16_backend_floods_the_event_channel() -> None:
    async def body() -> None:
        async with block_world() as w:
            pair = await tampered_pair(w, lambda rs: rs)
            fe = pair.frontend
            try:
                be_ch = pair.backend.channels[0]
                for i in range(20000):
                    be_ch.res.events.notify(be_ch.port)
                    if i % 1000 == 0:
                        await asyncio.sleep(0)
                assert len(await fe.read(0, 65536)) == 65536
                client = fe.queues[0].client
                assert client is not None and client.stats["spurious_wakeups"] > 0
                assert fe.error is None
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


@pytest.mark.usefixtures("tables")
def test_scenario_17_backend_never_answers() -> None:
    async def body() -> None:
        async with block_world() as w:
            pair = await tampered_pair(w, lambda rs: [], io_timeout=0.5)
            fe = pair.frontend
            try:
                with pytest.raises(TimeoutError):
                    await fe.read(0, 4096)
                assert fe.inflight == 1  # its id and pages stay with the backend
                with pytest.raises(TimeoutError):  # a batch's one future too
                    await fe.read_many([(0, bytearray(4096)), (4096, bytearray(512))])
                assert fe.inflight == 3
            finally:
                await pair.close()  # teardown completes with a silent backend (R12)
        assert w.held() == NOTHING

    run(body())


@pytest.mark.parametrize("used_up", ["persistent pool", "ring slots"])
def test_scenario_17_silent_backend_holding_every_page_or_slot(used_up: str) -> None:
    """A backend that never answers keeps the pages and ring slots of the requests it
    took: a later call that needs a page of the persistent pool, or a ring slot, ends
    with TimeoutError after ``io_timeout`` instead of waiting for them forever (R12)."""
    async def body() -> None:
        async with block_world() as w:
            pool = used_up == "persistent pool"
            pair = await tampered_pair(w, lambda rs: [], io_timeout=0.3, indirect=False,
                                       persistent=pool, persistent_pages=16)
            fe = pair.frontend
            try:
                # 19 pool pages (11 + 8), or all 32 slots of the one-page ring
                held = [fe.read(0, 19 * 4096)] if pool else [fe.read(k * 4096, 4096)
                                                            for k in range(32)]
                for r in await asyncio.gather(*held, return_exceptions=True):
                    assert isinstance(r, TimeoutError)
                late = asyncio.ensure_future(fe.read(0, 4096))
                batch = asyncio.ensure_future(fe.write_many([(0, bytes(4096))] * 2))
                done, _ = await asyncio.wait({late, batch}, timeout=10)
                assert done == {late, batch}, f"a call waiting for {used_up} never ended"
                assert isinstance(late.exception(), TimeoutError)
                assert isinstance(batch.exception(), TimeoutError)
                assert fe.io_stats["requests"] == (2 if pool else 32)
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_scenario_17_backend_never_leaves_initwait() -> None:
    async def body() -> None:
        async with block_world() as w:
            from xenpv.frontends.block import BlockFrontend

            info = await add_device(w.dom0, "vbd", FE, BE, VDEV)
            await w.dom0.write(f"{info.backend_path}/state", "2")
            fe = BlockFrontend(w.machine.domain(FE), w.fe, info.frontend_path,
                               connect_timeout=0.5, close_timeout=0.5)
            await fe.start()
            try:
                await fe.wait_state(S.Closing, S.Closed, timeout=WAIT)
                assert b"110" in (await w.read_error(info.frontend_path) or b"")
            finally:
                await fe.close()
        assert w.held() == NOTHING

    run(body())


# ------------------------------------------------------- the compiled lane and its twin

#: A valid segment (page index unused, first <= last <= 7).
_SEG = st.integers(0, 7).flatmap(lambda f: st.tuples(st.just(0), st.just(f), st.integers(f, 7)))
#: (operation, sector in the request's range, segments, what to break: 0-4 nothing,
#: 5 a bad ref, 6 a sector beyond the disk, 7 a bad segment)
_REQ = st.tuples(st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE]), st.integers(0, 85),
                 st.lists(_SEG, min_size=1, max_size=11), st.integers(0, 7))


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_REQ, min_size=1, max_size=8), min_size=1, max_size=3),
       readonly=st.booleans())
def test_compiled_lane_matches_the_readable_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        batches: list[list[tuple[int, int, list[tuple[int, int, int]], int]]],
        readonly: bool) -> None:
    """The backend's compiled io_uring lane (persistent grants) and the readable path
    (``XENPV_PURE_PYTHON=1``) give every request of the same batches (each sent twice, so
    the second finds its pages kept) the same status, the frontend's pages the same bytes
    and the image the same content; the lane took the kept ones."""
    async def serve(pure: bool) -> tuple[list[int], list[bytes], bytes, dict[str, int]]:
        monkeypatch.setenv("XENPV_PURE_PYTHON", "1" if pure else "0")
        d = tmp_path / ("pure" if pure else "lane")
        d.mkdir(exist_ok=True)
        r = await rig(d, persistent=True, config=BlockConfig(engine="io_uring"),
                      readonly=readonly)
        r.handler.respond_slots = r.service.respond_slots
        assert r.pg is not None
        r.pg.limit = 128  # every page kept once it served (the lane's condition)
        statuses: list[int] = []
        try:
            pages = [r.grant(fill=bytes([k]) * 4096) for k in range(88)]
            rid = 0
            for batch in batches * 2:
                reqs = []
                for k, (op, at, segs, broken) in enumerate(batch):
                    # disjoint ranges and pages per request: the results are deterministic
                    sector = k * 88 + at if broken != 6 else SECTORS - 2 + at
                    wire = [Segment(4000 if broken == 5 and i == 0 else
                                    pages[(k * 11 + i) % 88].refs[0], first,
                                    8 if broken == 7 and i == 0 else last)
                            for i, (_p, first, last) in enumerate(segs)]
                    rid += 1
                    reqs.append(r.rw(op, rid, sector, wire))
                statuses += await r.send(*reqs)
            assert r.handler.inflight == 0
            assert (r.handler.stats["lane"] > 0) == (not pure and any(
                s == BLKIF_RSP_OKAY for s in statuses))
            return (statuses, [bytes(p.mem) for p in pages], r.path.read_bytes(),
                    {k: r.handler.stats[k] for k in ("reads", "writes", "completed",
                                                     "errors", "bytes_read", "bytes_written")})
        finally:
            await r.close()

    async def body() -> None:
        lane = await serve(False)
        pure = await serve(True)
        assert lane == pure

    run(body())
    monkeypatch.delenv("XENPV_PURE_PYTHON")

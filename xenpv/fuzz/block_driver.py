"""The ``blkback:driver`` and ``blkfront:driver`` fuzz targets: hostile peers against the
real block drivers.

``blkfront:driver`` (:class:`BlkfrontTarget`) is the mirror image: a hostile backend
domain writes fuzzed features and sizes, maps the frontend's rings and answers its
requests with fuzzed ids, operations and statuses, moves ``rsp_prod`` anywhere and floods
the port, while the real :class:`~xenpv.frontends.block.BlockFrontend` reads, writes and
flushes.  Every API call must end (bounded) with data or one of the block/peer/local
errors, nothing may escape the loop, and after teardown every share of the frontend is
ended or in its quarantine.

``blkback:driver`` (:class:`BlkbackTarget`):

Each input builds a fresh world: an in-process emulator with the guest and the backend
domain, a 256 KiB image, one ring (ABI, persistent grants, I/O engine and indirect support
chosen by the input) served by the real :class:`~xenpv.backends.block.BlockRequests`
handler under a :class:`~xenpv.drivers.ringservice.RingService`, and a pool of pages the
guest granted (writable and read-only).  The rest of the input is a list of hostile
steps: well-formed requests with fuzzed fields steered at the pool, raw slot bytes,
arbitrary ``req_prod`` values, revoked grants, rewritten indirect pages, notification
floods and pauses.

Invariants (a breach is an :class:`~xenpv.fuzz.hostile.InvariantViolation`):

* nothing escapes the event loop (no exception in a callback or task);
* the image never grows (no write outside it) and the queue either keeps serving or
  stopped with a :class:`~xenpv.errors.PeerError`;
* every response carries a known status (OKAY, ERROR, EOPNOTSUPP), at most one per
  request taken;
* the work of an input is bounded in time, and after teardown the emulator holds no
  mapping and every share of the guest can be ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from xenpv.backends.block import BlockConfig, BlockImage, BlockRequests, PersistentGrants
from xenpv.drivers.ringchannel import BackChannel, FrontChannel, RingPlacement
from xenpv.drivers.ringservice import RingService
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.fuzz.hostile import InvariantViolation
from xenpv.fuzz.source import ByteSource
from xenpv.fuzz.xenbus_driver import (
    QUOTAS,
    GuestPages,
    World,
    backend_let_go,
    calls_end,
    frontend_let_go,
    hostile_backend,
    hostile_keys,
    no_escapes,
    play_input,
    settled,
    xenstore_world,
)
from xenpv.platforms.loopback.harness import InProcessMachine
from xenpv.protocols.blkif import (
    ABI,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    Segment,
    layouts,
)

__all__ = ["INPUT_BUDGET_S", "MAX_STEPS", "BlkbackTarget", "BlkfrontTarget", "RawRing",
           "serve_raw_ring"]

FE, BE = 3, 2
IMAGE_SIZE = 256 * 1024
MAX_STEPS = 32
POOL = 16
INPUT_BUDGET_S = 20.0
SETTLE_S = 3.0
_STATUSES = (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)


class BlkbackTarget:
    """One fresh world per input (callable); see the module docstring."""

    def __call__(self, data: bytes) -> None:
        """Play one input; raises InvariantViolation on a breach."""
        with tempfile.TemporaryDirectory(prefix="xenpv-blkfuzz-") as tmp:
            play_input("blkback:driver", "block backend", lambda: self._run(data, Path(tmp)),
                       ("xenpv.drivers", "xenpv.backends"))

    async def _run(self, data: bytes, tmp: Path) -> None:
        src = ByteSource(data)
        with no_escapes():
            abi = src.choice(list(ABI))
            config = BlockConfig(engine=src.choice(["auto", "threads", "inline"]),
                                 max_indirect_segments=src.choice([0, 256]), workers=2,
                                 resize_poll=0)
            persistent = src.boolean()
            config = dataclasses.replace(config, sector_size=src.choice([None, 4096]),
                                         discard_secure=src.boolean())
            path = tmp / "disk.img"
            path.write_bytes(os.urandom(IMAGE_SIZE))
            machine = InProcessMachine(max_grants=512, max_ports=16)
            world = _World(machine, path, abi, config, persistent)
            try:
                await world.start()
                for _ in range(MAX_STEPS):
                    if src.remaining <= 0 or not world.service.running:
                        break
                    await world.step(src)
                    world.check()
                await world.settle()
                world.check()
            finally:
                await world.close()
                machine.close()
        if path.stat().st_size != IMAGE_SIZE:
            raise InvariantViolation(f"the image grew to {path.stat().st_size} bytes")


class RawRing(NamedTuple):
    """A ring of the guest that the attacker writes by hand (slots and indexes) and the
    real block backend serving it (:func:`serve_raw_ring`)."""

    #: The guest's end: the ring pages it granted and the port it offered.
    ch: FrontChannel
    #: The backend's end, mapped and bound.
    bch: BackChannel
    #: The backend's persistent grants (None: not negotiated).
    pg: PersistentGrants | None
    handler: BlockRequests
    service: RingService


def serve_raw_ring(fe: Any, be: Any, image: BlockImage, abi: ABI, config: BlockConfig, *,
                   persistent_pages: int, executor: Any) -> RawRing:
    """A ring of guest ``fe`` served from ``be`` by the real request handler
    (:class:`~xenpv.backends.block.BlockRequests` on ``image``, I/O on ``executor``) under
    a :class:`~xenpv.drivers.ringservice.RingService`, started; ``persistent_pages``
    persistent grants at most (0: none).  The hostile block tests and this target's world
    attack the backend through it."""
    slot = layouts(abi).ring.slot_size
    ch = FrontChannel.create(fe, BE, slot_size=slot)
    bch = BackChannel.attach(be, FE, RingPlacement(ch.refs, ch.port), slot_size=slot)
    pg = PersistentGrants(be, FE, persistent_pages) if persistent_pages else None
    handler = BlockRequests(image, be, FE, abi, config, persistent=pg, executor=executor)
    service = RingService(bch, handler)
    handler.respond = service.respond
    service.start()
    return RawRing(ch, bch, pg, handler, service)


class _World:
    def __init__(self, machine: InProcessMachine, path: Path, abi: ABI, config: BlockConfig,
                 persistent: bool) -> None:
        self.machine = machine
        self.fe, self.be = machine.domain(FE), machine.domain(BE)
        self.path = path
        self.abi = abi
        self.slot = layouts(abi).ring.slot_size
        self.config = config
        self.persistent = persistent
        self.responses: list[tuple[int, int, int]] = []
        self.submitted = 0

    async def start(self) -> None:
        self.image = BlockImage(str(self.path), sector_size=self.config.sector_size)
        self.pool = (concurrent.futures.ThreadPoolExecutor(2)
                     if self.config.engine != "inline" else None)
        self.ch, self.bch, self.pg, self.handler, self.service = serve_raw_ring(
            self.fe, self.be, self.image, self.abi, self.config,
            persistent_pages=8 if self.persistent else 0, executor=self.pool)
        self.nr_ents = int(self.ch.ring.nr_ents)
        self.req_prod = 0
        self.rsp_cons = 0
        self.pages = GuestPages(self.fe, BE, POOL)

    def _submit(self, reqs: list[bytes]) -> None:
        """Write the slots and ``req_prod`` as a frontend does (no checks of its own)."""
        ring = self.ch.res.shares[0].mem
        for data in reqs:
            off = 64 + (self.req_prod % self.nr_ents) * self.slot
            ring[off:off + self.slot] = data.ljust(self.slot, b"\0")[: self.slot]
            self.req_prod = (self.req_prod + 1) & 0xFFFFFFFF
        struct.pack_into("<I", ring, 0, self.req_prod)
        self.fe.events.notify(self.ch.port)
        self.submitted += len(reqs)

    def _collect(self) -> None:
        """Read the responses the backend pushed (bounded by the ring size)."""
        ring = self.ch.res.shares[0].mem
        prod = struct.unpack_from("<I", ring, 8)[0]
        avail = (prod - self.rsp_cons) & 0xFFFFFFFF
        if avail > self.nr_ents:
            raise InvariantViolation(f"backend rsp_prod {prod} is {avail} past rsp_cons")
        for _ in range(avail):
            off = 64 + (self.rsp_cons % self.nr_ents) * self.slot
            self.responses.append(struct.unpack_from("<QBxh", ring, off))
            self.rsp_cons = (self.rsp_cons + 1) & 0xFFFFFFFF

    def _request(self, src: ByteSource) -> bytes:
        kind = src.below(4)
        rid = src.uint(8)
        sector = src.below(IMAGE_SIZE // 512 + 8) if src.below(4) else src.uint(8)
        if kind == 0:
            n = src.below(BLKIF_MAX_SEGMENTS_PER_REQUEST + 2)
            segs = tuple(Segment(self.pages.ref(src), src.below(9), src.below(9))
                         for _ in range(min(n, BLKIF_MAX_SEGMENTS_PER_REQUEST)))
            op = src.choice([0, 1, 2, 3, 4, 7, src.u8()])
            return BlkifRequest(op, n, src.u16(), rid, sector, segs).pack(self.abi)
        if kind == 1:
            return BlkifRequestDiscard(5, src.below(4), 0, rid, sector,
                                       src.below(64) if src.below(4) else src.uint(8)
                                       ).pack(self.abi)
        if kind == 2:
            grefs = tuple(self.pages.ref(src) for _ in range(8))
            return BlkifRequestIndirect(6, src.choice([0, 1, 3, src.u8()]),
                                        src.choice([1, 8, 64, 256, 257, src.u16()]), rid,
                                        sector, 0, grefs).pack(self.abi)
        return src.take(self.slot).ljust(self.slot, b"\0")

    async def step(self, src: ByteSource) -> None:
        action = src.below(8)
        ring = self.ch.res.shares[0].mem
        if action <= 2:
            self._submit([self._request(src) for _ in range(1 + src.below(4))])
        elif action == 3:
            self.req_prod = src.u32() if src.below(2) else (self.req_prod + src.below(64))
            struct.pack_into("<I", ring, 0, self.req_prod)
            self.fe.events.notify(self.ch.port)
        elif action == 4 and self.pages.shares:
            self.pages.revoke(src)  # under the backend's feet
        elif action == 5 and self.pages.shares:
            share = self.pages.pick(src)
            blob = src.take(64)
            off = src.below(4096 - len(blob) + 1)
            share.mem[off:off + len(blob)] = blob  # indirect records or data, rewritten
        elif action == 6:
            for _ in range(src.below(2000)):
                self.fe.events.notify(self.ch.port)
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(src.below(5) / 1000)

    def check(self) -> None:
        self._collect()
        bad = [r for r in self.responses if r[2] not in _STATUSES]
        if bad:
            raise InvariantViolation(f"response with an unknown status: {bad[0]}")
        if self.service.error is not None and not isinstance(self.service.error, PeerError):
            raise InvariantViolation(f"service stopped with {self.service.error!r}")

    async def settle(self) -> None:
        ring = self.ch.res.shares[0].mem

        def busy() -> bool:  # requests produced but not taken, or taken but not answered
            produced = struct.unpack_from("<I", ring, 0)[0]
            return self.service.running and (
                int(self.bch.ring.req_cons) != produced or self.service.pending > 0)

        await settled(busy, lambda: f"requests not served in {SETTLE_S} s "
                                    f"({self.service.pending} taken, unanswered)", SETTLE_S)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.service.stop()
            await self.handler.drain(SETTLE_S)
        if self.pg is not None:
            self.pg.release()
        self.bch.close()
        self.ch.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.image.close()
        backend_let_go(self.machine, self.pages)


# --------------------------------------------------------------------------- blkfront


#: What the frontend's API may end with under a hostile backend (anything else: breach).
def _allowed() -> tuple[type[BaseException], ...]:
    from xenpv.frontends.block import BlockError

    return (BlockError, PeerError, LocalError, PlatformError, TimeoutError)


class BlkfrontTarget:
    """The ``blkfront:driver`` target: a hostile backend domain (xenstore keys, ring
    answers, indexes, event floods, silence) against the real block frontend driver."""

    def __call__(self, data: bytes) -> None:
        """Play one input; raises InvariantViolation on a breach."""
        play_input("blkfront:driver", "block frontend", lambda: self._run(data),
                   ("xenpv.drivers", "xenpv.frontends", "xenpv.xenbus"))

    async def _run(self, data: bytes) -> None:
        src = ByteSource(data)
        async with xenstore_world("vbd", QUOTAS) as w:
            with no_escapes():
                fp, bp = await w.add(51712)
                fe = await self._attack(w, fp, bp, src)
            frontend_let_go(w.machine, fe)

    async def _attack(self, w: World, fp: str, bp: str, src: ByteSource) -> Any:
        """The hostile backend's keys, rings and answers against a new frontend of device
        ``fp``/``bp``; the frontend, closed."""
        from xenpv.drivers.ringchannel import read_ring_keys
        from xenpv.frontends.block import BlockFrontend, FrontConfig
        from xenpv.xenbus import PeerKeys

        allowed = _allowed()
        be_plat = w.machine.domain(BE)
        fe = BlockFrontend(w.machine.domain(FE), w.fe, fp, config=FrontConfig(
            abi=src.choice(list(ABI)), max_queues=1 + src.below(2),
            persistent=src.boolean(), persistent_pages=32, max_indirect_segments=64,
            io_timeout=0.3), connect_timeout=2.0, close_timeout=0.3, op_timeout=2.0,
            hook_timeout=2.0)
        await hostile_keys(w.be, bp, {
            "max-ring-page-order": (["0", "2", "4"], ["9", "x", "-1"]),
            "multi-queue-max-queues": (["1", "2"], ["0", "99999", ""]),
            "sectors": (["512", "2048"], ["0", "-1", "99999999999999999999"]),
            "sector-size": (["512", "4096"], ["8192", "1000", "0"]),
            "physical-sector-size": (["4096"], ["512", "3000"]),
            "feature-flush-cache": (["1", "0"], ["yes"]),
            "feature-barrier": (["0", "1"], ["2"]),
            "feature-discard": (["1", "0"], ["x"]),
            "feature-persistent": (["1", "0"], ["on"]),
            "feature-max-indirect-segments": (["256", "0", "32"], ["7", "4294967295"]),
        }, src)
        channels: list[BackChannel] = []

        async def attach() -> None:
            for pl in await read_ring_keys(PeerKeys(w.be, fp), max_order=4, max_queues=4):
                channels.append(BackChannel.attach(be_plat, FE, pl,
                                                   slot_size=layouts(fe.abi).ring.slot_size))

        def detach() -> None:
            for ch in channels:
                ch.close()

        await hostile_backend(w, fe, fp, bp, (b"3",), attach,
                              lambda: self._io(fe, channels, be_plat, src, allowed), detach)
        return fe

    async def _io(self, fe: Any, channels: list[BackChannel], be_plat: Any, src: ByteSource,
                  allowed: tuple[type[BaseException], ...]) -> None:
        with contextlib.suppress(*allowed):
            await fe.ready(1.0)
        jobs: list[asyncio.Future[Any]] = []
        for _ in range(MAX_STEPS):
            if src.remaining <= 0:
                break
            action = src.below(6)
            if action == 0:
                off = src.below(64) * 512
                jobs.append(asyncio.ensure_future(fe.read(off, 512 * (1 + src.below(128)))))
            elif action == 1:
                jobs.append(asyncio.ensure_future(fe.write(src.below(64) * 512,
                                                           bytes(512 * (1 + src.below(64))))))
            elif action == 2:
                jobs.append(asyncio.ensure_future(src.choice([fe.flush, fe.barrier])()))
            elif action == 3 and channels:
                self._answer(channels[src.below(len(channels))], src, fe)
            elif action == 4 and channels:
                ch = channels[src.below(len(channels))]
                if src.boolean():
                    struct.pack_into("<I", ch.res.mappings[0].mem, 8, src.u32())
                for _ in range(src.below(500)):
                    be_plat.events.notify(ch.port)
            await asyncio.sleep(src.below(3) / 1000)
        await calls_end(jobs, allowed)

    def _answer(self, ch: BackChannel, src: ByteSource, fe: Any) -> None:
        """Take what the frontend queued and answer with fuzzed ids, operations and
        statuses (sometimes the right ones)."""
        from xenpv.backends.block import response_packer

        slot = ch.slot_size
        buf = bytearray(slot * int(ch.ring.nr_ents))
        try:
            n = int(ch.ring.take_requests_into(buf))
        except PeerError:
            return
        pack = response_packer(fe.abi)
        idoff = 8 if slot == 112 else 4
        out = []
        for j in range(n):
            rid = struct.unpack_from("<Q", buf, j * slot + idoff)[0]
            op = buf[j * slot]
            if src.below(4) == 0:
                rid = src.uint(8)
            if src.below(4) == 0:
                op = src.u8()
            status = src.choice([0, 0, -1, -2, src.u16() - 32768])
            out.append(pack(rid, op, status))
        if out and src.below(8):
            with contextlib.suppress(PeerError, LocalError):
                for rsp in out[: src.below(len(out) + 1) or len(out)]:
                    ch.ring.put_response(rsp)
                if ch.ring.push_responses_and_check_notify() or src.boolean():
                    ch.res.events.notify(ch.port)

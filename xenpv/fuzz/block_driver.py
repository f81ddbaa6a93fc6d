"""The ``blkback:driver`` fuzz target: a hostile frontend against the real block backend.

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
import logging
import os
import struct
import tempfile
import time
from pathlib import Path

from xenpv.backends.block import BlockConfig, BlockImage, BlockRequests, PersistentGrants
from xenpv.drivers.ringchannel import BackChannel, FrontChannel, RingPlacement
from xenpv.drivers.ringservice import RingService
from xenpv.errors import LocalError, PeerError, PlatformError
from xenpv.fuzz.hostile import InvariantViolation, violation
from xenpv.fuzz.source import ByteSource
from xenpv.platforms.base import SharedPages
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

__all__ = ["INPUT_BUDGET_S", "MAX_STEPS", "BlkbackTarget"]

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
        started = time.monotonic()
        quiet = [logging.getLogger(n) for n in ("xenpv.drivers", "xenpv.backends")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.CRITICAL)
        try:
            with tempfile.TemporaryDirectory(prefix="xenpv-blkfuzz-") as tmp:
                asyncio.run(asyncio.wait_for(self._run(data, Path(tmp)), INPUT_BUDGET_S))
        except InvariantViolation:
            raise
        except TimeoutError:
            raise InvariantViolation(
                f"one blkback:driver input took over {INPUT_BUDGET_S} s (hang)") from None
        except Exception as e:
            raise violation("the block backend world raised", e) from None
        finally:
            for q, level in zip(quiet, levels, strict=True):
                q.setLevel(level)
        if time.monotonic() - started > INPUT_BUDGET_S:
            raise InvariantViolation(f"one blkback:driver input took over {INPUT_BUDGET_S} s")

    async def _run(self, data: bytes, tmp: Path) -> None:
        src = ByteSource(data)
        escaped: list[BaseException] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _l, ctx: escaped.append(
            ctx.get("exception") or RuntimeError(str(ctx.get("message")))))
        abi = src.choice(list(ABI))
        config = BlockConfig(engine=src.choice(["auto", "threads", "inline"]),
                             max_indirect_segments=src.choice([0, 256]), workers=2,
                             resize_poll=0)
        persistent = src.boolean()
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
        if escaped:
            raise violation("an exception escaped the event loop", escaped[0])
        if path.stat().st_size != IMAGE_SIZE:
            raise InvariantViolation(f"the image grew to {path.stat().st_size} bytes")


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
        self.shares: list[SharedPages] = []

    async def start(self) -> None:
        self.ch = FrontChannel.create(self.fe, BE, slot_size=self.slot)
        self.bch = BackChannel.attach(self.be, FE, RingPlacement(self.ch.refs, self.ch.port),
                                      slot_size=self.slot)
        self.image = BlockImage(str(self.path))
        self.pool = (concurrent.futures.ThreadPoolExecutor(2)
                     if self.config.engine != "inline" else None)
        self.pg = PersistentGrants(self.be, FE, 8) if self.persistent else None
        self.handler = BlockRequests(self.image, self.be, FE, self.abi, self.config,
                                     persistent=self.pg, executor=self.pool)
        self.service = RingService(self.bch, self.handler)
        self.handler.respond = self.service.respond
        self.service.start()
        self.nr_ents = int(self.ch.ring.nr_ents)
        self.req_prod = 0
        self.rsp_cons = 0
        for k in range(POOL):
            self.shares.append(self.fe.grants.grant(BE, 1, writable=k % 4 != 3))
        self.refs = [s.refs[0] for s in self.shares]

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

    def _ref(self, src: ByteSource) -> int:
        return src.choice(self.refs) if src.below(8) else src.u32()

    def _request(self, src: ByteSource) -> bytes:
        kind = src.below(4)
        rid = src.uint(8)
        sector = src.below(IMAGE_SIZE // 512 + 8) if src.below(4) else src.uint(8)
        if kind == 0:
            n = src.below(BLKIF_MAX_SEGMENTS_PER_REQUEST + 2)
            segs = tuple(Segment(self._ref(src), src.below(9), src.below(9))
                         for _ in range(min(n, BLKIF_MAX_SEGMENTS_PER_REQUEST)))
            op = src.choice([0, 1, 2, 3, 4, 7, src.u8()])
            return BlkifRequest(op, n, src.u16(), rid, sector, segs).pack(self.abi)
        if kind == 1:
            return BlkifRequestDiscard(5, src.below(4), 0, rid, sector,
                                       src.below(64) if src.below(4) else src.uint(8)
                                       ).pack(self.abi)
        if kind == 2:
            grefs = tuple(self._ref(src) for _ in range(8))
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
        elif action == 4 and self.shares:
            share = self.shares[src.below(len(self.shares))]
            with contextlib.suppress(PlatformError, LocalError):
                self.fe.grants.end_access(share)  # revoked under the backend's feet
                self.shares.remove(share)
        elif action == 5 and self.shares:
            share = self.shares[src.below(len(self.shares))]
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

        deadline = time.monotonic() + SETTLE_S
        await asyncio.sleep(0)
        while busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if busy():
            raise InvariantViolation(f"requests not served in {SETTLE_S} s "
                                     f"({self.service.pending} taken, unanswered)")

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
        if self.machine.outstanding()["mappings"]:
            raise InvariantViolation("the backend left grants mapped after teardown")
        for share in self.shares:
            try:
                self.fe.grants.end_access(share)
            except PlatformError as exc:
                raise violation("a guest page stayed in use after teardown", exc) from None

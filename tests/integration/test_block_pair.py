"""The block pair end to end: our frontend with our backend through xenstore and the
in-process emulator — data moved and checked against the image file, over the feature
matrix (ABIs, ring orders, queues, indirect, persistent grants), features refused by one
side, read-only disks, flush, discard, resize; nothing left held afterwards."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_block_support import NOTHING, World, block_world, make_image, run, start_pair

from xenpv.backends.block import BlockConfig
from xenpv.errors import LocalError
from xenpv.frontends.block import BlockError, BlockUnsupported, FrontConfig
from xenpv.protocols.blkif import ABI

MiB = 1 << 20


async def exercise(world: World, image: Path, data: bytes, *, seed: int = 7,
                   front: FrontConfig, back: BlockConfig) -> dict[str, object]:
    """Random reads and writes (small and large, many in flight), checked against a
    model and against the image file; returns both ends' info."""
    import asyncio

    pair = await start_pair(world, image, front=front, back=back)
    fe = pair.frontend
    model = bytearray(data)
    rng = random.Random(seed)
    try:
        assert fe.size == len(data)
        assert await fe.read(0, len(data)) == data  # one big read: many pieces at once
        jobs = []
        spans: list[tuple[int, int]] = []
        for _ in range(24):
            n = rng.choice([512, 4096, 12 * 4096, 300 * 512, 256 * 4096])
            n = min(n, len(data))
            off = rng.randrange(0, (len(data) - n) // 512 + 1) * 512
            if any(off < b and a < off + n for a, b in spans):
                continue  # concurrent writes to one range have no defined order
            spans.append((off, off + n))
            blob = rng.randbytes(n)
            model[off:off + n] = blob
            jobs.append(fe.write(off, blob))
        await asyncio.gather(*jobs)
        assert await fe.flush() is True
        reads = [fe.read(a, b - a) for a, b in spans]
        for (a, b), got in zip(spans, await asyncio.gather(*reads), strict=True):
            assert got == model[a:b]
        # the batch API: many ranges (some split in pieces), one future each way
        batch = [(a, rng.randbytes(b - a)) for a, b in spans]
        await fe.write_many(batch)
        for a, blob in batch:
            model[a:a + len(blob)] = blob
        bufs = [(a, bytearray(b - a)) for a, b in spans]
        await fe.read_many(bufs)
        assert [bytes(buf) for _, buf in bufs] == [model[a:b] for a, b in spans]
        assert image.read_bytes() == model
        info = {"front": fe.info(), "back": pair.backend.info()}
    finally:
        await pair.close()
    assert world.held() == NOTHING
    return info


@pytest.mark.parametrize("abi", [ABI.X86_64, ABI.X86_32, ABI.ARM])
def test_each_abi_moves_data(abi: ABI) -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, 4 * MiB)
            info = await exercise(w, image, data, front=FrontConfig(abi=abi),
                                  back=BlockConfig())
            assert info["back"]["abi"] == abi.value  # type: ignore[index]

    run(body())


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("queues", [1, 2])
def test_ring_orders_and_queues(order: int, queues: int) -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, 2 * MiB, seed=order)
            info = await exercise(w, image, data,
                                  front=FrontConfig(max_ring_order=order, max_queues=queues),
                                  back=BlockConfig(max_queues=4))
            front = info["front"]
            assert front["ring_pages"] == [1 << order] * queues  # type: ignore[index]
            assert info["back"]["queues"] == queues  # type: ignore[index]

    run(body())


@pytest.mark.parametrize("indirect", [True, False])
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("refused_by", ["front", "back"])
def test_indirect_and_persistent_on_off(indirect: bool, persistent: bool,
                                        refused_by: str) -> None:
    """Each feature on, or off on one side: the other side falls back and data moves."""
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, 3 * MiB)
            front = FrontConfig(indirect=indirect or refused_by == "back",
                                persistent=persistent or refused_by == "back")
            back = BlockConfig(max_indirect_segments=256 if indirect or refused_by == "front"
                               else 0,
                               persistent=persistent or refused_by == "front")
            info = await exercise(w, image, data, front=front, back=back)
            f, b = info["front"], info["back"]
            assert f["max_segments"] == (256 if indirect else 11)  # type: ignore[index]
            assert f["persistent"] is persistent  # type: ignore[index]
            assert b["persistent"] is persistent  # type: ignore[index]
            indirect_sent = f["stats"]["indirect"]  # type: ignore[index]
            assert (indirect_sent > 0) is indirect
            served = b["requests"]  # type: ignore[index]
            maps = sum(h["maps"] for h in served)
            rw = sum(h["reads"] + h["writes"] for h in served)
            # without persistent grants a ring batch's pages are mapped in one call
            assert (maps == 0) if persistent else (0 < maps < rw / 2)

    run(body())


def test_front_config_checks_its_values() -> None:
    for bad in ({"max_ring_order": 5}, {"max_queues": 0}, {"max_indirect_segments": 0},
                {"spin_us": -1}, {"spin_us": 2_000_000}):
        with pytest.raises(LocalError):
            FrontConfig(**bad)  # type: ignore[arg-type]
    assert FrontConfig(spin_us=50).spin_us == 50


@pytest.mark.parametrize("abi", [ABI.X86_64, ABI.X86_32])
def test_the_request_tables_twin_serves_the_pair(abi: ABI,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The readable twin of the frontend's request table (``XENPV_PURE_PYTHON=1``) moves
    the same data: two queues, and a persistent pool smaller than a batch, so the table
    runs out of pages and slots mid-batch and the general path takes the rest."""
    from xenpv.frontends import blktable, block

    monkeypatch.setattr(block, "_TABLES", blktable)

    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, 2 * MiB, seed=5)
            info = await exercise(w, image, data,
                                  front=FrontConfig(abi=abi, max_queues=2, max_ring_order=0,
                                                    persistent_pages=16),
                                  back=BlockConfig(max_queues=2))
            assert info["front"]["persistent"] is True  # type: ignore[index]

    run(body())


def test_batches_past_the_pool_and_the_ring_move_data() -> None:
    """Batches of one-page reads and writes larger than the persistent pool and the
    ring (one queue, 32 slots, a pool of 16 pages, some 512-byte and bytes pieces): the
    request table builds what fits, the general path the rest, and every byte lands."""
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, MiB, seed=9)
            pair = await start_pair(w, image, front=FrontConfig(
                max_queues=1, max_ring_order=0, persistent_pages=16, indirect=False))
            fe = pair.frontend
            model = bytearray(data)
            rng = random.Random(4)
            try:
                for _ in range(3):
                    offsets = rng.sample(range(0, MiB // 4096), 48)
                    writes = [(o * 4096, rng.randbytes(rng.choice([512, 4096])))
                              for o in offsets]
                    await fe.write_many(writes)
                    for o, blob in writes:
                        model[o:o + len(blob)] = blob
                    bufs = [(o * 4096, bytearray(rng.choice([512, 4096]))) for o in offsets]
                    await fe.read_many(bufs)
                    assert all(bytes(b) == model[o:o + len(b)] for o, b in bufs)
                assert image.read_bytes() == model and fe.inflight == 0
                assert fe.io_stats["requests"] == fe.io_stats["responses"] == 6 * 48
                # the ring client goes back to the loop right after a batch of answers
                assert [q.client.spin_us for q in fe.queues if q.client] == [0]
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_batch_without_persistent_grants_grants_its_pages_in_one_call() -> None:
    """Without persistent grants a batch's one-page requests share one grant call (ended
    after the last answer); the data is right and nothing stays granted."""
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, MiB)
            pair = await start_pair(w, image, front=FrontConfig(persistent=False))
            fe = pair.frontend
            try:
                bufs = [(k * 8192, bytearray(4096 if k % 2 else 512)) for k in range(16)]
                await fe.read_many(bufs)
                assert all(bytes(b) == data[o:o + len(b)] for o, b in bufs)
                assert fe.io_stats["grants"] == 1 and fe.io_stats["requests"] == 16
                await fe.write_many([(o, bytes(len(b))) for o, b in bufs])
                assert fe.io_stats["grants"] == 2
                assert await fe.read(0, 512) == bytes(512)
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_barrier_and_flush_refused_by_backend_fall_back() -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, MiB)
            pair = await start_pair(w, image, back=BlockConfig(flush=False, barrier=True,
                                                               discard=False))
            fe = pair.frontend
            try:
                await fe.write(0, b"\x55" * 4096)
                assert await fe.flush() is True  # as a barrier without data
                assert pair.backend.handlers[0].stats["barriers"] == 1
                with pytest.raises(BlockUnsupported):
                    await fe.discard(0, 4096)
            finally:
                await pair.close()
            pair = await start_pair(w, image, back=BlockConfig(flush=False, barrier=False),
                                    devid=51728)
            try:
                assert await pair.frontend.flush() is False  # nothing to ask for
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_read_only_disk_refuses_writes_at_both_ends() -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, MiB)
            pair = await start_pair(w, image, mode="r")
            fe = pair.frontend
            try:
                assert fe.readonly
                assert fe.features["flush"] is False and fe.features["discard"] is False
                with pytest.raises(BlockError):
                    await fe.write(0, b"x" * 512)
                # the backend refuses too (a frontend that ignores `info`)
                fe.info_bits = 0
                with pytest.raises(BlockError) as exc:
                    await fe.write(0, b"x" * 512)
                assert exc.value.status == -1
                assert await fe.read(0, 4096) == data[:4096]
            finally:
                await pair.close()
            assert image.read_bytes() == data
        assert w.held() == NOTHING

    run(body())


def test_discard_punches_a_hole() -> None:
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, 4 * MiB)
            pair = await start_pair(w, image)
            fe = pair.frontend
            try:
                before = os.stat(image).st_blocks
                assert fe.features["discard_granularity"] >= 512
                await fe.discard(MiB, 2 * MiB)
                assert await fe.read(MiB, 2 * MiB) == bytes(2 * MiB)
                assert os.stat(image).st_blocks < before
                assert os.path.getsize(image) == 4 * MiB
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_online_resize_reaches_the_frontend() -> None:
    async def body() -> None:
        import asyncio

        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, MiB)
            pair = await start_pair(w, image)
            fe = pair.frontend
            try:
                assert fe.sectors == MiB // 512
                with open(image, "r+b") as f:
                    f.truncate(3 * MiB)
                async with asyncio.timeout(10):
                    while fe.sectors != 3 * MiB // 512:
                        await asyncio.sleep(0.02)
                await fe.write(2 * MiB, b"\x77" * 4096)
                assert await fe.read(2 * MiB, 4096) == b"\x77" * 4096
                assert fe.io_stats["resizes"] == 1
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


@pytest.mark.parametrize("engine", ["inline", "threads", "io_uring", "auto-without-io_uring"])
def test_each_io_engine_moves_data(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine moves the data; each serves reads and writes the way it says (io_uring
    all of them, auto without io_uring small ones inline and large ones in threads)."""
    from xenpv.backends import blockio

    if engine == "auto-without-io_uring":  # what a kernel refusing io_uring leaves
        monkeypatch.setattr(blockio, "_probe", ["io_uring forbidden (test)"])
        engine = "auto"

    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, 2 * MiB)
            info = await exercise(w, image, data, front=FrontConfig(),
                                  back=BlockConfig(engine=engine))
            stats = info["back"]["requests"]  # type: ignore[index]
            count = {k: sum(s[k] for s in stats)  # type: ignore[index]
                     for k in ("inline", "threaded", "uring")}
            served = sum(s["reads"] + s["writes"] for s in stats)  # type: ignore[index]
            expect = {"inline": {"inline": served, "threaded": 0, "uring": 0},
                      "threads": {"inline": 0, "threaded": served, "uring": 0},
                      "io_uring": {"inline": 0, "threaded": 0, "uring": served}}
            if engine == "auto":
                assert count["uring"] == 0 and count["inline"] > 0 and count["threaded"] > 0
                assert count["inline"] + count["threaded"] == served
            else:
                assert count == expect[engine]

    run(body())


def test_persistent_pool_smaller_than_the_load_waits_for_pages() -> None:
    """With persistent grants every page comes from the pool (granted writable), also when
    more is in flight than the pool holds: pieces wait for pages to come back."""
    async def body() -> None:
        import asyncio

        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, 8 * MiB)
            pair = await start_pair(w, image, front=FrontConfig(persistent_pages=16))
            fe = pair.frontend
            try:
                blobs = [bytes([k]) * MiB for k in range(8)]
                await asyncio.gather(*(fe.write(k * MiB, b) for k, b in enumerate(blobs)))
                assert fe.io_stats["pool_waits"] > 0
                waits = fe.io_stats["pool_waits"]
                bufs = [(k * MiB, bytearray(MiB)) for k in range(8)]
                await fe.read_many(bufs)  # one batch: its pieces wait for pages too
                assert fe.io_stats["pool_waits"] > waits
                assert [bytes(b) for _, b in bufs] == blobs
                assert image.read_bytes() == b"".join(blobs)
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_io_uring_short_transfers_are_finished_and_end_of_file_is_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may move fewer bytes than asked: the backend submits the rest (here
    every multi-segment transfer is first cut to its first segment) and the data is
    whole; a transfer that moves nothing (past the end of the image) answers ERROR."""
    from xenpv.backends import blockio

    real_start = blockio.UringEngine.start
    cut = {"short": 0, "eof": 0}
    eof_next = [False]

    def start(self: blockio.UringEngine, write: bool, fd: int, views: list[memoryview],
              offset: int, done: object) -> bool:
        if eof_next[0]:
            eof_next[0] = False
            cut["eof"] += 1
            offset = os.fstat(fd).st_size  # as if the image had shrunk meanwhile
        elif len(views) > 1:
            cut["short"] += 1
            views = views[:1]
        return real_start(self, write, fd, views, offset, done)  # type: ignore[arg-type]

    monkeypatch.setattr(blockio.UringEngine, "start", start)

    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, 2 * MiB)
            info = await exercise(w, image, data, front=FrontConfig(),
                                  back=BlockConfig(engine="io_uring"))
            assert cut["short"] > 0
            stats = info["back"]["requests"]  # type: ignore[index]
            assert sum(s["uring"] for s in stats) > 0  # type: ignore[index]
            pair = await start_pair(w, image, back=BlockConfig(engine="io_uring"),
                                    devid=51728)
            try:
                eof_next[0] = True
                with pytest.raises(BlockError):
                    await pair.frontend.read(0, 4096)
                assert cut["eof"] == 1
                assert await pair.frontend.read(0, 4096) == image.read_bytes()[:4096]
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


def test_requests_of_one_loop_turn_go_in_one_push_and_flush_waits_for_them() -> None:
    """32 reads started together reach the backend as one batch on one queue, pushed
    with at most one notification (the frontend pushes once per loop turn), and are
    answered with the right data; a flush sent with a batch of writes is answered only
    after every one of them (it waits for the io_uring transfers started before it)."""
    async def body() -> None:
        import asyncio

        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = make_image(image, 2 * MiB)
            pair = await start_pair(w, image, front=FrontConfig(max_queues=4),
                                    back=BlockConfig(max_queues=4, engine="io_uring"))
            fe, be = pair.frontend, pair.backend
            try:
                offsets = [k * 8192 for k in range(32)]
                got = await asyncio.gather(*(fe.read(o, 4096) for o in offsets))
                assert got == [data[o:o + 4096] for o in offsets]
                taken = [h.stats["taken"] for h in be.handlers]
                assert sorted(taken) == [0, 0, 0, 32], taken
                busy = taken.index(32)
                assert be.services[busy].stats["batches"] == 1
                sent = [q.client.stats["notifications_sent"] for q in fe.queues if q.client]
                assert sum(sent) <= 1, sent
                done: list[str] = []

                async def tagged(what: str, aw: Any) -> None:
                    await aw
                    done.append(what)

                blob = bytes(range(256)) * 16
                await asyncio.gather(*(tagged(f"w{k}", fe.write(o, blob))
                                       for k, o in enumerate(offsets)),
                                     tagged("flush", fe.flush()))
                assert done[-1] == "flush" and len(done) == 33
                assert sum(h.stats["uring"] for h in be.handlers) >= 64
                assert all(image.read_bytes()[o:o + 4096] == blob for o in offsets)
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())

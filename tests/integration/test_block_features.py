"""Block pair features beyond the data path: logical sectors larger than 512 bytes (a
4 KiB-sector disk end to end, an image file and a real loop device, and the backend's
alignment refusals from a raw ring), secure discard (offered, refused, and what it does to
the file) and the backend's live state as ``xenpv block info`` shows it from another
process (requests held in flight by a gated I/O pool)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostile"))

from cli_support import xenpv
from test_block_processes import GUEST, add_vbd, connect_frontend, start_backend
from test_block_scenarios import rig
from test_block_support import FE, NOTHING, S, block_world, make_image, run, start_pair

from xenpv.backends.block import (
    BlockConfig,
    BlockImage,
    live_stats_path,
    read_live_stats,
)
from xenpv.cli.block import default_stats_dir
from xenpv.errors import LocalError
from xenpv.frontends.block import BlockUnsupported
from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.protocols.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifRequestDiscard,
    Segment,
)

MiB = 1 << 20
KiB = 1 << 10


def allocated_in(path: Path, start: int, end: int) -> bool:
    """Whether the file has data (not a hole) anywhere in ``[start, end)``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < end
    except OSError:  # ENXIO: no data past start
        return False
    finally:
        os.close(fd)


# ------------------------------------------------------------------ logical sector size


def test_4096_byte_sectors_move_data_and_refuse_misaligned_io_at_the_frontend() -> None:
    """A 4 KiB-sector disk on an image with a partial last logical sector: `sectors` stays
    in 512-byte units over whole logical sectors only, the frontend sizes the disk from
    it, moves data in whole logical sectors (many requests in flight, indirect and not)
    and refuses anything else before it reaches the ring."""
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            data = bytearray(make_image(image, 2 * MiB + 3000))
            pair = await start_pair(w, image, back=BlockConfig(sector_size=4096,
                                                               physical_sector_size=8192))
            fe = pair.frontend
            try:
                keys = {k: await w.dom0.read(f"{pair.be_path}/{k}") for k in
                        ("sectors", "sector-size", "physical-sector-size",
                         "discard-granularity")}
                assert keys["sectors"] == str(2 * MiB // 512).encode()
                assert keys["sector-size"] == b"4096"
                assert keys["physical-sector-size"] == b"8192"
                assert int(keys["discard-granularity"]) % 4096 == 0
                assert (fe.sector_size, fe.physical_sector_size, fe.size) == (4096, 8192,
                                                                            2 * MiB)
                jobs = []
                for k, n in enumerate([4096, 12 * 4096, 64 * 4096, 3 * 4096, 4096]):
                    off = (k * 80 + 1) * 4096
                    blob = bytes([k + 1]) * n
                    data[off:off + n] = blob
                    jobs.append(fe.write(off, blob))
                await asyncio.gather(*jobs)
                assert await fe.read(0, 2 * MiB) == data[:2 * MiB]
                for bad in [(512, 4096), (4096, 512), (2048, 2048)]:
                    with pytest.raises(LocalError, match="4096-byte sector"):
                        await fe.write(bad[0], bytes(bad[1]))
                    with pytest.raises(LocalError, match="4096-byte sector"):
                        await fe.read(*bad)
                    with pytest.raises(LocalError, match="4096-byte sector"):
                        await fe.discard(*bad)
                with pytest.raises(LocalError, match="beyond"):  # the partial sector
                    await fe.read(2 * MiB, 4096)
                await fe.discard(8192, 8192)
                data[8192:16384] = bytes(8192)
                assert await fe.read(0, 32768) == data[:32768]
                back = pair.backend.handlers[0].stats
                assert back["errors"] == 0  # nothing misaligned reached the backend
                assert fe.io_stats["indirect"] > 0
            finally:
                await pair.close()
            assert image.read_bytes() == data
        assert w.held() == NOTHING

    run(body())


def test_4096_byte_sectors_backend_refuses_misaligned_requests(tmp_path: Path) -> None:
    """A frontend that ignores `sector-size` (a raw ring): a request whose start, length
    or any segment's start or length in its page is not whole 4 KiB sectors gets ERROR
    and writes nothing; aligned ones are served (the ring counts 512-byte units)."""
    async def body() -> None:
        r = await rig(tmp_path, config=BlockConfig(sector_size=4096))
        try:
            page = r.grant(2, fill=b"\xa5" * 8192)
            ref0, ref1 = page.refs
            full0, full1 = Segment(ref0, 0, 7), Segment(ref1, 0, 7)
            bad = [
                r.rw(BLKIF_OP_WRITE, 1, 1, [full0]),  # start not on a 4 KiB sector
                r.rw(BLKIF_OP_WRITE, 2, 0, [Segment(ref0, 0, 3)]),  # 2 KiB long
                r.rw(BLKIF_OP_WRITE, 3, 0, [Segment(ref0, 1, 7), Segment(ref1, 0, 0)]),
                r.rw(BLKIF_OP_WRITE, 4, 0, [Segment(ref0, 4, 7), Segment(ref1, 0, 3)]),
                r.rw(BLKIF_OP_READ, 5, 4, [full0]),
                BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 0, 6, 0, 1).pack(r.abi),
                BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 0, 7, 4, 8).pack(r.abi),
            ]
            assert await r.send(*bad) == [BLKIF_RSP_ERROR] * len(bad)
            assert r.image_unchanged()
            assert r.handler.stats["errors"] == len(bad)
            assert await r.send(r.rw(BLKIF_OP_WRITE, 8, 8, [full0, full1])) == [
                BLKIF_RSP_OKAY]
            assert r.path.read_bytes()[4096:12288] == b"\xa5" * 8192
            assert await r.send(BlkifRequestDiscard(BLKIF_OP_DISCARD, 0, 0, 9, 8, 8
                                                    ).pack(r.abi)) == [BLKIF_RSP_OKAY]
            assert r.path.read_bytes()[4096:8192] == bytes(4096)
        finally:
            await r.close()

    run(body())


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_flush_and_barrier_without_data_at_sector_minus_one_are_served(
        tmp_path: Path, sector_size: int) -> None:
    """Linux's blkfront sends a flush that carries no data with sector (u64)-1 (the block
    layer's flush request starts there): FLUSH and BARRIER without segments are served
    OKAY at any sector, with 4 KiB logical sectors too (no range to align); with data the
    range is checked as before."""
    async def body() -> None:
        r = await rig(tmp_path, config=BlockConfig(sector_size=sector_size))
        try:
            no_sector = 2**64 - 1
            assert await r.send(r.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, no_sector, []),
                                r.rw(BLKIF_OP_WRITE_BARRIER, 2, no_sector, []),
                                r.rw(BLKIF_OP_FLUSH_DISKCACHE, 3, 0, [])) \
                == [BLKIF_RSP_OKAY] * 3
            page = r.grant(1, fill=b"\x5a" * 4096)
            assert await r.send(r.rw(BLKIF_OP_FLUSH_DISKCACHE, 4, no_sector,
                                     [Segment(page.refs[0], 0, 7)])) == [BLKIF_RSP_ERROR]
            assert r.image_unchanged()
        finally:
            await r.close()

    run(body())


def test_loop_device_with_4096_byte_sectors(tmp_path: Path) -> None:
    """A real block device (a loop device with 4 KiB logical sectors): the backend takes
    its logical and physical block sizes from the device (BLKSSZGET/BLKPBSZGET), refuses a
    smaller configured size, and serves it (a plain discard punches the range); secure discard offered by the host but not
    supported by the device answers EOPNOTSUPP, which turns only secure discard off."""
    backing = tmp_path / "backing.img"
    data = make_image(backing, 4 * MiB)
    made = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096",
                           str(backing)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, f"this test needs a loop device (root): {made.stderr}"
    dev = made.stdout.strip()
    try:
        img = BlockImage(dev)
        assert (img.sector_size, img.physical_sector_size, img.sectors) == (4096, 4096,
                                                                             8192)
        img.close()
        with pytest.raises(LocalError, match="below the device's logical block size"):
            BlockImage(dev, sector_size=512)

        async def body() -> None:
            async with block_world() as w:
                pair = await start_pair(w, Path(dev), back=BlockConfig(discard_secure=True,
                                                                       resize_poll=0))
                fe = pair.frontend
                try:
                    assert (fe.sector_size, fe.size) == (4096, 4 * MiB)
                    assert fe.features["discard_secure"] is True
                    assert await fe.read(0, 4 * MiB) == data
                    await fe.write(MiB, b"\x5a" * 65536)
                    assert await fe.flush()
                    # A plain discard on the device (fallocate punches it: zeros after).
                    await fe.discard(MiB + 32768, 32768)
                    assert await fe.read(MiB, 65536) == b"\x5a" * 32768 + bytes(32768)
                    with pytest.raises(BlockUnsupported, match="secure"):
                        await fe.discard(0, 4096, secure=True)
                    assert fe.features["discard_secure"] is False
                    assert fe.features["discard"] is True
                    with pytest.raises(BlockUnsupported):  # not sent again
                        await fe.discard(0, 4096, secure=True)
                    assert pair.backend.handlers[0].stats["unsupported"] == 1
                    with pytest.raises(LocalError, match="4096-byte sector"):
                        await fe.write(512, bytes(512))
                finally:
                    await pair.close()
            assert w.held() == NOTHING

        run(body())
        with open(dev, "rb") as f:
            assert f.read(MiB + 65536)[MiB:] == b"\x5a" * 32768 + bytes(32768)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True, timeout=30)


# ------------------------------------------------------------------ secure discard


def test_secure_discard_erases_and_releases_the_range() -> None:
    """Offered (`discard-secure=1`): the range reads as zeros, its blocks are released,
    the file keeps its size.  Not offered: `discard(secure=True)` raises before anything
    is sent, and plain discard still works."""
    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, 4 * MiB)
            pair = await start_pair(w, image, back=BlockConfig(discard_secure=True))
            fe = pair.frontend
            try:
                assert await w.dom0.read(f"{pair.be_path}/discard-secure") == b"1"
                assert fe.features["discard_secure"] is True
                before = os.stat(image).st_blocks
                await fe.discard(MiB, 2 * MiB, secure=True)
                assert await fe.read(MiB, 2 * MiB) == bytes(2 * MiB)
                assert os.stat(image).st_blocks < before
                assert not allocated_in(image, MiB, 3 * MiB)
                assert os.path.getsize(image) == 4 * MiB
                stats = pair.backend.handlers[0].stats
                assert (stats["secure_discards"], stats["discards"]) == (1, 0)
            finally:
                await pair.close()
            other = w.tmp / "other.img"
            data = make_image(other, MiB)
            pair = await start_pair(w, other, devid=51728)
            fe = pair.frontend
            try:
                assert await w.dom0.read(f"{pair.be_path}/discard-secure") == b"0"
                sent = fe.io_stats["requests"]
                with pytest.raises(BlockUnsupported, match="secure"):
                    await fe.discard(0, 4096, secure=True)
                assert fe.io_stats["requests"] == sent
                await fe.discard(0, 4096)
                assert await fe.read(0, 8192) == bytes(4096) + data[4096:8192]
            finally:
                await pair.close()
        assert w.held() == NOTHING

    run(body())


@pytest.mark.parametrize("offered", [False, True])
def test_secure_discard_flag_from_a_raw_ring(tmp_path: Path, offered: bool) -> None:
    """BLKIF_DISCARD_SECURE in the flag byte: EOPNOTSUPP and nothing touched when not
    offered; erased when offered."""
    async def body() -> None:
        r = await rig(tmp_path, config=BlockConfig(discard_secure=offered))
        try:
            req = BlkifRequestDiscard(BLKIF_OP_DISCARD, BLKIF_DISCARD_SECURE, 0, 1, 16, 16)
            status = await r.send(req.pack(r.abi))
            if not offered:
                assert status == [BLKIF_RSP_EOPNOTSUPP] and r.image_unchanged()
                assert r.handler.stats["unsupported"] == 1
            else:
                assert status == [BLKIF_RSP_OKAY]
                got = r.path.read_bytes()
                assert got[8192:16384] == bytes(8192)
                assert got[:8192] + got[16384:] == r.data[:8192] + r.data[16384:]
        finally:
            await r.close()

    run(body())


def test_secure_discard_overwrites_the_data_before_punching(tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    """With hole punching made a no-op, the range still reads as zeros: the data blocks
    were overwritten (and only they: a hole inside the range stays a hole)."""
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.write(b"\xee" * MiB)
        f.seek(2 * MiB)
        f.write(b"\xdd" * MiB)
    img = BlockImage(str(path))
    monkeypatch.setattr(img, "punch", lambda offset, length: None)
    try:
        img.secure_discard(512 * KiB, 2 * MiB)
    finally:
        img.close()
    got = path.read_bytes()
    assert got[:512 * KiB] == b"\xee" * (512 * KiB)
    assert got[512 * KiB:2560 * KiB] == bytes(2 * MiB)
    assert got[2560 * KiB:] == b"\xdd" * (512 * KiB)
    assert not allocated_in(path, MiB, 2 * MiB)  # the hole was not filled in


# ------------------------------------------------------------------ live state


class GatedPool(concurrent.futures.ThreadPoolExecutor):
    """An I/O pool whose work waits for ``gate`` (requests stay in flight until then)."""

    def __init__(self) -> None:
        super().__init__(4)
        self.gate = threading.Event()
        self.gate.set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        def gated() -> Any:
            self.gate.wait(60)
            return fn(*args, **kwargs)
        return super().submit(gated)


def test_block_info_shows_requests_in_flight_from_another_process() -> None:
    """Writes held in the backend's I/O pool: `xenpv block info`, another process, sees
    them in flight on the queue; once released it sees none in flight and them completed;
    the stats file goes away with the device."""
    async def info(w: Any, stats: Path) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            *xenpv("block", "info", str(FE), "xvda", "-s", str(w.tmp / "dom0.sock"),
                   "--stats-dir", str(stats)), stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        shown: dict[str, Any] = json.loads(out)
        return shown

    async def until(w: Any, stats: Path, be_path: str, ok: Callable[[dict[str, Any]], bool],
                    *, shown: bool = True) -> dict[str, Any]:
        """Wait for the state in the file to satisfy ``ok`` (read here, cheaply), then
        (``shown``) what `block info` in another process shows of it (the state holds
        still)."""
        async with asyncio.timeout(30):
            while not ok(live := read_live_stats(stats, be_path) or {"inflight": -1,
                                                                       "queues": [{}]}):
                await asyncio.sleep(0.02)
        if shown:
            live = (await info(w, stats))["live"]
        assert ok(live)
        return live

    async def body() -> None:
        async with block_world() as w:
            image = w.tmp / "disk.img"
            make_image(image, 2 * MiB)
            stats = w.tmp / "stats"
            pool = GatedPool()
            pair = await start_pair(w, image, back=BlockConfig(engine="threads", max_queues=1),
                                    back_kw={"executor": pool, "stats_dir": stats,
                                             "stats_interval": 0.05})
            fe = pair.frontend
            try:
                await fe.read(0, 4096)  # a persistent grant mapped, one request completed
                live = await until(w, stats, pair.be_path,
                                   lambda s: s["queues"][0].get("completed") == 1, shown=False)
                assert (live["pid"], live["stale"], live["inflight"]) == (os.getpid(),
                                                                         False, 0)
                pool.gate.clear()
                writes = asyncio.gather(*(fe.write(k * 65536, bytes([k]) * 65536)
                                          for k in range(3)))
                live = await until(w, stats, pair.be_path, lambda s: s["inflight"] == 3)
                q = live["queues"][0]
                assert q["inflight"] == 3 and q["persistent_grants"] >= 16
                assert q["completed"] == 1 and q["errors"] == 0
                pool.gate.set()
                await writes
                live = await until(w, stats, pair.be_path, lambda s: s["inflight"] == 0)
                assert live["queues"][0]["completed"] == 4
                assert live["queues"][0]["taken"] == 4
                path = live_stats_path(stats, pair.be_path)
            finally:
                pool.gate.set()
                await pair.close()
                pool.shutdown()
            assert not os.path.exists(path)
            assert read_live_stats(stats, pair.be_path) is None
        assert w.held() == NOTHING

    run(body())


def test_backend_process_options_and_live_state(
        daemon_machine: Callable[..., DaemonMachine], tmp_path: Path,
        procs: list[subprocess.Popen[bytes]]) -> None:
    """`xenpv block backend --sector-size 4096 --discard-secure` in its own process: the
    frontend sees 4 KiB sectors and secure discard works; `xenpv block info --rundir`
    finds the process's live state in the run directory's stats directory, and after a
    SIGKILL reports it stale."""
    machine = daemon_machine(GUEST, max_grants=4096, max_ports=64)
    rundir = machine.rundir
    image = tmp_path / "disk.img"
    data = bytearray(make_image(image, 2 * MiB))
    sock = str(Path(rundir) / "dom0" / "xenstore")
    be = start_backend(rundir, procs, "--sector-size", "4096", "--discard-secure",
                       "--stats-interval", "0.05")
    fe_path = add_vbd(sock, image)

    async def body() -> None:
        fe, xs, guest = await connect_frontend(rundir, fe_path)
        try:
            assert (fe.sector_size, fe.size, fe.features["discard_secure"]) == (4096, 2 * MiB,
                                                                               True)
            await fe.write(4096, b"\x11" * 8192)
            await fe.discard(MiB, 65536, secure=True)
            data[4096:12288] = b"\x11" * 8192
            data[MiB:MiB + 65536] = bytes(65536)
            assert await fe.read(0, 2 * MiB) == data
            be_path = f"/local/domain/0/backend/vbd/{GUEST}/51712"
            sent = fe.io_stats["requests"]
            async with asyncio.timeout(30):  # the file catches up (read here, cheaply)
                while not (live := read_live_stats(default_stats_dir(rundir), be_path)) \
                        or sum(q["completed"] for q in live["queues"]) < sent:
                    await asyncio.sleep(0.02)
            out = await asyncio.create_subprocess_exec(
                *xenpv("block", "info", str(GUEST), "xvda", "--rundir", rundir),
                stdout=subprocess.PIPE)
            shown = json.loads((await out.communicate())[0])
            live = shown["live"]
            assert shown["backend"] == be_path
            assert sum(q["completed"] for q in live["queues"]) == sent
            assert shown["backend_keys"]["sector-size"] == "4096"
            assert shown["backend_keys"]["discard-secure"] == "1"
            assert live["pid"] == be.pid and live["stale"] is False
            assert live["inflight"] == 0
            assert sum(q["secure_discards"] for q in live["queues"]) == 1
            be.kill()
            be.wait(20)
            after = read_live_stats(default_stats_dir(rundir), shown["backend"])
            assert after is not None and after["stale"] is True
        finally:
            await fe.abort()
            await xs.close()
            guest.close()

    asyncio.run(body())
    assert image.read_bytes() == data


def test_read_live_stats_takes_only_a_well_formed_state(tmp_path: Path) -> None:
    """What `block info` reads is checked: a backend path that is not one (the frontend's
    `backend` node is the guest's to write) names no file outside the stats directory,
    and a file that is not a state (truncated, wrong shapes) shows as no state."""
    be = "/local/domain/0/backend/vbd/3/51712"
    target = Path(live_stats_path(tmp_path, be))
    assert target == tmp_path / "vbd-0-3-51712.json"
    for bad_path in ["/local/domain/0/backend/vbd/../../../etc/passwd", "backend", ""]:
        assert read_live_stats(tmp_path, bad_path) is None
    good = {"pid": os.getpid(), "updated": 0, "queues": [{"inflight": 2}, {"inflight": 1}]}
    for content in [b"{", b"[]", b'{"pid": 1}', b'{"pid": "x", "queues": []}',
                    json.dumps({**good, "queues": [1]}).encode(),
                    json.dumps({**good, "queues": {"a": 1}}).encode()]:
        target.write_bytes(content)
        assert read_live_stats(tmp_path, be) is None, content
    target.write_bytes(json.dumps(good).encode())
    shown = read_live_stats(tmp_path, be)
    assert shown is not None and (shown["inflight"], shown["stale"]) == (3, False)


@pytest.mark.parametrize("sizes", [("4096", "2048"), ("4096", "6144"), ("8192", "8192"),
                                   ("1024", "x")])
def test_frontend_fails_closed_on_bad_sector_sizes(sizes: tuple[str, str]) -> None:
    """A backend publishing a sector size the frontend cannot honour (over a page), or a
    physical sector size below it or not a power of two: the frontend never connects,
    it writes its error node and holds nothing."""
    async def body() -> None:
        async with block_world() as w:
            from xenpv.frontends.block import BlockFrontend
            from xenpv.xenbus import add_device

            info = await add_device(w.dom0, "vbd", FE, 2, 51712)
            bp = info.backend_path
            await w.dom0.write(f"{bp}/state", "2")
            fe = BlockFrontend(w.machine.domain(FE), w.fe, info.frontend_path,
                               close_timeout=0.5)
            await fe.start()
            try:
                await fe.wait_state(S.Initialised, timeout=10)
                for k, v in {"sectors": "2048", "sector-size": sizes[0],
                             "physical-sector-size": sizes[1], "state": "4"}.items():
                    await w.dom0.write(f"{bp}/{k}", v)
                await fe.wait_state(S.Closing, S.Closed, timeout=10)
                assert await w.read_error(info.frontend_path)
                with pytest.raises(LocalError):
                    await fe.read(0, 4096)
            finally:
                await fe.close()
        assert w.held() == NOTHING

    run(body())

"""The NBD export's limits, in process: our frontend and backend on the in-process emulator,
:class:`~xenpv.frontends.nbd.NbdExport` on a Unix socket, raw asyncio clients.

What the real clients (tests/interop/test_block_nbd.py) cannot show: the old
``NBD_OPT_EXPORT_NAME`` entry with its 124 zero bytes, a client stalled in the handshake
(dropped after ``handshake_timeout``), connections past ``max_connections`` (closed), and
a client that sends requests but never reads the replies (the server stops reading
requests at ``max_inflight``/``max_buffered``: memory stays bounded).  The emulator holds
nothing afterwards.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from test_block_support import NOTHING, block_world, make_image, run, start_pair

from xenpv.frontends.nbd import NbdConfig, NbdExport

IHAVEOPT = 0x49484156454F5054
REQ = struct.Struct(">IHHQQI")
SIZE = 1 << 20


async def _open(sock: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(sock)


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 10) == b""
    except ConnectionError:
        return True


def test_export_limits_hold_against_stalling_clients() -> None:
    async def body() -> None:
        async with block_world() as world:
            image = world.tmp / "disk.img"
            data = make_image(image, SIZE)
            pair = await start_pair(world, image)
            sock = str(Path(world.tmp) / "nbd.sock")
            export = NbdExport(pair.frontend, "xvda",
                               NbdConfig(max_payload=65536, max_inflight=4,
                                         max_buffered=131072, max_connections=3,
                                         handshake_timeout=0.5))
            await export.listen(sock)
            try:
                # the old way in: EXPORT_NAME, size, flags and 124 zero bytes (no NO_ZEROES)
                r, w = await _open(sock)
                assert (await r.readexactly(18))[:16] == b"NBDMAGICIHAVEOPT"
                w.write(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 1, 4) + b"xvda")
                size, flags = struct.unpack(">QH", await r.readexactly(10))
                assert size == SIZE and flags & 1 and not flags & 2  # has flags, writable
                assert await r.readexactly(124) == bytes(124)
                w.write(REQ.pack(0x25609513, 0, 0, 42, 4096, 512))
                magic, error, cookie = struct.unpack(">IIQ", await r.readexactly(16))
                assert (magic, error, cookie) == (0x67446698, 0, 42)
                assert await r.readexactly(512) == data[4096:4608]

                # a client that never reads replies: the server stops taking requests
                for k in range(64):
                    w.write(REQ.pack(0x25609513, 0, 0, k, 0, 65536))
                await asyncio.sleep(1.0)
                taken = export.stats["requests"]
                await asyncio.sleep(1.0)
                assert export.stats["requests"] == taken < 1 + 64  # reading stopped
                assert export.max_inflight_seen <= 4
                # ... and serves them all once the client reads again, in any order
                seen = set()
                for _ in range(64):
                    _m, error, cookie = struct.unpack(">IIQ", await r.readexactly(16))
                    assert error == 0
                    assert await r.readexactly(65536) == data[:65536]
                    seen.add(cookie)
                assert seen == set(range(64))
                w.write(REQ.pack(0x25609513, 0, 2, 0, 0, 0))  # DISC
                assert await _closed(r)
                w.close()

                # a client stalled in the handshake is dropped after handshake_timeout
                r1, w1 = await _open(sock)
                await r1.readexactly(18)
                assert await _closed(r1)
                w1.close()

                # past max_connections, connections are closed at once
                held = [await _open(sock) for _ in range(3)]
                for hr, _hw in held:
                    await hr.readexactly(18)
                r2, w2 = await _open(sock)
                assert await _closed(r2)
                assert export.stats["refused"] >= 1
                w2.close()
                for _hr, hw in held:
                    hw.close()
            finally:
                await export.close()
                await pair.close()
            assert world.held() == NOTHING

    run(body())

"""xenpv vchan server and client in separate domain processes on the loopback daemon.

A bulk transfer with a digest both ways, then peer death: one process is killed in the
middle of a transfer, the other reports the close (unmap notification: live byte cleared,
port signalled) and the emulator holds nothing afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import xenpv.vchan as xenpv_vchan
from xenpv.testing.vchan import VchanLab, vchan_path

SERVER, CLIENT = 1, 2
MiB = 1 << 20


@pytest.fixture
def lab() -> Iterator[VchanLab]:
    with VchanLab((SERVER, CLIENT)) as lab:
        yield lab


@pytest.mark.parametrize("ring", [0, 64 * 1024, MiB], ids=["in-page", "64KiB", "1MiB"])
def test_transfer_between_processes_with_digest(lab: VchanLab, ring: int) -> None:
    size = MiB if ring == 0 else 48 * MiB
    path = vchan_path(SERVER, CLIENT, f"bulk{ring}")
    server = lab.tool(SERVER, "server", str(CLIENT), path, "--send", str(size), "--recv",
                      str(size), "--read-min", str(ring), "--write-min", str(ring), "--chunk", "50001")
    assert lab.read_json(server)["event"] == "ready"
    client = lab.tool(CLIENT, "client", str(SERVER), path, "--send", str(size), "--recv", str(size))
    assert lab.read_json(client)["event"] == "ready"
    a, b = lab.read_json(server, 120), lab.read_json(client, 120)
    assert a["event"] == b["event"] == "done"
    assert a["sent"] == b["received"] == size and b["sent"] == a["received"] == size
    assert a["sent_crc"] == b["received_crc"] and b["sent_crc"] == a["received_crc"]
    assert server.wait(30) == 0 and client.wait(30) == 0
    lab.assert_released()


@pytest.mark.parametrize("victim", ["server", "client"])
def test_peer_killed_mid_transfer_is_reported_and_released(lab: VchanLab, victim: str) -> None:
    path = vchan_path(SERVER, CLIENT, f"kill-{victim}")
    endless = str(1 << 40)
    server = lab.tool(SERVER, "server", str(CLIENT), path, "--send", endless, "--recv", "-1",
                      "--read-min", str(MiB), "--write-min", str(MiB))
    assert lab.read_json(server)["event"] == "ready"
    client = lab.tool(CLIENT, "client", str(SERVER), path, "--send", endless, "--recv", "-1")
    assert lab.read_json(client)["event"] == "ready"
    dead, survivor = (server, client) if victim == "server" else (client, server)
    dead.kill()
    dead.wait(10)
    result = lab.read_json(survivor, 30)
    # the survivor was sending when its peer vanished: either its write hit the gone peer
    # (BrokenPipeError) or its reader saw the end of the stream first
    assert result["event"] in ("error", "done")
    if result["event"] == "error":
        assert "BrokenPipeError" in result["error"]
    survivor.wait(30)
    lab.assert_released()


@pytest.mark.parametrize(("server_platform", "client_platform", "ring"),
                         [("xen", "loopback", MiB), ("loopback", "xen", MiB), ("xen", "xen", 0)])
def test_real_xen_platform_through_the_replacement_libraries(
        lab: VchanLab, server_platform: str, client_platform: str, ring: int) -> None:
    """The same endpoints on ``xenpv.platforms.xen`` (Xen's C library API, here served by
    the emulator's replacement libraries) against the loopback platform and itself."""
    size = 4 * MiB if ring else MiB // 2
    path = vchan_path(SERVER, CLIENT, f"xen-{server_platform}-{client_platform}")
    server = lab.tool(SERVER, "server", str(CLIENT), path, "--send", str(size), "--recv",
                      str(size), "--read-min", str(ring), "--write-min", str(ring),
                      "--platform", server_platform)
    assert lab.read_json(server)["event"] == "ready"
    client = lab.tool(CLIENT, "client", str(SERVER), path, "--send", str(size), "--recv",
                      str(size), "--platform", client_platform)
    assert lab.read_json(client)["event"] == "ready"
    a, b = lab.read_json(server, 120), lab.read_json(client, 120)
    assert a["event"] == b["event"] == "done"
    assert a["sent_crc"] == b["received_crc"] and b["sent_crc"] == a["received_crc"]
    assert a["received"] == b["received"] == size
    assert server.wait(30) == 0 and client.wait(30) == 0
    lab.assert_released()


def test_asyncio_server_sees_killed_client_process(lab: VchanLab) -> None:
    """Our asyncio stream server (here) and a client process killed mid-transfer: the
    handler's reader reaches end of file and the vchan is released."""
    spf = lab.platform(SERVER)
    path = vchan_path(SERVER, CLIENT, "asyncio-kill")
    got: list[int] = []

    async def main() -> None:
        ended = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            total = 0
            while chunk := await reader.read(1 << 16):
                total += len(chunk)
                if total > 4 * MiB and client.poll() is None:
                    client.kill()
            got.append(total)
            writer.close()
            ended.set()

        server = await xenpv_vchan.start_server(spf, CLIENT, path, handler, read_min=MiB,
                                                write_min=MiB)
        client = lab.tool(CLIENT, "client", str(SERVER), path, "--send", str(1 << 40))
        await asyncio.wait_for(ended.wait(), 60)
        server.close()
        await server.wait_closed()
        assert await server.quarantine.drain(5.0)

    asyncio.run(asyncio.wait_for(main(), 90))
    assert got and got[0] > 4 * MiB
    spf.close()
    lab.assert_released()

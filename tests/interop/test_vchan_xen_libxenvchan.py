"""xenpv's vchan client against a server built on Debian's libxenvchan (1 MiB rings).

``tests/csrc/vchan_peer_server.c`` links ``libxenvchan.so.4.17`` from the peers tree and
runs as an emulated domain through the replacement libraries; our client runs in another
process (``python -m xenpv.vchan.tool``).  256 MiB go each way with a CRC-32 over every
byte; then either side is killed in the middle of a transfer and the other must report
the close and release everything.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.testing.vchan import VchanLab, build_libxenvchan_program, read_line, vchan_path

SERVER, CLIENT = 1, 2
MiB = 1 << 20
SRC = Path(__file__).resolve().parent.parent / "csrc" / "vchan_peer_server.c"


@pytest.fixture(scope="module")
def peer_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_libxenvchan_program(SRC, tmp_path_factory.mktemp("csrc") / "vchan_peer_server")


@pytest.fixture
def lab() -> Iterator[VchanLab]:
    with VchanLab((SERVER, CLIENT)) as lab:
        yield lab


def start_c_server(lab: VchanLab, exe: Path, path: str, send: int, recv: int,
                   hold: bool = False) -> subprocess.Popen[bytes]:
    proc = lab.spawn(SERVER, [str(exe), str(CLIENT), path, str(send), str(recv), str(MiB),
                              "1" if hold else "0"], stdout=subprocess.PIPE, bufsize=0)
    assert read_line(proc, 30) == "ready"
    return proc


def test_256_mib_each_way_against_libxenvchan_server(lab: VchanLab, peer_server: Path) -> None:
    size = 256 * MiB
    path = vchan_path(SERVER, CLIENT, "bulk")
    server = start_c_server(lab, peer_server, path, size, size)
    client = lab.tool(CLIENT, "client", str(SERVER), path, "--send", str(size), "--recv", str(size))
    assert lab.read_json(client)["event"] == "ready"
    done = lab.read_json(client, timeout=120)
    assert done["event"] == "done"
    word, sent, sent_crc, received, received_crc = read_line(server, 60).split()
    assert word == "done"
    assert (int(sent), int(received)) == (size, size)
    assert (done["sent"], done["received"]) == (size, size)
    assert done["received_crc"] == int(sent_crc)
    assert done["sent_crc"] == int(received_crc)
    assert client.wait(30) == 0
    assert server.wait(30) == 0
    lab.assert_released()


def test_libxenvchan_server_killed_mid_transfer(lab: VchanLab, peer_server: Path) -> None:
    path = vchan_path(SERVER, CLIENT, "kill-server")
    server = start_c_server(lab, peer_server, path, 1 << 40, 1 << 40)
    client = lab.tool(CLIENT, "client", str(SERVER), path, "--send", str(1 << 40), "--recv", "-1")
    assert lab.read_json(client)["event"] == "ready"
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    # the unmap notification clears srv_live and signals: our client sees the close
    result = lab.read_json(client, timeout=30)
    assert result["event"] in ("done", "error")
    if result["event"] == "error":
        assert "BrokenPipeError" in result["error"]
    assert client.wait(30) in (0, 2)
    lab.assert_released()


def test_our_client_killed_mid_transfer(lab: VchanLab, peer_server: Path) -> None:
    path = vchan_path(SERVER, CLIENT, "kill-client")
    server = start_c_server(lab, peer_server, path, 1 << 40, 1 << 40)
    client = lab.tool(CLIENT, "client", str(SERVER), path, "--send", str(1 << 40), "--recv", "-1")
    assert lab.read_json(client)["event"] == "ready"
    client.kill()
    client.wait(10)
    # the client's mapping goes: cli_live is cleared and the port signalled
    assert read_line(server, 30).startswith("closed ")
    assert server.wait(30) == 2
    lab.assert_released()

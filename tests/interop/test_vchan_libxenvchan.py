"""Debian's ``libxenvchan.so.4.17`` on the loopback emulator, driven by our C program
``tests/csrc/vchan_bulk.c``: 64 MiB each way through 1 MiB rings (256 granted pages per
ring, mapped contiguously), and the death of either side seen by the other through the
unmap notifications."""

from __future__ import annotations

import shutil
import signal
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from shim_peers import LoopbackRun

from xenpv import peers

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "vchan_bulk.c"
TOTAL = 64 << 20
RING = 1 << 20


def expected_crc(total: int, seed: int) -> str:
    """CRC-32 of vchan_bulk's stream: little-endian words (i * 2654435761 + seed) mod 2^32."""
    assert total % 4 == 0
    words = (np.arange(total // 4, dtype=np.uint64) * 2654435761 + seed).astype("<u4")
    return f"{zlib.crc32(words.tobytes()):08x}"


@pytest.fixture(scope="module")
def vchan_bulk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vchan_bulk compiled against libxen-dev's headers and Debian's libxenvchan."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler (cc) is needed to build tests/csrc/vchan_bulk.c"
    out = tmp_path_factory.mktemp("csrc") / "vchan_bulk"
    lib = peers.lib_dir()
    subprocess.run(
        [
            cc, "-O2", "-Wall", "-Werror", f"-I{peers.include_dir()}", "-o", str(out),
            str(SOURCE), f"-L{lib}", f"-Wl,-rpath-link,{lib}", "-lxenvchan",
        ],
        check=True,
        timeout=120,
    )
    return out


@pytest.fixture
def loopback() -> Iterator[LoopbackRun]:
    """A daemon with domain 1 (vchan server) and domain 2 (vchan client)."""
    run = LoopbackRun({1: "vchan-server", 2: "vchan-client"})
    try:
        yield run
    finally:
        run.close()


def _output(proc: subprocess.Popen[bytes], timeout: float) -> list[str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err.decode(errors='replace')}"
    return out.decode().split("\n")


def test_64_mib_each_way_through_1_mib_rings(loopback: LoopbackRun, vchan_bulk: Path) -> None:
    path = "/local/domain/1/data/vchan/bulk"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    server = loopback.spawn(1, [str(vchan_bulk), "server", "2", path, str(TOTAL), str(RING)], **pipes)
    client = loopback.spawn(2, [str(vchan_bulk), "client", "1", path, str(TOTAL), str(RING)], **pipes)
    to_server, to_client = expected_crc(TOTAL, 1), expected_crc(TOTAL, 2)
    assert _output(client, 150)[:2] == [f"sent {TOTAL} {to_server}", f"received {TOTAL} {to_client}"]
    assert _output(server, 30)[:2] == [f"received {TOTAL} {to_server}", f"sent {TOTAL} {to_client}"]
    # the server removed its xenstore entries on close
    assert loopback.xenstore_read(f"{path}/ring-ref") is None


@pytest.mark.parametrize("victim", ["client", "server"])
def test_killed_peer_is_seen_through_its_unmap_notification(
    loopback: LoopbackRun, vchan_bulk: Path, victim: str
) -> None:
    path = f"/local/domain/1/data/vchan/hold-{victim}"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    server = loopback.spawn(1, [str(vchan_bulk), "hold-server", "2", path, "0", "4096"], **pipes)
    client = loopback.spawn(2, [str(vchan_bulk), "hold-client", "1", path], **pipes)
    for proc in (server, client):
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"connected\n"
    dead, survivor = (client, server) if victim == "client" else (server, client)
    dead.send_signal(signal.SIGKILL)
    dead.wait(10)
    # SIGKILL runs no cleanup: only the emulator's unmap notification (live byte cleared,
    # port signalled) can tell the survivor.
    assert _output(survivor, 30)[0] == "peer-closed"

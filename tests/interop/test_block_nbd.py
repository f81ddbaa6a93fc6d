"""``xenpv block export`` against real NBD clients, and against hostile ones.

The whole chain runs in separate processes on the loopback daemon: ``xenpv block backend
--all`` as dom0 serves the image, ``xenpv device add vbd`` is the toolstack, and ``xenpv
block export xvda`` runs as the guest (under ``xenpv loopback env``'s environment) and
serves the disk on a Unix socket.  The clients are Debian's ``qemu-img``/``qemu-io``
(qemu-utils) and ``nbdinfo`` (libnbd-bin) from the peers tree; a missing one fails the
test.  The hostile clients speak raw bytes to the same socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_support import json_line, xenpv

from xenpv import peers
from xenpv.platforms.loopback.env import domain_env
from xenpv.platforms.loopback.harness import DaemonMachine

GUEST = 5
WAIT = 30.0
MiB = 1 << 20
SIZE = 8 * MiB


@dataclass
class Export:
    """The running chain: image, socket, the export's process."""

    image: Path
    sock: str
    proc: subprocess.Popen[bytes]
    rundir: str

    @property
    def url(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> dict[str, object]:
        """Close the export's stdin; its ``done`` event."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        done = json_line(self.proc, WAIT)
        assert self.proc.wait(WAIT) == 0
        return done


@pytest.fixture
def export(request: pytest.FixtureRequest, daemon_machine: Callable[..., DaemonMachine],
           tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> Iterator[Export]:
    """The chain on an 8 MiB image, the vbd in mode ``request.param`` (``w`` by default;
    ``MODE:N`` also serves it with N-byte logical sectors)."""
    mode, _, sector_size = getattr(request, "param", "w").partition(":")
    machine = daemon_machine(GUEST, max_grants=8192, max_ports=64)
    rundir = machine.rundir
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(7).randbytes(SIZE))
    be = subprocess.Popen(xenpv("block", "backend", "--all", "--rundir", rundir,
                                *(["--sector-size", sector_size] if sector_size else [])),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(be)
    assert json_line(be, WAIT)["event"] == "ready"
    subprocess.run(xenpv("device", "add", "vbd", "-f", str(GUEST), "-s",
                         str(Path(rundir) / "dom0" / "xenstore"), "--target", str(image),
                         "--vdev", "xvda", "--mode", mode), check=True, capture_output=True, timeout=WAIT)
    sock = str(tmp_path / "nbd.sock")
    env = {**os.environ, **domain_env(rundir, GUEST)}  # as `eval "$(xenpv loopback env)"`
    ex = subprocess.Popen(xenpv("block", "export", "xvda", "--socket", sock),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    procs.append(ex)
    ready = json_line(ex, WAIT)
    assert ready == {"event": "ready", "socket": sock, "name": "xvda", "size": SIZE,
                     "readonly": mode == "r"}
    chain = Export(image, sock, ex, rundir)
    yield chain
    if ex.poll() is None:
        chain.stop()
    assert be.stdin is not None
    be.stdin.close()
    assert json_line(be, WAIT)["event"] == "done"
    assert be.wait(WAIT) == 0
    machine.assert_released()


def tool(name: str) -> list[str]:
    """A client program from the peers tree (PeerMissing, a failure, if absent)."""
    return [str(peers.find(name))]


def run_tool(*cmd: str) -> str:
    out = subprocess.run(cmd, env=peers.run_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"{cmd[0]} failed: {out.stdout}{out.stderr}"
    return out.stdout


def test_qemu_img_convert_reads_the_whole_disk(export: Export, tmp_path: Path) -> None:
    """``qemu-img convert`` of the exported disk is the image, byte for byte; ``nbdinfo``
    shows its size and that it is writable."""
    copy = tmp_path / "copy.raw"
    run_tool(*tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", export.url, str(copy))
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == \
        hashlib.sha256(export.image.read_bytes()).hexdigest()
    info = json.loads(run_tool(*tool("nbdinfo"), "--json", export.url))
    [exp] = info["exports"]
    assert exp["export-size"] == SIZE
    assert exp["is_read_only"] is False
    assert exp["can_flush"] is True and exp["can_fua"] is True
    assert exp["block_size_minimum"] == 512
    assert run_tool(*tool("nbdinfo"), "--size", export.url).strip() == str(SIZE)
    done = export.stop()
    stats = done["export"]
    assert isinstance(stats, dict)
    assert stats["bytes_read"] >= SIZE and stats["errors"] == 0


def test_qemu_io_writes_land_in_the_image_and_read_back(export: Export) -> None:
    """``qemu-io`` writes patterns (some with FUA, one unaligned to 4 KiB), flushes, reads
    them back through the export, and the image file holds them; many requests are in
    flight at once (``aio_write`` batches)."""
    original = export.image.read_bytes()
    cmds = ["write -P 0xab 0 64k", "write -P 0xcd -f 1m 512k", "write -P 0x11 6293504 1k",
            "aio_write -P 0x21 2m 256k", "aio_write -P 0x22 3m 256k",
            "aio_write -P 0x23 4m 256k", "aio_write -P 0x24 5m 256k", "aio_flush",
            "flush", "read -P 0xab 0 64k", "read -P 0xcd 1m 512k", "read -P 0x11 6293504 1k",
            "read -P 0x24 5m 256k", "discard 7m 64k", "read -P 0 7m 64k",
            "read -v 8388096 512"]
    args = [*tool("qemu-io"), "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run_tool(*args, export.url)
    assert "Pattern verification failed" not in out, out
    # the last read's dump shows the image's last sector (what another program wrote)
    assert original[-512:-496].hex(" ")[:11] in out
    export.stop()
    data = export.image.read_bytes()
    want = bytearray(original)
    for pat, off, n in ((0xAB, 0, 64 << 10), (0xCD, MiB, 512 << 10), (0x11, 6 * MiB + 2048, 1024),
                        (0x21, 2 * MiB, 256 << 10), (0x22, 3 * MiB, 256 << 10),
                        (0x23, 4 * MiB, 256 << 10), (0x24, 5 * MiB, 256 << 10)):
        want[off:off + n] = bytes([pat]) * n
    want[7 * MiB:7 * MiB + 65536] = bytes(65536)  # the TRIM punched a hole
    assert data == want
    assert "discard 65536/65536 bytes at offset 7340032" in out


@pytest.mark.parametrize("export", ["w:4096"], indirect=True)
def test_4096_byte_sectors_reach_nbd_clients(export: Export) -> None:
    """A disk served with 4 KiB logical sectors: the export announces 4 KiB as its minimum
    block size, and ``qemu-io`` honours it (a write of 1 KiB at 512 bytes becomes a
    read-modify-write of the sector around it), so only the bytes written change."""
    original = export.image.read_bytes()
    info = json.loads(run_tool(*tool("nbdinfo"), "--json", export.url))
    [exp] = info["exports"]
    assert exp["block_size_minimum"] == 4096 and exp["export-size"] == SIZE
    out = run_tool(*tool("qemu-io"), "-f", "raw", "-c", "write -P 0x33 512 1k", "-c",
                   "write -P 0x44 1m 64k", "-c", "flush", "-c", "read -P 0x33 512 1k",
                   "-c", "read -P 0x44 1m 64k", export.url)
    assert "Pattern verification failed" not in out, out
    export.stop()
    want = bytearray(original)
    want[512:1536] = b"\x33" * 1024
    want[MiB:MiB + 65536] = b"\x44" * 65536
    assert export.image.read_bytes() == want


@pytest.mark.parametrize("export", ["r"], indirect=True)
def test_read_only_disk_is_exported_read_only(export: Export, tmp_path: Path) -> None:
    """A vbd in mode ``r`` is exported with NBD_FLAG_READ_ONLY: ``nbdinfo`` says so, a
    ``qemu-io`` write fails, reads work, the image is unchanged."""
    original = export.image.read_bytes()
    info = json.loads(run_tool(*tool("nbdinfo"), "--json", export.url))
    assert info["exports"][0]["is_read_only"] is True
    out = subprocess.run([*tool("qemu-io"), "-f", "raw", "-c", "write -P 0x55 0 4k",
                          export.url], env=peers.run_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 or "wrote" not in out.stdout, out.stdout
    copy = tmp_path / "copy.raw"
    run_tool(*tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", export.url, str(copy))
    assert copy.read_bytes() == original
    export.stop()
    assert export.image.read_bytes() == original


# -- hostile clients: raw bytes on the socket

def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(path)
    return s


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionError:
        return True


def _go(s: socket.socket) -> None:
    """Handshake with NO_ZEROES and NBD_OPT_GO for the default export."""
    greeting = _recv(s, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))
    data = struct.pack(">I", 0) + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", _recv(s, 20))
        assert magic == 0x3E889045565A9
        _recv(s, length)
        if rtype == 1:
            return
        assert rtype == 3, f"reply type {rtype:#x}"


def _request(s: socket.socket, cmd: int, cookie: int, offset: int, length: int,
             flags: int = 0, payload: bytes = b"") -> None:
    s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length) + payload)


def _reply(s: socket.socket) -> tuple[int, int]:
    magic, error, cookie = struct.unpack(">IIQ", _recv(s, 16))
    assert magic == 0x67446698
    return error, cookie


def test_hostile_clients_get_errors_or_are_dropped(export: Export) -> None:
    """Out-of-range reads get EINVAL, writes past the end ENOSPC (their payload consumed),
    unaligned writes and unknown commands EINVAL, oversized reads EINVAL; an oversized
    write, a bad request magic, a bad option magic, an unknown client flag and an
    oversized option end the connection; the export keeps serving good clients."""
    s = _connect(export.sock)
    _go(s)
    _request(s, 0, 1, SIZE - 512, 1024)  # read past the end
    assert _reply(s) == (22, 1)
    _request(s, 0, 2, (1 << 64) - 512, 512)  # offset at the top of u64
    assert _reply(s) == (22, 2)
    _request(s, 1, 3, SIZE, 512, payload=bytes(512))  # write past the end
    assert _reply(s) == (28, 3)
    _request(s, 1, 4, 100, 512, payload=bytes(512))  # unaligned write
    assert _reply(s) == (22, 4)
    _request(s, 0, 5, 0, 1 << 31)  # read larger than the most advertised
    assert _reply(s) == (22, 5)
    _request(s, 77, 6, 0, 0)  # unknown command
    assert _reply(s) == (22, 6)
    _request(s, 0, 7, 512, 100)  # unaligned read: served from the covering sectors
    assert _reply(s) == (0, 7)
    assert _recv(s, 100) == export.image.read_bytes()[512:612]
    # several requests in flight: every cookie answered exactly once
    for k in range(32):
        _request(s, 0, 100 + k, k * 65536, 65536)
    seen = set()
    for _ in range(32):
        error, cookie = _reply(s)
        assert error == 0
        _recv(s, 65536)
        seen.add(cookie)
    assert seen == set(range(100, 132))
    _request(s, 1, 8, 0, 0xFFFFFFFF)  # a 4 GiB write payload: dropped, nothing read
    assert _closed(s)
    s.close()

    s = _connect(export.sock)
    _go(s)
    s.sendall(b"\xde\xad\xbe\xef" + bytes(24))  # bad request magic
    assert _closed(s)
    s.close()

    s = _connect(export.sock)
    _recv(s, 18)
    s.sendall(struct.pack(">I", 1 << 7))  # unknown client flag
    assert _closed(s)
    s.close()

    s = _connect(export.sock)
    _recv(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0))  # bad option magic
    assert _closed(s)
    s.close()

    s = _connect(export.sock)
    _recv(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 1 << 30))
    assert _closed(s)  # oversized option: not read, connection ended
    s.close()

    s = _connect(export.sock)  # an unknown export name and an unknown option: error replies
    _recv(s, 18)
    s.sendall(struct.pack(">I", 3))
    data = struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    assert struct.unpack(">QIII", _recv(s, 20))[2] == (1 << 31) + 6
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 99, 0))
    assert struct.unpack(">QIII", _recv(s, 20))[2] == (1 << 31) + 1
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 3, 0))  # LIST: the one export
    _magic, _o, rtype, length = struct.unpack(">QIII", _recv(s, 20))
    assert rtype == 2 and _recv(s, length) == struct.pack(">I", 4) + b"xvda"
    assert struct.unpack(">QIII", _recv(s, 20))[2] == 1
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 2, 0))  # ABORT: ACK, then closed
    assert struct.unpack(">QIII", _recv(s, 20))[2] == 1
    assert _closed(s)
    s.close()

    copy = run_tool(*tool("nbdinfo"), "--size", export.url)  # a good client still served
    assert copy.strip() == str(SIZE)
    stats = export.stop()["export"]
    assert isinstance(stats, dict)
    assert stats["protocol_errors"] >= 5
    assert export.image.read_bytes() == random.Random(7).randbytes(SIZE)  # nothing written


def test_nbdcopy_writes_the_whole_disk_over_several_connections(export: Export,
                                                                tmp_path: Path) -> None:
    """``nbdcopy`` of a new disk image into the export (several connections, as the export
    offers multi-conn, and many requests in flight on each): after its flush, the backend's
    image file is the new image; reading it back with ``nbdcopy`` gives the same bytes."""
    new = random.Random(99).randbytes(SIZE)
    src = tmp_path / "new.raw"
    src.write_bytes(new)
    run_tool(*tool("nbdcopy"), "--flush", "--connections=4", "--requests=32", str(src),
             export.url)
    back = tmp_path / "back.raw"
    run_tool(*tool("nbdcopy"), export.url, str(back))
    assert back.read_bytes() == new
    stats = export.stop()["export"]
    assert isinstance(stats, dict)
    assert stats["connections"] >= 4 and stats["errors"] == 0 and stats["flushes"] >= 1
    assert export.image.read_bytes() == new

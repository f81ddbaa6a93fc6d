"""The block backend's io_uring engine on its own, and its fall-back when the kernel
refuses io_uring (a real seccomp filter in a child process)."""

from __future__ import annotations

import asyncio
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from xenpv.backends.blockio import UringEngine, effective_engine, uring_unavailable

# A child that forbids io_uring_setup (EPERM) with a seccomp filter, then asks for io_uring.
_SECCOMP_CHILD = textwrap.dedent("""
    import ctypes, logging, struct, sys
    def ins(code, jt, jf, k):
        return struct.pack("<HBBI", code, jt, jf, k)
    prog = b"".join([
        ins(0x20, 0, 0, 4),            # A = seccomp_data.arch
        ins(0x15, 1, 0, 0xC000003E),   # x86-64? go on : allow
        ins(0x06, 0, 0, 0x7FFF0000),   # RET ALLOW
        ins(0x20, 0, 0, 0),            # A = seccomp_data.nr
        ins(0x15, 0, 1, 425),          # io_uring_setup?
        ins(0x06, 0, 0, 0x00050001),   # RET ERRNO(EPERM)
        ins(0x06, 0, 0, 0x7FFF0000),   # RET ALLOW
    ])
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("<HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_ulong]
    assert libc.prctl(38, 1, None, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, fprog, 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
    if sys.argv[1] == "cli":  # the command's own log line, then its failure to connect
        from xenpv.cli import main
        sys.exit(main(["block", "backend", "--all", "--rundir", sys.argv[2], "--engine",
                       "io_uring"]))
    logging.basicConfig(format="%(message)s")
    from xenpv.backends.blockio import effective_engine, uring_unavailable
    print(effective_engine("io_uring"), effective_engine("auto"), effective_engine("threads"))
    print(uring_unavailable())
""")


def test_io_uring_forbidden_by_seccomp_falls_back_with_a_clear_message(tmp_path: Path) -> None:
    assert uring_unavailable() is None  # this machine allows it (the engine is tested)
    assert effective_engine("auto") == "io_uring"
    out = subprocess.run([sys.executable, "-c", _SECCOMP_CHILD, "engines"],
                         capture_output=True, text=True, timeout=60, check=True)
    engines, reason = out.stdout.splitlines()
    assert engines == "threads mixed threads"
    assert reason.startswith("io_uring forbidden (seccomp filter or kernel.io_uring_disabled)")
    # said once per requested engine, naming what serves instead
    assert "io_uring forbidden" in out.stderr and "thread-pool engine instead" in out.stderr
    assert out.stderr.count("io_uring forbidden") == 2
    cli = subprocess.run([sys.executable, "-c", _SECCOMP_CHILD, "cli", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cli.returncode == 1  # no emulator there: it got as far as connecting
    assert cli.stderr.splitlines()[0] == (
        "xenpv block: io_uring forbidden (seccomp filter or kernel.io_uring_disabled): "
        "io_uring_setup: Operation not permitted; serving with the thread-pool engine instead")


def test_uring_engine_reads_writes_short_transfers_and_waits_at_close(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    fd = os.open(path, os.O_RDWR)
    mem = mmap.mmap(-1, 4 * 4096)
    pages = memoryview(mem)

    async def body() -> None:
        eng = UringEngine(asyncio.get_running_loop(), entries=4)
        results: list[tuple[str, int]] = []
        try:
            for k in range(12):  # more than the ring's 4 slots: it submits as it fills
                assert eng.start(False, fd, [pages[(k % 4) * 4096:(k % 4 + 1) * 4096]],
                                 (k % 4) * 4096, lambda r, k=k: results.append((f"r{k}", r)))
            # two buffers in one request (READV), and one running past the end (short)
            assert eng.start(False, fd, [pages[:512], pages[4096:5120]], 1024,
                             lambda r: results.append(("v", r)))
            assert eng.start(False, fd, [pages[:4096]], 14 * 1024,
                             lambda r: results.append(("short", r)))
            eng.submit()
            async with asyncio.timeout(10):
                while eng.inflight:
                    eng.complete()
                    await asyncio.sleep(0.001)
            assert sorted(results) == sorted([(f"r{k}", 4096) for k in range(12)]
                                             + [("v", 1536), ("short", 2048)])
            pages[:4096] = b"\xab" * 4096
            assert eng.start(True, fd, [pages[:4096]], 8192, lambda r: results.append(("w", r)))
            eng.submit()
        finally:
            eng.close()  # waits for the write still in flight, calls its function
        assert results[-1] == ("w", 4096) and eng.inflight == 0
        eng.close()  # idempotent

    asyncio.run(body())
    os.close(fd)
    assert path.read_bytes()[8192:12288] == b"\xab" * 4096
    pages.release()
    mem.close()


def test_uring_engine_answers_a_direct_read_from_the_eventfd_alone(tmp_path: Path) -> None:
    """An O_DIRECT read completes after its submission; the loop, asleep in its poller,
    must be woken by the ring's eventfd (it hung when the ring deferred completion work
    to the next system call of the task)."""
    path = tmp_path / "img"
    path.write_bytes(bytes(range(256)) * 64)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    mem = mmap.mmap(-1, 4096)
    page = memoryview(mem)

    async def body() -> list[int]:
        eng = UringEngine(asyncio.get_running_loop())
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            for _ in range(20):
                got = asyncio.get_running_loop().create_future()
                assert eng.start(False, fd, [page], 4096, got.set_result)
                eng.submit()
                await asyncio.wait_for(got, 10)  # only the eventfd can finish it
        finally:
            eng.close()
        return [got.result(), eng.stats["submitted"]]

    assert asyncio.run(body()) == [4096, 20]
    assert bytes(page) == bytes(range(256)) * 16
    os.close(fd)
    page.release()
    mem.close()

"""Xen's test-xenstore as a guest of the loopback emulator: over the domain's socket, and
over the domain's xenstore ring through the xenbus device (``XenbusDevice``: what a guest
kernel's ``/dev/xen/xenbus`` does), against our embedded xenstored and against Xen's C
xenstored as dom0's.  test-xenstore works below the relative path ``xenstore-test``, so
in the guest's home, which dom0 owns: dom0 makes that node the guest's first, as a
toolstack gives a guest its writable subtrees.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from shim_peers import LoopbackRun
from test_xenstore_peers import TESTS

from xenpv import peers
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.xenstore.blocking import BlockingClient
from xenpv.xenstore.wire import XenstoreError, XsType
from xenpv.xenstore.xenbusdev import XenbusDevice

GUEST = 5
TEST_PATH = f"/local/domain/{GUEST}/xenstore-test"


@pytest.fixture(scope="module", params=["ours", "xen-c", "oxenstored"])
def run(request: pytest.FixtureRequest) -> Iterator[LoopbackRun]:
    r = LoopbackRun({GUEST: "guest"}, xenstored=request.param)
    try:
        yield r
    finally:
        r.close()


def _test_xenstore(run: LoopbackRun, env: dict[str, str]) -> None:
    with _dom0(run) as dom0:
        dom0.write(TEST_PATH, b"")
        dom0.set_perms(TEST_PATH, [f"n{GUEST}"])
    result = subprocess.run([str(peers.find("test-xenstore")), "-i", "3"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0].strip() for line in result.stdout.splitlines()] == TESTS
    with _dom0(run) as dom0:  # it ran as the guest, in its home, and cleaned up there
        with pytest.raises(XenstoreError) as gone:
            dom0.read(TEST_PATH)
        assert gone.value.errno_name == "ENOENT"


def test_test_xenstore_as_a_guest_over_its_ring(run: LoopbackRun) -> None:
    guest = ClientPlatform.for_domain(run.rundir, GUEST)
    ring = guest.xenstore_ring()
    try:
        with XenbusDevice(ring.mem, guest.events, ring.port) as dev:
            # a path that is not a socket: libxenstore opens it as the xenbus device
            _test_xenstore(run, run.env(GUEST, XENSTORED_PATH=dev.path))
            assert dev.error is None
    finally:
        ring.release()
        guest.close()


# (C xenstored serves guests over their rings only: a guest has no socket there)
@pytest.mark.parametrize("run", ["ours"], indirect=True)
def test_test_xenstore_as_a_guest_over_its_socket(run: LoopbackRun) -> None:
    env = run.env(GUEST)
    assert env["XENSTORED_PATH"] == os.path.join(run.rundir, f"dom{GUEST}", "xenstore")
    _test_xenstore(run, env)


def _dom0(run: LoopbackRun) -> BlockingClient:
    return BlockingClient(os.path.join(run.rundir, "dom0", "xenstore"), timeout=20)


@pytest.mark.parametrize("run", ["ours"], indirect=True)
def test_xenbus_device_ends_on_a_ring_the_server_flagged_and_a_new_one_resets_it(
    run: LoopbackRun,
) -> None:
    guest = ClientPlatform.for_domain(run.rundir, GUEST)
    ring = guest.xenstore_ring()
    try:
        with XenbusDevice(ring.mem, guest.events, ring.port) as dev:
            fd = os.open(dev.path, os.O_RDWR | os.O_NOCTTY)
            try:  # a header announcing 4097 bytes: the server flags the ring (PROTO)
                os.write(fd, struct.pack("<IIII", XsType.READ, 1, 0, 4097) + b"x" * 32)
                deadline = time.monotonic() + 20
                while dev.error is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert dev.error is not None and "error 3" in dev.error
                # the device hung up: a read ends at once (end of file or EIO)
                assert select.select([fd], [], [], 10)[0] == [fd]
                try:
                    assert os.read(fd, 4096) == b""
                except OSError as exc:
                    assert exc.errno == errno.EIO
            finally:
                os.close(fd)
        # the next taker resets the connection and is served again
        with XenbusDevice(ring.mem, guest.events, ring.port) as dev:
            _test_xenstore(run, run.env(GUEST, XENSTORED_PATH=dev.path))
            assert dev.error is None
    finally:
        ring.release()
        guest.close()

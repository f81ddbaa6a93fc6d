"""Xen's own ``xl`` (Debian's xen-utils-4.17) as the toolstack of the loopback emulator.

``xl`` and ``libxenlight`` load on the replacement libraries (the calls they never make
here are generated ENOSYS stubs, ``scripts/shim_stubs.py``), list the emulator's domains,
and attach, list and detach vbds and vifs that xenpv's own backends serve and xenpv's
frontends in the guests use (``xl_support.XlToolstack``: a private mount namespace gives
libxl its fixed paths).  The nodes ``xl`` writes equal those of ``xenpv device add``
modulo the differences listed in ``docs/xl.md``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cffi
from cli_support import json_line, xenpv
from test_shim_xenconsoled import GREETING, Console, _read_until
from test_shim_xenconsoled import console as console  # the fixture
from xl_support import XlToolstack

from xenpv import peers
from xenpv.frontends.block import BlockFrontend, FrontConfig
from xenpv.frontends.net import NetFrontend
from xenpv.platforms.loopback.client import ClientPlatform
from xenpv.platforms.loopback.env import shim_dir
from xenpv.platforms.loopback.harness import DaemonMachine
from xenpv.protocols.ethernet import NetFrame
from xenpv.xenbus import remove_device
from xenpv.xenstore.client import connect

REPO = Path(__file__).resolve().parents[2]
XEN_BIN = peers.XEN_BIN
#: The toolstack and Xen's two xenstoreds (every one linked BIND_NOW).
PROGRAMS = (f"{XEN_BIN}/xl", f"{XEN_BIN}/xenstored", f"{XEN_BIN}/oxenstored")
#: oxenstored's libxenguest imports xtl_* and xencall1 unversioned; Debian's libxenctrl
#: brings libxentoollog and libxencall in, the replacement does not link Debian libraries.
PRELOAD = {f"{XEN_BIN}/oxenstored": "libxentoollog.so.1 libxencall.so.1"}


def test_xl_and_xens_servers_load_on_the_replacement_libraries() -> None:
    """Every symbol of xl, libxenlight, libxlutil, libxenguest and both xenstoreds
    resolves with the replacement libraries first (``ldd -r`` binds everything, as
    BIND_NOW does), libxenctrl and libxenforeignmemory come from them, and the generated
    stubs are what the generator writes for the peers tree."""
    env = peers.run_env([str(shim_dir())])
    for program in PROGRAMS:
        path = peers.find(program)
        run_env = dict(env)
        if program in PRELOAD:
            run_env["LD_PRELOAD"] = PRELOAD[program]
        out = subprocess.run(["ldd", "-r", str(path)], env=run_env, capture_output=True,
                             text=True, timeout=30)
        report = out.stdout + out.stderr
        assert out.returncode == 0, report
        assert "undefined symbol" not in report and "not found" not in report, report
        for lib in ("libxenctrl.so.4.17", "libxenforeignmemory.so.1"):
            lines = [line for line in report.splitlines() if line.strip().startswith(lib)]
            if lines:
                assert all(str(shim_dir()) in line for line in lines), report
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "shim_stubs.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_stubs_fail_with_enosys_and_the_helpers_work() -> None:
    """A generated stub returns -1 (or NULL for a pointer) with errno ENOSYS; the
    hand-written helpers behave as Xen's: xc_strerror, xc_error_code_to_desc,
    xc_get_last_error (no error), read_exact/write_exact over a pipe (EOF is -1, errno
    0)."""
    ffi = cffi.FFI()
    ffi.cdef("""
        int xc_domain_pause(void *xch, uint32_t domid);
        void *xc_map_foreign_range(void *xch, uint32_t dom, int size, int prot,
                                   unsigned long mfn);
        const char *xc_strerror(void *xch, int errcode);
        const char *xc_error_code_to_desc(int code);
        typedef struct { int code; char message[1024]; } xc_error;
        const xc_error *xc_get_last_error(void *xch);
        int read_exact(int fd, void *data, size_t size);
        int write_exact(int fd, const void *data, size_t size);
    """)
    lib: Any = ffi.dlopen(str(shim_dir() / "libxenctrl.so.4.17"))
    ffi.errno = 0
    assert lib.xc_domain_pause(ffi.NULL, 1) == -1 and ffi.errno == errno.ENOSYS
    ffi.errno = 0
    assert lib.xc_map_foreign_range(ffi.NULL, 1, 4096, 3, 0) == ffi.NULL
    assert ffi.errno == errno.ENOSYS
    assert ffi.string(lib.xc_strerror(ffi.NULL, errno.EINVAL)) == os.strerror(errno.EINVAL).encode()
    assert ffi.string(lib.xc_error_code_to_desc(3)) == b"Invalid configuration"
    last = lib.xc_get_last_error(ffi.NULL)
    assert last.code == 0 and ffi.string(last.message) == b""
    r, w = os.pipe()
    try:
        assert lib.write_exact(w, b"0123456789", 10) == 0
        os.close(w)
        w = -1
        buf = ffi.new("char[8]")
        assert lib.read_exact(r, buf, 8) == 0 and ffi.buffer(buf)[:] == b"01234567"
        ffi.errno = 5
        assert lib.read_exact(r, buf, 8) == -1 and ffi.errno == 0  # 2 bytes, then EOF
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# ------------------------------------------------------------------ xl as the toolstack

GUESTS = {1: "xl-one", 2: "xl-two"}
#: A domain that gets the same devices from ``xenpv device add`` (no frontend runs there).
OURS = 3
WAIT = 20.0
MiB = 1 << 20
XVDB = 51728  # vdev xvdb
#: What ``xl`` writes that ``xenpv device add`` does not (or differently), per device
#: type: {node relative to the device's backend (``be/``) or frontend (``fe/``)
#: directory: (xenpv's value, xl's value)}; ``docs/xl.md`` says why.
DIFFERENCES: dict[str, dict[str, tuple[str | None, str | None]]] = {
    "vbd": {
        "be/script": (None, "/etc/xen/scripts/block"),
        "be/specification": (None, "xen"),
        "fe/trusted": (None, "1"),
        "fe/protocol": (None, "x86_64-abi"),
    },
    "vif": {
        "be/script": ("vif-bridge", "/etc/xen/scripts/vif-bridge"),
        "be/hotplug-status": (None, ""),
        "be/mtu": ("1500", None),
        "fe/trusted": (None, "1"),
    },
    "vkbd": {},
}


async def snapshot(xs: Any, devtype: str, domid: int, devid: int) -> dict[str, str]:
    """The device's backend and frontend nodes: ``{"be/KEY": value, "be/KEY@perms": ...}``
    (the guest's domain number in values and permissions replaced by ``D``), and
    ``libxl`` when xl's own record of the device exists."""
    out: dict[str, str] = {}
    for side, path in (("be", f"/local/domain/0/backend/{devtype}/{domid}/{devid}"),
                       ("fe", f"/local/domain/{domid}/device/{devtype}/{devid}")):
        for key in await xs.directory(path):
            value = (await xs.read(f"{path}/{key}")).decode()
            out[f"{side}/{key}"] = "D" if value == str(domid) and key.endswith("-id") \
                else value.replace(f"/{domid}/", "/D/")
            perms = await xs.get_perms(f"{path}/{key}")
            out[f"{side}/{key}@perms"] = " ".join(
                p.access + ("D" if p.domid == domid else str(p.domid)) for p in perms)
    if await xs.exists(f"/libxl/{domid}/device/{devtype}/{devid}"):
        out["libxl"] = "present"
    return out


def differences(ours: dict[str, str], xls: dict[str, str]) -> dict[str, tuple[str | None,
                                                                               str | None]]:
    """``{key: (ours, xl's)}`` for every node that is not the same in both."""
    return {k: (ours.get(k), xls.get(k)) for k in sorted(ours.keys() | xls.keys())
            if ours.get(k) != xls.get(k) and not k.endswith("@perms")} | {
        k: (ours.get(k), xls.get(k)) for k in sorted(ours.keys() & xls.keys())
        if k.endswith("@perms") and ours[k] != xls[k]}


async def wait_node(xs: Any, path: str, want: str | None, timeout: float = WAIT) -> None:
    """Until ``path`` reads ``want`` (``None``: until it is gone)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = (await xs.read(path)).decode() if await xs.exists(path) else None
        if value == want:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{path} is {value!r}, not {want!r}"
        await asyncio.sleep(0.05)


def test_xl_attaches_lists_and_detaches_vbds_and_vifs_served_by_xenpv(
        daemon_machine: Callable[..., DaemonMachine], procs: list[subprocess.Popen[bytes]],
        tmp_path: Path) -> None:
    """``xl list`` shows the emulator's domains (their uuids); ``xl block-attach`` and
    ``network-attach`` write the same nodes as ``xenpv device add`` modulo
    :data:`DIFFERENCES`, run the hotplug scripts, and the devices are served by ``xenpv
    block backend``/``net backend``: the guests' frontends connect and move data;
    ``block-list``/``network-list`` show them connected; ``block-detach`` and
    ``network-detach`` close both ends and remove every node."""
    machine = daemon_machine(max_grants=4096, max_ports=64)
    for domid, name in {**GUESTS, OURS: "xenpv-three"}.items():
        machine.create_domain(domid, name)
    rundir = machine.rundir
    sock = str(Path(rundir) / "dom0" / "xenstore")
    state = tmp_path / "xl"
    state.mkdir()
    xl = XlToolstack(rundir, state)
    listed = xl.domains()
    assert set(listed) == {"Domain-0", "xenpv-three", *GUESTS.values()}, listed
    assert listed["Domain-0"][0] == 0
    uuids = {listed[name][1] for name in GUESTS.values()}
    uuids.add(listed["xenpv-three"][1])
    assert len(uuids) == 3 and "00000000-0000-0000-0000-000000000000" not in uuids
    for domid, name in GUESTS.items():
        assert listed[name][0] == domid
        xl.adopt(domid, name, listed[name][1])
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    block = subprocess.Popen(xenpv("block", "backend", "--all", "--rundir", rundir),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(block)
    net = subprocess.Popen(xenpv("net", "backend", "--all", "--rundir", rundir),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(net)
    assert json_line(block, WAIT)["event"] == "ready"
    assert json_line(net, WAIT)["event"] == "ready"

    def cli(*args: str) -> None:
        subprocess.run(xenpv(*args, "-s", sock), check=True, capture_output=True, timeout=WAIT)

    async def xl_run(*args: str) -> str:
        """xl in a thread: the guests' frontends run in this event loop meanwhile."""
        return await asyncio.to_thread(xl.run, *args)

    async def body() -> None:
        xs = await connect(sock)
        try:
            for domid in GUESTS:  # what the toolstack that built the domain wrote
                await xs.write(f"/local/domain/{domid}/memory/target", "262144")
                await xs.write(f"/local/domain/{domid}/memory/static-max", "262144")
            await block_device(xs)
            await net_devices(xs)
            await keyboard_nodes(xs)
            for devtype, devid in (("vbd", XVDB), ("vif", 0)):  # never connected: no wait
                await remove_device(xs, devtype, OURS, devid, 0, force=True)
        finally:
            await xs.close()

    async def block_device(xs: Any) -> None:
        be = f"/local/domain/0/backend/vbd/1/{XVDB}"
        cli("device", "add", "vbd", "-f", str(OURS), "--target", str(image), "--vdev", "xvdb")
        await wait_node(xs, f"/local/domain/0/backend/vbd/{OURS}/{XVDB}/state", "2")
        ours = await snapshot(xs, "vbd", OURS, XVDB)
        await xl_run("block-attach", "1", f"format=raw,vdev=xvdb,access=rw,target={image}")
        xls = await snapshot(xs, "vbd", 1, XVDB)
        assert xls.pop("libxl") == "present"
        assert differences(ours, xls) == DIFFERENCES["vbd"]
        assert xl.hotplug_calls() == [f"block add backend/vbd/1/{XVDB}"]
        guest = ClientPlatform.for_domain(rundir, 1)
        gxs = await connect(str(Path(rundir) / "dom1" / "xenstore"))
        # One queue on a one-page ring: xl block-list reads only those keys (event-channel,
        # ring-ref), and shows -1 for queue-N/... and ring-refN
        fe = BlockFrontend(guest, gxs, f"/local/domain/1/device/vbd/{XVDB}",
                           config=FrontConfig(max_queues=1, max_ring_order=0),
                           close_timeout=2.0)
        try:
            await fe.start()
            await fe.ready(WAIT)
            blob = bytes(range(256)) * 1024  # 256 KiB
            await fe.write(MiB, blob)
            assert await fe.flush()
            assert await fe.read(MiB, len(blob)) == blob
            assert image.read_bytes()[MiB:MiB + len(blob)] == blob
            rows = (await xl_run("block-list", "1")).splitlines()
            assert rows[0].split()[:4] == ["Vdev", "BE", "handle", "state"]
            vdev, backend, _, st, evtch, ring = rows[1].split()[:6]
            assert (vdev, backend, st) == (str(XVDB), "0", "4")
            assert int(evtch) > 0 and int(ring) >= 0
            await xl_run("block-detach", "1", "xvdb")
            for path in (be, f"/local/domain/1/device/vbd/{XVDB}", f"/libxl/1/device/vbd/{XVDB}"):
                assert not await xs.exists(path), path
            assert xl.hotplug_calls()[1:] == [f"block remove backend/vbd/1/{XVDB}"]
            assert (await xl_run("block-list", "1")).splitlines()[1:] == []
        finally:
            await fe.close()
            await gxs.close()
            guest.close()

    async def net_devices(xs: Any) -> None:
        macs = {1: "00:16:3e:00:00:01", 2: "00:16:3e:00:00:02"}
        cli("device", "add", "vif", "-f", str(OURS), "--mac", macs[1], "--switch", "lab")
        await wait_node(xs, f"/local/domain/0/backend/vif/{OURS}/0/state", "2")
        ours = await snapshot(xs, "vif", OURS, 0)
        calls = len(xl.hotplug_calls())
        for domid in GUESTS:
            await xl_run("network-attach", str(domid), f"mac={macs[domid]}", "bridge=lab")
        xls = await snapshot(xs, "vif", 1, 0)
        assert xls.pop("libxl") == "present"
        assert differences(ours, xls) == DIFFERENCES["vif"]
        assert xl.hotplug_calls()[calls:] == [f"vif-bridge online backend/vif/{d}/0"
                                              for d in GUESTS]
        ends = []
        try:
            for domid in GUESTS:
                plat = ClientPlatform.for_domain(rundir, domid)
                gxs = await connect(str(Path(rundir) / f"dom{domid}" / "xenstore"))
                fe = NetFrontend(plat, gxs, f"/local/domain/{domid}/device/vif/0",
                                 close_timeout=2.0)
                ends.append((fe, gxs, plat))
                await fe.start()
            a, b = ends[0][0], ends[1][0]
            await a.ready(WAIT)
            await b.ready(WAIT)
            assert a.mac == bytes.fromhex(macs[1].replace(":", ""))
            hello = b"\xff" * 6 + a.mac + b"\x88\xb5" + b"through xl".ljust(46, b".")
            await a.send(NetFrame(hello))
            assert (await b.recv(WAIT)).data == hello
            reply = a.mac + b.mac + b"\x88\xb5" + bytes(range(256)) * 5
            await b.send(NetFrame(reply))
            assert (await a.recv(WAIT)).data == reply
            rows = (await xl_run("network-list", "1")).splitlines()
            assert rows[0].split()[:4] == ["Idx", "BE", "Mac", "Addr."]
            idx, backend, mac, handle, st = rows[1].split()[:5]
            assert (idx, backend, mac, handle, st) == ("0", "0", macs[1], "0", "4")
            calls = len(xl.hotplug_calls())
            for domid in GUESTS:
                await xl_run("network-detach", str(domid), "0")
                for path in (f"/local/domain/0/backend/vif/{domid}/0",
                             f"/local/domain/{domid}/device/vif/0",
                             f"/libxl/{domid}/device/vif/0"):
                    assert not await xs.exists(path), path
            assert xl.hotplug_calls()[calls:] == [f"vif-bridge offline backend/vif/{d}/0"
                                                  for d in GUESTS]
            assert (await xl_run("network-list", "1")).splitlines()[1:] == []
        finally:
            for fe, gxs, plat in ends:
                await fe.close()
                await gxs.close()
                plat.close()

    async def keyboard_nodes(xs: Any) -> None:
        # xl does not wait for a vkbd's backend: the nodes only (QEMU's backend type,
        # xl's default, is the vkbd directory xenpv uses)
        cli("device", "add", "vkbd", "-f", str(OURS))
        ours = await snapshot(xs, "vkbd", OURS, 0)
        await xl_run("vkb-attach", "1", "backend-type=qemu")
        xls = await snapshot(xs, "vkbd", 1, 0)
        assert xls.pop("libxl") == "present"
        assert differences(ours, xls) == DIFFERENCES["vkbd"]
        assert ours["be/state"] == "1" and len(ours) == 14
        for domid in (1, OURS):
            await remove_device(xs, "vkbd", domid, 0, 0, force=True)

    asyncio.run(body())
    # libxl's files went to the overlays' upper layers, never to the host
    name = f"userdata-d.1.{listed[GUESTS[1]][1]}.libxl-json"
    assert (state / "var" / "up" / "lib" / "xen" / name).exists()
    assert not (Path("/var/lib/xen") / name).exists()
    assert not Path("/usr/lib/xen-4.17").exists()
    for backend in (block, net):
        assert backend.stdin is not None
        backend.stdin.close()
        assert json_line(backend, WAIT)["event"] == "done"
        assert backend.wait(WAIT) == 0
    machine.assert_released()


def test_xl_console_attaches_to_a_guest_console_served_by_xenconsoled(
        console: Console, tmp_path: Path) -> None:
    """``xl console 1`` execs its compiled-in ``/usr/lib/xen-4.17/bin/xenconsole`` (there
    in xl's mount namespace) on our terminal: the guest's output arrives, our input
    reaches the guest."""
    xl = XlToolstack(console.run.rundir, tmp_path)
    master, slave = os.openpty()
    proc = subprocess.Popen(xl.command("console", "1"), env=xl.env, stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True)
    try:
        os.close(slave)
        slave = -1
        console.start_guest_output()
        _read_until(master, GREETING)
        os.write(master, b"via xl\n")  # xenconsole put the terminal in raw mode
        assert console.guest_input() == b"via xl\n"
        assert proc.poll() is None
        assert Path(f"/proc/{proc.pid}/exe").resolve().name == "xenconsole"
    finally:
        proc.kill()
        proc.wait(10)
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_xl_attaches_a_qdisk_that_qemu_serves(
        daemon_machine: Callable[..., DaemonMachine], procs: list[subprocess.Popen[bytes]],
        tmp_path: Path) -> None:
    """``xl block-attach ...backendtype=qdisk`` for a guest whose device model is QEMU
    (Debian's 7.2, running as dom0 on the emulator): QEMU's qdisk backend serves it, our
    frontend's writes land in the image, ``block-detach`` closes and removes it and QEMU
    carries on."""
    machine = daemon_machine(max_grants=4096, max_ports=64)
    machine.create_domain(1, "xl-qdisk")
    rundir = machine.rundir
    xl = XlToolstack(rundir, tmp_path / "xl")
    ((domid, uuid),) = [row for name, row in xl.domains().items() if name == "xl-qdisk"]
    xl.adopt(domid, "xl-qdisk", uuid)
    image = tmp_path / "q.img"
    image.write_bytes(bytes(4 * MiB))
    log = tmp_path / "qemu.log"
    with open(log, "wb") as out:
        qemu = subprocess.Popen(peers.qemu_device_model(1), env=xl.env, stdout=out,
                                stderr=subprocess.STDOUT)
    procs.append(qemu)
    be = "/local/domain/0/backend/qdisk/1/51744"  # xvdc

    async def body() -> None:
        xs = await connect(str(Path(rundir) / "dom0" / "xenstore"))
        guest = ClientPlatform.for_domain(rundir, 1)
        gxs = await connect(str(Path(rundir) / "dom1" / "xenstore"))
        fe = None
        try:
            # what libxl writes when it has started the device model (its check that one
            # runs), and the memory node of a domain it built
            await xs.write("/local/domain/1/image/device-model-pid", str(qemu.pid))
            await xs.write("/local/domain/1/memory/target", "262144")
            await asyncio.to_thread(xl.run, "block-attach", "1",
                                    f"backendtype=qdisk,format=raw,vdev=xvdc,access=rw,"
                                    f"target={image}")
            assert (await xs.read(f"{be}/params")).decode() == f"aio:{image}"
            fe = BlockFrontend(guest, gxs, "/local/domain/1/device/vbd/51744",
                               close_timeout=2.0)
            await fe.start()
            await fe.ready(WAIT)
            blob = bytes(range(255, -1, -1)) * 512
            await fe.write(2 * MiB, blob)
            assert await fe.flush()
            assert image.read_bytes()[2 * MiB:2 * MiB + len(blob)] == blob
            detach = await asyncio.to_thread(xl.call, "-vvv", "block-detach", "1", "xvdc")
            if detach.returncode != 0:
                # QEMU removes an offline device's directories itself once it is Closed; if
                # it does so before libxl reads the backend's Closed state, libxl calls the
                # removal failed (a race of QEMU 7.2 and libxl 4.17, seen under load)
                assert "wanted state 6 but it was removed" in detach.stderr, detach.stderr
            # QEMU may rewrite the state node just after libxl removed the directory,
            # then removes it again
            await wait_node(xs, be, None)
            await wait_node(xs, "/local/domain/1/device/vbd/51744", None)
        finally:
            if fe is not None:
                await fe.close()
            await gxs.close()
            await xs.close()
            guest.close()

    try:
        asyncio.run(body())
    except Exception as exc:
        raise AssertionError(f"{exc!r}; QEMU said: {log.read_text(errors='replace')[-2000:]}"
                             ) from exc
    assert qemu.poll() is None
    assert xl.hotplug_calls() == []  # libxl runs no script for QEMU's disks

"""The replacement libraries themselves: symbols and versions against Debian's, loading
under the real consumers, and the calls the platform suite does not reach (libxenctrl,
the stubs, the grant-copy probe, shares released with plain munmap)."""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import cffi
import pytest
from shim_peers import LoopbackRun
from shim_support import XC_DOMINFO_CDEF, act_as, daemon_stats, loopback_fixture

from xenpv import peers
from xenpv.platforms.loopback.env import shim_dir
from xenpv.platforms.xen import XenPlatform

REPO = Path(__file__).resolve().parents[2]
#: replacement -> Debian's library of the same soname; all but libxenctrl replace it whole
WHOLE = [
    "libxengnttab.so.1",
    "libxenevtchn.so.1",
    "libxenforeignmemory.so.1",
    "libxendevicemodel.so.1",
    "libxentoolcore.so.1",
]
CONSUMERS = [
    "usr/lib/x86_64-linux-gnu/libxenvchan.so.4.17",
    "usr/lib/xen-4.17/bin/vchan-socket-proxy",
    "usr/lib/xen-4.17/bin/xenconsoled",
    "usr/lib/xen-4.17/bin/xenconsole",
    "usr/lib/xen-4.17/bin/lsevtchn",
    "usr/libexec/xen-qemu-system-i386",
]
_SYM = re.compile(r"\s(DF|DO)\s+(\S+)\s+\S+\s+(\(?)(\S+?)\)?\s+(\S+)$")


def _dynsyms(path: Path) -> dict[str, set[tuple[str, str]]]:
    """``{"defined": {(version, name)}, "undefined": {...}}`` from ``objdump -T``."""
    out = subprocess.run(
        ["objdump", "-T", str(path)], check=True, capture_output=True, text=True
    ).stdout
    syms: dict[str, set[tuple[str, str]]] = {"defined": set(), "undefined": set()}
    for line in out.splitlines():
        m = _SYM.search(line)
        if m:
            kind = "undefined" if m.group(2) == "*UND*" else "defined"
            syms[kind].add((m.group(4), m.group(5)))
    return syms


def _version_nodes(path: Path) -> set[str]:
    out = subprocess.run(
        ["readelf", "-V", str(path)], check=True, capture_output=True, text=True
    ).stdout
    section = out.split("Version definition section", 1)[1].split("Version needs", 1)[0]
    return set(re.findall(r"Name: (VERS_[0-9.]+)", section))


@pytest.mark.parametrize("name", WHOLE)
def test_replacement_exports_what_debians_library_exports(name: str) -> None:
    ours, debians = shim_dir() / name, peers.lib_dir() / name
    assert _dynsyms(ours)["defined"] == _dynsyms(debians)["defined"]
    assert _version_nodes(ours) == _version_nodes(debians)


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_every_import_of_the_consumers_resolves_with_the_shim_first(consumer: str) -> None:
    path = peers.find(consumer)
    env = peers.run_env([str(shim_dir())])
    out = subprocess.run(["ldd", "-r", str(path)], env=env, capture_output=True, text=True)
    report = out.stdout + out.stderr
    assert "undefined symbol" not in report and "not found" not in report, report
    for line in report.splitlines():
        lib = line.split("=>")[0].strip()
        if lib in WHOLE or lib == "libxenctrl.so.4.17":
            assert str(shim_dir()) in line, line  # the replacement, not Debian's
    # libxenctrl is only partly replaced: everything the consumer takes from it exists
    ctrl = _dynsyms(shim_dir() / "libxenctrl.so.4.17")["defined"]
    wanted = {s for s in _dynsyms(path)["undefined"] if s[0] == "VERS_4.17.0"}
    wanted -= {s for s in wanted if s[1].startswith("libxenvchan_")}
    assert wanted <= ctrl


def test_shim_sources_compile_without_warnings(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed"
    for source in sorted((REPO / "shim").glob("*.c")):
        res = subprocess.run(
            [cc, "-fsyntax-only", "-Wall", "-Werror", f"-I{REPO / 'shim' / 'include'}", str(source)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, f"{source.name}: {res.stderr}"


# --------------------------------------------------------------------------- calls

CDEF = XC_DOMINFO_CDEF + """
typedef struct { uint16_t dom; uint32_t port; uint32_t status; uint32_t vcpu;
                 uint16_t rdom; uint32_t rport; } xc_evtchn_status_t;
void *xc_interface_open(void *logger, void *dombuild_logger, unsigned open_flags);
int xc_interface_close(void *xch);
int xc_domain_getinfo(void *xch, uint32_t first_domid, unsigned int max_doms, xc_dominfo_t *info);
int xc_evtchn_status(void *xch, xc_evtchn_status_t *status);
int xc_readconsolering(void *xch, char *buffer, unsigned int *pnr_chars, int clear,
                       int incremental, uint32_t *pindex);
void *xenforeignmemory_open(void *logger, unsigned open_flags);
int xenforeignmemory_close(void *fmem);
void *xenforeignmemory_map(void *fmem, uint32_t dom, int prot, size_t pages,
                           const unsigned long arr[], int err[]);
void *xendevicemodel_open(void *logger, unsigned int open_flags);
int xendevicemodel_close(void *dmod);
int xendevicemodel_shutdown(void *dmod, uint16_t domid, unsigned int reason);
typedef int restrict_cb(void *ah, uint16_t domid);
typedef struct { restrict_cb *cb; void *next; void *prev; } active_handle;
int xentoolcore_restrict_all(uint16_t domid);
void xentoolcore__register_active_handle(active_handle *ah);
void xentoolcore__deregister_active_handle(active_handle *ah);
void *xengntshr_open(void *logger, unsigned open_flags);
int xengntshr_close(void *xgs);
void *xengntshr_share_pages(void *xgs, uint32_t domid, int count, uint32_t *refs, int writable);
void *xengnttab_open(void *logger, unsigned open_flags);
int xengnttab_close(void *xgt);
int xengnttab_grant_copy(void *xgt, uint32_t count, void *segs);
int xengnttab_unmap(void *xgt, void *start_address, uint32_t count);
void *xengnttab_map_grant_refs(void *xgt, uint32_t count, uint32_t *domids, uint32_t *refs,
                               int prot);
int xengntshr_unshare(void *xgs, void *start_address, uint32_t count);
void *xenevtchn_fdopen(void *logger, int fd, unsigned open_flags);
int xenevtchn_bind_unbound_port(void *xce, uint32_t domid);
int xenevtchn_close(void *xce);
int munmap(void *addr, size_t length);
"""
ffi = cffi.FFI()
ffi.cdef(CDEF)


#: A daemon with domains 1 and 2.
loopback = loopback_fixture({1: "one", 2: "two"})


@pytest.fixture
def as_dom(loopback: LoopbackRun, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``as_dom(N)``: this process acts as domain N for handles opened from now on."""

    def switch(domid: int) -> None:
        act_as(monkeypatch, loopback, domid)

    return switch


def _lib(name: str) -> Any:
    return ffi.dlopen(str(shim_dir() / name))


def test_xc_domain_getinfo_and_evtchn_status_report_the_emulated_domains(
    loopback: LoopbackRun, as_dom: Any
) -> None:
    xc = _lib("libxenctrl.so.4.17")
    as_dom(1)
    platform = XenPlatform(1, lib_dir=shim_dir())
    try:
        port = platform.events.alloc_unbound(2)
        as_dom(0)
        xch = xc.xc_interface_open(ffi.NULL, ffi.NULL, 0)
        assert xch != ffi.NULL
        try:
            info = ffi.new("xc_dominfo_t[8]")
            assert xc.xc_domain_getinfo(xch, 0, 8, info) == 3
            assert [info[i].domid for i in range(3)] == [0, 1, 2]
            assert xc.xc_domain_getinfo(xch, 2, 8, info) == 1 and info[0].domid == 2
            assert xc.xc_domain_getinfo(xch, 3, 8, info) == 0
            st = ffi.new("xc_evtchn_status_t *", {"dom": 1, "port": port})
            assert xc.xc_evtchn_status(xch, st) == 0
            assert st.status == 1 and st.rdom == 2  # unbound, offered to domain 2
            n = ffi.new("unsigned int *", 100)
            assert xc.xc_readconsolering(xch, ffi.new("char[100]"), n, 0, 0, ffi.NULL) == -1
        finally:
            xc.xc_interface_close(xch)
    finally:
        platform.close()


def test_stub_libraries_open_dummy_handles_and_refuse_operations(as_dom: Any) -> None:
    # (libxenforeignmemory maps guest frames: tests/interop/test_foreign_memory.py)
    dm, tc = _lib("libxendevicemodel.so.1"), _lib("libxentoolcore.so.1")
    d = dm.xendevicemodel_open(ffi.NULL, 0)
    assert d != ffi.NULL
    assert dm.xendevicemodel_shutdown(d, 1, 0) == -1 and ffi.errno == errno.EOPNOTSUPP
    dm.xendevicemodel_close(d)
    seen: list[int] = []

    @ffi.callback("restrict_cb")
    def cb(ah: Any, domid: int) -> int:
        seen.append(domid)
        return 0

    ah = ffi.new("active_handle *", {"cb": cb})
    tc.xentoolcore__register_active_handle(ah)
    assert tc.xentoolcore_restrict_all(5) == 0 and seen == [5]
    tc.xentoolcore__deregister_active_handle(ah)
    assert tc.xentoolcore_restrict_all(6) == 0 and seen == [5]


def test_shares_released_with_plain_munmap_are_ended_when_their_address_returns(
    loopback: LoopbackRun, as_dom: Any
) -> None:
    # libxenvchan releases shared ring pages with munmap: the library notices when the
    # kernel hands the same addresses out again, and ends the stale shares.
    gt = _lib("libxengnttab.so.1")
    libc = ffi.dlopen(None)
    as_dom(1)
    h = gt.xengntshr_open(ffi.NULL, 0)
    assert h != ffi.NULL
    try:
        refs = ffi.new("uint32_t[1]")
        addrs = set()
        for _ in range(20):
            p = gt.xengntshr_share_pages(h, 2, 1, refs, 1)
            assert p != ffi.NULL
            addrs.add(int(ffi.cast("uintptr_t", p)))
            libc.munmap(p, 4096)
        stats = daemon_stats(loopback, 1)
        assert len(addrs) < 20, "the kernel never reused an address"
        assert stats["shares"] == len(addrs) and stats["grants"] == len(addrs)
    finally:
        gt.xengntshr_close(h)
    assert daemon_stats(loopback, 1)["shares"] == 0


def test_grant_copy_with_no_segments_is_a_successful_probe(as_dom: Any) -> None:
    gt = _lib("libxengnttab.so.1")
    as_dom(1)
    h = gt.xengnttab_open(ffi.NULL, 0)
    assert h != ffi.NULL
    try:
        assert gt.xengnttab_grant_copy(h, 0, ffi.NULL) == 0
    finally:
        gt.xengnttab_close(h)


def test_map_grant_refs_takes_a_domain_per_ref_and_unmap_checks_the_count(
    loopback: LoopbackRun, as_dom: Any
) -> None:
    gt = _lib("libxengnttab.so.1")
    shares, pages = [], []
    for domid in (1, 2):  # one page from each domain, granted to dom0
        as_dom(domid)
        h = gt.xengntshr_open(ffi.NULL, 0)
        ref = ffi.new("uint32_t[1]")
        p = gt.xengntshr_share_pages(h, 0, 1, ref, 1)
        assert p != ffi.NULL
        ffi.memmove(p, f"from dom{domid}".encode(), 9)
        shares.append((h, p))
        pages.append(ref[0])
    as_dom(0)
    h0 = gt.xengnttab_open(ffi.NULL, 0)
    try:
        m = gt.xengnttab_map_grant_refs(
            h0, 2, ffi.new("uint32_t[]", [1, 2]), ffi.new("uint32_t[]", pages),
            mmap.PROT_READ | mmap.PROT_WRITE,
        )
        assert m != ffi.NULL
        raw = ffi.buffer(m, 2 * 4096)
        assert raw[0:9] == b"from dom1" and raw[4096 : 4096 + 9] == b"from dom2"
        assert gt.xengnttab_unmap(h0, m, 1) == -1 and ffi.errno == errno.EINVAL
        assert gt.xengnttab_unmap(h0, m, 2) == 0
        assert gt.xengnttab_unmap(h0, m, 2) == -1  # already gone
    finally:
        gt.xengnttab_close(h0)
        for h, p in shares:
            assert gt.xengntshr_unshare(h, p, 1) == 0
            gt.xengntshr_close(h)
    assert all(v == 0 for k, v in daemon_stats(loopback, 1).items() if k != "handles")


def test_evtchn_fdopen_takes_over_a_connected_control_socket(loopback: LoopbackRun) -> None:
    ev = _lib("libxenevtchn.so.1")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(loopback.rundir / "dom1" / "control"))
    h = ev.xenevtchn_fdopen(ffi.NULL, sock.detach(), 0)
    assert h != ffi.NULL
    try:
        port = ev.xenevtchn_bind_unbound_port(h, 2)
        assert port > 0
        assert daemon_stats(loopback, 1)["ports"] == 1
    finally:
        ev.xenevtchn_close(h)
    assert daemon_stats(loopback, 1)["ports"] == 0


def test_lsevtchn_lists_a_domains_ports_through_xc_evtchn_status(
    loopback: LoopbackRun, as_dom: Any
) -> None:
    as_dom(1)
    one = XenPlatform(1, lib_dir=shim_dir())
    as_dom(2)
    two = XenPlatform(2, lib_dir=shim_dir())
    try:
        offered = one.events.alloc_unbound(2)
        waiting = one.events.alloc_unbound(0)
        bound = two.events.bind_interdomain(1, offered)
        out = subprocess.run(
            [str(peers.find("lsevtchn")), "1"],
            env=loopback.env(0),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        lines = out.splitlines()
        # port 1: the xenstore channel the domain builder connected to dom0's xenstored
        assert re.fullmatch(r"   1: VCPU 0: Interdomain \(Connected\) - Remote Domain 0, "
                            r"Port \d+", lines[0]), lines
        assert lines[1:] == [
            f"{offered:4d}: VCPU 0: Interdomain (Connected) - Remote Domain 2, Port {bound}",
            f"{waiting:4d}: VCPU 0: Interdomain (Waiting connection) - Remote Domain 0",
        ]
    finally:
        one.close()
        two.close()


def test_a_forked_child_gets_its_own_connection(loopback: LoopbackRun, as_dom: Any) -> None:
    gt = _lib("libxengnttab.so.1")
    as_dom(1)
    h = gt.xengntshr_open(ffi.NULL, 0)
    assert h != ffi.NULL
    refs = ffi.new("uint32_t[1]")
    try:
        pid = os.fork()
        if pid == 0:  # child: the inherited connection is the parent's; a new handle
            code = 1  # must connect anew and work
            try:
                hc = gt.xengntshr_open(ffi.NULL, 0)
                if hc != ffi.NULL and gt.xengntshr_share_pages(hc, 2, 1, refs, 1) != ffi.NULL:
                    code = 0 if daemon_stats(loopback, 1)["handles"] == 2 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the child's connection died with it (its share ended); ours still works
        assert gt.xengntshr_share_pages(h, 2, 1, refs, 1) != ffi.NULL
        assert daemon_stats(loopback, 1)["shares"] == 1
    finally:
        gt.xengntshr_close(h)

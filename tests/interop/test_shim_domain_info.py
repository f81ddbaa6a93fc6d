"""The replacement libxenctrl's domain and host answers and libxenevtchn's VIRQ_DOM_EXC,
called from C: what Xen's xenstoreds and toolstack ask (``xc_domain_getinfo`` /
``xc_domain_getinfolist`` with the shutdown, crash and dying state and per-domain uuids,
``xc_version``, ``xc_physinfo``, ``xc_get_max_cpus``, ``xc_domain_get_guest_width``,
``xc_domain_shutdown``), and the structure layouts against Xen's own headers."""

from __future__ import annotations

import errno
import os
import select
import subprocess
from pathlib import Path
from typing import Any

import cffi
import pytest
from shim_peers import LoopbackRun
from shim_support import XC_DOMINFO_CDEF, act_as, loopback_fixture

from xenpv import peers
from xenpv.platforms.loopback.env import shim_dir

REPO = Path(__file__).resolve().parents[2]

CDEF = XC_DOMINFO_CDEF + """
typedef struct { uint16_t domain; uint16_t pad1; uint32_t flags; uint64_t pages[7];
                 uint32_t nr_online_vcpus, max_vcpu_id, ssidref; uint8_t handle[16];
                 uint32_t cpupool; uint8_t gpaddr_bits; uint8_t pad2[7]; uint32_t arch[2];
               } xc_domaininfo_t;
typedef struct { uint32_t threads_per_core, cores_per_socket, nr_cpus, max_cpu_id, nr_nodes,
                 max_node_id, cpu_khz, capabilities, arch_capabilities, pad;
                 uint64_t total_pages, free_pages, scrub_pages, outstanding_pages, max_mfn;
                 uint32_t hw_cap[8]; } xc_physinfo_t;
void *xc_interface_open(void *logger, void *dombuild_logger, unsigned open_flags);
int xc_interface_close(void *xch);
int xc_domain_getinfo(void *xch, uint32_t first_domid, unsigned int max_doms, xc_dominfo_t *info);
int xc_domain_getinfolist(void *xch, uint32_t first, unsigned int max, xc_domaininfo_t *info);
int xc_domain_get_guest_width(void *xch, uint32_t domid, unsigned int *guest_width);
int xc_domain_shutdown(void *xch, uint32_t domid, int reason);
int xc_version(void *xch, int cmd, void *arg);
int xc_get_max_cpus(void *xch);
int xc_physinfo(void *xch, xc_physinfo_t *info);
void *xenevtchn_open(void *logger, unsigned int flags);
int xenevtchn_close(void *xce);
int xenevtchn_fd(void *xce);
int xenevtchn_bind_virq(void *xce, unsigned int virq);
int xenevtchn_pending(void *xce);
int xenevtchn_unmask(void *xce, uint32_t port);
int xenevtchn_notify(void *xce, uint32_t port);
"""
ffi = cffi.FFI()
ffi.cdef(CDEF)

# xc_dominfo_t bit-field order (xenctrl.h): dying, crashed, shutdown, paused, blocked, running
DYING, CRASHED, SHUTDOWN, BLOCKED, RUNNING = 1, 2, 4, 16, 32
XEN_DOMINF_SHUTDOWN, XEN_DOMINF_RUNNING = 1 << 2, 1 << 5
VIRQ_DOM_EXC = 3

loopback = loopback_fixture({1: "one", 2: "two", 3: "three"})


def _lib(name: str) -> Any:
    return ffi.dlopen(str(shim_dir() / name))


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_domain_state_uuids_virq_and_host_answers_from_c(
    loopback: LoopbackRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    act_as(monkeypatch, loopback, 0)
    xc, ev = _lib("libxenctrl.so.4.17"), _lib("libxenevtchn.so.1")
    xch = xc.xc_interface_open(ffi.NULL, ffi.NULL, 0)
    xce = ev.xenevtchn_open(ffi.NULL, 0)
    assert xch != ffi.NULL and xce != ffi.NULL
    try:
        port = ev.xenevtchn_bind_virq(xce, VIRQ_DOM_EXC)
        assert port > 0
        assert ev.xenevtchn_bind_virq(xce, VIRQ_DOM_EXC) == -1 and ffi.errno == errno.EEXIST
        assert ev.xenevtchn_bind_virq(xce, 8) == -1 and ffi.errno == errno.ENOSYS
        assert ev.xenevtchn_notify(xce, port) == -1 and ffi.errno == errno.EINVAL
        fd = ev.xenevtchn_fd(xce)
        assert not _readable(fd, 0)

        info = ffi.new("xc_dominfo_t[8]")
        assert xc.xc_domain_getinfo(xch, 0, 8, info) == 4
        handles = [bytes(info[i].handle) for i in range(4)]
        assert handles[0] == bytes(16) and len(set(handles)) == 4  # distinct, dom0's zero
        assert all(info[i].flags & RUNNING for i in range(4))

        # shutdown (2: suspend) and crash (3) are told apart as libxc does
        assert xc.xc_domain_shutdown(xch, 2, 2) == 0
        assert _readable(fd, 10) and ev.xenevtchn_pending(xce) == port
        assert ev.xenevtchn_unmask(xce, port) == 0
        assert xc.xc_domain_shutdown(xch, 3, 3) == 0
        assert _readable(fd, 10) and ev.xenevtchn_pending(xce) == port
        assert ev.xenevtchn_unmask(xce, port) == 0
        assert xc.xc_domain_getinfo(xch, 2, 2, info) == 2
        assert info[0].flags & (SHUTDOWN | CRASHED | RUNNING) == SHUTDOWN
        assert info[0].shutdown_reason == 2
        assert info[1].flags & (SHUTDOWN | CRASHED | RUNNING) == CRASHED
        assert info[1].shutdown_reason == 3

        lst = ffi.new("xc_domaininfo_t[8]")
        assert xc.xc_domain_getinfolist(xch, 1, 8, lst) == 3
        assert [lst[i].domain for i in range(3)] == [1, 2, 3]
        assert lst[0].flags == XEN_DOMINF_RUNNING
        assert lst[1].flags == XEN_DOMINF_SHUTDOWN | 2 << 16
        assert lst[2].flags == XEN_DOMINF_SHUTDOWN | 3 << 16
        assert [bytes(lst[i].handle) for i in range(3)] == handles[1:]

        # destroy: VIRQ_DOM_EXC again, and the domain is gone from both lists
        loopback.domain_op("destroy", 3)
        assert _readable(fd, 10) and ev.xenevtchn_pending(xce) == port
        assert xc.xc_domain_getinfo(xch, 3, 1, info) == 0
        assert xc.xc_domain_getinfolist(xch, 0, 8, lst) == 3

        width = ffi.new("unsigned int *")
        assert xc.xc_domain_get_guest_width(xch, 1, width) == 0 and width[0] == 8
        assert xc.xc_domain_get_guest_width(xch, 3, width) == -1 and ffi.errno == errno.ESRCH

        assert xc.xc_version(xch, 0, ffi.NULL) == (4 << 16) | 17
        extra = ffi.new("char[16]")
        assert xc.xc_version(xch, 1, extra) == 0 and ffi.string(extra) == b".7"
        caps = ffi.new("char[1024]")
        assert xc.xc_version(xch, 3, caps) == 0 and b"x86_64" in ffi.string(caps)
        assert xc.xc_version(xch, 7, ffi.NULL) == 4096
        handle = ffi.new("uint8_t[16]")
        assert xc.xc_version(xch, 8, handle) == 0 and bytes(handle) == bytes(16)
        assert xc.xc_version(xch, 99, ffi.NULL) == -1

        cpus = os.cpu_count()
        assert xc.xc_get_max_cpus(xch) == cpus
        phys = ffi.new("xc_physinfo_t *")
        assert xc.xc_physinfo(xch, phys) == 0
        assert phys.nr_cpus == cpus and phys.max_cpu_id == cpus - 1 and phys.nr_nodes == 1
        assert 0 < phys.free_pages <= phys.total_pages
    finally:
        ev.xenevtchn_close(xce)
        xc.xc_interface_close(xch)


def test_a_guest_may_bind_virq_dom_exc_but_never_receives_it(
    loopback: LoopbackRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    act_as(monkeypatch, loopback, 1)
    ev = _lib("libxenevtchn.so.1")
    xce = ev.xenevtchn_open(ffi.NULL, 0)
    try:
        port = ev.xenevtchn_bind_virq(xce, VIRQ_DOM_EXC)
        assert port > 0
        loopback.domain_op("create", 9)
        loopback.domain_op("destroy", 9)
        assert not _readable(ev.xenevtchn_fd(xce), 0.2)
    finally:
        ev.xenevtchn_close(xce)


PROBE = """
#include <stdio.h>
#include <stddef.h>
#include %s
#define F(t, m) printf("%%s.%%s %%zu\\n", #t, #m, offsetof(t, m))
int main(void) {
    printf("xc_domaininfo_t %%zu\\n", sizeof(xc_domaininfo_t));
    printf("xc_physinfo_t %%zu\\n", sizeof(xc_physinfo_t));
    F(xc_domaininfo_t, flags); F(xc_domaininfo_t, tot_pages); F(xc_domaininfo_t, handle);
    F(xc_domaininfo_t, cpupool); F(xc_domaininfo_t, arch_config);
    F(xc_physinfo_t, total_pages); F(xc_physinfo_t, free_pages); F(xc_physinfo_t, hw_cap);
    F(xen_compile_info_t, compile_date); F(xen_feature_info_t, submap);
    return 0;
}
"""


def _probe(tmp: Path, name: str, include: str, flags: list[str]) -> str:
    src = tmp / f"{name}.c"
    src.write_text(PROBE % include)
    exe = tmp / name
    subprocess.run(["cc", "-o", str(exe), str(src), *flags], check=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def test_domain_and_host_structures_match_xens_headers(tmp_path: Path) -> None:
    theirs = _probe(tmp_path, "xen", "<xenctrl.h>", [f"-I{peers.include_dir()}"])
    ours = _probe(tmp_path, "ours", '"xenpv_xentypes.h"', [f"-I{REPO / 'shim' / 'include'}"])
    assert ours == theirs

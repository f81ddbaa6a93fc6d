"""Shared pieces of the replacement-library tests that call the libraries in this process.

* :func:`loopback_fixture` -- a module-scoped fixture running one loopback daemon with the
  given domains for the whole module (``loopback = loopback_fixture({1: "one"})``);
* :func:`act_as` -- make the handles this process opens from now on act as a domain;
* :func:`daemon_stats` -- the daemon's count of what a domain holds, asked as dom0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from shim_peers import LoopbackRun

from xenpv.platforms.loopback import proto
from xenpv.platforms.loopback.client import ControlConnection

#: cffi declaration of xenctrl.h's xc_dominfo_t (its bit-fields as one ``flags`` word:
#: bit 0 dying, 1 crashed, 2 shutdown, 3 paused, 4 blocked, 5 running)
XC_DOMINFO_CDEF = """
typedef struct { uint32_t domid; uint32_t ssidref; unsigned int flags; unsigned int shutdown_reason;
                 unsigned long nr_pages, nr_outstanding_pages, nr_shared_pages, nr_paged_pages,
                 shared_info_frame; uint64_t cpu_time; unsigned long max_memkb;
                 unsigned int nr_online_vcpus, max_vcpu_id; uint8_t handle[16];
                 unsigned int cpupool; uint8_t gpaddr_bits; uint32_t arch[2]; } xc_dominfo_t;
"""

#: The leading fields of a STATS reply (later protocol versions may append more).
STATS_FIELDS = ("grants", "revoking", "mappings", "ports", "shares", "handles")


def loopback_fixture(domains: dict[int, str]) -> Any:
    """A module-scoped ``loopback`` fixture: a daemon with ``domains`` ({domid: name}),
    shared by the module's tests (each closes what it opens), stopped after the module."""

    @pytest.fixture(scope="module")
    def loopback() -> Iterator[LoopbackRun]:
        run = LoopbackRun(domains)
        try:
            yield run
        finally:
            run.close()

    return loopback


def act_as(monkeypatch: pytest.MonkeyPatch, run: LoopbackRun, domid: int) -> None:
    """Handles of the replacement libraries opened from now on act as ``domid``."""
    monkeypatch.setenv("XENPV_LOOPBACK_SOCKET", str(run.rundir / f"dom{domid}" / "control"))


def daemon_stats(run: LoopbackRun, domid: int) -> dict[str, int]:
    """What the daemon counts for ``domid`` (grants, mappings, ports, shares, handles...)."""
    ctl = ControlConnection(run.rundir / "dom0" / "control")
    try:
        out, _ = ctl.call(proto.Op.STATS, proto.U32.pack(domid))
    finally:
        ctl.close()
    return dict(zip(STATS_FIELDS, proto.U32x6.unpack_from(out), strict=True))

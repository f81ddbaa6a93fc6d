"""Session fixture: a shared ring driven by Xen's own io/ring.h macros, compiled with cffi."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from xenpv import peers
from xenpv.bench.ring import compile_cffi

WRAPPERS = Path(__file__).with_name("xen_ring_wrappers.c")
CDEF = """
struct xr;
struct xr *xr_new(int slot, int front, void *page, unsigned bytes, int init, uint32_t start);
void xr_free(struct xr *h);
long long xr_op(struct xr *h, int op, uint8_t *buf, long long n);
"""


@pytest.fixture(scope="session")
def xen_ring_macros(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The compiled wrapper module (``.ffi``, ``.lib``); built once per test session from
    libxen-dev's headers (a missing peers tree is an error, not a skip)."""
    include = str(peers.include_dir())
    build = tmp_path_factory.mktemp("xen-ring-macros")
    return compile_cffi("_xenpv_test_ring_macros", CDEF, WRAPPERS.read_text(), [include], build)

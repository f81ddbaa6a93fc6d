"""Fixtures shared by the ring tests: one suite, both implementations, one pytest run.

Import the fixture into a test module with ``from rings_conftest import rings_fixture``;
tests then take a ``rings`` argument (the namespace of one implementation, see
``xenpv.rings.implementation``) and run once per implementation.  The compiled one must be
built: a missing extension makes its half of the tests error, never skip.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from xenpv.rings import implementation

IMPLEMENTATIONS = ("cython", "reference")
PAGE = 4096
MASK32 = 0xFFFFFFFF


@pytest.fixture(params=IMPLEMENTATIONS, name="rings")
def rings_fixture(request: pytest.FixtureRequest) -> SimpleNamespace:
    """One ring implementation (parametrized over all of them)."""
    return implementation(request.param)


def pattern(seed: int, nbytes: int) -> bytes:
    """Deterministic, seed-dependent filler bytes for ring entries."""
    i = np.arange(nbytes, dtype=np.uint32)
    return ((seed * 131 + i * 7 + (i >> 8)) & 0xFF).astype(np.uint8).tobytes()

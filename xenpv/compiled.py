"""The one switch between the compiled core and its pure-Python twins.

Each compiled module (``xenpv.rings._sring``/``_bytering``/``_atomic``,
``xenpv.vchan._vring``, ``xenpv.xenstore._xsconn``/``_xsring``,
``xenpv.protocols._blkscan``/``_netscan``, the TAP write header builder
``xenpv.drivers._vnethdr``, the block backend's io_uring lane in
``xenpv.backends._uring``, the block frontend's request table in
``xenpv.frontends._blktable``) has a readable pure-Python twin that
serves when the extension is not built, or when ``XENPV_PURE_PYTHON=1`` forces it (tests
and benchmarks compare both).  The variable is read here and nowhere else.
"""

from __future__ import annotations

import os

__all__ = ["PURE_PYTHON_ENV", "pure_python"]

#: ``1`` makes every module that has a compiled twin use its pure-Python one.
PURE_PYTHON_ENV = "XENPV_PURE_PYTHON"


def pure_python() -> bool:
    """Whether the environment forces the pure-Python twins (``XENPV_PURE_PYTHON=1``)."""
    return os.environ.get(PURE_PYTHON_ENV) == "1"

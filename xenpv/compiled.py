"""The one switch between the compiled core and its pure-Python twins.

Each compiled module (``xenpv.rings._sring``/``_bytering``/``_atomic``,
``xenpv.vchan._vring``, ``xenpv.xenstore._xsconn``/``_xsring``,
``xenpv.protocols._blkscan``/``_netscan``/``_netrx``, the TAP write header builder
``xenpv.drivers._vnethdr``, the block backend's io_uring lane in
``xenpv.backends._uring``, the net backend's TX copy group ``xenpv.backends._nettx``,
the block frontend's request table in ``xenpv.frontends._blktable``, the net frontend's
TX table in ``xenpv.frontends._nettx``) has a readable pure-Python twin that
serves when the extension is not built, or when ``XENPV_PURE_PYTHON=1`` forces it (tests
and benchmarks compare both).  The variable is read here and nowhere else.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = ["PURE_PYTHON_ENV", "compiled_attr", "pure_python"]

#: ``1`` makes every module that has a compiled twin use its pure-Python one.
PURE_PYTHON_ENV = "XENPV_PURE_PYTHON"


def pure_python() -> bool:
    """Whether the environment forces the pure-Python twins (``XENPV_PURE_PYTHON=1``)."""
    return os.environ.get(PURE_PYTHON_ENV) == "1"


def compiled_attr(module: str, name: str | None = None, twin: Any = None) -> Any:
    """``name`` of the compiled extension ``module`` (the module itself when ``name`` is
    None), or ``twin`` where the readable twin serves: the extension is not built, or
    :func:`pure_python` says so.  Every module with a compiled twin chooses through this."""
    if pure_python():
        return twin
    try:
        mod = importlib.import_module(module)
    except ImportError:  # not built: the twin serves
        return twin
    return mod if name is None else getattr(mod, name)

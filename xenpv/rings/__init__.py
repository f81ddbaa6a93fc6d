"""Shared request/response rings and byte rings (Xen's ``io/ring.h`` semantics).

``IMPLEMENTATION`` is ``"cython"`` when the compiled core is in use, ``"reference"`` when the
pure-Python twin (``xenpv.rings._reference``) serves instead: because the extension is not
built, or because ``XENPV_PURE_PYTHON=1`` forces it.
"""

from __future__ import annotations

import os

IMPLEMENTATION: str
if os.environ.get("XENPV_PURE_PYTHON") == "1":
    IMPLEMENTATION = "reference"
else:
    try:
        from xenpv.rings import _sring  # noqa: F401

        IMPLEMENTATION = "cython"
    except ImportError:
        IMPLEMENTATION = "reference"

"""Type stubs for the compiled direct path of the embedded xenstored (cython/xsconn.pyx)."""

from typing import Any

AGAIN: int
DONE: int
GENERAL: int
UNSENT: int
EOF: int
ERROR: int

def serve(xc: Any, rounds: int) -> tuple[Any, ...]: ...

"""Evaluate C expressions against Xen's public headers (libxen-dev), for the layout tests.

Two ways, both compiling Xen's real headers from ``xenpv.peers.include_dir()``:

* :func:`cffi_values` -- cffi API mode: a generated C file with the ``#include`` s and one
  table of constant expressions (``offsetof``, ``sizeof``, macros), compiled with
  ``ffi.compile`` into a temporary directory and loaded; native x86-64 layout.
* :func:`asm_values` -- ``gcc -S`` into assembly and the table read back from the ``.long``
  directives.  With ``m32=True`` this gives the i386 ABI without a 32-bit libc or multilib
  (``-ffreestanding``: only the compiler's own ``stdint.h``/``stddef.h`` are needed), which
  is how the ``x86_32-abi`` blkif layout is measured.

This helper is independent of any ring-test compilation elsewhere in the suite.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xenpv import peers

COMMON_PRELUDE = """
#include <stddef.h>
#include <stdint.h>
"""


def include_dir() -> Path:
    """libxen-dev's ``usr/include`` (raises ``PeerMissing`` if the peers tree is absent)."""
    return peers.include_dir()


def _table(int_queries: Mapping[str, str], ctype: str) -> str:
    body = ",\n".join(f"    ({ctype})({expr})" for expr in int_queries.values()) or "0"
    return f"const {ctype} xenpv_ints[] = {{\n{body}\n}};\n"


def cffi_values(
    int_queries: Mapping[str, str],
    str_queries: Mapping[str, str],
    prelude: str,
    tmpdir: Path,
    modname: str = "_xenpv_layout_probe",
) -> tuple[dict[str, int], dict[str, str]]:
    """Compile the queries with cffi (API mode) against Xen's headers; return their values."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef("long long xenpv_int(int i);\nconst char *xenpv_str(int i);")
    strs = ",\n".join(f"    {expr}" for expr in str_queries.values()) or '""'
    source = (
        COMMON_PRELUDE
        + prelude
        + _table(int_queries, "long long")
        + f"static const char *const xenpv_strs[] = {{\n{strs}\n}};\n"
        + "long long xenpv_int(int i) { return xenpv_ints[i]; }\n"
        + "const char *xenpv_str(int i) { return xenpv_strs[i]; }\n"
    )
    ffi.set_source(
        modname,
        source,
        include_dirs=[str(include_dir())],
        define_macros=[("__XEN_TOOLS__", "1")],
        extra_compile_args=["-w"],
    )
    tmpdir.mkdir(parents=True, exist_ok=True)
    so = ffi.compile(tmpdir=str(tmpdir), verbose=False)
    spec = importlib.util.spec_from_file_location(modname, so)
    assert spec is not None and spec.loader is not None
    mod: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ints = {k: int(mod.lib.xenpv_int(i)) for i, k in enumerate(int_queries)}
    texts = {k: mod.ffi.string(mod.lib.xenpv_str(i)).decode() for i, k in enumerate(str_queries)}
    return ints, texts


def _cc() -> str:
    return os.environ.get("CC") or shutil.which("gcc") or "cc"


def m32_supported(tmpdir: Path) -> bool:
    """Whether the C compiler can generate i386 code (``-m32 -ffreestanding -S``)."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    probe = tmpdir / "m32probe.c"
    probe.write_text("#include <stdint.h>\nconst int x = sizeof(uint64_t);\n")
    res = subprocess.run(
        [_cc(), "-m32", "-ffreestanding", "-S", "-o", os.devnull, str(probe)],
        capture_output=True,
        timeout=60,
    )
    return res.returncode == 0


_DIRECTIVE = re.compile(r"\s*\.(long|zero|value|byte|quad)\s+(-?\w+)")


def asm_values(
    int_queries: Mapping[str, str],
    prelude: str,
    tmpdir: Path,
    *,
    m32: bool,
    name: str = "probe",
    extra_includes: tuple[Path, ...] = (),
) -> dict[str, int]:
    """Compile the queries with ``gcc -S`` (``-m32`` for i386) and read the values back.

    Every query must be a constant expression that fits an ``int``.  ``extra_includes``
    come before Xen's include directory (e.g. stand-ins for libc headers in a freestanding
    i386 compile).
    """
    tmpdir.mkdir(parents=True, exist_ok=True)
    src = tmpdir / f"{name}.c"
    asm = tmpdir / f"{name}.s"
    src.write_text(COMMON_PRELUDE + prelude + _table(int_queries, "int"))
    incs = [f"-I{d}" for d in (*extra_includes, include_dir())]
    cmd = [_cc(), "-S", "-O0", "-w", "-D__XEN_TOOLS__", *incs, "-o", str(asm), str(src)]
    if m32:
        cmd[1:1] = ["-m32", "-ffreestanding"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    values: list[int] = []
    inside = False
    for line in asm.read_text().splitlines():
        if line.startswith("xenpv_ints:"):
            inside = True
            continue
        if not inside:
            continue
        m = _DIRECTIVE.match(line)
        if not m:
            if values:
                break
            continue
        kind, arg = m.groups()
        if kind == "long":
            values.append(int(arg, 0))
        elif kind == "zero":
            values.extend([0] * (int(arg, 0) // 4))
        else:
            raise AssertionError(f"unexpected directive in table: {line!r}")
    if len(values) != len(int_queries):
        raise AssertionError(f"read {len(values)} values from {asm}, expected {len(int_queries)}")
    return dict(zip(int_queries, values, strict=True))


def header_text(*relpaths: str) -> str:
    """Concatenated text of headers below the include dir (to discover their macros)."""
    return "\n".join((include_dir() / p).read_text() for p in relpaths)


_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Za-z_]\w*)[ \t]+(\S.*?)\s*(?:/\*.*)?$", re.M)


def defined_macros(text: str, pattern: str) -> dict[str, str]:
    """Object-like ``#define`` s of ``text`` whose names fully match ``pattern`` -> their bodies."""
    rx = re.compile(pattern)
    return {m.group(1): m.group(2) for m in _DEFINE.finditer(text) if rx.fullmatch(m.group(1))}

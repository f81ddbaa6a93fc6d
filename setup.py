"""Build script for xenpv's compiled parts.

Two kinds of native code are built here:

* Cython extensions (``cython/*.pyx``), each listed once in ``CYTHON_MODULES``.  Compiler
  directives live in ``CYTHON_DIRECTIVES`` only.  ``XENPV_DEBUG_BUILD=1`` turns on bounds
  checks and the expensive invariant checks guarded by ``XENPV_DEBUG`` in the C headers.
* Replacement libraries for the loopback emulator (``shim/``), plain C shared objects
  built by ``build_shim`` and shipped inside the package (see ``SHIM_LIBRARIES``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
DEBUG = os.environ.get("XENPV_DEBUG_BUILD") == "1"

# module name -> .pyx source (one pair per hot concern)
CYTHON_MODULES: dict[str, str] = {
    "xenpv.rings._sring": "cython/sring.pyx",
    "xenpv.rings._bytering": "cython/bytering.pyx",
    "xenpv.rings._atomic": "cython/atomic.pyx",
    "xenpv.vchan._vring": "xenpv/vchan/_vring.pyx",
    "xenpv.xenstore._xsconn": "cython/xsconn.pyx",
    "xenpv.xenstore._xsring": "cython/xsring.pyx",
    "xenpv.backends._uring": "cython/uring.pyx",
    "xenpv.protocols._netrx": "cython/netrx.pyx",
    "xenpv.protocols._blkscan": "cython/blkscan.pyx",
    "xenpv.protocols._netscan": "cython/netscan.pyx",
    "xenpv.frontends._blktable": "cython/blktable.pyx",
    "xenpv.frontends._nettx": "cython/netfronttx.pyx",
    "xenpv.platforms.loopback._gntcopy": "cython/gntcopy.pyx",
    "xenpv.drivers._vnethdr": "cython/vnethdr.pyx",
    "xenpv.backends._nettx": "cython/nettx.pyx",
}

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}

# Shared libraries: name -> (sources, version script or None, extra link args).
# Each is built into xenpv/platforms/loopback/shim/<name>.
SHIM_LIBRARIES: dict[str, tuple[list[str], str | None, list[str]]] = {
    "libxengnttab.so.1": (["shim/gnttab.c", "shim/common.c"], "shim/libxengnttab.map", ["-lpthread"]),
    "libxenevtchn.so.1": (["shim/evtchn.c", "shim/common.c"], "shim/libxenevtchn.map", ["-lpthread"]),
    "libxenforeignmemory.so.1": (["shim/foreignmemory.c", "shim/common.c"], "shim/libxenforeignmemory.map", ["-lpthread"]),
    # Needs libxenforeignmemory (as Debian's does): libxenguest imports xenforeignmemory_*
    # unversioned and finds them only if a loaded library brought it in; found next to
    # libxenctrl ($ORIGIN) also when it is opened by path.
    "libxenctrl.so.4.17": (["shim/ctrl.c", "shim/ctrl_xl.c", "shim/ctrl_stubs.c", "shim/common.c"],
                           "shim/libxenctrl.map",
                           ["-lpthread", "-Wl,-rpath,$ORIGIN", "-Wl,--no-as-needed",
                            "xenpv/platforms/loopback/shim/libxenforeignmemory.so.1"]),
    "libxendevicemodel.so.1": (["shim/devicemodel.c"], "shim/libxendevicemodel.map", []),
    "libxentoolcore.so.1": (["shim/toolcore.c"], "shim/libxentoolcore.map", ["-lpthread"]),
    # LD_PRELOAD interposer for C xenstored's /proc/xen/xsd_{port,kva} and its lifeline
    # (not a Xen library)
    "libxenpv_xsd.so": (["shim/xsd_open.c"], None, ["-ldl", "-lpthread"]),
}
SHIM_OUT = HERE / "xenpv" / "platforms" / "loopback" / "shim"


def cython_extensions() -> list[Extension]:
    from Cython.Build import cythonize

    macros = [("XENPV_DEBUG", "1")] if DEBUG else []
    exts = [
        Extension(
            name,
            [src],
            include_dirs=["cython/includes"],
            define_macros=macros,
            extra_compile_args=["-O2"],
        )
        for name, src in CYTHON_MODULES.items()
        if (HERE / src).exists()
    ]
    return cythonize(exts, compiler_directives=CYTHON_DIRECTIVES, include_path=["cython"])


class BuildExt(build_ext):
    """build_ext that also builds the C replacement libraries in ``shim/``."""

    def run(self) -> None:
        super().run()
        self.build_shim()

    def build_shim(self) -> None:
        cc = os.environ.get("CC", "cc")
        for name, (sources, vscript, extra) in SHIM_LIBRARIES.items():
            outdirs = [SHIM_OUT]
            if not self.inplace:
                outdirs.append(Path(self.build_lib) / "xenpv" / "platforms" / "loopback" / "shim")
            for outdir in outdirs:
                outdir.mkdir(parents=True, exist_ok=True)
                soname = name
                cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Ishim/include",
                       f"-Wl,-soname,{soname}", "-o", str(outdir / name), *sources]
                if vscript:
                    cmd.append(f"-Wl,--version-script={vscript}")
                cmd += extra
                print(" ".join(cmd), file=sys.stderr)
                subprocess.check_call(cmd, cwd=HERE)


setup(ext_modules=cython_extensions(), cmdclass={"build_ext": BuildExt})

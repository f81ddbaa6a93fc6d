"""Build the API reference of xenpv from its docstrings: ``python scripts/api_docs.py [OUT]``.

Writes HTML pages (one per module, with an index and a search box) into OUT (default
``docs/api/html``) with pdoc (``pip install .[docs]``).  Documented: every public module
of the library (``xenpv`` and its packages; modules whose name starts with ``_``, the
command line ``xenpv.cli`` and the benchmark drivers ``xenpv.bench`` are left out).  The
docstrings are reStructuredText.  Nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "api" / "html"
#: packages whose modules are not library API
EXCLUDED = ("xenpv.cli", "xenpv.bench")


def public_modules() -> list[str]:
    """Names of the modules the reference documents, sorted."""
    import xenpv

    names = ["xenpv"]
    for info in pkgutil.walk_packages(xenpv.__path__, "xenpv."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts) or any(
            info.name == e or info.name.startswith(e + ".") for e in EXCLUDED
        ):
            continue
        names.append(info.name)
    return sorted(names)


def build(out: Path) -> list[str]:
    """Render the reference into ``out``; returns the modules documented.  A module that
    cannot be imported is an error (pdoc would only warn and leave it out)."""
    import pdoc
    import pdoc.render

    modules = public_modules()
    for name in modules:
        importlib.import_module(name)
    pdoc.render.configure(docformat="restructuredtext", show_source=False,
                          footer_text="xenpv API reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # pdoc's "cannot import" warnings
        # a package without __all__ brings its submodules along: named twice, one page
        warnings.filterwarnings("ignore", message=".*has already been added")
        pdoc.pdoc(*modules, output_directory=out)
    return modules


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    modules = build(args.out)
    print(f"API reference of {len(modules)} modules in {args.out}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Package ``__init__`` files that export names without importing their modules up front.

A package whose public names come from asyncio modules (``xenpv.xenbus``, ``xenpv.vchan``)
also holds sans-IO modules (``xenbus.machine``, ``vchan.ring``).  Importing a submodule runs
its package's ``__init__`` first, so an ``__init__`` that imports the asyncio modules would
load asyncio into every user of the sans-IO ones.  :func:`lazy_exports` gives such a package
a module ``__getattr__`` (PEP 562) that imports a name's module on first access instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name of ``exports`` comes
    from the submodule it maps to (``{"FrontendDriver": "driver"}``), imported on first use."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__

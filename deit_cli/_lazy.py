"""Names a package exports without importing them until first use (`import deit_cli` and
the CLI's start-up must not import torch)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` resolving `names` (name -> module: a dotted name is absolute,
    a plain one a submodule of `package`) on first access."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = names[name] if "." in names[name] else f"{package}.{names[name]}"
        return getattr(importlib.import_module(module), name)

    return __getattr__

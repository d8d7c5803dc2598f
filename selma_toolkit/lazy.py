"""Names imported on first use: package namespaces (PEP 562) and registry entries (``"module:name"``).

A stage package (``selma_toolkit.train``, ``.images``, ``.prompts``, ``.lora``) exports its
functions from modules that need torch or the recipe classes, while the recipe classes import
each stage's settings module from the same package: importing the package must therefore not
import those modules. ``lazy_exports`` gives a package ``__getattr__`` / ``__dir__`` that import
a name's module when the name is first read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package``: ``exports`` maps a submodule to the names it
    provides; a name read once becomes a plain attribute of ``namespace`` (the package globals)."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{module}"), name)
        namespace[name] = value  # later lookups (and monkeypatch) see a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *module_of})

    return __getattr__, __dir__


def import_object(path: str) -> Any:
    """The object a registry entry names as ``"package.module:name"`` (a scorer factory, a model
    source), imported now: registries list their entries by name so that importing the registry
    imports none of them."""
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)

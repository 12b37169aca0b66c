"""The module paths of loraga_fast 0.1, kept importable for one release with a ``DeprecationWarning``.

0.2 moved the modules into subpackages (``layers``, ``distributed``, ``stores``, ``core``, ``api``, ``command``).
``import loraga_fast.peft_compat`` (and every other old path in :data:`MOVED`) still works: a finder on
``sys.meta_path`` hands out the new module under the old name and warns once per old path. The public names of
``loraga_fast`` itself did not move.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "install"]

MOVED: dict[str, tuple[str, ...]] = {
    "loraga_fast.cache": ("loraga_fast.stores.cached", "loraga_fast.stores.files"),
    "loraga_fast.capture": ("loraga_fast.layers.capture", "loraga_fast.layers.kinds"),
    "loraga_fast.cli": ("loraga_fast.command.main", "loraga_fast.command.bench"),
    "loraga_fast.dtensor": ("loraga_fast.distributed.dtensor",),
    "loraga_fast.estimate": ("loraga_fast.core.passes",),
    "loraga_fast.factors": ("loraga_fast.stores.factors",),
    "loraga_fast.handoff": ("loraga_fast.core.handoff",),
    "loraga_fast.init_command": ("loraga_fast.command.init",),
    "loraga_fast.inputs": ("loraga_fast.command.inputs", "loraga_fast.api.quantize"),
    "loraga_fast.layer_init": ("loraga_fast.core.layer_init",),
    "loraga_fast.memory": ("loraga_fast.core.memory",),
    "loraga_fast.original": ("loraga_fast.api.original", "loraga_fast.api.names"),
    "loraga_fast.peft_compat": ("loraga_fast.api.preprocess",),
    "loraga_fast.placeholder": ("loraga_fast.stores.placeholder",),
    "loraga_fast.plots": ("loraga_fast.bench.plots",),
    "loraga_fast.quantized": ("loraga_fast.layers.quantized",),
    "loraga_fast.runs": ("loraga_fast.api.runs", "loraga_fast.api.names"),
    "loraga_fast.sharding": ("loraga_fast.distributed.layout", "loraga_fast.distributed.guard",
                             "loraga_fast.stores.sharded"),
    "loraga_fast.sketch_store": ("loraga_fast.stores.sketch",),
    "loraga_fast.steps": ("loraga_fast.api.steps",),
    "loraga_fast.store": ("loraga_fast.stores.exact", "loraga_fast.stores.base", "loraga_fast.distributed.collectives"),
    "loraga_fast.targets": ("loraga_fast.layers.targets",),
}
"""Old module path -> the modules that hold its names now. A path that moved whole is the new module itself; a
split one is a module that looks each name up in its new homes, in order."""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the new module object itself (``loraga_fast.peft_compat is
    loraga_fast.api.preprocess``); the module keeps its own name and spec."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        homes = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {' and '.join(homes)} in loraga_fast 0.2; the old path will be removed in "
                      "0.3 (the public names are importable from loraga_fast itself)", DeprecationWarning,
                      stacklevel=2)  # warnings skips importlib's own frames: 2 is the importing line
        modules = [importlib.import_module(home) for home in homes]
        if len(modules) == 1:
            self._specs[spec.name] = modules[0].__spec__
            return modules[0]
        return _Split(spec.name, modules)

    def exec_module(self, module: ModuleType) -> None:
        # a whole module was executed already under its new name: give it its own spec back (the import system set
        # the old path's)
        name = module.__spec__.name  # type: ignore[union-attr]
        if name in self._specs:
            module.__spec__ = self._specs.pop(name)


class _Split(ModuleType):
    """An old module that was split: its names are looked up in the new modules, in order."""

    def __init__(self, name: str, homes: list[ModuleType]):
        super().__init__(name, f"moved to {', '.join(m.__name__ for m in homes)}")
        self._homes = homes
        self.__all__ = [n for m in homes for n in getattr(m, "__all__", ())]

    def __getattr__(self, attr: str) -> Any:
        for home in self._homes:
            if hasattr(home, attr):
                return getattr(home, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(m.__name__ for m in self._homes)}) has "
                             f"no attribute {attr!r}")


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())

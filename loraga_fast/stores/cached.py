"""Reading caches back: exact mode's mean gradients into a store, low-memory mode's factors as a
:class:`~loraga_fast.stores.base.GradientSource` (:class:`CachedFactors`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from torch import nn

from ..errors import UsageError
from ..layers.kinds import weight_shape
from .base import FactorSource
from .exact import AccumulatorStore
from .factors import LayerFactors
from .files import GRAD_SUFFIX, PARTS, ZERO_KEY, CacheFile

__all__ = ["CachedFactors", "load_factors", "load_gradients"]


def load_gradients(path: str | os.PathLike[str], store: AccumulatorStore) -> None:
    """Check a gradient cache against the store's layers, then copy each cached mean gradient into its slot (one
    tensor at a time, so no second full copy is held) as one pass. Layers without a cached gradient keep a zero
    count.

    Raises:
        ValueError: not a safetensors file, a factor cache, or names or shapes that do not match (the message
            names the first mismatching module). Nothing is copied then.
    """
    cache = CacheFile(path, store.shapes, "exact")
    try:
        for name, (rows, _) in store.shapes.items():
            if f"{name}{GRAD_SUFFIX}" in cache.keys:  # a sharded store reads only its own rows
                store.load_rows(name, cache.get(f"{name}{GRAD_SUFFIX}", store.local_rows(rows)))
    finally:
        cache.close()


class CachedFactors(FactorSource):
    """A factor cache as a :class:`~loraga_fast.stores.base.GradientSource`: the flow after estimation runs on it
    unchanged."""

    def __init__(self, factors: dict[str, LayerFactors], zero: set[str], names: Sequence[str]):
        self.cached = factors
        self.zero = zero
        self.names = list(names)

    def counts(self) -> dict[str, int]:
        return {name: int(name in self.cached or name in self.zero) for name in self.names}

    def magnitudes(self) -> dict[str, float]:
        """:meth:`GradientSource.magnitudes`: each cached layer's top singular value, 0 for a layer cached as zero."""
        return {name: float(self.cached[name].s[0]) if name in self.cached else 0.0 for name in self.names}

    def factors(self, ranks: Mapping[str, int]) -> dict[str, LayerFactors]:
        return {name: self.cached[name] for name in ranks if name in self.cached}


def load_factors(path: str | os.PathLike[str], modules: Mapping[str, nn.Module], ranks: Mapping[str, int]) -> CachedFactors:
    """Read a low-memory cache written by :func:`save_factors`, checked against ``modules`` and ``ranks``; the
    factors are trimmed to ``2 r`` columns' worth at use and moved to each weight's device.

    Raises:
        ValueError: not a safetensors file, a gradient cache, names/shapes that do not match, or factors with
            fewer than ``2 r`` columns (a cache made for a smaller rank).
    """
    cache = CacheFile(path, {name: weight_shape(m) for name, m in modules.items()}, "lowmem")
    try:
        zero = set(json.loads(cache.metadata.get(ZERO_KEY, "[]")))
        factors: dict[str, LayerFactors] = {}
        for name, module in modules.items():
            if f"{name}.loraga_fast.u" not in cache.keys:
                continue
            u, s, v = (cache.get(f"{name}.loraga_fast.{part}") for part in PARTS)
            need = min(2 * ranks[name], min(weight_shape(module)))
            if u.shape[1] < need:
                raise UsageError(f"Cache file '{cache.path}' was written for a smaller rank: module '{name}' has "
                                 f"{u.shape[1]} cached singular vectors but r={ranks[name]} needs {2 * ranks[name]}. "
                                 "Delete the file or pass another cache_file.")
            device = module.weight.device
            factors[name] = LayerFactors(u=u.to(device), s=s.to(device), v=v.to(device))
    finally:
        cache.close()
    return CachedFactors(factors, zero, list(modules))


"""Cache files: safetensors, never pickle. Exact mode caches mean gradients, low-memory mode factors.

Gradient keys follow peft's cache naming (``"{module_name}._peft_loraga_grad"``); factor keys are
``"{module_name}.loraga_fast.{u,s,v}"``. The metadata names the mode and every target, including layers that saw
no backward pass (and so have no tensor), so a reload can tell "no gradient" from "wrong model". Both kinds are
checked against the model by one validator before anything is copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .capture import weight_shape
from .errors import UsageError
from .factors import LayerFactors, PreparedGroup, factor_groups
from .placeholder import LowMemGradient
from .store import AccumulatorStore, Estimate

__all__ = ["CachedFactors", "load_factors", "load_gradients", "save_factors", "save_gradients", "write_atomic"]

_GRAD_SUFFIX = "._peft_loraga_grad"
_TARGETS_KEY = "loraga_fast.targets"
_ZERO_KEY = "loraga_fast.zero"
_MODE_KEY = "loraga_fast.mode"  # "lowmem" for factor caches; gradient caches (ours and peft's) have none
_PARTS = ("u", "s", "v")


def write_atomic(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file through a temporary file and a rename (no half-written file at ``path``, ever),
    with loraga_fast's version and ``metadata``; parent folders are created."""
    from . import __version__

    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(dict(tensors), tmp, metadata={"format": "pt", "loraga_fast.version": __version__, **metadata})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_gradients(path: str | os.PathLike[str], grads: Mapping[str, torch.Tensor], target_names: Sequence[str]) -> None:
    """Write ``grads`` (``{module_name: fp32 mean gradient}``) to ``path`` atomically."""
    tensors = {f"{name}{_GRAD_SUFFIX}": grads[name] for name in target_names if name in grads}
    write_atomic(path, tensors, {_TARGETS_KEY: json.dumps(list(target_names))})


def save_factors(path: str | os.PathLike[str], factors: Mapping[str, LayerFactors], target_names: Sequence[str],
                 zero: Iterable[str]) -> None:
    """Write low-memory factors (fp32) atomically; metadata names the mode, every target and the all-zero layers."""
    tensors = {f"{name}.loraga_fast.{part}": getattr(f, part).contiguous()
               for name, f in factors.items() for part in _PARTS}
    write_atomic(path, tensors, {_MODE_KEY: "lowmem", _TARGETS_KEY: json.dumps(list(target_names)),
                                 _ZERO_KEY: json.dumps(sorted(zero))})


class _Cache:
    """An open cache file checked against the targets: right kind, same names, same shapes."""

    def __init__(self, path: str | os.PathLike[str], shapes: Mapping[str, tuple[int, int]], mode: str):
        self.path = os.fspath(path)
        try:
            self.handle = safe_open(self.path, framework="pt", device="cpu")
        except SafetensorError as err:
            raise UsageError(
                f"Cache file '{self.path}' is not a safetensors file ({err}). loraga_fast writes its caches with "
                "safetensors and never unpickles (peft's own caches are pickles): delete the file or pass another "
                "cache_file."
            ) from err
        try:
            self._check(shapes, mode)
        except BaseException:
            self.close()
            raise

    def _check(self, shapes: Mapping[str, tuple[int, int]], mode: str) -> None:
        self.keys = set(self.handle.keys())
        self.metadata = self.handle.metadata() or {}
        found = self.metadata.get(_MODE_KEY, "exact")
        if found != mode:
            held = ("low-memory factors (written by preprocess_loraga(mode='lowmem'))" if found == "lowmem" else
                    "exact-mode mean gradients (written by preprocess_loraga(mode='exact') or peft)")
            raise UsageError(f"Cache file '{self.path}' holds {held}: pass mode='{found}' to use it, or another "
                             f"cache_file for mode='{mode}'.")
        names = (json.loads(self.metadata[_TARGETS_KEY]) if _TARGETS_KEY in self.metadata
                 else [k[: -len(_GRAD_SUFFIX)] for k in sorted(self.keys) if k.endswith(_GRAD_SUFFIX)])
        for name in shapes:
            if name not in names:
                raise UsageError(f"Cache file '{self.path}' does not match the model: it has no entry for target "
                                 f"module '{name}'.")
        extra = [name for name in names if name not in shapes]
        if extra:
            raise UsageError(f"Cache file '{self.path}' does not match the model: it holds module '{extra[0]}', which "
                             "is not a target of this model and lora_config.")
        for name, shape in shapes.items():
            cached = self.cached_shape(name)
            if cached is not None and cached != tuple(shape):
                raise UsageError(f"Cache file '{self.path}' does not match the model: module '{name}' has a cached "
                                 f"{'gradient' if mode == 'exact' else 'factorization'} of shape {cached} but a weight "
                                 f"of shape {tuple(shape)}.")

    def cached_shape(self, name: str) -> tuple[int, ...] | None:
        """The weight shape the cache holds for ``name``, or None when it holds no tensor for it."""
        if f"{name}{_GRAD_SUFFIX}" in self.keys:
            return tuple(self.handle.get_slice(f"{name}{_GRAD_SUFFIX}").get_shape())
        if f"{name}.loraga_fast.u" in self.keys:
            u, v = (self.handle.get_slice(f"{name}.loraga_fast.{p}").get_shape() for p in ("u", "v"))
            return (u[0], v[0])
        return None

    def get(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)

    def close(self) -> None:
        self.handle.__exit__(None, None, None)


def load_gradients(path: str | os.PathLike[str], store: AccumulatorStore) -> None:
    """Check a gradient cache against the store's layers, then copy each cached mean gradient into its slot (one
    tensor at a time, so no second full copy is held) as one pass. Layers without a cached gradient keep a zero
    count.

    Raises:
        ValueError: not a safetensors file, a factor cache, or names or shapes that do not match (the message
            names the first mismatching module). Nothing is copied then.
    """
    cache = _Cache(path, store.shapes, "exact")
    try:
        for name in store.shapes:
            if f"{name}{_GRAD_SUFFIX}" in cache.keys:
                store.load(name, cache.get(f"{name}{_GRAD_SUFFIX}"))
    finally:
        cache.close()


class CachedFactors(Estimate):
    """A factor cache as an :class:`~loraga_fast.store.Estimate`: the flow after estimation runs on it unchanged."""

    def __init__(self, factors: dict[str, LayerFactors], zero: set[str], names: Sequence[str]):
        self.factors = factors
        self.zero = zero
        self.names = list(names)

    def counts(self) -> dict[str, int]:
        return {name: int(name in self.factors or name in self.zero) for name in self.names}

    def max_abs(self) -> dict[str, float]:
        return {name: float(self.factors[name].s[0]) if name in self.factors else 0.0 for name in self.names}

    def prepare(self, modules: Mapping[str, nn.Module], ranks: Mapping[str, int], *, weight_svd: bool,
                zero: Collection[str]) -> tuple[list[PreparedGroup], dict[str, Any]]:
        placeholders = {name: LowMemGradient(name, weight_shape(modules[name])) for name in ranks}
        groups = factor_groups(modules, list(ranks), self.factors, ranks, zero, placeholders, weight_svd=weight_svd,
                               shape_of=weight_shape)
        return groups, placeholders  # type: ignore[return-value]

    def save_cache(self, path: str | os.PathLike[str], names: Sequence[str], zero: Collection[str]) -> None:
        save_factors(path, self.factors, names, zero)


def load_factors(path: str | os.PathLike[str], modules: Mapping[str, nn.Module], ranks: Mapping[str, int]) -> CachedFactors:
    """Read a low-memory cache written by :func:`save_factors`, checked against ``modules`` and ``ranks``; the
    factors are trimmed to ``2 r`` columns' worth at use and moved to each weight's device.

    Raises:
        ValueError: not a safetensors file, a gradient cache, names/shapes that do not match, or factors with
            fewer than ``2 r`` columns (a cache made for a smaller rank).
    """
    cache = _Cache(path, {name: weight_shape(m) for name, m in modules.items()}, "lowmem")
    try:
        zero = set(json.loads(cache.metadata.get(_ZERO_KEY, "[]")))
        factors: dict[str, LayerFactors] = {}
        for name, module in modules.items():
            if f"{name}.loraga_fast.u" not in cache.keys:
                continue
            u, s, v = (cache.get(f"{name}.loraga_fast.{part}") for part in _PARTS)
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

"""Gradient cache files: safetensors, never pickle.

Keys follow peft's cache naming (``"{module_name}._peft_loraga_grad"``); the metadata records every target
name, including layers that saw no backward pass (and so have no tensor), so a reload can tell "no gradient"
from "wrong model".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .store import AccumulatorStore

__all__ = ["load_cache", "save_cache", "write_atomic"]

_SUFFIX = "._peft_loraga_grad"
_TARGETS_KEY = "loraga_fast.targets"


def save_cache(path: str | os.PathLike[str], grads: Mapping[str, torch.Tensor], target_names: Sequence[str]) -> None:
    """Write ``grads`` (``{module_name: fp32 mean gradient}``) to ``path`` atomically (temporary file + rename)."""
    tensors = {f"{name}{_SUFFIX}": grads[name] for name in target_names if name in grads}
    write_atomic(path, tensors, {_TARGETS_KEY: json.dumps(list(target_names))})


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


def load_cache(path: str | os.PathLike[str], targets: Mapping[str, torch.Tensor], store: AccumulatorStore) -> None:
    """Check a cache against the model's targets, then copy its gradients into ``store``.

    Args:
        path: the cache file.
        targets: ``{module_name: weight}`` of the current targets.
        store: accumulators for those targets; each cached gradient is copied into its slot (one tensor at a
            time, so no second full copy is held) and the slot counts as one pass, so ``store.means()`` returns
            it unchanged. Targets the cache holds no gradient for keep a zero count.

    Raises:
        ValueError: the file is not a safetensors file, or its names or shapes do not match ``targets``
            (the message names the first mismatching module). Nothing is copied then.
    """
    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(
            f"Cache file '{path}' is not a safetensors file ({err}). loraga_fast writes its caches with safetensors "
            "and never unpickles (peft's own caches are pickles): delete the file or pass another cache_file."
        ) from err
    with handle:
        keys = set(handle.keys())
        metadata = handle.metadata() or {}
        if metadata.get("loraga_fast.mode", "exact") != "exact":  # written by loraga_fast.lowmem.save_factors
            raise ValueError(
                f"Cache file '{path}' holds low-memory factors (written by preprocess_loraga(mode='lowmem')), not mean "
                "gradients: pass mode='lowmem' to use it, or another cache_file for mode='exact'."
            )
        cached_names = (
            json.loads(metadata[_TARGETS_KEY])
            if _TARGETS_KEY in metadata
            else [k[: -len(_SUFFIX)] for k in sorted(keys) if k.endswith(_SUFFIX)]
        )
        for name, weight in targets.items():
            if name not in cached_names:
                raise ValueError(f"Cache file '{path}' does not match the model: it has no entry for target module '{name}'.")
            key = f"{name}{_SUFFIX}"
            if key in keys:
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != tuple(weight.shape):
                    raise ValueError(
                        f"Cache file '{path}' does not match the model: module '{name}' has a cached gradient of shape "
                        f"{shape} but a weight of shape {tuple(weight.shape)}."
                    )
        extra = [name for name in cached_names if name not in targets]
        if extra:
            raise ValueError(
                f"Cache file '{path}' does not match the model: it holds module '{extra[0]}', which is not a target "
                "of this model and lora_config."
            )
        for name in targets:
            key = f"{name}{_SUFFIX}"
            if key in keys:
                slot = store[name]
                slot.acc.copy_(handle.get_tensor(key))
                slot.count = 1

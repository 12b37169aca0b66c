"""Cache files: safetensors, never pickle. Exact mode caches mean gradients, low-memory mode factors.

Gradient keys follow peft's cache naming (``"{module_name}._peft_loraga_grad"``); factor keys are
``"{module_name}.loraga_fast.{u,s,v}"``. The metadata names the mode and every target, including layers that saw
no backward pass (and so have no tensor), so a reload can tell "no gradient" from "wrong model". Both kinds are
checked against the model by one validator (:class:`CacheFile`) before anything is copied; reading them back into
a store is :mod:`loraga_fast.stores.cached`.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..errors import UsageError
from .factors import LayerFactors

__all__ = ["GRAD_SUFFIX", "PARTS", "ZERO_KEY", "CacheFile", "save_factors", "save_gradients", "stream_gradients",
           "umask", "write_atomic"]

GRAD_SUFFIX = "._peft_loraga_grad"
TARGETS_KEY = "loraga_fast.targets"
ZERO_KEY = "loraga_fast.zero"
MODE_KEY = "loraga_fast.mode"  # "lowmem" for factor caches; gradient caches (ours and peft's) have none
PARTS = ("u", "s", "v")


def umask() -> int:
    """The process's umask (the file modes ``open`` and ``mkdir`` give are ``0o666`` / ``0o777`` less it)."""
    try:  # Linux: read it without setting it (os.umask sets the process-wide value, racing other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file through a temporary file and a rename (no half-written file at ``path``, ever),
    with loraga_fast's version and ``metadata``; parent folders are created."""
    with _replacing(path) as tmp:
        save_file(dict(tensors), tmp, metadata={"format": "pt", "loraga_fast.version": __version__, **metadata})


@contextlib.contextmanager
def _replacing(path: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary file name beside ``path`` (parent folders created) that replaces ``path`` when the block
    succeeds, with the mode ``open`` would give (``0o666`` less the umask); on any error the temporary file is
    removed and ``path`` is left as it was."""
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # safetensors writes 0o600 whatever the umask: the mode open() would give
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_gradients(path: str | os.PathLike[str], grads: Mapping[str, torch.Tensor], target_names: Sequence[str]) -> None:
    """Write ``grads`` (``{module_name: fp32 mean gradient}``) to ``path`` atomically."""
    tensors = {f"{name}{GRAD_SUFFIX}": grads[name] for name in target_names if name in grads}
    write_atomic(path, tensors, {TARGETS_KEY: json.dumps(list(target_names))})


def stream_gradients(path: str | os.PathLike[str] | None, shapes: Mapping[str, tuple[int, int]],
                     produce: Callable[[str], torch.Tensor], target_names: Sequence[str]) -> None:
    """:func:`save_gradients` one gradient at a time: ``produce(name)`` gives each fp32 mean gradient of ``shapes``
    in turn and it is written before the next is asked for, so a process never holds more than one whole gradient
    (sharded stores gather them layer by layer). Every process of a sharded store calls this, in the same order
    (``produce`` may be collective); only the one with a ``path`` writes. The file is a standard safetensors file,
    written through a temporary file and a rename."""
    keys = sorted(f"{name}{GRAD_SUFFIX}" for name in shapes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "loraga_fast.version": __version__,
                                               TARGETS_KEY: json.dumps(list(target_names))}}
    offset = 0
    for key in keys:
        rows, cols = shapes[key[: -len(GRAD_SUFFIX)]]
        header[key] = {"dtype": "F32", "shape": [rows, cols], "data_offsets": [offset, offset + 4 * rows * cols]}
        offset += 4 * rows * cols
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    if path is None:
        for key in keys:
            produce(key[: -len(GRAD_SUFFIX)])
        return
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key in keys:
            grad = produce(key[: -len(GRAD_SUFFIX)])
            f.write(grad.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())


def save_factors(path: str | os.PathLike[str], factors: Mapping[str, LayerFactors], target_names: Sequence[str],
                 zero: Iterable[str]) -> None:
    """Write low-memory factors (fp32) atomically; metadata names the mode, every target and the all-zero layers."""
    tensors = {f"{name}.loraga_fast.{part}": getattr(f, part).contiguous()
               for name, f in factors.items() for part in PARTS}
    write_atomic(path, tensors, {MODE_KEY: "lowmem", TARGETS_KEY: json.dumps(list(target_names)),
                                 ZERO_KEY: json.dumps(sorted(zero))})


_FIX = " Delete the file, or pass another cache file (one written for these targets and this lora_config)."


class CacheFile:
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
        found = self.metadata.get(MODE_KEY, "exact")
        if found != mode:
            held = ("low-memory factors (written by preprocess_loraga(mode='lowmem'))" if found == "lowmem" else
                    "exact-mode mean gradients (written by preprocess_loraga(mode='exact') or peft)")
            raise UsageError(f"Cache file '{self.path}' holds {held}: pass mode='{found}' to use it, or another "
                             f"cache_file for mode='{mode}'.")
        names = (json.loads(self.metadata[TARGETS_KEY]) if TARGETS_KEY in self.metadata
                 else [k[: -len(GRAD_SUFFIX)] for k in sorted(self.keys) if k.endswith(GRAD_SUFFIX)])
        for name in shapes:
            if name not in names:
                raise UsageError(f"Cache file '{self.path}' does not match the model: it has no entry for target "
                                 f"module '{name}'.{_FIX}")
        extra = [name for name in names if name not in shapes]
        if extra:
            raise UsageError(f"Cache file '{self.path}' does not match the model: it holds module '{extra[0]}', which "
                             f"is not a target of this model and lora_config.{_FIX}")
        for name, shape in shapes.items():
            cached = self.cached_shape(name)
            if cached is not None and cached != tuple(shape):
                raise UsageError(f"Cache file '{self.path}' does not match the model: module '{name}' has a cached "
                                 f"{'gradient' if mode == 'exact' else 'factorization'} of shape {cached} but a weight "
                                 f"of shape {tuple(shape)}.{_FIX}")

    def cached_shape(self, name: str) -> tuple[int, ...] | None:
        """The weight shape the cache holds for ``name``, or None when it holds no tensor for it."""
        if f"{name}{GRAD_SUFFIX}" in self.keys:
            return tuple(self.handle.get_slice(f"{name}{GRAD_SUFFIX}").get_shape())
        if f"{name}.loraga_fast.u" in self.keys:
            u, v = (self.handle.get_slice(f"{name}.loraga_fast.{p}").get_shape() for p in ("u", "v"))
            return (u[0], v[0])
        return None

    def get(self, key: str, rows: range | None = None) -> torch.Tensor:
        """The tensor ``key``, or only its ``rows`` (read from the file without the others)."""
        if rows is None:
            return self.handle.get_tensor(key)
        return self.handle.get_slice(key)[rows.start : rows.stop]

    def close(self) -> None:
        self.handle.__exit__(None, None, None)



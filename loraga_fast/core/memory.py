"""Accumulator memory of exact and low-memory mode, before anything runs: :func:`memory_estimate`."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..layers.kinds import math_shape
from ..layers.targets import fill_default_target_modules, find_targets, layer_ranks
from ..stores.sketch import CHUNK_LAYERS, DEFAULT_PASSES, FINGERPRINT_PROBES, sketch_columns

__all__ = ["MemoryEstimate", "accumulator_bytes", "available_bytes", "capture_bytes", "check_fits",
           "extra_bytes_per_layer", "factor_bytes", "memory_estimate", "stream_workspace_bytes", "target_memory",
           "workspace_bytes"]

WORKSPACE_CHUNKS = 6
"""Layer-sized fp32 ``(max(m, n), k)`` temporaries the sketch algebra holds at once, at most: orthonormalizing the
previous pass's product (CholeskyQR2: the two triangular solves and their column-major copies), or the final SVD
(LAPACK's copy of the product, its ``U`` and work space). Measured with bench/sketch_memory.py: the live peak over
the sketches on LLaMA-7B shapes stays within ``1.3 x sketches + this``."""


STREAM_WORKSPACE = 8
"""fp32 ``(m + n, l)`` blocks one-pass low-memory mode holds at once, at most, while it merges one layer
(:mod:`loraga_fast.stores.stream`): a backward pass's fold (the test matrix and the compressed batch ``[L; R]``)
or a distributed merge's step (the partial this process has merged so far and the one it received: two blocks),
then :func:`~loraga_fast.ops.stream.merge_update` of width ``2 l``: the concatenation being factored (``[U diag(s),
L]`` or ``[V, R]``, ``2 l`` columns), both Q factors (two blocks; LAPACK factors in the Q's own column-major
buffer) and the new ``U``, ``V`` with their ``torch.where`` copies. The distributed merge is a binomial tree of
such ``2 l``-wide merges, so this does not grow with the number of processes (the all-gather it replaced held
``P`` processes' factors and merged ``(P + 1) l`` columns at once). Measured peaks of the ops' allocations, the
``STREAM_CORE`` matrices included: a fold 5.2-7.3 blocks on shapes from ``(16, 1000)`` to ``(1000, 16)``
(tests/stores/test_stream_workspace.py), a 4-process tree merge 9.6 blocks on ``(40, 70)`` with ``l = 16``
(tests/distributed/test_stream_merge.py), against this formula's 8.5-11.2 and 12.7 blocks there."""

STREAM_CORE = 8
"""fp32 ``(2 l, 2 l)`` matrices of the same merge: the two R factors, the core, its singular vectors, and the SVD's
copy of the core and work space (measured: five visible)."""


def stream_workspace_bytes(layers: Iterable[tuple[int, int, int]]) -> int:
    """Transient bytes of one-pass low-memory mode for layers ``(m, n, l)``, in a backward pass's fold and in the
    distributed merge alike: one layer is merged at a time, ``2 l`` columns at once, so
    ``4 (STREAM_WORKSPACE (m + n) l + STREAM_CORE (2 l)^2)`` of the largest layer, whatever the number of
    processes."""
    return max((4 * (STREAM_WORKSPACE * (m + n) * k + STREAM_CORE * (2 * k) ** 2) for m, n, k in layers), default=0)


def accumulator_bytes(shapes: Iterable[tuple[int, int]], r: int, sketch_size: int | None = None,
                      passes: int | None = None) -> tuple[int, int]:
    """``(exact, lowmem)`` accumulator bytes for layers of weight shapes ``shapes`` at rank ``r``: ``4 m n`` per
    layer in exact mode, ``4 (m + n) k`` in low-memory mode (plus :func:`extra_bytes_per_layer` with two or more
    passes, the ``k`` singular values with one)."""
    exact = lowmem = 0
    for m, n in shapes:
        k = sketch_columns(m, n, r, sketch_size)
        exact += 4 * m * n
        lowmem += 4 * (m + n) * k + (4 * k if passes == 1 else extra_bytes_per_layer(m, n))
    return exact, lowmem


def workspace_bytes(layers: Iterable[tuple[int, int, int]]) -> int:
    """Transient bytes low-memory mode needs beside its sketches, for layers ``(m, n, k)``: the sketch algebra
    (between passes, and the final factors) works on ``CHUNK_LAYERS`` layer(s) of a shape group at a time and
    holds up to ``WORKSPACE_CHUNKS`` fp32 ``(max(m, n), k)`` temporaries per layer of the chunk, so the workspace is
    that of the largest layer: ``4 * WORKSPACE_CHUNKS * min(CHUNK_LAYERS, B) * max(m, n) * k`` bytes (B = layers
    in the group). It does not grow with the number of layers."""
    groups: dict[tuple[int, int, int], int] = {}
    for key in layers:
        groups[key] = groups.get(key, 0) + 1
    return max((4 * WORKSPACE_CHUNKS * min(CHUNK_LAYERS, b) * max(m, n) * k for (m, n, k), b in groups.items()), default=0)


def factor_bytes(layers: Iterable[tuple[int, int, int]]) -> int:
    """The top-``2r`` factors low-memory mode computes after its last pass and keeps until the hand-off, for layers
    ``(m, n, r)``: fp32 ``U (m, 2r)`` and ``V (n, 2r)``, ``4 (m + n) 2r`` bytes per layer (1/12 of the sketch at the
    default ``k = 24 r``)."""
    return sum(4 * (m + n) * min(2 * r, m, n) for m, n, r in layers)


def capture_bytes(layers: Iterable[tuple[int, int, int]], tokens: int, device: torch.device) -> int:
    """Transient bytes of one layer's sketch product during a backward pass over ``tokens`` tokens (freed before the
    next layer's): the torch backend (CPU) upcasts ``G`` and ``X`` to fp32 and forms ``X P`` (``4 T (m + n + k)``);
    the Triton backend (CUDA) reads them in place and holds only the fp32 ``(T, k)`` product. Both add the
    fingerprint's two ``(T, P)`` projections."""
    p = FINGERPRINT_PROBES
    if device.type == "cuda":
        return max((4 * tokens * (k + 2 * p) for _, _, k in layers), default=0)
    return max((4 * tokens * (m + n + k + 2 * p) for m, n, k in layers), default=0)


def extra_bytes_per_layer(m: int, n: int) -> int:
    """Bytes low-memory mode holds per layer beside its sketch: the ``(P, P)`` fingerprint and (an upper bound
    for) its share of the per-group probes ``Phi_m (m, P)``, ``Phi_n (n, P)`` (P = FINGERPRINT_PROBES)."""
    p = FINGERPRINT_PROBES
    return 4 * (p * p + (m + n) * p)


@dataclass
class MemoryEstimate:
    """Accumulator memory of the two modes for one model and LoRA config.

    Attributes:
        exact_bytes: fp32 ``(m, n)`` accumulators (exact mode).
        lowmem_bytes: the ``(m + n) k`` fp32 sketches plus fingerprints and probes (low-memory mode).
        num_layers: target layers.
        sketch_columns: ``k`` of each layer (by name).
        passes: low-memory mode's passes the figures are for (None: the default, ``DEFAULT_PASSES``; 1: the one-pass
            truncated SVDs of :mod:`loraga_fast.stores.stream`, whose ``lowmem_bytes`` are ``4 ((m + n) k + k)`` per
            layer and whose workspace is :func:`stream_workspace_bytes`).
        workspace_bytes: low-memory mode's bounded transient workspace (:func:`workspace_bytes`).
        factor_bytes: the top-``2r`` factors it holds after the last pass (:func:`factor_bytes`). Its peak is
            :attr:`lowmem_peak_bytes` = ``lowmem_bytes + factor_bytes + workspace_bytes``, plus, while one layer's
            backward runs, that layer's capture temporaries (:func:`capture_bytes`, activation-sized).
    """

    exact_bytes: int
    lowmem_bytes: int
    num_layers: int
    sketch_columns: dict[str, int] = field(default_factory=dict)
    workspace_bytes: int = 0
    factor_bytes: int = 0
    passes: int | None = None

    @property
    def lowmem_peak_bytes(self) -> int:
        """What low-memory mode holds at its peak beside the model and activations: sketches, factors, workspace."""
        return self.lowmem_bytes + self.factor_bytes + self.workspace_bytes

    def __str__(self) -> str:
        ratio = self.exact_bytes / max(self.lowmem_peak_bytes, 1)
        if ratio >= 1.05:
            than = f"{ratio:.1f}x less"
        elif ratio <= 1 / 1.05:
            than = f"{1 / ratio:.1f}x more"
        else:  # within 5%: "1.0x less" would promise a saving that is not there
            than = "about the same as exact mode"
        return (f"LoRA-GA accumulator memory for {self.num_layers} target layers: exact mode {_fmt(self.exact_bytes)}, "
                f"low-memory mode {_fmt(self.lowmem_peak_bytes)} (sketches {_fmt(self.lowmem_bytes)}, factors "
                f"{_fmt(self.factor_bytes)}, workspace {_fmt(self.workspace_bytes)}; {than}, {self._passes_text})")

    @property
    def _passes_text(self) -> str:
        if self.passes is None:
            return f"{DEFAULT_PASSES} passes over the batches by default"
        return "one pass over the batches" if self.passes == 1 else f"{self.passes} passes over the batches"


def available_bytes(device: torch.device) -> int | None:
    """Memory the accumulators could take on ``device`` right now: free device memory on CUDA, the kernel's
    ``MemAvailable`` on a Linux CPU; None where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(targets: Sequence[tuple[str, nn.Module]], ranks: Mapping[str, int], mode: str,
               sketch_size: int | None = None, passes: int | None = None) -> None:
    """Refuse, before the first forward pass, a run whose accumulators alone exceed what a device has available.

    Raises:
        UsageError: naming the device, the bytes needed and available, and the alternative (low-memory mode for
            exact mode; fewer targets or a smaller ``sketch_size`` for low-memory mode).
    """
    by_device: dict[torch.device, list[tuple[str, nn.Module]]] = {}
    for name, module in targets:
        by_device.setdefault(module.weight.device, []).append((name, module))
    for device, members in by_device.items():
        free = available_bytes(device)
        if free is None:
            continue
        memory = target_memory(members, ranks, sketch_size, passes=passes if mode == "lowmem" else None)
        need = memory.exact_bytes if mode == "exact" else memory.lowmem_peak_bytes
        if need <= free:
            continue
        if mode == "exact":
            hint = (f"use preprocess_loraga(..., mode='lowmem') (loraga-fast init --mode lowmem), which needs "
                    f"{_fmt(memory.lowmem_peak_bytes)}, fewer target_modules, or shard the model (FSDP)")
        else:
            hint = "use fewer target_modules or a smaller sketch_size"
        raise UsageError(f"LoRA-GA {mode} mode needs {_fmt(need)} of fp32 accumulators for {len(members)} target "
                         f"layer(s) on {device}, but only {_fmt(free)} is available: {hint}.")


def _fmt(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def target_memory(targets: Sequence[tuple[str, nn.Module]], ranks: Mapping[str, int],
                  sketch_size: int | None = None, passes: int | None = None) -> MemoryEstimate:
    """:class:`MemoryEstimate` for ``targets`` (``(name, module)``) with per-layer ``ranks`` (low-memory mode's
    figures for ``passes``; None: the default)."""
    exact = lowmem = 0
    columns = {}
    layers, ranked = [], []
    for name, module in targets:
        m, n = math_shape(module)
        e, lm = accumulator_bytes([(m, n)], ranks[name], sketch_size, passes)
        exact += e
        lowmem += lm
        columns[name] = sketch_columns(m, n, ranks[name], sketch_size)
        layers.append((m, n, columns[name]))
        ranked.append((m, n, ranks[name]))
    workspace = stream_workspace_bytes(layers) if passes == 1 else workspace_bytes(layers)
    return MemoryEstimate(exact_bytes=exact, lowmem_bytes=lowmem, num_layers=len(targets), sketch_columns=columns,
                          workspace_bytes=workspace, factor_bytes=factor_bytes(ranked), passes=passes)


def memory_estimate(model: nn.Module, lora_config: Any, *, sketch_size: int | None = None,
                    passes: int | None = None) -> MemoryEstimate:
    """Bytes of the accumulators ``preprocess_loraga`` would hold for ``model`` and ``lora_config``.

    Exact mode: ``4 m n`` per target layer (one fp32 gradient). Low-memory mode: ``4 (m + n) k`` per layer with
    ``k = sketch_size`` or ``24 r`` (capped at ``min(m, n)``), plus a ``4 x 4`` fingerprint and the probes
    (:func:`extra_bytes_per_layer`); its bounded workspace is ``workspace_bytes`` (:func:`workspace_bytes`) and the
    factors it keeps after the last pass ``factor_bytes``, so its peak is ``lowmem_peak_bytes``. Activations and the model are not included (the same in both modes; low-memory
    mode adds one layer's capture temporaries at a time, :func:`capture_bytes`). ``passes=1``: the figures of
    one-pass low-memory mode (``4 ((m + n) k + k)`` per layer, workspace :func:`stream_workspace_bytes`). ``lora_config`` is not
    modified. ``str()`` of the result is a one-line summary (what ``preprocess_loraga`` logs).

    Raises:
        UsageError: no layer of the model is a target (e.g. a model that ``get_peft_model`` wrapped already).
    """
    config = copy.deepcopy(lora_config)
    fill_default_target_modules(model, config)
    targets = find_targets(model, config)
    if not targets:
        wrapped = " (it is wrapped by peft already: estimate on the base model)" if hasattr(model, "peft_config") else ""
        names = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
        raise UsageError(f"memory_estimate: no nn.Linear or Conv1D layer of the model matches target_modules="
                         f"{names!r}{wrapped}.")
    return target_memory(targets, layer_ranks(config, [name for name, _ in targets]), sketch_size, passes)

"""``memory_estimate``: accumulator memory of exact and low-memory mode for a model and LoRA config."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .init import layer_ranks
from .lowmem import MemoryEstimate, estimate_bytes
from .peft_compat import _fill_default_target_modules, find_targets

__all__ = ["memory_estimate"]


def memory_estimate(model: nn.Module, lora_config: Any, *, sketch_size: int | None = None) -> MemoryEstimate:
    """Bytes of the accumulators ``preprocess_loraga`` would hold for ``model`` and ``lora_config``.

    Exact mode: ``4 m n`` per target layer (one fp32 gradient). Low-memory mode: ``4 (m + n) k`` per layer with
    ``k = sketch_size`` or ``16 r`` (capped at ``min(m, n)``), plus a ``4 x 4`` fingerprint and the probes
    (:func:`loraga_fast.lowmem.extra_bytes_per_layer`). Activations, the model and transient workspace are not
    included (they are the same in both modes, except the ``(T, k)`` products of one layer at a time).
    ``lora_config`` is not modified. ``str()`` of the result is a one-line summary (what ``preprocess_loraga`` logs).
    """
    config = copy.deepcopy(lora_config)
    _fill_default_target_modules(model, config)
    targets = find_targets(model, config)
    return estimate_bytes(targets, layer_ranks(config, [name for name, _ in targets]), sketch_size)

"""The drop-in surface: :func:`preprocess_loraga`, with peft's contract.

``from loraga_fast import preprocess_loraga`` replaces ``from peft import preprocess_loraga``; the user's
``peft.get_peft_model(model, lora_config)`` then initializes LoRA-GA from what is attached here. The work goes
through the one flow every mode shares: targets (:mod:`~loraga_fast.targets`) -> store (exact, sharded or sketch)
-> capture passes (:mod:`~loraga_fast.estimate`) -> hand-off (:mod:`~loraga_fast.handoff`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from .cache import load_factors, load_gradients
from .capture import math_shape, weight_layout_transposed, weight_shape
from .errors import UsageError
from .estimate import run_passes
from .handoff import hand_off
from .memory import check_fits, estimate_bytes
from .quantized import OFFSETS
from .sharding import (
    ShardLayout,
    check_sharded_call,
    check_sharded_config,
    new_store,
    shard_layout,
)
from .sketch_store import (
    DEFAULT_PASSES,
    DEFAULT_SKETCH_PER_RANK,
    SketchSpec,
    SketchStore,
    sketch_columns,
)
from .store import Estimate, Store, is_distributed
from .targets import check_ranks, fill_default_target_modules, find_targets, layer_ranks

__all__ = ["check_preprocess", "preprocess_loraga"]

logger = logging.getLogger("loraga_fast")


def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[], None],
    cache_file: str | os.PathLike[str] | None = None,
    *,
    num_batches: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
    mode: str = "exact",
    sketch_size: int | None = None,
    passes: int | None = None,
    quantized_offset: str = "requantize",
) -> None:
    """Estimate the mean gradient of every LoRA-GA target layer and attach it for ``peft.get_peft_model``.

    A drop-in replacement for ``peft.preprocess_loraga`` with the same arguments and effects, computed without
    autograd weight gradients: each target ``nn.Linear`` / ``Conv1D`` is routed through a capture op whose
    backward adds ``G^T X`` (output gradient times input, all tokens) into an fp32 accumulator.

    Args:
        model: the model to preprocess (not yet wrapped by peft).
        lora_config: a ``LoraConfig`` with ``init_lora_weights="lora_ga"`` and ``lora_ga_config`` set. When its
            ``target_modules`` is None, it is filled from peft's defaults for the model type (as peft does).
        train_step: callback that runs forward and backward passes (``loss.backward()``) over the estimation
            batches. It may call ``model.zero_grad()``; the result is still the mean over all backward passes.
        cache_file: optional safetensors file. If it exists and is non-empty, gradients are loaded from it and
            ``train_step`` is not called; otherwise they are estimated and saved there.
        num_batches: optional number of backward passes ``train_step`` will run, for the progress bar.
        progress: show a progress bar (default: only when ``num_batches`` is given).
        process_group: data parallel. When ``torch.distributed`` is initialized, every rank runs ``train_step`` on
            its own batches and the sums and pass counts are reduced over this group (default: the world) with one
            collective per shape group, so every rank ends with the mean over all ranks' backward passes (ranks may
            run different numbers of batches). Only rank 0 writes ``cache_file``. FSDP-sharded models (FSDP2
            ``fully_shard`` with ``Shard(0)`` on a 1-D mesh; FSDP1 with ``use_orig_params=True``) are handled too: the
            accumulators are row-sharded over the model's process group (``process_group`` must be left unset) and
            every rank must run the same number of forward passes (a mismatch raises on every rank instead of
            hanging). See :mod:`loraga_fast.sharding`.
        mode: ``"exact"`` (default): one fp32 accumulator per target (4 bytes per weight), ``train_step`` runs once.
            ``"lowmem"``: only skinny sketches of each gradient (``4 (m + n) k`` bytes per layer, ``k = 24 r``), from
            which the top ``2r`` singular triplets are reconstructed; ``train_step`` runs ``passes`` times and must be
            re-runnable and see the same batches each time (checked; the global random state is reset before each
            pass). ``_peft_loraga_grad`` is then a placeholder, not a tensor, and ``cache_file`` holds the factors.
            See :mod:`loraga_fast.lowmem`.
        sketch_size: low-memory mode only: sketch columns ``k`` per layer (default ``24 r``, capped at
            ``min(m, n)``); must be at least ``2 r``.
        passes: low-memory mode only: calls of ``train_step`` (default 3, at least 2); more passes are more
            accurate (each is one power iteration).
        quantized_offset: bitsandbytes 4-/8-bit targets only (QLoRA): how ``get_peft_model`` applies LoRA-GA's base
            offset ``W - s B A``, which 4 or 8 bits cannot store exactly: ``"requantize"`` (default: dequantize,
            subtract in fp32, quantize again with the layer's own settings, as the original LoRA-GA repository
            does) or ``"none"`` (the quantized base is left untouched; the model's function then changes by
            ``s B A``). Quantized targets are captured through their own forward (the gradient with respect to the
            dequantized weight); no float copy of a weight is made.

    Effects:
        Each target module gets ``module._peft_loraga_grad``: fp32, the weight's shape and layout, on the
        weight's device, equal to the sum of the weight gradients over the backward passes through the module
        divided by their number (for an FSDP-sharded model: a ``DTensor`` row-sharded over the model's group). Targets that
        saw no backward pass get none (peft then falls back to its default init for them). If anything fails, the
        model is left as it was.

    Raises:
        ValueError: ``lora_config.lora_ga_config`` is missing, a target is quantized by a library other than
            bitsandbytes, no supported layer matches, ``2 r > min(m, n)`` for a target, the accumulators do not fit
            in memory (all checked from shapes and config before ``train_step`` runs); a target's forward is not
            the standard linear forward; ``train_step`` ran no backward pass through any target; or the cache does
            not match the model.
    """
    targets, ranks, passes, cached = _checked_plan(model, lora_config, mode, sketch_size, passes, quantized_offset,
                                                   cache_file)
    logger.info("%s", estimate_bytes(targets, ranks, sketch_size))
    layout = shard_layout(targets, model)
    if layout is not None:
        check_sharded_config(layout, lora_config)
        if mode == "exact":
            check_sharded_call(layout, cache_file, process_group)
        elif process_group is not None and process_group is not layout.group:
            check_sharded_call(layout, None, process_group)
        process_group = layout.group  # FSDP: everything is reduced over the model's group

    start = time.perf_counter()
    if layout is None and not (cached and mode == "lowmem"):  # FSDP shards the accumulators over its ranks
        check_fits(targets, ranks, mode, sketch_size)
    estimate: Estimate
    if cached and mode == "lowmem":
        estimate = load_factors(cache_file, dict(targets), ranks)  # type: ignore[arg-type]
        source = f"loaded from {os.fspath(cache_file)}"  # type: ignore[arg-type]
    else:
        store = _new_store(targets, layout, ranks, mode, sketch_size, passes)
        if cached:
            load_gradients(cache_file, store)  # type: ignore[arg-type]
            source = f"loaded from {os.fspath(cache_file)}"  # type: ignore[arg-type]
        else:
            run_passes(model, targets, store, train_step, ranks=ranks, process_group=process_group,
                       guard_group=layout.group if layout is not None else None, num_batches=num_batches,
                       progress=progress)
            backwards = max(store.counts().values(), default=0)
            source = (f"estimated in {store.passes} passes over {backwards} backward passes each" if store.passes > 1
                      else f"estimated over {backwards} backward passes")
        logger.info("LoRA-GA: %d target layers %s in %.2fs (%s: %.1f MiB)", len(targets), source,
                    time.perf_counter() - start, "sketches" if mode == "lowmem" else "fp32 accumulators",
                    store.nbytes / 2**20)
        estimate = store
    writer = not is_distributed(process_group) or torch.distributed.get_rank(process_group) == 0
    hand_off(lora_config, targets, estimate, layout=layout,
             cache_file=cache_file if not cached and writer else None, quantized_offset=quantized_offset)


def check_preprocess(model: nn.Module, lora_config: LoraConfig, cache_file: str | os.PathLike[str] | None = None, *,
                     mode: str = "exact", sketch_size: int | None = None, passes: int | None = None,
                     quantized_offset: str = "requantize") -> None:
    """Every check :func:`preprocess_loraga` makes from shapes and config before it runs ``train_step`` (LoRA-GA
    config, targets, ``2 r <= min(m, n)``, arguments, cache path, memory fit), without running anything: for
    callers that want to fail before spending time on data preparation. Fills ``lora_config.target_modules`` from
    peft's defaults when it is None, as :func:`preprocess_loraga` does.

    Raises:
        ValueError: the first failed check, with the message :func:`preprocess_loraga` would give.
    """
    targets, ranks, _, cached = _checked_plan(model, lora_config, mode, sketch_size, passes, quantized_offset,
                                              cache_file)
    if shard_layout(targets, model) is None and not (cached and mode == "lowmem"):
        check_fits(targets, ranks, mode, sketch_size)


def _checked_plan(model: nn.Module, lora_config: LoraConfig, mode: str, sketch_size: int | None, passes: int | None,
                  quantized_offset: str, cache_file: str | os.PathLike[str] | None
                  ) -> tuple[list[tuple[str, nn.Module]], dict[str, int], int | None, bool]:
    """``(targets, ranks, passes, cached)`` after the checks that need only shapes and config."""
    if lora_config.lora_ga_config is None:
        raise UsageError(
            "If you want to use LoRA-GA, please initialize the LoraConfig with "
            "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...)."
        )
    fill_default_target_modules(model, lora_config)
    targets = find_targets(model, lora_config)
    if not targets:
        raise UsageError(
            "No supported layers found for LoRA-GA initialization. "
            "LoRA-GA only supports nn.Linear and Conv1D layers. "
            "Please ensure your model contains at least one of these layer types in target_modules."
        )
    if mode not in ("exact", "lowmem"):
        raise UsageError(f"mode must be 'exact' or 'lowmem', got {mode!r}.")
    if quantized_offset not in OFFSETS:
        raise UsageError(f"quantized_offset must be one of {', '.join(map(repr, OFFSETS))}, got {quantized_offset!r}.")
    if mode == "exact" and (sketch_size is not None or passes is not None):
        raise UsageError("sketch_size and passes apply to mode='lowmem' only.")
    ranks = layer_ranks(lora_config, [name for name, _ in targets])
    check_ranks({name: weight_shape(module) for name, module in targets}, ranks, ranks)  # before any forward pass
    if mode == "lowmem":
        passes = DEFAULT_PASSES if passes is None else passes
        if passes < 2:
            raise UsageError(f"low-memory mode needs passes >= 2 (the default is {DEFAULT_PASSES}), got {passes}.")
        if sketch_size is not None and sketch_size < 2 * max(ranks.values()):
            raise UsageError(f"sketch_size={sketch_size} must be at least 2 * r = {2 * max(ranks.values())} (the "
                             f"default, {DEFAULT_SKETCH_PER_RANK} r, meets LoRA-GA's accuracy needs).")
    cached = False
    if cache_file is not None:
        path = os.fspath(cache_file)
        if os.path.isdir(path):
            raise UsageError(f"cache_file '{path}' is a folder: give a file path (e.g. "
                             f"{os.path.join(path, 'loraga_cache.safetensors')!r}).")
        cached = os.path.isfile(path) and os.path.getsize(path) > 0
    return targets, ranks, passes, cached


def _new_store(targets: list[tuple[str, nn.Module]], layout: ShardLayout | None, ranks: dict[str, int], mode: str,
               sketch_size: int | None, passes: int | None) -> Store:
    """The store of ``mode``: exact fp32 accumulators (row shards on FSDP models) or low-memory sketches."""
    if mode == "exact":
        return new_store(targets, layout)
    specs = []
    for name, module in targets:
        m, n = math_shape(module)
        specs.append(SketchSpec(name, m, n, sketch_columns(m, n, ranks[name], sketch_size), module.weight.device,
                                weight_layout_transposed(module)))
    return SketchStore(specs, passes=passes or DEFAULT_PASSES)

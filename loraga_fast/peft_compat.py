"""The drop-in surface: :func:`preprocess_loraga`, with peft's contract and target matching.

``from loraga_fast import preprocess_loraga`` replaces ``from peft import preprocess_loraga``; the user's
``peft.get_peft_model(model, lora_config)`` then initializes LoRA-GA from the gradients attached here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.model import LoraModel
from torch import nn

from .cache import load_cache, save_cache
from .capture import CaptureSession, is_supported_layer, weight_shape
from .init import PreparedGroup, check_finite, init_layer_from_factors, layer_ranks, max_abs, prepare_groups
from .lowmem import estimate_bytes, preprocess_lowmem
from .sharding import ShardLayout, StepGuard, shard_layout
from .store import AccumulatorStore, ShardedStore, Slot

__all__ = ["estimate_into", "find_targets", "finish", "init_progress", "preprocess_loraga"]

logger = logging.getLogger("loraga_fast")

GRAD_ATTR = "_peft_loraga_grad"


def _fill_default_target_modules(model: nn.Module, lora_config: LoraConfig) -> None:
    """Fill ``lora_config.target_modules`` from peft's per-architecture defaults, as peft does."""
    if lora_config.target_modules is not None:
        return
    model_config = LoraModel.get_model_config(model)
    target_modules = LoraModel.target_module_mapping.get(model_config["model_type"])
    if target_modules is None:
        raise ValueError("Please specify `target_modules` in `peft_config`")
    lora_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)


def find_targets(model: nn.Module, lora_config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs LoRA-GA initializes: modules peft's own rules match whose type is
    ``nn.Linear`` or transformers ``Conv1D`` (other matched types are skipped, as in peft).

    Raises:
        ValueError: a matched module is quantized (LoRA-GA needs full-precision gradients).
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if LoraModel._check_target_module_exists(lora_config, name) and is_supported_layer(module)
    ]
    for name, module in targets:
        if hasattr(module, "quant_state") or hasattr(module.weight, "quant_state"):
            raise ValueError(
                f"LoRA-GA does not support quantized models. Found quantized module: '{name}'. "
                "LoRA-GA requires full-precision gradients during preprocessing."
            )
    return targets


class _Progress:
    """tqdm bar over backward passes (the most any target has seen), when a total is known or asked for."""

    def __init__(self, total: int | None, enabled: bool | None):
        self.bar = None
        if enabled or (enabled is None and total is not None):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="LoRA-GA gradient estimation", unit="backward")

    def on_backward(self, slot: Slot) -> None:
        assert self.bar is not None
        if slot.count > self.bar.n:
            self.bar.update(slot.count - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
            ``"lowmem"``: only skinny sketches of each gradient (``4 (m + n) k`` bytes per layer, ``k = 16 r``), from
            which the top ``2r`` singular triplets are reconstructed; ``train_step`` runs ``passes`` times and must be
            re-runnable and see the same batches each time (checked; the global random state is reset before each
            pass). ``_peft_loraga_grad`` is then a placeholder, not a tensor, and ``cache_file`` holds the factors.
            See :mod:`loraga_fast.lowmem`.
        sketch_size: low-memory mode only: sketch columns ``k`` per layer (default ``16 r``, capped at
            ``min(m, n)``); must be at least ``2 r``.
        passes: low-memory mode only: calls of ``train_step`` (default 3, at least 2); more passes are more
            accurate (each is one power iteration).

    Effects:
        Each target module gets ``module._peft_loraga_grad``: fp32, the weight's shape and layout, on the
        weight's device, equal to the sum of the weight gradients over the backward passes through the module
        divided by their number (for an FSDP-sharded model: a ``DTensor`` row-sharded over the model's group). Targets that
        saw no backward pass get none (peft then falls back to its default init for them). If anything fails, the
        model is left as it was.

    Raises:
        ValueError: ``lora_config.lora_ga_config`` is missing, a target is quantized, no supported layer matches,
            a target's forward is not the standard linear forward, or the cache does not match the model.
    """
    if lora_config.lora_ga_config is None:
        raise ValueError(
            "If you want to use LoRA-GA, please initialize the LoraConfig with "
            "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...)."
        )
    _fill_default_target_modules(model, lora_config)
    targets = find_targets(model, lora_config)
    if not targets:
        raise ValueError(
            "No supported layers found for LoRA-GA initialization. "
            "LoRA-GA only supports nn.Linear and Conv1D layers. "
            "Please ensure your model contains at least one of these layer types in target_modules."
        )
    if mode not in ("exact", "lowmem"):
        raise ValueError(f"mode must be 'exact' or 'lowmem', got {mode!r}.")
    if mode == "exact" and (sketch_size is not None or passes is not None):
        raise ValueError("sketch_size and passes apply to mode='lowmem' only.")
    logger.info("%s", estimate_bytes(targets, layer_ranks(lora_config, [n for n, _ in targets]), sketch_size))
    layout = shard_layout(targets, model)
    if layout is not None:
        check_sharded_config(layout, lora_config)
    if mode == "lowmem":
        if layout is not None:  # FSDP: the sketches are replicated (small); sum them over the model's group
            if process_group is not None and process_group is not layout.group:
                _check_sharded_call(layout, None, process_group)
            process_group = layout.group
            train_step = _guarded(model, train_step, layout)
        distributed = _distributed(process_group)
        writer = not distributed or torch.distributed.get_rank(process_group) == 0
        groups, placeholders = preprocess_lowmem(
            model, lora_config, targets, train_step, cache_file, sketch_size=sketch_size, passes=passes,
            num_batches=num_batches, progress=progress, process_group=process_group,
            distributed=distributed, writer=writer,
        )
        _attach(targets, placeholders)  # type: ignore[arg-type]
        _register(groups)  # type: ignore[arg-type]
        register_owners(layout, targets)
        return
    start = time.perf_counter()
    if layout is not None:
        _check_sharded_call(layout, cache_file, process_group)
    store = new_store(targets, layout)
    cached = cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0
    if cached:
        load_cache(cache_file, {name: module.weight for name, module in targets}, store)  # type: ignore[arg-type]
        source = f"loaded from {os.fspath(cache_file)}"  # type: ignore[arg-type]
    else:
        estimate_into(store, model, targets, train_step, num_batches=num_batches, progress=progress)
        if layout is not None:
            store.all_reduce()  # the sums were reduce-scattered at every backward pass: only the counts remain
        elif _distributed(process_group):
            store.all_reduce(process_group)
        passes = max((slot.count for slot in store.slots.values()), default=0)
        source = f"estimated over {passes} backward passes"
    writer = not _distributed(process_group) or torch.distributed.get_rank(process_group) == 0
    finish(lora_config, targets, store, cache_file=cache_file if not cached and writer else None)
    register_owners(layout, targets)
    logger.info(
        "LoRA-GA: %d target layers %s in %.2fs (fp32 accumulators: %.1f MiB in %d shape groups)",
        len(targets), source, time.perf_counter() - start, store.nbytes / 2**20, len(store.groups),
    )


def new_store(targets: list[tuple[str, nn.Module]], layout: ShardLayout | None) -> AccumulatorStore:
    """Accumulators for ``targets``: whole fp32 matrices, or row shards when the model is FSDP-sharded."""
    specs = [(name, weight_shape(m), _local_device(m.weight)) for name, m in targets]
    return AccumulatorStore(specs) if layout is None else ShardedStore(specs, layout.group, layout.mesh)  # type: ignore[arg-type]


def _local_device(weight: torch.Tensor) -> torch.device:
    to_local = getattr(weight, "to_local", None)
    return to_local().device if to_local is not None else weight.device


def _guarded(model: nn.Module, train_step: Callable[[], None], layout: ShardLayout) -> Callable[[], None]:
    """``train_step`` with a :class:`StepGuard` around each call (uneven step counts raise instead of hanging)."""

    def step() -> None:
        guard = StepGuard(model, layout.group, _local_device(next(iter(model.parameters()))))
        try:
            train_step()
            guard.finish()
        finally:
            guard.remove()

    return step


def check_sharded_config(layout: ShardLayout, lora_config: Any) -> None:
    """Raise ``ValueError`` for LoRA-GA settings a sharded layout cannot serve."""
    if layout.owners is not None and getattr(lora_config.lora_ga_config, "scale", None) == "weight_svd":
        raise ValueError(
            "scale='weight_svd' is not supported on FSDP1 models (it needs each weight's top singular value, and "
            "FSDP1 holds weights as flattened shards): use another scale, or FSDP2 (fully_shard)."
        )


# FSDP1: the unit whose summon_full_params gives a prepared layer its whole weight during initialization
_FSDP1_OWNERS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def register_owners(layout: ShardLayout | None, targets: list[tuple[str, nn.Module]]) -> None:
    """Remember each FSDP1 target's unit for :func:`_lora_ga_init_from_prepared` (weakly)."""
    if layout is None or layout.owners is None:
        return
    for name, module in targets:
        _FSDP1_OWNERS[module] = layout.owners[name]


def _check_sharded_call(layout: ShardLayout, cache_file: Any, process_group: Any) -> None:
    if cache_file is not None:
        raise ValueError(
            "cache_file is not supported for FSDP-sharded models yet (each rank holds only its rows of the gradients): "
            "call preprocess_loraga without cache_file."
        )
    if process_group is not None and process_group is not layout.group:
        raise ValueError(
            "process_group differs from the process group the model is sharded over by FSDP: the gradients are "
            "reduced over that group; leave process_group unset for sharded models."
        )


def _distributed(group: Any = None) -> bool:
    """True when torch.distributed is initialized and ``group`` (default: the world) has more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def estimate_into(store: AccumulatorStore, model: nn.Module, targets: list[tuple[str, nn.Module]],
                  train_step: Callable[[], None], *, num_batches: int | None = None,
                  progress: bool | None = None) -> None:
    """Run ``train_step`` with ``targets`` routed through the capture op, summing ``G^T X`` into ``store``."""
    bar = _Progress(num_batches, progress)
    guard = None
    if isinstance(store, ShardedStore):  # one reduce-scatter per backward: every rank must run the same steps
        guard = StepGuard(model, store.group, store.groups[0].device)
    try:
        with CaptureSession(model, targets, store, on_backward=bar.on_backward if bar.bar is not None else None):
            with torch.enable_grad():
                train_step()
        if guard is not None:
            guard.finish()
    finally:
        if guard is not None:
            guard.remove()
        if isinstance(store, ShardedStore):
            store.release_workspace()
        bar.close()


def finish(lora_config: LoraConfig, targets: list[tuple[str, nn.Module]], store: AccumulatorStore, *,
           cache_file: str | os.PathLike[str] | None = None) -> None:
    """Everything after estimation: means, checks, optional cache, attach, and the hand-off to peft (each shape
    group is factored, batched, when ``get_peft_model`` initializes its first layer).

    ``store`` holds the summed gradients and pass counts of ``targets``. Nothing is attached and no weight is
    touched unless every check passes.
    """
    names = [name for name, _ in targets]
    modules = dict(targets)
    grads = store.means()
    maxabs = max_abs(store)
    check_finite(maxabs, grads)
    ranks = layer_ranks(lora_config, list(grads))
    for name, r in ranks.items():
        shape = store.shapes[name]
        if 2 * r > min(shape):
            raise ValueError(
                f"LoRA-GA needs 2 * r <= min(out_features, in_features), but layer '{name}' has a weight of shape "
                f"{shape} and r={r}: lower r (or set rank_pattern for it) or exclude the layer."
            )
    zero = [name for name in grads if maxabs[name] == 0]
    shown = store.shaped_for_user(grads)
    groups = prepare_groups(
        store, modules, ranks, weight_svd=getattr(lora_config.lora_ga_config, "scale", None) == "weight_svd",
        zero=zero, attached=shown,
    )
    if cache_file is not None:
        save_cache(cache_file, grads, names)
    _attach(targets, shown)
    _register(groups)

    missing = [name for name in names if name not in grads]
    if missing:
        logger.warning(
            "LoRA-GA: %d of %d target layers saw no backward pass in train_step and keep peft's default init: %s",
            len(missing), len(names), _short(missing),
        )
    if zero:
        logger.warning(
            "LoRA-GA: the mean gradient of %d layer(s) is all zero (the loss never reached them); they get peft's "
            "default LoRA init: %s", len(zero), _short(zero),
        )


def _short(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _attach(targets: list[tuple[str, nn.Module]], grads: dict[str, torch.Tensor]) -> None:
    """Set ``_peft_loraga_grad`` on every target with a gradient; drop a stale one from the others."""
    for name, module in targets:
        if name in grads:
            setattr(module, GRAD_ATTR, grads[name])
        elif hasattr(module, GRAD_ATTR):
            delattr(module, GRAD_ATTR)


# ---- hand-off to peft.get_peft_model ---------------------------------------------------------------------
#
# peft initializes LoRA-GA in LoraLayer.lora_ga_init, one layer at a time, with one torch.svd_lowrank each.
# While some base layer carries factors from preprocess_loraga, LoraLayer.lora_ga_init is wrapped: for such a
# layer (recognised by identity of the attached gradient tensor, so a gradient the user replaced is respected)
# it initializes from the precomputed factors; every other layer goes to peft's own method. The wrapper is
# removed as soon as no prepared layer is left, and nothing is stored on the model besides _peft_loraga_grad.

_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[PreparedGroup, str]] = weakref.WeakKeyDictionary()
_peft_lora_ga_init: Callable[..., Any] | None = None
_init_bar: Any = None


@contextlib.contextmanager
def init_progress(total: int) -> Iterator[None]:
    """Show a progress bar over the prepared layers that ``get_peft_model`` initializes inside this block."""
    global _init_bar
    from tqdm.auto import tqdm

    _init_bar = tqdm(total=total, desc="LoRA-GA initialization", unit="layer")
    try:
        yield
    finally:
        _init_bar.close()
        _init_bar = None


def _lora_layer_class() -> type:
    from peft.tuners.lora.layer import LoraLayer

    return LoraLayer


def _register(groups: list[PreparedGroup]) -> None:
    global _peft_lora_ga_init
    for group in groups:
        for name, ref in group.modules.items():
            module = ref()
            assert module is not None
            _PREPARED[module] = (group, name)
            weakref.finalize(module, _uninstall_if_idle)  # a prepared model dropped before get_peft_model
    if groups and _peft_lora_ga_init is None:
        layer_cls = _lora_layer_class()
        _peft_lora_ga_init = layer_cls.lora_ga_init
        layer_cls.lora_ga_init = functools.wraps(_peft_lora_ga_init)(_lora_ga_init_from_prepared)


def _unregister(base: nn.Module) -> None:
    _PREPARED.pop(base, None)
    _FSDP1_OWNERS.pop(base, None)
    _uninstall_if_idle()


def _uninstall_if_idle() -> None:
    global _peft_lora_ga_init
    if _peft_lora_ga_init is not None and not any(True for _ in _PREPARED.keys()):
        _lora_layer_class().lora_ga_init = _peft_lora_ga_init
        _peft_lora_ga_init = None


def _lora_ga_init_from_prepared(self: Any, adapter_name: str, lora_ga_config: Any) -> None:
    original = _peft_lora_ga_init
    assert original is not None
    base = self.get_base_layer()
    entry = _PREPARED.get(base)
    if entry is None:
        return original(self, adapter_name, lora_ga_config)
    group, name = entry
    try:
        # a gradient the user replaced, or a rank beyond what was prepared, goes to peft's own path
        if (lora_ga_config is None or getattr(base, GRAD_ATTR, None) is not group.grads[name]
                or self.r[adapter_name] > max(group.ranks.values())):
            return original(self, adapter_name, lora_ga_config)
        if name in group.zero:  # the loss never reached it: peft's default init (no factorization needed)
            self.reset_lora_parameters(adapter_name, init_lora_weights=True)
        else:
            factors = group.factors()[name]
            unit = _FSDP1_OWNERS.get(base)
            if unit is None:
                init_layer_from_factors(self, adapter_name, lora_ga_config, factors)
            else:  # FSDP1: the whole weight for the duration, offset in place, written back to every rank's shard
                from torch.distributed.fsdp import FullyShardedDataParallel

                with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True):
                    init_layer_from_factors(self, adapter_name, lora_ga_config, factors, in_place=True)
        delattr(base, GRAD_ATTR)
        if _init_bar is not None:
            _init_bar.update(1)
    finally:
        _unregister(base)

"""The hand-off to ``peft.get_peft_model``: attach, register, and initialize prepared layers from their factors.

peft initializes LoRA-GA in ``LoraLayer.lora_ga_init``, one layer at a time, with one ``torch.svd_lowrank`` each.
While some base layer is prepared here, ``LoraLayer.lora_ga_init`` is wrapped: a prepared layer (recognised by
identity of the attached ``_peft_loraga_grad``, so a gradient the user replaced is respected) is initialized from
its group's factors (:mod:`loraga_fast.stores.factors`, :mod:`loraga_fast.core.layer_init`); every other layer goes to peft's
own method. The wrapper removes itself as soon as no prepared layer is left, and nothing is stored on the model
besides ``_peft_loraga_grad``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from ..distributed.layout import ShardLayout
from ..layers.kinds import weight_shape
from ..layers.quantized import UNTOUCHED_BASES
from ..layers.targets import GRAD_ATTR, check_ranks, layer_ranks, warn_left_out
from ..stores.base import GradientSource
from ..stores.factors import PreparedGroup
from .allocation import RankBudget, allocate, apply_ranks, decrease_curve
from .layer_init import init_layer_from_factors, stable_features
from .passes import summarize

__all__ = ["hand_off", "init_progress", "release"]

_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[PreparedGroup, str]] = weakref.WeakKeyDictionary()
# FSDP1: the unit whose summon_full_params gives a prepared layer its whole weight during initialization
_FSDP1_OWNERS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
_peft_lora_ga_init: Callable[..., Any] | None = None
_init_bar: Any = None
_offset_layers = 0  # layers whose base was offset since the wrapper was installed (for the save guidance)

logger = logging.getLogger("loraga_fast")

SAVE_GUIDANCE = (
    "LoRA-GA offset the base weights of {n} layer(s) (W -= scaling * B A): the adapter reproduces this model only on "
    "that offset base, so a plain save_pretrained + PeftModel.from_pretrained on a fresh base gives a different model. "
    "Call save_loraga_model_init(model, DIR) now and save_loraga_model_final(model, DIR) after training (a plain LoRA "
    "adapter for the untouched base; or peft's save_pretrained(..., path_initial_model_for_weight_conversion=...)), "
    "or preprocess with keep_base=True, which leaves the base untouched."
)


def hand_off(lora_config: Any, targets: Sequence[tuple[str, nn.Module]], source: GradientSource, *,
             layout: ShardLayout | None = None, cache_file: str | os.PathLike[str] | None = None,
             writer: bool = True, quantized_offset: str = "requantize",
             budget: RankBudget | None = None, keep_base: str | None = None) -> dict[str, int] | None:
    """Everything after estimation, for every mode: checks, prepared groups, optional cache, attach, register.

    Nothing is attached and no weight is touched unless every check passes; each shape group is factored (exact
    mode) when ``get_peft_model`` initializes its first layer. With a ``budget``, the groups are factored now
    instead, once, to ``2 max_rank`` triplets; the ranks are allocated from the first-step loss decrease those
    spectra predict for the config's direction and scale (:func:`~loraga_fast.core.allocation.allocate`) and
    written to ``lora_config.rank_pattern`` / ``alpha_pattern``, and the same factors initialize the layers.

    Returns:
        The allocated ranks (every target's) with a ``budget``, else None.

    Raises:
        ValueError: a non-finite mean gradient, or ``2 r > min(m, n)`` for a layer that saw a backward pass.
    """
    names = [name for name, _ in targets]
    modules = dict(targets)
    seen, zero = summarize(source, names)
    if budget is None:
        ranks = layer_ranks(lora_config, seen)
        check_ranks({name: weight_shape(modules[name]) for name in seen}, ranks, seen)
    else:
        ranks = {name: budget.max_ranks[name] for name in seen}
    weight_svd = getattr(lora_config.lora_ga_config, "scale", None) == "weight_svd"
    groups, attached = source.prepare(modules, ranks, weight_svd=weight_svd, zero=zero)
    allocated = None
    if budget is not None:
        curves = _decrease_curves(lora_config.lora_ga_config, budget, groups, modules)
        allocated = allocate(curves, {name: budget.costs[name] for name in names}, budget.params, budget.min_rank,
                             budget.max_ranks)
        apply_ranks(lora_config, budget, allocated)
        for group in groups:
            group.ranks = {name: allocated[name] for name in group.ranks}
    for group in groups:
        group.quantized_offset = quantized_offset
        group.keep_base = keep_base
    if cache_file is not None:
        source.save_cache(cache_file, names, zero, writer=writer)
    _attach(targets, attached)
    _register(groups, layout, targets)
    warn_left_out(names, seen, zero, what="keep peft's default init")
    return allocated


def _decrease_curves(lora_ga_config: Any, budget: RankBudget, groups: Sequence[PreparedGroup],
                     modules: Mapping[str, nn.Module]) -> dict[str, list[float]]:
    """Each factored layer's predicted first-step decrease at every rank up to its ``max_rank``, for the config's
    direction and scale (:func:`~loraga_fast.core.allocation.decrease_curve`), from the one factorization (to
    ``2 max_rank`` triplets; collective when sharded)."""
    direction, scale = lora_ga_config.direction, lora_ga_config.scale
    gamma = getattr(lora_ga_config, "stable_gamma", 1)
    curves = {}
    for group in groups:
        factors = group.factors()
        for name in group.ranks:
            if name not in factors:
                continue
            f = factors[name]
            curves[name] = decrease_curve(f.s.tolist(), budget.max_ranks[name], direction, scale,
                                          scaling=budget.scaling[name],
                                          stable_factor=stable_features(modules[name]) ** 0.25 / gamma**0.5,
                                          weight_sigma=f.weight_sigma)
    return curves


def _attach(targets: Sequence[tuple[str, nn.Module]], grads: Mapping[str, Any]) -> None:
    """Set ``_peft_loraga_grad`` on every target with a gradient; drop a stale one from the others."""
    for name, module in targets:
        if name in grads:
            setattr(module, GRAD_ATTR, grads[name])
        elif hasattr(module, GRAD_ATTR):
            delattr(module, GRAD_ATTR)


def prepared(module: nn.Module) -> tuple[PreparedGroup, str] | None:
    """The prepared group and name of a base layer waiting for ``get_peft_model``, or None."""
    return _PREPARED.get(module)


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


def _register(groups: Sequence[PreparedGroup], layout: ShardLayout | None,
              targets: Sequence[tuple[str, nn.Module]]) -> None:
    global _peft_lora_ga_init
    for group in groups:
        for name, ref in group.modules.items():
            module = ref()
            assert module is not None
            _PREPARED[module] = (group, name)
            weakref.finalize(module, _uninstall_if_idle)  # a prepared model dropped before get_peft_model
    if layout is not None and layout.owners is not None:
        for name, module in targets:
            _FSDP1_OWNERS[module] = layout.owners[name]
    if groups and _peft_lora_ga_init is None:
        layer_cls = _lora_layer_class()
        _peft_lora_ga_init = layer_cls.lora_ga_init
        layer_cls.lora_ga_init = functools.wraps(_peft_lora_ga_init)(_lora_ga_init_from_prepared)


def release(module: nn.Module) -> None:
    """Forget a prepared layer (consumed, or abandoned), and unwrap peft once none is left."""
    _PREPARED.pop(module, None)
    _FSDP1_OWNERS.pop(module, None)
    _uninstall_if_idle()


def _uninstall_if_idle() -> None:
    global _peft_lora_ga_init, _offset_layers
    if _peft_lora_ga_init is not None and not any(True for _ in _PREPARED.keys()):
        _lora_layer_class().lora_ga_init = _peft_lora_ga_init
        _peft_lora_ga_init = None
        if _offset_layers:  # once per initialization: how to save what the offset base makes necessary
            logger.warning(SAVE_GUIDANCE.format(n=_offset_layers))
            _offset_layers = 0


def _lora_ga_init_from_prepared(self: Any, adapter_name: str, lora_ga_config: Any) -> None:
    global _offset_layers
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
                init_layer_from_factors(self, adapter_name, lora_ga_config, factors, name=name,
                                        quantized_offset=group.quantized_offset, keep_base=group.keep_base)
            else:  # FSDP1: the whole weight for the duration, offset in place, written back to every process's shard
                from torch.distributed.fsdp import FullyShardedDataParallel

                with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True):
                    init_layer_from_factors(self, adapter_name, lora_ga_config, factors, in_place=True, name=name,
                                            keep_base=group.keep_base)
            if self not in UNTOUCHED_BASES:  # keep_base, or a quantized base left as it is: nothing was offset
                _offset_layers += 1
        delattr(base, GRAD_ATTR)
        if _init_bar is not None:
            _init_bar.update(1)
    finally:
        release(base)

"""What one LoRA-GA preprocessing will do, decided once from shapes and config before any data is read.

:func:`make_plan` runs every check that needs no data (LoRA-GA config, targets, ``2 r <= min(m, n)``, mode and
arguments, cache path, sharded layout) and returns a :class:`Plan`: the targets and their ranks, the mode, the
memory it will take and the store it needs. Entry points make one plan and pass it down; the command makes it on
a meta-device skeleton of the model and :meth:`Plan.bind` s it to the loaded model (same names and shapes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..distributed.layout import ShardLayout, check_sharded_call, check_sharded_config, shard_layout
from ..errors import UsageError
from ..layers.kinds import math_shape, weight_layout_transposed, weight_shape
from ..layers.quantized import OFFSETS
from ..layers.targets import check_ranks, fill_default_target_modules, find_targets, layer_ranks
from ..stores.base import Store
from ..stores.files import CacheFile
from ..stores.sharded import new_store
from ..stores.sketch import DEFAULT_PASSES, DEFAULT_SKETCH_PER_LORA_RANK, SketchSpec, SketchStore, sketch_columns
from ..stores.stream import StreamStore
from .allocation import RankBudget, rank_budget as check_budget
from .convergence import StopRule, stop_rule
from .layer_init import KEEP_BASE
from .memory import MemoryEstimate, check_fits, target_memory

__all__ = ["DEFAULT_KEEP_BASE", "MODES", "Plan", "make_plan"]

MODES = ("exact", "lowmem")
DEFAULT_KEEP_BASE = "a-only"  # keep_base=True; on the argument of docs/usage.md, not yet measured (docs/benchmarks.md)


@dataclass(frozen=True)
class Plan:
    """One preprocessing, decided: ``targets`` (``(name, module)`` of the model it is bound to), each target's LoRA
    rank, the mode and its passes, the cache, the sharded layout (FSDP) and the accumulator memory.

    Attributes:
        cached: ``cache_file`` exists and is non-empty, so it is read instead of running ``train_step``.
        process_group: the process group the store is reduced over (an FSDP model's own group when sharded).
        stop: ``until="converged"``: when to stop ``train_step`` (:mod:`~loraga_fast.core.convergence`), else None.
        budget: ``rank_budget=``: the checked budget the ranks are allocated under
            (:mod:`~loraga_fast.core.allocation`), else None (the config's ranks).
        keep_base: None (LoRA-GA's init, the base offset), or the construction of an init that leaves the base
            untouched (:data:`~loraga_fast.core.layer_init.KEEP_BASE`).
    """

    lora_config: Any
    targets: list[tuple[str, nn.Module]]
    ranks: dict[str, int]
    mode: str
    passes: int
    sketch_size: int | None
    quantized_offset: str
    cache_file: str | None
    cached: bool
    layout: ShardLayout | None
    process_group: Any
    memory: MemoryEstimate
    stop: StopRule | None = None
    budget: RankBudget | None = None
    keep_base: str | None = None

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.targets]

    def bind(self, model: nn.Module) -> Plan:
        """The same plan for another instance of the model (the loaded model after a meta-device skeleton): the
        targets are looked up by name and must have the same weight shapes.

        Raises:
            UsageError: a target is missing from ``model`` or has another shape.
        """
        modules = dict(model.named_modules())
        targets = []
        for name, planned in self.targets:
            module = modules.get(name)
            if module is None or weight_shape(module) != weight_shape(planned):
                found = "no such module" if module is None else f"a weight of shape {weight_shape(module)}"
                raise UsageError(f"the model has {found} at target '{name}', planned with a weight of shape "
                                 f"{weight_shape(planned)}: the weights do not belong to the checked configuration.")
            targets.append((name, module))
        layout = shard_layout(targets, model)
        return replace(self, targets=targets, layout=layout,
                       process_group=layout.process_group if layout is not None else self.process_group)

    def check_fits(self) -> None:
        """Refuse a run whose accumulators exceed what the targets' devices have available (not for FSDP, which
        shards them, nor for a factor cache, which holds no accumulator). Raises UsageError."""
        if self.layout is None and not (self.cached and self.mode == "lowmem"):
            check_fits(self.targets, self.ranks, self.mode, self.sketch_size, self.passes)

    def new_store(self) -> Store:
        """The store of the mode: exact fp32 accumulators (row shards on FSDP models), low-memory sketches (two or
        more passes) or low-memory mode's one-pass truncated SVDs."""
        if self.mode == "exact":
            return new_store(self.targets, self.layout)
        specs = []
        for name, module in self.targets:
            m, n = math_shape(module)
            specs.append(SketchSpec(name, m, n, sketch_columns(m, n, self.ranks[name], self.sketch_size),
                                    module.weight.device, weight_layout_transposed(module)))
        return StreamStore(specs) if self.passes == 1 else SketchStore(specs, passes=self.passes)


def make_plan(model: nn.Module, lora_config: Any, cache_file: str | os.PathLike[str] | None = None, *,
              mode: str = "exact", sketch_size: int | None = None, passes: int | None = None,
              quantized_offset: str = "requantize", process_group: Any = None, until: str | None = None,
              convergence_tol: float | None = None, rank_budget: Any = None, min_rank: Any = 1,
              max_rank: Any = None, check_every: int | None = None, keep_base: bool | str = False) -> Plan:
    """Check everything that needs only shapes and config, and decide the run (see :class:`Plan`). Fills
    ``lora_config.target_modules`` from peft's defaults when it is None, as peft does. ``check_every`` overrides
    the convergence check interval (measurements).

    Raises:
        UsageError: the first failed check, naming the layer or argument and the fix.
    """
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
    if mode not in MODES:
        raise UsageError(f"mode must be 'exact' or 'lowmem', got {mode!r}.")
    if quantized_offset not in OFFSETS:
        raise UsageError(f"quantized_offset must be one of {', '.join(map(repr, OFFSETS))}, got {quantized_offset!r}.")
    if mode == "exact" and (sketch_size is not None or passes is not None):
        raise UsageError("sketch_size and passes apply to mode='lowmem' only.")
    ranks = layer_ranks(lora_config, [name for name, _ in targets])
    shapes = {name: weight_shape(module) for name, module in targets}
    check_ranks(shapes, ranks, ranks)  # before any forward pass
    columns = None
    if mode == "lowmem":
        columns = {name: sketch_columns(*math_shape(module), ranks[name], sketch_size) for name, module in targets}
    budget = check_budget(lora_config, shapes, ranks, rank_budget, min_rank, max_rank, sketch_columns=columns)
    if mode == "lowmem":
        passes = DEFAULT_PASSES if passes is None else passes
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise UsageError(f"passes must be a positive integer (1: one pass, a running truncated SVD; 2 or more: "
                             f"sketches, one pass each; the default is {DEFAULT_PASSES}), got {passes!r}.")
        if sketch_size is not None and sketch_size < 2 * max(ranks.values()):
            raise UsageError(f"sketch_size={sketch_size} must be at least 2 * r = {2 * max(ranks.values())} (the "
                             f"default, {DEFAULT_SKETCH_PER_LORA_RANK} r, meets LoRA-GA's accuracy needs).")
    keep = _keep_base(keep_base, rank_budget)
    stop = stop_rule(until, convergence_tol, mode, check_every, passes=passes or 1,
                     direction=lora_config.lora_ga_config.direction)
    path, cached = None, False
    if cache_file is not None:
        path = os.fspath(cache_file)
        if os.path.isdir(path):
            raise UsageError(f"cache_file '{path}' is a folder: give a file path (e.g. "
                             f"{os.path.join(path, 'loraga_cache.safetensors')!r}).")
        cached = os.path.isfile(path) and os.path.getsize(path) > 0
        if cached:  # its kind, names and shapes from the header, before any data is read (or a model loaded)
            CacheFile(path, shapes, mode).close()
    layout = shard_layout(targets, model)
    if layout is not None:
        check_sharded_config(layout, lora_config)
        check_sharded_call(layout, process_group)
        process_group = layout.process_group  # sharded: everything is reduced over the model's process group
    return Plan(lora_config=lora_config, targets=targets, ranks=ranks, mode=mode, passes=passes or 1,
                sketch_size=sketch_size, quantized_offset=quantized_offset, cache_file=path, cached=cached,
                layout=layout, process_group=process_group,
                memory=target_memory(targets, ranks, sketch_size, passes=passes if mode == "lowmem" else None),
                stop=stop, budget=budget, keep_base=keep)


def _keep_base(keep_base: Any, rank_budget: Any) -> str | None:
    """The checked ``keep_base``: None (off), or a construction of :data:`KEEP_BASE` (True: the default one)."""
    if keep_base is False or keep_base is None:
        return None
    keep = DEFAULT_KEEP_BASE if keep_base is True else keep_base
    if keep not in KEEP_BASE:
        raise UsageError(f"keep_base must be False, True or one of {', '.join(map(repr, KEEP_BASE))}, got "
                         f"{keep_base!r}.")
    if rank_budget is not None:
        raise UsageError("keep_base cannot be combined with rank_budget yet: the allocation's criterion is the first "
                         "step of LoRA-GA's own init (docs/convergence-and-ranks.md). Drop one of them.")
    return keep

"""Which process group a sharded model's targets are sharded over (FSDP2, FSDP1, DeepSpeed ZeRO-3), and the
settings a sharded layout cannot serve.

FSDP2 (``fully_shard``) keeps each weight as a ``DTensor`` with ``Shard(0)`` on a 1-D device mesh outside
forward and hands the unsharded tensor to the module during forward; FSDP1 with ``use_orig_params=True`` does the
same with flattened views. Either way the capture op sees whole ``X``, ``G`` and ``W`` and only the accumulators
need sharding (:class:`~loraga_fast.stores.sharded.ShardedStore`: row shards like FSDP2's, filled by a
reduce-scatter per backward pass). The initialization writes each process's rows of the offset in place (FSDP2),
offsets the whole weight inside ``summon_full_params(unit, recurse=False, writeback=True)`` (FSDP1), or writes
each process's flat partition (ZeRO-3, :mod:`loraga_fast.distributed.zero3`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .dtensor import is_dtensor
from .zero3 import check_partitions, gathering_engine, is_zero3, zero3_group

__all__ = ["ShardLayout", "check_sharded_call", "check_sharded_config", "fsdp1_layout", "shard_layout", "zero3_layout"]


@dataclass(frozen=True)
class ShardLayout:
    """The 1-D device mesh the targets' accumulators are row-sharded over, and its process group.

    FSDP2: the mesh every target weight is ``Shard(0)``-sharded over. FSDP1: a mesh over the FSDP units' process
    group, and ``owners`` maps each target name to its innermost ``FullyShardedDataParallel`` unit (whose
    ``summon_full_params`` gives the whole weight for the initialization). ZeRO-3 (``engine="zero3"``): a mesh
    over the process group DeepSpeed partitions the weights over.
    """

    mesh: Any
    process_group: Any
    owners: dict[str, nn.Module] | None = None
    engine: str = "fsdp"

    def estimating(self, model: nn.Module, targets: Sequence[tuple[str, nn.Module]]) -> Any:
        """The context the capture passes run in: for ZeRO-3, one that gathers weights for forward when no DeepSpeed
        engine wraps the model yet (:func:`~loraga_fast.distributed.zero3.gathering_engine`)."""
        if self.engine == "zero3":
            return gathering_engine(model, targets)
        return contextlib.nullcontext()


def _fsdp1_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    return getattr(torch.distributed.fsdp, "FullyShardedDataParallel", None)


def fsdp1_layout(model: nn.Module, targets: Sequence[tuple[str, nn.Module]]) -> ShardLayout | None:
    """The layout of an FSDP1 (``FullyShardedDataParallel``) model's targets: None when the model has no FSDP1 unit.

    Supported: ``use_orig_params=True`` with ``FULL_SHARD``, ``SHARD_GRAD_OP`` or ``NO_SHARD`` (what FSDP1 turns
    the others into on one rank), every target inside a unit,
    ``nn.Linear`` targets (peft cannot build its ``Conv1D`` adapter on FSDP1's flattened weights).

    Raises:
        ValueError: naming the unit or layer that is not supported and how to fix it.
    """
    fsdp1 = _fsdp1_class()
    if fsdp1 is None:
        return None
    units = {name: m for name, m in model.named_modules() if isinstance(m, fsdp1)}
    if not units:
        return None
    from torch.distributed.fsdp import ShardingStrategy

    owners: dict[str, nn.Module] = {}
    for name, module in targets:
        parts = name.split(".")
        owner = next((units[p] for p in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)) if p in units), None)
        if owner is None:
            raise UsageError(f"Layer '{name}' is outside every FSDP unit while others are wrapped: wrap the model's root too.")
        if not isinstance(module, nn.Linear):
            raise UsageError(
                f"Layer '{name}' is a {type(module).__name__} inside FSDP1: peft cannot build its adapter on FSDP1's "
                "flattened weights. Use FSDP2 (fully_shard) for this model."
            )
        owners[name] = owner
    for unit_name, unit in units.items():
        label = unit_name or type(unit).__name__
        if not getattr(unit, "_use_orig_params", False):
            raise UsageError(
                f"FSDP1 unit '{label}' was wrapped with use_orig_params=False; LoRA-GA needs the original parameters: "
                "wrap with FullyShardedDataParallel(..., use_orig_params=True), or use FSDP2 (fully_shard)."
            )
        if unit.sharding_strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP,
                                          ShardingStrategy.NO_SHARD):
            raise UsageError(
                f"FSDP1 unit '{label}' uses {unit.sharding_strategy}; loraga_fast supports FULL_SHARD, SHARD_GRAD_OP "
                "and NO_SHARD (hybrid sharding is not supported; or use FSDP2 on a 1-D mesh)."
            )
    by_process_group = {id(u.process_group): u for u in owners.values()}
    if len(by_process_group) != 1:
        raise UsageError("The FSDP1 units holding the target layers use different process groups.")
    unit = next(iter(by_process_group.values()))
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(unit.process_group, unit.compute_device.type)
    return ShardLayout(mesh=mesh, process_group=unit.process_group, owners=owners)


def shard_layout(targets: Sequence[tuple[str, nn.Module]], model: nn.Module | None = None) -> ShardLayout | None:
    """The sharded layout of ``targets``: DeepSpeed ZeRO-3 (see :func:`zero3_layout`), FSDP1 (when ``model`` has
    ``FullyShardedDataParallel`` units, see :func:`fsdp1_layout`) or FSDP2 (DTensor weights); None for an unsharded
    model.

    Raises:
        ValueError: some targets are sharded and others are not, a weight is sharded in a way other than
            ``Shard(0)`` on a 1-D mesh (HSDP, tensor parallel, ``shard_placement_fn``), or the targets use
            different meshes. The message names the layer.
    """
    zero3 = zero3_layout(targets)
    if zero3 is not None:
        return zero3
    layout = fsdp1_layout(model, targets) if model is not None else None
    if layout is not None:
        return layout
    sharded = _sharded(targets, is_dtensor, "is not sharded", " (FSDP2): apply fully_shard to the model's root as "
                       "well, so every target layer is managed by FSDP.")
    return _fsdp2_layout(sharded) if sharded else None


def _fsdp2_layout(sharded: Sequence[tuple[str, Any]]) -> ShardLayout:
    from torch.distributed.tensor import Shard

    mesh = sharded[0][1].device_mesh
    for name, weight in sharded:
        if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise UsageError(
                f"Layer '{name}' has a weight sharded as {tuple(weight.placements)} on a {weight.device_mesh.ndim}-D "
                "mesh; loraga_fast supports FSDP2's default Shard(0) on a 1-D mesh (no HSDP, tensor parallel or "
                "shard_placement_fn)."
            )
        if weight.device_mesh != mesh:
            raise UsageError(f"Layer '{name}' is sharded over a different device mesh than '{sharded[0][0]}'.")
    return ShardLayout(mesh=mesh, process_group=mesh.get_group())


def zero3_layout(targets: Sequence[tuple[str, nn.Module]]) -> ShardLayout | None:
    """The layout of DeepSpeed ZeRO-3 targets (weights partitioned by ``deepspeed.zero.Init`` or a stage-3 engine),
    or None when no target weight is a ZeRO-3 parameter. ZeRO stages 1 and 2 keep whole weights: data parallel.

    Raises:
        ValueError: some targets are ZeRO-3 parameters and others not, they are partitioned over different process
            groups, or a partition cannot be written (:func:`~loraga_fast.distributed.zero3.check_partitions`),
            naming the layer.
    """
    zero = _sharded(targets, is_zero3, "is not a DeepSpeed ZeRO-3 parameter", ": create the whole model under "
                    "deepspeed.zero.Init (or load it with a ZeRO-3 config) before preprocessing.")
    if not zero:
        return None
    group = zero3_group(zero[0][1])
    for name, weight in zero:
        if zero3_group(weight) is not group:
            raise UsageError(f"Layer '{name}' is partitioned over another process group than '{zero[0][0]}': create "
                             "the whole model under one deepspeed.zero.Init (or one ZeRO-3 config).")
    check_partitions(targets)
    from torch.distributed.device_mesh import DeviceMesh

    device = zero[0][1].device.type  # where weights are gathered and the accumulators live, also with offload_param
    return ShardLayout(mesh=DeviceMesh.from_group(group, device), process_group=group, engine="zero3")


def _sharded(targets: Sequence[tuple[str, nn.Module]], kind: Any, not_kind: str, fix: str) -> list[tuple[str, Any]]:
    """``(name, weight)`` of the targets whose weight satisfies ``kind``: all of them or none.

    Raises:
        UsageError: some do and some do not, naming one of each, what the other ``not_kind`` and the ``fix``.
    """
    of_kind = [(name, m.weight) for name, m in targets if kind(m.weight)]
    others = [name for name, m in targets if not kind(m.weight)]
    if of_kind and others:
        raise UsageError(f"Layer '{others[0]}' {not_kind} while '{of_kind[0][0]}' is{fix}")
    return of_kind


def check_sharded_config(layout: ShardLayout, lora_config: Any) -> None:
    """Raise ``ValueError`` for LoRA-GA settings a sharded layout cannot serve."""
    if layout.owners is not None and getattr(lora_config.lora_ga_config, "scale", None) == "weight_svd":
        raise UsageError(
            "scale='weight_svd' is not supported on FSDP1 models (it needs each weight's top singular value, and "
            "FSDP1 holds weights as flattened shards): use another scale, or FSDP2 (fully_shard)."
        )


def check_sharded_call(layout: ShardLayout, process_group: Any) -> None:
    """Raise ``ValueError`` for a ``process_group`` other than the one the model is sharded over."""
    if process_group is not None and process_group is not layout.process_group:
        by = "DeepSpeed ZeRO-3" if layout.engine == "zero3" else "FSDP"
        raise UsageError(
            f"process_group differs from the process group the model is sharded over by {by}: the gradients are "
            "reduced over that group; leave process_group unset for sharded models."
        )

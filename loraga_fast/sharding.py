"""FSDP-sharded models (FSDP2 and FSDP1): which process group the target weights are sharded over, and a guard
against ranks running different numbers of steps (which would otherwise hang in FSDP's collectives).

FSDP2 (``fully_shard``) keeps each weight as a ``DTensor`` with ``Shard(0)`` on a 1-D device mesh outside
forward and hands the unsharded tensor to the module during forward; FSDP1 with ``use_orig_params=True`` does the
same with flattened views. Either way the capture op sees whole ``X``, ``G`` and ``W`` and only the accumulators
need sharding (:class:`~loraga_fast.store.ShardedStore`: row shards like FSDP2's, filled by a reduce-scatter per
backward pass). The initialization writes each rank's rows of the offset in place (FSDP2) or offsets the whole
weight inside ``summon_full_params(unit, recurse=False, writeback=True)`` (FSDP1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ShardLayout", "StepGuard", "fsdp1_layout", "shard_layout"]


@dataclass(frozen=True)
class ShardLayout:
    """The 1-D device mesh the targets' accumulators are row-sharded over, and its process group.

    FSDP2: the mesh every target weight is ``Shard(0)``-sharded over. FSDP1: a mesh over the FSDP units' process
    group, and ``owners`` maps each target name to its innermost ``FullyShardedDataParallel`` unit (whose
    ``summon_full_params`` gives the whole weight for the initialization).
    """

    mesh: Any
    group: Any
    owners: dict[str, nn.Module] | None = None


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


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
            raise ValueError(f"Layer '{name}' is outside every FSDP unit while others are wrapped: wrap the model's root too.")
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"Layer '{name}' is a {type(module).__name__} inside FSDP1: peft cannot build its adapter on FSDP1's "
                "flattened weights. Use FSDP2 (fully_shard) for this model."
            )
        owners[name] = owner
    for unit_name, unit in units.items():
        label = unit_name or type(unit).__name__
        if not getattr(unit, "_use_orig_params", False):
            raise ValueError(
                f"FSDP1 unit '{label}' was wrapped with use_orig_params=False; LoRA-GA needs the original parameters: "
                "wrap with FullyShardedDataParallel(..., use_orig_params=True), or use FSDP2 (fully_shard)."
            )
        if unit.sharding_strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP,
                                          ShardingStrategy.NO_SHARD):
            raise ValueError(
                f"FSDP1 unit '{label}' uses {unit.sharding_strategy}; loraga_fast supports FULL_SHARD, SHARD_GRAD_OP "
                "and NO_SHARD (hybrid sharding is not supported; or use FSDP2 on a 1-D mesh)."
            )
    groups = {id(u.process_group): u for u in owners.values()}
    if len(groups) != 1:
        raise ValueError("The FSDP1 units holding the target layers use different process groups.")
    unit = next(iter(groups.values()))
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(unit.process_group, unit.compute_device.type)
    return ShardLayout(mesh=mesh, group=unit.process_group, owners=owners)


def shard_layout(targets: Sequence[tuple[str, nn.Module]], model: nn.Module | None = None) -> ShardLayout | None:
    """The sharded layout of ``targets``: FSDP1 (when ``model`` has ``FullyShardedDataParallel`` units, see
    :func:`fsdp1_layout`) or FSDP2 (DTensor weights); None for an unsharded model.

    Raises:
        ValueError: some targets are sharded and others are not, a weight is sharded in a way other than
            ``Shard(0)`` on a 1-D mesh (HSDP, tensor parallel, ``shard_placement_fn``), or the targets use
            different meshes. The message names the layer.
    """
    if model is not None:
        layout = fsdp1_layout(model, targets)
        if layout is not None:
            return layout
    sharded = [(name, m.weight) for name, m in targets if _is_dtensor(m.weight)]
    if not sharded:
        return None
    from torch.distributed.tensor import Shard

    plain = [name for name, m in targets if not _is_dtensor(m.weight)]
    if plain:
        raise ValueError(
            f"Layer '{plain[0]}' is not sharded while '{sharded[0][0]}' is (FSDP2): apply fully_shard to the model's "
            "root as well, so every target layer is managed by FSDP."
        )
    mesh = sharded[0][1].device_mesh
    for name, weight in sharded:
        if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise ValueError(
                f"Layer '{name}' has a weight sharded as {tuple(weight.placements)} on a {weight.device_mesh.ndim}-D "
                "mesh; loraga_fast supports FSDP2's default Shard(0) on a 1-D mesh (no HSDP, tensor parallel or "
                "shard_placement_fn)."
            )
        if weight.device_mesh != mesh:
            raise ValueError(f"Layer '{name}' is sharded over a different device mesh than '{sharded[0][0]}'.")
    return ShardLayout(mesh=mesh, group=mesh.get_group())


class StepGuard:
    """Detects ranks that run different numbers of model forwards, before FSDP's collectives hang on it.

    A forward pre-hook on the model (ahead of FSDP's own) all-reduces 1 from every rank that starts a forward;
    when ``train_step`` returns, :meth:`finish` all-reduces 0. A rank that starts a forward while another has
    already finished sees a sum below the world size (and the finished one a sum above 0): both raise the same
    clear error instead of deadlocking. One tiny all-reduce per forward.
    """

    def __init__(self, model: nn.Module, group: Any, device: torch.device):
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)
        self.device = device
        self.forwards = 0
        self._handle = model.register_forward_pre_hook(self._pre_forward, prepend=True)

    def _sync(self, flag: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([flag], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def _error(self, running: int) -> ValueError:
        import torch.distributed as dist

        return ValueError(
            f"LoRA-GA on an FSDP-sharded model: ranks ran different numbers of forward passes (rank "
            f"{dist.get_rank(self.group)} after {self.forwards}; {running} of {self.world} ranks were still running). "
            "Every rank must run the same number of steps: give each rank the same number of batches (e.g. a "
            "DistributedSampler with drop_last=True, or num_batches=) so the FSDP collectives line up."
        )

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        running = self._sync(1)
        if running != self.world:
            raise self._error(running)
        self.forwards += 1

    def finish(self) -> None:
        """Called on every rank once ``train_step`` returned; raises if some rank is still running forwards."""
        self.remove()
        running = self._sync(0)
        if running != 0:
            raise self._error(running)

    def remove(self) -> None:
        self._handle.remove()

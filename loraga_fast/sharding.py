"""FSDP-sharded models: which process group the target weights are sharded over, and a guard against ranks
running different numbers of steps (which would otherwise hang in FSDP's collectives).

FSDP2 (``fully_shard``) keeps each weight as a ``DTensor`` with ``Shard(0)`` on a 1-D device mesh outside
forward and hands the unsharded tensor to the module during forward, so the capture op sees whole ``X``, ``G`` and
``W`` and only the accumulators need sharding (:class:`~loraga_fast.store.ShardedStore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ShardLayout", "StepGuard", "check_no_fsdp1", "shard_layout"]


@dataclass(frozen=True)
class ShardLayout:
    """The 1-D device mesh every target weight is ``Shard(0)``-sharded over (FSDP2), and its process group."""

    mesh: Any
    group: Any


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def check_no_fsdp1(model: nn.Module) -> None:
    """Raise ``ValueError`` for FSDP1 (``FullyShardedDataParallel``) wrappers, naming the first one."""
    if not torch.distributed.is_available():
        return
    fsdp1 = getattr(torch.distributed.fsdp, "FullyShardedDataParallel", None)
    for name, module in model.named_modules():
        if fsdp1 is not None and isinstance(module, fsdp1):
            raise ValueError(
                f"Module '{name or type(module).__name__}' is wrapped by FSDP1 (FullyShardedDataParallel), whose flat "
                "parameters split weights across ranks mid-row; loraga_fast supports FSDP2: shard the model with "
                "torch.distributed.fsdp.fully_shard (each decoder layer, then the root) instead, or run data parallel "
                "on the unsharded model."
            )


def shard_layout(targets: Sequence[tuple[str, nn.Module]]) -> ShardLayout | None:
    """The FSDP2 layout of ``targets``' weights: None when none is a DTensor.

    Raises:
        ValueError: some targets are sharded and others are not, a weight is sharded in a way other than
            ``Shard(0)`` on a 1-D mesh (HSDP, tensor parallel, ``shard_placement_fn``), or the targets use
            different meshes. The message names the layer.
    """
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

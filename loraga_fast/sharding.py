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

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import weight_shape
from .dtensor import is_dtensor, local_tensor, rows_per_rank
from .errors import UsageError
from .factors import PreparedGroup, ShardedGradientGroup
from .ops import accumulate
from .store import AccumulatorSlot, AccumulatorStore, Group, all_reduce_counts

__all__ = ["ShardLayout", "ShardedSlot", "ShardedStore", "StepGuard", "check_sharded_call", "check_sharded_config",
           "fsdp1_layout", "new_store", "shard_layout"]


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
    groups = {id(u.process_group): u for u in owners.values()}
    if len(groups) != 1:
        raise UsageError("The FSDP1 units holding the target layers use different process groups.")
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
    sharded = [(name, m.weight) for name, m in targets if is_dtensor(m.weight)]
    if not sharded:
        return None
    from torch.distributed.tensor import Shard

    plain = [name for name, m in targets if not is_dtensor(m.weight)]
    if plain:
        raise UsageError(
            f"Layer '{plain[0]}' is not sharded while '{sharded[0][0]}' is (FSDP2): apply fully_shard to the model's "
            "root as well, so every target layer is managed by FSDP."
        )
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

    def _error(self, running: int) -> UsageError:
        import torch.distributed as dist

        return UsageError(
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


def check_sharded_config(layout: ShardLayout, lora_config: Any) -> None:
    """Raise ``ValueError`` for LoRA-GA settings a sharded layout cannot serve."""
    if layout.owners is not None and getattr(lora_config.lora_ga_config, "scale", None) == "weight_svd":
        raise UsageError(
            "scale='weight_svd' is not supported on FSDP1 models (it needs each weight's top singular value, and "
            "FSDP1 holds weights as flattened shards): use another scale, or FSDP2 (fully_shard)."
        )


def check_sharded_call(layout: ShardLayout, cache_file: Any, process_group: Any) -> None:
    """Raise ``ValueError`` for ``preprocess_loraga`` arguments an exact-mode run on a sharded model cannot serve."""
    if cache_file is not None:
        raise UsageError(
            "cache_file is not supported for FSDP-sharded models yet (each rank holds only its rows of the gradients): "
            "call preprocess_loraga without cache_file."
        )
    if process_group is not None and process_group is not layout.group:
        raise UsageError(
            "process_group differs from the process group the model is sharded over by FSDP: the gradients are "
            "reduced over that group; leave process_group unset for sharded models."
        )


class ShardedSlot(AccumulatorSlot):
    """A row shard of one layer's accumulator: each backward pass's local ``G^T X`` is computed whole in a
    shared workspace and reduce-scattered over the ranks, so this rank only ever keeps its own rows."""

    def __init__(self, name: str, acc: torch.Tensor, rows: int, store: ShardedStore):
        super().__init__(name, acc)
        self.rows = rows
        self.store = store

    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        import torch.distributed as dist

        c, n = self.acc.shape
        world = self.store.world
        if world == 1:  # nothing to scatter
            accumulate(self.acc, grad_out, x, transposed=transposed)
            return
        full = self.store.workspace(world * c * n, self.acc.device).view(world * c, n)
        full.zero_()
        accumulate(full[: self.rows], grad_out, x, transposed=transposed)
        mine = self.store.workspace(c * n, self.acc.device, second=True).view(c, n)
        dist.reduce_scatter_tensor(mine, full, group=self.store.group)
        self.acc.add_(mine)


class ShardedStore(AccumulatorStore):
    """Accumulators sharded by rows over the ranks of ``group``, the way FSDP2 shards weights (``torch.chunk`` on
    dim 0: rank ``i`` owns rows ``[i*c, (i+1)*c)`` with ``c = ceil(m / N)``; past ``m`` the rows are zero padding).

    Every rank holds ``(B, c, n)`` per shape group (about ``1/N`` of the exact store) plus one workspace the
    size of the largest layer's full gradient. Every backward pass through a target costs one reduce-scatter,
    so every rank must run the same backward passes in the same order (FSDP requires that anyway).
    """

    def __init__(self, specs: Sequence[tuple[str, tuple[int, int], torch.device]], layout: ShardLayout):
        import torch.distributed as dist

        self.layout = layout
        self.group = layout.group
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._workspaces: dict[tuple[torch.device, bool], torch.Tensor] = {}
        super().__init__(specs)

    def local_rows(self, rows: int) -> range:
        """The global rows this rank owns of a ``rows``-row matrix (possibly empty)."""
        c = rows_per_rank(rows, self.world)
        return range(min(self.rank * c, rows), min((self.rank + 1) * c, rows))

    def local_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (rows_per_rank(shape[0], self.world), shape[1])

    def make_slot(self, name: str, acc: torch.Tensor, shape: tuple[int, int]) -> AccumulatorSlot:
        return ShardedSlot(name, acc, shape[0], self)

    def workspace(self, numel: int, device: torch.device, second: bool = False) -> torch.Tensor:
        key = (torch.device(device), second)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            self._workspaces[key] = buf
        return buf[:numel]

    def release(self) -> None:
        """Free the reduce-scatter workspaces (after the estimation)."""
        self._workspaces.clear()

    def reduce(self, group: Any = None) -> None:
        """Sum the pass counts over the ranks (the sums were reduce-scattered at every backward pass)."""
        all_reduce_counts(list(self.slots.values()), self.groups[0].device if self.groups else None, self.group)

    def global_max(self, values: torch.Tensor) -> torch.Tensor:
        """Maxima over all ranks' shards; a NaN anywhere becomes +inf (still non-finite) so MAX carries it."""
        import torch.distributed as dist

        values = torch.nan_to_num(values.clone(), nan=float("inf"))
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values

    def user_tensors(self, means: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each mean gradient as a ``DTensor`` row-sharded over the layout's mesh (``Shard(0)``: for FSDP2, exactly
        like its weight), over this rank's rows (no copy); ``.full_tensor()`` gathers it."""
        from torch.distributed.tensor import DTensor, Shard

        out: dict[str, torch.Tensor] = {}
        for name, grad in means.items():
            m, n = self.shapes[name]
            out[name] = DTensor.from_local(grad[: len(self.local_rows(m))], self.layout.mesh, [Shard(0)],
                                           run_check=False, shape=torch.Size((m, n)), stride=(n, 1))
        return out

    def load(self, name: str, mean: torch.Tensor) -> None:
        """Set a layer's sum from a row-sharded ``DTensor`` mean gradient (this rank's rows) as one pass."""
        if not is_dtensor(mean):
            raise UsageError(
                f"the model is FSDP-sharded but the gradient for '{name}' is a plain tensor; pass the DTensors "
                "estimate_gradient returns for the sharded model."
            )
        super().load(name, local_tensor(mean))

    def make_group(self, group: Group, modules: Mapping[str, nn.Module], ranks: Mapping[str, int], *,
                   weight_svd: bool, zero: Collection[str], attached: Mapping[str, torch.Tensor]) -> PreparedGroup:
        return ShardedGradientGroup(group.tensor, [s.name for s in group.slots], modules, ranks, weight_svd=weight_svd,
                                    zero=zero, attached=attached, shape=group.shape, group=self.group)

    def save_cache(self, path: Any, names: Sequence[str], zero: Collection[str]) -> None:
        raise UsageError("cache_file is not supported for FSDP-sharded models yet.")


def new_store(targets: Sequence[tuple[str, nn.Module]], layout: ShardLayout | None) -> AccumulatorStore:
    """Exact-mode accumulators for ``targets``: whole fp32 matrices, or row shards when the model is FSDP-sharded."""
    specs = [(name, weight_shape(m), local_tensor(m.weight).device) for name, m in targets]
    return AccumulatorStore(specs) if layout is None else ShardedStore(specs, layout)

"""Exact mode on FSDP-sharded models: accumulators sharded by rows over the model's process group, like FSDP2
shards the weights (:class:`ShardedStore`), filled by a reduce-scatter per backward pass."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..distributed.collectives import all_reduce_counts
from ..distributed.dtensor import is_dtensor, local_tensor, rows_per_process
from ..distributed.layout import ShardLayout
from ..errors import UsageError
from ..layers.kinds import weight_shape
from ..ops import accumulate
from ..ops.rsvd import gather_rows
from .exact import AccumulatorSlot, AccumulatorStore, ShapeGroup
from .factors import PreparedGroup, ShardedGradientGroup
from .files import stream_gradients

__all__ = ["ShardedSlot", "ShardedStore", "new_store"]


class ShardedSlot(AccumulatorSlot):
    """A row shard of one layer's accumulator: each backward pass's local ``G^T X`` is computed whole in a
    shared workspace and reduce-scattered over the processes, so this process only ever keeps its own rows."""

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
        dist.reduce_scatter_tensor(mine, full, group=self.store.process_group)
        self.acc.add_(mine)


class ShardedStore(AccumulatorStore):
    """Accumulators sharded by rows over the processes of the layout's process group, the way FSDP2 shards weights
    (``torch.chunk`` on dim 0: process ``i`` owns rows ``[i*c, (i+1)*c)`` with ``c = ceil(m / N)``; past ``m`` the
    rows are zero padding).

    Every process holds ``(B, c, n)`` per shape group (about ``1/N`` of the exact store) plus one workspace the
    size of the largest layer's full gradient. Every backward pass through a target costs one reduce-scatter,
    so every process must run the same backward passes in the same order (FSDP requires that anyway).
    """

    def __init__(self, specs: Sequence[tuple[str, tuple[int, int], torch.device]], layout: ShardLayout):
        import torch.distributed as dist

        self.layout = layout
        self.process_group = layout.process_group
        self.world = dist.get_world_size(self.process_group)
        self.process_index = dist.get_rank(self.process_group)
        self._workspaces: dict[tuple[torch.device, bool], torch.Tensor] = {}
        super().__init__(specs)

    def local_rows(self, rows: int) -> range:
        """The global rows this process owns of a ``rows``-row matrix (possibly empty)."""
        c = rows_per_process(rows, self.world)
        return range(min(self.process_index * c, rows), min((self.process_index + 1) * c, rows))

    def local_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (rows_per_process(shape[0], self.world), shape[1])

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

    def reduce(self, process_group: Any = None) -> None:
        """Sum the pass counts over the layout's processes (the sums were reduce-scattered at every backward pass)."""
        device = self.shape_groups[0].device if self.shape_groups else None
        all_reduce_counts(list(self.slots.values()), device, self.process_group)

    def global_max(self, values: torch.Tensor) -> torch.Tensor:
        """Maxima over all processes' shards; a NaN anywhere becomes +inf (still non-finite) so MAX carries it."""
        import torch.distributed as dist

        values = torch.nan_to_num(values.clone(), nan=float("inf"))
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.process_group)
        return values

    def user_tensors(self, means: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each mean gradient as a ``DTensor`` row-sharded over the layout's mesh (``Shard(0)``: for FSDP2, exactly
        like its weight), over this process's rows (no copy); ``.full_tensor()`` gathers it."""
        from torch.distributed.tensor import DTensor, Shard

        out: dict[str, torch.Tensor] = {}
        for name, grad in means.items():
            m, n = self.shapes[name]
            out[name] = DTensor.from_local(grad[: len(self.local_rows(m))], self.layout.mesh, [Shard(0)],
                                           run_check=False, shape=torch.Size((m, n)), stride=(n, 1))
        return out

    def load(self, name: str, mean: torch.Tensor) -> None:
        """Set a layer's sum from a row-sharded ``DTensor`` mean gradient (this process's rows) as one pass."""
        if not is_dtensor(mean):
            raise UsageError(
                f"the model is sharded (FSDP or DeepSpeed ZeRO-3) but the gradient for '{name}' is a plain tensor; "
                "pass the DTensors estimate_gradient returns for the sharded model."
            )
        self.load_rows(name, local_tensor(mean))

    def make_group(self, group: ShapeGroup, modules: Mapping[str, nn.Module], ranks: Mapping[str, int], *,
                   weight_svd: bool, zero: Collection[str], attached: Mapping[str, torch.Tensor]) -> PreparedGroup:
        return ShardedGradientGroup(group.tensor, [s.name for s in group.slots], modules, ranks, weight_svd=weight_svd,
                                    zero=zero, attached=attached, shape=group.shape,
                                    process_group=self.process_group)

    def save_cache(self, path: Any, names: Sequence[str], zero: Collection[str], *, writer: bool = True) -> None:
        """Write the mean gradients as one standard gradient cache, gathered one layer at a time (every process
        holds one whole gradient at most, transiently); only the ``writer`` writes, and any later run can read it,
        sharded (each process reads its own rows) or not."""
        shapes = {name: self.shapes[name] for name, slot in self.slots.items() if slot.count > 0}

        def gathered(name: str) -> torch.Tensor:
            return gather_rows(self.slots[name].acc[None], self.process_group)[0, : self.shapes[name][0]]

        stream_gradients(path if writer else None, shapes, gathered, names)


def new_store(targets: Sequence[tuple[str, nn.Module]], layout: ShardLayout | None) -> AccumulatorStore:
    """Exact-mode accumulators for ``targets``: whole fp32 matrices, or row shards when the model is FSDP-sharded."""
    specs = [(name, weight_shape(m), local_tensor(m.weight).device) for name, m in targets]
    return AccumulatorStore(specs) if layout is None else ShardedStore(specs, layout)


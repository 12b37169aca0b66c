"""fp32 gradient accumulators, grouped by shape and device.

All target layers whose weight has the same ``(m, n)`` shape on the same device share one contiguous
``(B, m, n)`` fp32 tensor; each layer gets a view of it. A whole group can then be factored, reduced across
ranks or saved without stacking copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .ops import accumulate

__all__ = ["AccumulatorStore", "Group", "ShardedSlot", "ShardedStore", "Slot", "all_reduce_counts"]


@dataclass(eq=False)
class Slot:
    """One layer's accumulator: a view into its group's tensor, and its backward-pass count.

    The capture op calls :meth:`add` once per backward pass through the layer; other accumulation schemes
    (sharded, sketched) subclass it and override :meth:`add`.
    """

    name: str
    acc: torch.Tensor
    count: int = 0

    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        """Add this pass's ``G^T X`` (``X^T G`` in the ``(in, out)`` layout when ``transposed``) into ``acc``."""
        accumulate(self.acc, grad_out, x, transposed=transposed)


def all_reduce_counts(slots: Sequence[Slot], device: torch.device | None, group: object = None) -> None:
    """Sum the slots' backward-pass counts over the ranks of ``group``, in place: one small all_reduce."""
    import torch.distributed as dist

    counts = torch.tensor([s.count for s in slots], dtype=torch.int64, device=device or torch.device("cpu"))
    dist.all_reduce(counts, group=group)
    for slot, count in zip(slots, counts.tolist()):
        slot.count = count


@dataclass(eq=False)
class Group:
    """Layers sharing a weight shape and device: ``tensor[i]`` is ``slots[i].acc``."""

    shape: tuple[int, int]
    device: torch.device
    tensor: torch.Tensor
    slots: list[Slot] = field(default_factory=list)


class AccumulatorStore:
    """Zero-initialized fp32 accumulators for named layers, grouped into ``(B, m, n)`` tensors.

    Args:
        specs: ``(name, (m, n), device)`` for each layer, in the order the layers should be reported.
    """

    def __init__(self, specs: Sequence[tuple[str, tuple[int, int], torch.device]]):
        members: dict[tuple[tuple[int, int], torch.device], list[str]] = {}
        for name, shape, device in specs:
            members.setdefault((tuple(shape), torch.device(device)), []).append(name)
        self.groups: list[Group] = []
        slots: dict[str, Slot] = {}
        for (shape, device), names in members.items():
            tensor = torch.zeros((len(names), *self._local_shape(shape)), dtype=torch.float32, device=device)
            group = Group(shape=shape, device=device, tensor=tensor)
            self.groups.append(group)
            for i, name in enumerate(names):
                slot = self._make_slot(name, tensor[i], shape)
                group.slots.append(slot)
                slots[name] = slot
        # report in the caller's order, not in group order
        self.slots: dict[str, Slot] = {name: slots[name] for name, _, _ in specs}
        self.shapes: dict[str, tuple[int, int]] = {name: tuple(shape) for name, shape, _ in specs}  # type: ignore[misc]

    def _local_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return shape

    def _make_slot(self, name: str, acc: torch.Tensor, shape: tuple[int, int]) -> Slot:
        return Slot(name=name, acc=acc)

    def __getitem__(self, name: str) -> Slot:
        return self.slots[name]

    def global_max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-layer maxima over the whole gradients (this store holds them whole: ``values`` as is)."""
        return values

    def shaped_for_user(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean gradients as handed to users (``_peft_loraga_grad``, ``estimate_gradient``): here, as is."""
        return grads

    @property
    def nbytes(self) -> int:
        """Bytes held by all accumulators (this rank's shards, for a sharded store)."""
        return sum(g.tensor.numel() * g.tensor.element_size() for g in self.groups)

    def all_reduce(self, group: object = None) -> None:
        """Sum the accumulators and the pass counts over the ranks of ``group`` (``torch.distributed``; default:
        the world), in place: one collective per shape group and one for all the counts. Every rank must hold the
        same layers in the same order (the same model and targets), whatever the number of batches it ran."""
        import torch.distributed as dist

        for g in self.groups:
            dist.all_reduce(g.tensor, group=group)
        all_reduce_counts(list(self.slots.values()), self.groups[0].device if self.groups else None, group)

    def means(self) -> dict[str, torch.Tensor]:
        """Turn each accumulated sum into a mean over its backward passes, in place.

        Returns ``{name: mean}`` for every layer that saw at least one backward pass (views into the group
        tensors, no copies). Call once.
        """
        out: dict[str, torch.Tensor] = {}
        for name, slot in self.slots.items():
            if slot.count > 0:
                slot.acc.div_(slot.count)
                out[name] = slot.acc
        return out


class ShardedSlot(Slot):
    """A row shard of one layer's accumulator: each backward pass's local ``G^T X`` is computed whole in a
    shared workspace and reduce-scattered over the ranks, so this rank only ever keeps its own rows."""

    def __init__(self, name: str, acc: torch.Tensor, rows: int, store: ShardedStore):
        super().__init__(name=name, acc=acc)
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

    def __init__(self, specs: Sequence[tuple[str, tuple[int, int], torch.device]], group: object = None,
                 mesh: object = None):
        import torch.distributed as dist

        self.group = group
        self.mesh = mesh
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._workspaces: dict[tuple[torch.device, bool], torch.Tensor] = {}
        super().__init__(specs)

    def rows_per_rank(self, rows: int) -> int:
        return -(-rows // self.world)

    def local_rows(self, rows: int) -> range:
        """The global rows this rank owns of a ``rows``-row matrix (possibly empty)."""
        c = self.rows_per_rank(rows)
        return range(min(self.rank * c, rows), min((self.rank + 1) * c, rows))

    def _local_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (self.rows_per_rank(shape[0]), shape[1])

    def _make_slot(self, name: str, acc: torch.Tensor, shape: tuple[int, int]) -> Slot:
        return ShardedSlot(name, acc, shape[0], self)

    def workspace(self, numel: int, device: torch.device, second: bool = False) -> torch.Tensor:
        key = (torch.device(device), second)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            self._workspaces[key] = buf
        return buf[:numel]

    def release_workspace(self) -> None:
        """Free the reduce-scatter workspaces (after the estimation)."""
        self._workspaces.clear()

    def all_reduce(self, group: object = None) -> None:
        """Sum the pass counts over the ranks (the sums were reduce-scattered at every backward pass)."""
        all_reduce_counts(list(self.slots.values()), self.groups[0].device if self.groups else None, self.group)

    def global_max(self, values: torch.Tensor) -> torch.Tensor:
        """Maxima over all ranks' shards; a NaN anywhere becomes +inf (still non-finite) so MAX carries it."""
        import torch.distributed as dist

        values = torch.nan_to_num(values.clone(), nan=float("inf"))
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values

    def shaped_for_user(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each mean gradient as a ``DTensor`` row-sharded over ``mesh`` (``Shard(0)``: for FSDP2, exactly like its
        weight), over this rank's rows (no copy); ``.full_tensor()`` gathers it."""
        from torch.distributed.tensor import DTensor, Shard

        out: dict[str, torch.Tensor] = {}
        for name, grad in grads.items():
            m, n = self.shapes[name]
            rows = self.local_rows(m)
            out[name] = DTensor.from_local(grad[: len(rows)], self.mesh, [Shard(0)], run_check=False,
                                           shape=torch.Size((m, n)), stride=(n, 1))
        return out

"""Exact mode's store: fp32 accumulators, one ``(m, n)`` sum per layer, grouped by shape and device."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..distributed.collectives import all_reduce_counts, is_distributed
from ..ops import accumulate
from ..layers.capture import Slot
from .base import Store, row_max_abs
from .factors import GradientGroup, PreparedGroup
from .files import save_gradients

__all__ = ["AccumulatorSlot", "AccumulatorStore", "ShapeGroup"]


class AccumulatorSlot(Slot):
    """One layer's fp32 sum ``acc``: a view into its group's tensor."""

    def __init__(self, name: str, acc: torch.Tensor):
        super().__init__(name)
        self.acc = acc

    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        """Add this pass's ``G^T X`` (``X^T G`` in the ``(in, out)`` layout when ``transposed``) into ``acc``."""
        accumulate(self.acc, grad_out, x, transposed=transposed)


@dataclass(eq=False)
class ShapeGroup:
    """Layers sharing a weight shape and device: ``tensor[i]`` is ``slots[i].acc``."""

    shape: tuple[int, int]
    device: torch.device
    tensor: torch.Tensor
    slots: list[AccumulatorSlot] = field(default_factory=list)


class AccumulatorStore(Store):
    """Zero-initialized fp32 accumulators for named layers, grouped into ``(B, m, n)`` tensors.

    Args:
        specs: ``(name, (m, n), device)`` for each layer, in the order the layers should be reported.
    """

    def __init__(self, specs: Sequence[tuple[str, tuple[int, int], torch.device]]):
        members: dict[tuple[tuple[int, int], torch.device], list[str]] = {}
        for name, shape, device in specs:
            members.setdefault((tuple(shape), torch.device(device)), []).append(name)  # type: ignore[arg-type]
        self.shape_groups: list[ShapeGroup] = []
        slots: dict[str, AccumulatorSlot] = {}
        for (shape, device), names in members.items():
            tensor = torch.zeros((len(names), *self.local_shape(shape)), dtype=torch.float32, device=device)
            group = ShapeGroup(shape=shape, device=device, tensor=tensor)
            self.shape_groups.append(group)
            for i, name in enumerate(names):
                slot = self.make_slot(name, tensor[i], shape)
                group.slots.append(slot)
                slots[name] = slot
        # report in the caller's order, not in group order
        self.slots: dict[str, AccumulatorSlot] = {name: slots[name] for name, _, _ in specs}  # type: ignore[assignment]
        self.shapes: dict[str, tuple[int, int]] = {name: tuple(shape) for name, shape, _ in specs}  # type: ignore[misc]
        self._means: dict[str, torch.Tensor] | None = None

    def local_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The part of an ``(m, n)`` sum this process holds (all of it here)."""
        return shape

    def make_slot(self, name: str, acc: torch.Tensor, shape: tuple[int, int]) -> AccumulatorSlot:
        return AccumulatorSlot(name, acc)

    def __getitem__(self, name: str) -> AccumulatorSlot:
        return self.slots[name]

    def local_rows(self, rows: int) -> range:
        """The rows of a ``rows``-row sum this process holds (all of them here)."""
        return range(rows)

    def load_rows(self, name: str, block: torch.Tensor) -> None:
        """Set this process's rows of a layer's sum to ``block`` (its :meth:`local_rows` of the mean) as one pass."""
        slot = self.slots[name]
        slot.acc[: block.shape[0]].copy_(block)
        slot.count = 1

    def load(self, name: str, mean: torch.Tensor) -> None:
        """Set a layer's sum to ``mean`` as one pass: for given gradients (``LoraGAContext``)."""
        self.load_rows(name, mean)

    @property
    def nbytes(self) -> int:
        return sum(g.tensor.numel() * g.tensor.element_size() for g in self.shape_groups)

    def reduce(self, process_group: Any = None) -> None:
        """Sum the accumulators and the pass counts over the processes of ``process_group`` (default: the world), in
        place, when distributed: one collective per shape group and one for all the counts. Every process must hold
        the same layers in the same order (the same model and targets), whatever the number of batches it ran."""
        if not is_distributed(process_group):
            return
        import torch.distributed as dist

        for g in self.shape_groups:
            dist.all_reduce(g.tensor, group=process_group)
        all_reduce_counts(list(self.slots.values()), self.shape_groups[0].device if self.shape_groups else None,
                          process_group)

    def global_max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-layer maxima over the whole gradients, from this process's part (here: ``values`` as is)."""
        return values

    def magnitudes(self) -> dict[str, float]:
        """Each layer's largest absolute entry of its sum (:meth:`GradientSource.magnitudes`; a sharded store's over
        all processes' rows): one reduction per shape group, no full-size temporary."""
        out: dict[str, float] = {}
        for group in self.shape_groups:
            values = self.global_max(row_max_abs(group.tensor)).tolist()
            out.update({slot.name: v for slot, v in zip(group.slots, values)})
        return out

    def user_tensors(self, means: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean gradients as users see them (``_peft_loraga_grad``, ``estimate_gradient``): here, the views."""
        return dict(means)

    def mean_gradients(self) -> dict[str, torch.Tensor]:
        """``{name: mean gradient}`` for every layer that saw a backward pass: each sum is divided by its pass count,
        in place, on the first call (later calls return the same tensors). Views of the group tensors, no copies."""
        if self._means is None:
            means: dict[str, torch.Tensor] = {}
            for name, slot in self.slots.items():
                if slot.count > 0:
                    slot.acc.div_(slot.count)
                    means[name] = slot.acc
            self._means = self.user_tensors(means)
        return self._means

    def prepare(self, modules: Mapping[str, nn.Module], ranks: Mapping[str, int], *, weight_svd: bool,
                zero: Collection[str]) -> tuple[list[PreparedGroup], dict[str, Any]]:
        """One lazily factored :class:`~loraga_fast.stores.factors.GradientGroup` per shape group with a layer in ``ranks``;
        the mean gradients are what gets attached."""
        shown = self.mean_gradients()
        groups = [self.make_group(g, modules, ranks, weight_svd=weight_svd, zero=zero, attached=shown)
                  for g in self.shape_groups if any(slot.name in ranks for slot in g.slots)]
        return groups, {name: shown[name] for name in ranks}  # type: ignore[return-value]

    def make_group(self, group: ShapeGroup, modules: Mapping[str, nn.Module], ranks: Mapping[str, int], *,
                   weight_svd: bool, zero: Collection[str], attached: Mapping[str, torch.Tensor]) -> PreparedGroup:
        return GradientGroup(group.tensor, [s.name for s in group.slots], modules, ranks, weight_svd=weight_svd,
                             zero=zero, attached=attached, shape=group.shape)

    def save_cache(self, path: str | os.PathLike[str], names: Sequence[str], zero: Collection[str], *,
                   writer: bool = True) -> None:
        if writer:  # every process holds the same reduced means
            save_gradients(path, {name: slot.acc for name, slot in self.slots.items() if slot.count > 0}, names)

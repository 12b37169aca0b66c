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

__all__ = ["AccumulatorStore", "Group", "Slot"]


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
            tensor = torch.zeros((len(names), *shape), dtype=torch.float32, device=device)
            group = Group(shape=shape, device=device, tensor=tensor)
            self.groups.append(group)
            for i, name in enumerate(names):
                slot = Slot(name=name, acc=tensor[i])
                group.slots.append(slot)
                slots[name] = slot
        # report in the caller's order, not in group order
        self.slots: dict[str, Slot] = {name: slots[name] for name, _, _ in specs}

    def __getitem__(self, name: str) -> Slot:
        return self.slots[name]

    @property
    def nbytes(self) -> int:
        """Bytes held by all accumulators."""
        return sum(g.tensor.numel() * g.tensor.element_size() for g in self.groups)

    def all_reduce(self, group: object = None) -> None:
        """Sum the accumulators and the pass counts over the ranks of ``group`` (``torch.distributed``; default:
        the world), in place: one collective per shape group and one for all the counts. Every rank must hold the
        same layers in the same order (the same model and targets), whatever the number of batches it ran."""
        import torch.distributed as dist

        for g in self.groups:
            dist.all_reduce(g.tensor, group=group)
        slots = list(self.slots.values())
        device = self.groups[0].device if self.groups else torch.device("cpu")
        counts = torch.tensor([s.count for s in slots], dtype=torch.int64, device=device)
        dist.all_reduce(counts, group=group)
        for slot, count in zip(slots, counts.tolist()):
            slot.count = count

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

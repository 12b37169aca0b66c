"""The few collectives the stores share: whether a process group spans several processes, and the sum of the
per-layer backward-pass counts over it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..layers.capture import Slot

__all__ = ["all_reduce_counts", "is_distributed"]


def is_distributed(process_group: Any = None) -> bool:
    """True when torch.distributed is initialized and ``process_group`` (default: the world) has more than one
    process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def all_reduce_counts(slots: Sequence[Slot], device: torch.device | None, process_group: Any = None) -> None:
    """Sum the slots' backward-pass counts over the processes of ``process_group``, in place: one small all_reduce."""
    import torch.distributed as dist

    counts = torch.tensor([s.count for s in slots], dtype=torch.int64, device=device or torch.device("cpu"))
    dist.all_reduce(counts, group=process_group)
    for slot, count in zip(slots, counts.tolist()):
        slot.count = count


"""The one place that knows how FSDP2 row-shards a weight (``DTensor`` with ``Shard(0)`` on a 1-D mesh)."""

from __future__ import annotations

import torch

__all__ = ["is_dtensor", "local_tensor", "rows_per_rank"]


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked by its interface: no import of torch.distributed)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a ``DTensor`` (its local shard), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def rows_per_rank(rows: int, world: int) -> int:
    """Rows each rank holds when ``rows`` are split like ``torch.chunk`` (FSDP2's ``Shard(0)``): ``ceil(rows / world)``;
    the last ranks hold fewer (or none) and pad."""
    return -(-rows // world)

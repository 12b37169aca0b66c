"""The one place that knows how FSDP2 row-shards a weight (``DTensor`` with ``Shard(0)`` on a 1-D mesh)."""

from __future__ import annotations

import torch

__all__ = ["is_dtensor", "local_tensor", "rows_per_process"]


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked by its interface: no import of torch.distributed)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a ``DTensor`` (its local shard), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def rows_per_process(rows: int, world: int) -> int:
    """Rows each process holds when ``rows`` are split like ``torch.chunk`` over ``world`` processes (FSDP2's
    ``Shard(0)``): ``ceil(rows / world)``; the last processes hold fewer (or none) and pad."""
    return -(-rows // world)

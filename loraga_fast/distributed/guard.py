"""A guard against ranks that run different numbers of forward passes on a sharded model (which would otherwise
hang in FSDP's or DeepSpeed's collectives)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["StepGuard"]


class StepGuard:
    """Detects ranks that run different numbers of model forwards, before FSDP's or DeepSpeed's collectives hang on it.

    A forward pre-hook on the model (ahead of FSDP's own) all-reduces 1 from every rank that starts a forward;
    when ``train_step`` returns, :meth:`finish` all-reduces 0. A rank that starts a forward while another has
    already finished sees a sum below the world size (and the finished one a sum above 0): both raise the same
    clear error instead of deadlocking. One tiny all-reduce per forward.
    """

    def __init__(self, model: nn.Module, process_group: Any, device: torch.device):
        import torch.distributed as dist

        self.process_group = process_group
        self.world = dist.get_world_size(process_group)
        self.device = device
        self.forwards = 0
        self._handle = model.register_forward_pre_hook(self._pre_forward, prepend=True)

    def _sync(self, flag: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([flag], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.process_group)
        return int(t.item())

    situation = "on a sharded model (FSDP or DeepSpeed ZeRO-3)"  # what the error says the run was
    why = "so the collectives line up"  # and why every rank must run the same steps

    def _error(self, running: int) -> UsageError:
        import torch.distributed as dist

        where = f"rank {dist.get_rank(self.process_group)} after {self.forwards}; {running} of {self.world} still running"
        return UsageError(f"LoRA-GA {self.situation}: ranks ran different numbers of forward passes ({where}). Every "
                          "rank must run the same number of steps: give each rank the same number of batches (e.g. a "
                          f"DistributedSampler with drop_last=True, or num_batches=) {self.why}.")

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


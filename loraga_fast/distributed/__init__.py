"""Distributed runs: the process-group side of the flow.

* :mod:`~loraga_fast.distributed.dtensor` -- the one place that reads FSDP2 ``DTensor`` row shards;
* :mod:`~loraga_fast.distributed.layout` -- which process group FSDP1/FSDP2 targets are sharded over, and the settings
  a sharded layout cannot serve;
* :mod:`~loraga_fast.distributed.guard` -- :class:`~loraga_fast.distributed.guard.StepGuard`, which turns a rank
  mismatch in forward passes into an error instead of a hang;
* :mod:`~loraga_fast.distributed.collectives` -- the collectives the stores share.

Naming: a *process group* is always ``process_group``; ``rank`` / ``r`` always means the LoRA rank, and a process's
place in its group is its *process index*.
"""

"""DeepSpeed ZeRO-3: the one place that reads DeepSpeed's partitioned parameters.

Under ZeRO-3 every process holds ``1/N`` of each weight, flattened: outside forward ``param.data`` is empty and
``param.ds_tensor`` holds elements ``[i p, (i + 1) p)`` of the row-major flattened weight (``p =
ceil(numel / N)``, ``i`` the process index in ``param.ds_process_group``; the last process pads). DeepSpeed's
module hooks gather a layer's weight for its forward and again for its backward, so the capture op sees whole
``X``, ``G`` and ``W`` as on one GPU. What changes is where the accumulators live (row shards, like FSDP:
:class:`~loraga_fast.stores.sharded.ShardedStore`), how the base offset is written (:func:`offset_partition`:
into this process's flat slice, and into its ZeRO++ secondary slice when hierarchical partitioning keeps one,
nothing gathered), and how a weight is read whole (:func:`gathered`, one layer at a time).

deepspeed is imported only when a model has ZeRO-3 parameters (their ``ds_*`` attributes say so).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["check_partitions", "engine_module", "gathered", "gathering_engine", "is_hooked", "is_zero3",
           "offset_partition", "partition_range", "places_itself", "release_gathered", "writing", "zero3_group"]

# DeepSpeed's message when a loss computed through an engine without optimizer is backpropagated directly
_ENGINE_BACKWARD = "Direct calls to tensor.backward() are not supported"
_ENGINE_CONFIG = {"train_micro_batch_size_per_gpu": 1,
                  # 0: the temporary engine marks no parameter persistent (whatever the user's engine will do)
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def is_zero3(param: Any) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or a stage-3 engine)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor") and hasattr(param, "ds_process_group")


def zero3_group(param: Any) -> Any:
    """The process group ``param`` is partitioned over."""
    return param.ds_process_group


def partition_range(param: Any, secondary: bool = False) -> tuple[int, int]:
    """``(start, stop)``: the elements of the flattened weight this process's partition holds (``stop - start``
    may be less than the partition's size on the last process, or 0). ``secondary``: the same for the ZeRO++
    secondary partition (hierarchical partitioning, ``zero_hpz_partition_size > 1``: a copy of the weight split
    over the smaller ``param.ds_zero_param_process_group``, which DeepSpeed gathers from for forward)."""
    import torch.distributed as dist

    if secondary:
        size, group = int(param.ds_secondary_tensor.ds_numel), param.ds_zero_param_process_group
    else:
        size, group = int(param.ds_tensor.ds_numel), zero3_group(param)
    start = size * dist.get_rank(group)
    return min(start, int(param.ds_numel)), min(start + size, int(param.ds_numel))


def check_partitions(targets: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse, naming the layer, what the ZeRO-3 path cannot serve: partitions offloaded to NVMe (DeepSpeed swaps
    them in and out of files, which the offset cannot write into); partitions stored quantized (ZeRO++
    ``zero_quantized_nontrainable_weights``: an offset cannot be written into int8 values); weights partitioned over
    fewer processes than the run has (a data-parallel group under model or sequence parallelism,
    ``zero.Init(data_parallel_group=...)``): the gradients are summed over the partition group only, which would
    leave the other processes' batches out."""
    import torch.distributed as dist

    for name, module in targets:
        weight = module.weight
        partitions = [weight.ds_tensor, getattr(weight, "ds_secondary_tensor", None)]
        location = getattr(weight.ds_tensor, "final_location", None)
        if location is not None and str(getattr(location, "value", location)) == "nvme":
            raise UsageError(
                f"Layer '{name}' has its ZeRO-3 partition offloaded to NVMe (offload_param.device='nvme'); loraga_fast "
                "writes the LoRA-GA offset into each process's partition and cannot reach swapped-out ones: use "
                "offload_param.device='cpu' or 'none' for the preprocessing run."
            )
        if any(hasattr(part, "ds_quant_scale") for part in partitions if part is not None):
            raise UsageError(
                f"Layer '{name}' has its ZeRO-3 partition stored quantized (ZeRO++ "
                "zero_quantized_nontrainable_weights); loraga_fast writes the LoRA-GA offset into each process's "
                "partition and cannot write into quantized values: turn zero_quantized_nontrainable_weights off for "
                "the preprocessing run."
            )
        size, world = dist.get_world_size(zero3_group(weight)), dist.get_world_size()
        if size != world:
            raise UsageError(
                f"Layer '{name}' is partitioned by ZeRO-3 over {size} of the {world} processes (a data-parallel group "
                "under model or sequence parallelism, or zero.Init(data_parallel_group=...)); loraga_fast sums the "
                "gradients over the partition group and would leave the other processes' batches out: partition over "
                "all processes for the preprocessing run."
            )


def engine_module(model: Any) -> nn.Module | None:
    """The module a DeepSpeed engine (``deepspeed.initialize``, or ``accelerator.prepare`` under DeepSpeed) wraps, or
    None when ``model`` is not an engine. Batches go through this module, not the engine: an engine built without an
    optimizer refuses a direct ``loss.backward()`` (and has no ``engine.backward``), and its gathering hooks sit on
    the module's layers anyway."""
    engine = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)  # none unless deepspeed was imported
    return model.module if engine is not None and isinstance(model, engine) else None


def places_itself(model: nn.Module) -> bool:
    """True for a model with ZeRO-3 parameters: DeepSpeed placed its partitions (``zero.Init``'s device, or CPU for
    ``offload_param``), and moving the module with ``.to(device)`` would only move the empty placeholders."""
    return any(is_zero3(p) for p in model.parameters())


def is_hooked(module: nn.Module) -> bool:
    """True when a DeepSpeed stage-3 engine's hooks gather ``module``'s parameters for its forward."""
    return any(getattr(hook, "__qualname__", "").startswith("DeepSpeedZeRoOffload.")
               for hook in module._forward_pre_hooks.values())


@contextlib.contextmanager
def gathering_engine(model: nn.Module, targets: Sequence[tuple[str, nn.Module]]) -> Iterator[None]:
    """While open, a temporary DeepSpeed stage-3 engine (no optimizer) gathers the weights of a ZeRO-3 model that
    no engine wraps yet (a model loaded partitioned, before ``Trainer`` or ``deepspeed.initialize`` builds one); on
    exit its hooks are removed, so the user's own engine can wrap the model later. When an engine wraps the model
    already, it is used as is. Either way every weight is partitioned again on exit (:func:`release_gathered`).

    A ``train_step`` that calls an engine built without an optimizer (``engine(**batch).loss.backward()``) fails
    inside DeepSpeed's backward hook; that failure becomes one ``UsageError`` saying to call the model instead."""
    engine = None
    if not all(is_hooked(module) for _, module in targets):
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=_ENGINE_CONFIG)
    try:
        yield
    except RuntimeError as err:
        if _ENGINE_BACKWARD not in str(err):
            raise
        raise UsageError(
            "train_step ran a backward pass through a DeepSpeed engine that has no optimizer: DeepSpeed refuses "
            "loss.backward() there (and engine.backward needs an optimizer). In train_step call the model the engine "
            "wraps (engine.module, the model given to deepspeed.initialize or accelerator.prepare), not the engine."
        ) from None
    finally:
        try:
            release_gathered(model)
        finally:
            if engine is not None:
                engine.destroy()


def release_gathered(model: nn.Module) -> None:
    """Partition again every ZeRO-3 weight of ``model`` a forward left gathered. DeepSpeed releases a module's
    weights after its backward only when the module's input requires grad; with every weight frozen (as during
    the capture) the first blocks' inputs do not, so their weights would stay whole on every process."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [p for p in model.parameters()
              if is_zero3(p) and not p.ds_persist and p.ds_status == ZeroParamStatus.AVAILABLE]
    for p in params:
        p.ds_active_sub_modules.clear()
    if params:
        params[0].partition(param_list=params)


@contextlib.contextmanager
def gathered(modules: Sequence[nn.Module]) -> Iterator[None]:
    """The whole weights of ``modules`` for the duration (read only; partitioned again on exit)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([m.weight for m in modules], modifier_rank=None):
        yield


@contextlib.contextmanager
def writing(model: nn.Module) -> Iterator[bool]:
    """For saving ``model``'s adapter from every process of a distributed run: its ZeRO-3 trainable parameters
    (LoRA weights a training engine partitioned) gathered for the duration, and True in the one process that
    writes (process 0; every process writes when not distributed). The processes wait for the writer to finish."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad and is_zero3(p)]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    writer = not distributed or dist.get_rank() == 0
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield writer
    else:
        yield writer
    if distributed:  # not on an error: a process that raised must not leave the others waiting forever
        dist.barrier()


@torch.no_grad()
def offset_partition(weight: Any, b: torch.Tensor, a: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> None:
    """``W -= scaling * B @ A`` on this process's flat partition of a ZeRO-3 weight, in place, computing only the
    rows of ``B @ A`` that overlap it (``B (out, r)`` and ``A (r, in)`` are whole on every process); the same on its
    ZeRO++ secondary partition when hierarchical partitioning keeps one (forward gathers from it: left alone, the
    model would run on the weight before the offset); a weight whose data is gathered or persistent (whole on every
    process) is offset whole too."""
    rows, cols = (a.shape[1], b.shape[0]) if fan_in_fan_out else (b.shape[0], a.shape[1])  # stored layout
    partitions = [(weight.ds_tensor, partition_range(weight))]
    if getattr(weight, "ds_secondary_tensor", None) is not None:
        partitions.append((weight.ds_secondary_tensor, partition_range(weight, secondary=True)))
    for tensor, (start, stop) in partitions:
        if stop > start:
            first, last = start // cols, -(-stop // cols)
            rows_delta = _delta_rows(b, a, first, last, fan_in_fan_out).reshape(-1)
            block = rows_delta[start - first * cols : stop - first * cols]
            part = tensor.narrow(0, 0, stop - start)
            part.copy_(part.to(torch.float32).sub_(block.to(part.device), alpha=scaling))
    if weight.data.numel() == rows * cols:  # gathered or persistent: the whole weight as well
        data = weight.data.view(rows, cols)
        data.copy_(data.to(torch.float32).sub_(_delta_rows(b, a, 0, rows, fan_in_fan_out).to(data.device),
                                               alpha=scaling))


def _delta_rows(b: torch.Tensor, a: torch.Tensor, first: int, last: int, fan_in_fan_out: bool) -> torch.Tensor:
    """Rows ``[first, last)`` of ``B @ A`` in the stored layout (``(B @ A)^T`` for ``Conv1D``), fp32."""
    if fan_in_fan_out:
        return (b @ a[:, first:last]).T
    return b[first:last] @ a

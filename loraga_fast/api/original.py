"""The original LoRA-GA utilities (github.com/Outsider565/LoRA-GA), on loraga_fast's capture, store and init.

Code written for the original runs unchanged with these imports::

    from loraga_fast import estimate_gradient, LoraGAContext, save_loraga_model_init, save_loraga_model_final

    named_grad = estimate_gradient(model, dataloader, accelerator)
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model, LoraConfig(..., init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()))
    save_loraga_model_init(model, save_dir)
    ...  # train (LoRA-GA wants a full-fine-tuning-sized learning rate, ~2e-5 on 7B models)
    save_loraga_model_final(model, save_dir)  # a plain LoRA adapter for the unmodified base model
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..core.convergence import DEFAULT_DIRECTION, stop_rule
from ..core.handoff import hand_off, release
from ..core.passes import run_passes, summarize
from ..distributed.layout import check_sharded_config, shard_layout
from ..distributed.zero3 import engine_module, places_itself, writing
from ..errors import UsageError
from ..layers.kinds import is_supported_layer, weight_shape
from ..layers.quantized import UNTOUCHED_BASES, unsupported_quantized
from ..layers.targets import GRAD_ATTR, fill_default_target_modules, find_targets, layer_ranks, warn_left_out
from ..stores.sharded import new_store
from .names import INIT_CHECKPOINT, OFFSETS_FILE
from .steps import LossFn, train_step_from_dataloader

__all__ = ["LoraGAContext", "estimate_gradient", "save_loraga_model_final", "save_loraga_model_init"]


def estimate_gradient(
    model: nn.Module,
    dataloader: Iterable[Any],
    accelerator: Any = None,
    quant_flag: bool = False,
    origin_type: str = "bf16",
    quant_type: str = "nf4",
    no_split_module_classes: list[str] | None = None,
    *,
    num_batches: int | None = None,
    lora_config: Any = None,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    until: str | None = None,
    convergence_tol: float | None = None,
) -> dict[str, torch.Tensor]:
    """Mean gradient of every target layer's weight over ``dataloader``: ``{module_name: fp32 gradient}``.

    Computed with the capture op (no ``.grad``, fp32 accumulation). The positional order is the original's.

    Args:
        model: a floating-point model, or one quantized with bitsandbytes (4-bit nf4/fp4 or 8-bit, e.g. loaded with
            ``BitsAndBytesConfig``): its ``Linear4bit`` / ``Linear8bitLt`` targets are captured directly (the
            gradient with respect to the dequantized weight), with no float copy of the model.
        dataloader: batches as dicts (``model(**batch)``), tuples/lists (``model(*batch)``) or tensors.
        accelerator: optional ``accelerate.Accelerator``: the model goes to its device (a DeepSpeed ZeRO-3 model
            stays where DeepSpeed placed it) and the dataloader through ``accelerator.prepare``. Whenever
            ``torch.distributed`` is initialized (torchrun, ``accelerate launch``), the sums and counts are reduced
            over all processes (one collective per shape group).
        quant_flag: the original's switch for quantized training (QLoRA). The original then estimates on a float
            copy of the model, offloaded block by block, and initializes the re-quantized model; here a quantized
            model is estimated directly, so ``quant_flag`` only says that the model will be trained quantized and
            changes nothing in the estimation.
        origin_type, quant_type, no_split_module_classes: accepted for the original's signature; they only served
            its float-copy workaround (the float dtype of the copy, the quantization to re-apply, the offload
            blocks) and are not used.
        num_batches: use only the first ``num_batches`` batches.
        lora_config: restrict the targets to those of this ``LoraConfig`` (peft's matching rules); default: every
            ``nn.Linear`` and transformers ``Conv1D`` of the model.
        loss_fn: ``loss_fn(outputs, batch) -> loss``; default ``outputs.loss``.
        progress: show a progress bar.
        until, convergence_tol: ``until="converged"`` stops once LoRA-GA's ``A`` and ``B`` directions of every mean
            gradient have converged, as in :func:`~loraga_fast.preprocess_loraga` (``r`` and the direction from
            ``lora_config``, else peft's defaults: 8 and ``"ArB2r"``); the result is the mean over the batches
            actually run.

    Returns:
        ``{module_name: mean gradient}``: fp32, the weight's layout, on the weight's device, for every target that
        saw a backward pass (the tensors are views of shape-grouped buffers). Names are those of the bare model,
        also for a ``DistributedDataParallel`` one or a DeepSpeed engine (whose module runs the batches). For an
        FSDP- or ZeRO-3-sharded model, each is a ``DTensor`` row-sharded over the model's process group (every rank
        must then run the same number of batches).

    Raises:
        ValueError: no target layer; a target quantized by a library other than bitsandbytes; an empty dataloader;
            a batch without a loss; no backward pass reaching any target; a non-finite mean gradient. The model is
            left as it was.
    """
    del quant_flag, origin_type, quant_type, no_split_module_classes  # the original's workaround only (see above)
    ga = getattr(lora_config, "lora_ga_config", None) if lora_config is not None else None
    stop = stop_rule(until, convergence_tol,  # before any data is read; without a LoRA-GA config, peft's direction
                     direction=ga.direction if ga is not None else DEFAULT_DIRECTION)
    # a DeepSpeed engine (accelerator.prepare under DeepSpeed) runs its module: without an optimizer it refuses a
    # plain backward
    model = engine_module(model) or model
    # a DistributedDataParallel model (accelerator.prepare) runs as is, but is named like the bare model, so the
    # result matches LoraGAContext(bare_model, ...) and peft's module names
    named = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if lora_config is not None:
        fill_default_target_modules(named, lora_config)
        targets = find_targets(named, lora_config)
    else:
        targets = [(name, module) for name, module in named.named_modules() if is_supported_layer(module)]
        for name, module in named.named_modules():
            kind = unsupported_quantized(module)
            if kind is not None:
                raise UsageError(f"estimate_gradient: layer '{name}' is a {kind} quantized layer; loraga_fast captures "
                                 "nn.Linear, Conv1D and bitsandbytes Linear4bit/Linear8bitLt layers (pass lora_config "
                                 "with target_modules that leave it out, or load the model with bitsandbytes).")
    if not targets:
        raise UsageError("estimate_gradient: the model has no nn.Linear or Conv1D target layer.")
    device: Any = "auto"
    if accelerator is not None:
        if not places_itself(model):  # DeepSpeed ZeRO-3 placed the partitions itself
            model.to(accelerator.device)
        dataloader = accelerator.prepare(dataloader)
        device = None  # the prepared dataloader places the batches
    layout = shard_layout(targets, named)
    store = new_store(targets, layout)
    step = train_step_from_dataloader(model, dataloader, num_batches=num_batches, device=device, loss_fn=loss_fn)
    total = num_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)  # type: ignore[arg-type]
    group = layout.process_group if layout is not None else None
    with layout.estimating(named, targets) if layout is not None else contextlib.nullcontext():
        ranks = layer_ranks(lora_config, [name for name, _ in targets]) if lora_config is not None else {}
        run_passes(model, targets, store, step, ranks=ranks, process_group=group, guard_group=group, num_batches=total,
                   progress=progress, stop=stop)
    seen, _ = summarize(store, [name for name, _ in targets])
    warn_left_out([name for name, _ in targets], seen, (), what="are left out of the result")
    return store.mean_gradients()


class LoraGAContext:
    """Inside the context, ``peft.get_peft_model(model, LoraConfig(..., init_lora_weights="lora_ga", ...))``
    initializes LoRA-GA from ``named_grad`` through loraga_fast's batched path.

    ``named_grad`` maps module names to mean weight gradients (as :func:`estimate_gradient` returns). Entries for
    modules that are not ``nn.Linear``/``Conv1D`` are ignored (the original's estimate also returned those).
    Checked on entry: every name is a module of ``model`` and every shape is its weight's. When ``get_peft_model``
    starts injecting a LoRA-GA adapter into ``model``, every target must have a finite gradient: otherwise a
    ``ValueError`` names the first missing (or the non-finite) ones before anything is modified. On exit nothing of the
    context remains (no attribute on the model, peft's classes as they were).
    """

    def __init__(self, model: nn.Module, named_grad: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self.named_grad = dict(named_grad or {})
        self._original: Any = None
        self._prepared: list[nn.Module] = []

    def __enter__(self) -> LoraGAContext:
        modules = dict(self.model.named_modules())
        for name, grad in self.named_grad.items():
            module = modules.get(name)
            if module is None:
                raise UsageError(f"LoraGAContext: named_grad has an entry for '{name}', which is not a module of the model.")
            if not is_supported_layer(module):
                continue
            if tuple(grad.shape) != weight_shape(module):
                raise UsageError(
                    f"LoraGAContext: the gradient for '{name}' has shape {tuple(grad.shape)}, but the module's weight "
                    f"has shape {weight_shape(module)}."
                )
        from peft.tuners.lora.model import LoraModel

        self._original = LoraModel.__dict__.get("inject_adapter")
        context = self
        inherited = LoraModel.inject_adapter

        def inject_adapter(tuner: Any, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
            config = tuner.peft_config[adapter_name]
            if model is context.model and str(getattr(config, "init_lora_weights", "")).lower() == "lora_ga":
                context._prepare(config)
            return inherited(tuner, model, adapter_name, *args, **kwargs)

        LoraModel.inject_adapter = inject_adapter
        return self

    def _prepare(self, config: Any) -> None:
        if config.lora_ga_config is None:
            raise UsageError(
                "If you want to use LoRA-GA, please initialize the LoraConfig with "
                "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...)."
            )
        fill_default_target_modules(self.model, config)
        targets = find_targets(self.model, config)
        missing = [name for name, _ in targets if name not in self.named_grad]
        if missing:
            raise UsageError(
                f"LoraGAContext: named_grad has no gradient for target module '{missing[0]}'"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; estimate it with the same "
                "target_modules, or exclude it from the LoraConfig."
            )
        layout = shard_layout(targets, self.model)
        if layout is not None:
            check_sharded_config(layout, config)
        store = new_store(targets, layout)
        for name, _ in targets:
            try:
                store.load(name, self.named_grad[name])
            except UsageError as err:
                raise UsageError(f"LoraGAContext: {err}") from None
        hand_off(config, targets, store, layout=layout)
        self._prepared += [m for _, m in targets]

    def __exit__(self, *exc: object) -> None:
        from peft.tuners.lora.model import LoraModel

        if self._original is None:
            del LoraModel.inject_adapter
        else:
            LoraModel.inject_adapter = self._original
        for module in self._prepared:  # whatever get_peft_model did not consume (it failed, or was not called)
            if hasattr(module, GRAD_ATTR):
                delattr(module, GRAD_ATTR)
            release(module)
        self._prepared = []


def save_loraga_model_init(model: Any, save_dir: str | os.PathLike[str]) -> None:
    """Save the freshly initialized adapter to ``save_dir/init_lora_checkpoint`` (call right after
    ``get_peft_model``, before training). It is saved as a plain LoRA adapter (``init_lora_weights=True``), which
    is what peft's conversion in :func:`save_loraga_model_final` needs. In a distributed run (DDP, FSDP, DeepSpeed
    ZeRO-3) call it on every process: process 0 writes, with ZeRO-3 adapter weights gathered."""
    init_dir = os.path.join(os.fspath(save_dir), INIT_CHECKPOINT)
    saved = {name: cfg.init_lora_weights for name, cfg in model.peft_config.items()}
    try:
        for cfg in model.peft_config.values():
            cfg.init_lora_weights = True
        with writing(model) as writer:  # distributed: process 0 writes (ZeRO-3 adapters gathered)
            if writer:
                model.save_pretrained(init_dir)
    finally:
        for name, value in saved.items():
            model.peft_config[name].init_lora_weights = value


def save_loraga_model_final(model: Any, save_dir: str | os.PathLike[str]) -> None:
    """Save the trained adapter to ``save_dir`` converted to a plain LoRA adapter for the *unmodified* base model
    (peft's ``path_initial_model_for_weight_conversion``: the result holds ``B_final A_final - B_init A_init`` as a
    rank-``2r`` adapter), then remove the initial checkpoint and, in a ``loraga-fast init`` run folder, the offset
    base weights (``base_offset.safetensors``): the folder then holds just the adapter for the untouched base
    (plus the run's ``loraga_fast_init.json``).

    A base initialized with ``keep_base`` (or a quantized base with ``quantized_offset="none"``) was never offset:
    its trained adapter is saved as it is (rank ``r``; exact on the untouched base). With ``"requantize"`` the converted adapter on the
    untouched quantized base differs from the trained model by the requantization error of the offset.

    In a distributed run (DDP, FSDP, DeepSpeed ZeRO-3) call it on every process: process 0 writes, with the trained
    ZeRO-3 adapter weights gathered.

    Raises:
        FileNotFoundError: :func:`save_loraga_model_init` was not called with this ``save_dir``.
        ValueError: the model mixes LoRA-GA layers whose base was offset with quantized ones left untouched.
    """
    save_dir = os.fspath(save_dir)
    init_dir = os.path.join(save_dir, INIT_CHECKPOINT)
    if not os.path.isdir(init_dir):
        raise FileNotFoundError(
            f"No initial adapter in '{init_dir}': call save_loraga_model_init(model, {save_dir!r}) right after "
            "get_peft_model, before training."
        )
    from peft.tuners.lora.layer import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    untouched = [m for m in layers if m in UNTOUCHED_BASES]
    if untouched and len(untouched) < len(layers):
        raise UsageError(f"save_loraga_model_final: {len(untouched)} of the {len(layers)} LoRA layers have a base left "
                         "untouched (keep_base, or a quantized base with quantized_offset='none') and the others an "
                         "offset base; no single adapter converts both. Initialize every target the same way, or save "
                         "with model.save_pretrained and keep the offset base.")
    with writing(model) as writer:  # distributed: process 0 writes, the trained ZeRO-3 adapters gathered
        if not writer:
            return
        if untouched:  # the base was never offset: the trained adapter is the adapter for the untouched base
            model.save_pretrained(save_dir)
        else:
            model.save_pretrained(save_dir, path_initial_model_for_weight_conversion=init_dir)
        shutil.rmtree(init_dir)
        offsets = os.path.join(save_dir, OFFSETS_FILE)
        if os.path.isfile(offsets):  # only the initialized model needed it; the final adapter is for the untouched base
            os.remove(offsets)

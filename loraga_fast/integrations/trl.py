"""LoRA-GA in TRL in one line: :func:`init_lora_ga` turns the LoRA adapters a trainer created into LoRA-GA's.

TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer``, ...) take ``peft_config=`` and call
``get_peft_model`` inside ``__init__``, before any data has gone through the model, so peft finds no estimated
gradient and gives the adapters its default init (``B = 0``). :func:`init_lora_ga` then, before training::

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=lora_config)
    init_lora_ga(trainer, num_batches=64)      # lora_config: init_lora_weights="lora_ga", lora_ga_config=...
    trainer.train()

1. runs ``num_batches`` batches of the trainer's own train dataloader (dataset, collator, batch size, sampler,
   device placement) through its own ``compute_loss`` (SFT's, DPO's with its reference pass, ...) with every adapter
   disabled (``PeftModel.disable_adapter``), so the model the batches see is the base model the trainer was given;
   for the plan, the capture session and ZeRO-3's temporary engine, ``preprocess_loraga`` sees that base model with
   each LoRA layer swapped back for its base layer (the module names peft's ``target_modules`` match), the LoRA
   layers being put back only while the trainer's passes run;
2. estimates the mean gradients with :func:`~loraga_fast.api.preprocess.preprocess_loraga` (every mode and option
   of it: ``mode=``, ``until=``, ``keep_base=``, ``quantized_offset=``, ``cache_file=``, ...);
3. re-initializes each LoRA layer in place through peft's own ``LoraLayer.lora_ga_init`` (under peft's
   ``gather_params_ctx``, as ``get_peft_model`` calls it), i.e. the same adapters and base offset as
   ``preprocess_loraga`` followed by ``get_peft_model``.

One Trainer per process, as accelerate requires under DeepSpeed: the trainer built for training estimates. The
adapters' parameters stay the same ``nn.Parameter`` objects (only their data is replaced), and nothing has been
wrapped or optimized yet (``trainer.train()`` builds the optimizer, the scheduler, DDP and the DeepSpeed engine
afterwards), so no optimizer can hold stale parameters; a trainer that has trained or wrapped its model is refused.

Works for any ``transformers.Trainer`` whose model is a peft model (TRL's trainers subclass it). Importing this
module imports neither TRL nor transformers.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from torch import nn

from ..api.original import save_loraga_model_init
from ..api.preprocess import preprocess_loraga
from ..api.steps import train_step_from_trainer
from ..errors import UsageError

__all__ = ["init_lora_ga"]

TrainerT = TypeVar("TrainerT")

_GRAD_ATTR = "_peft_loraga_grad"  # peft's: what preprocess_loraga attaches and LoraLayer.lora_ga_init reads
# preprocess_loraga's options that change the adapters' ranks, which the trainer's get_peft_model already fixed
_RANK_OPTIONS = ("rank_budget", "min_rank", "max_rank")
# what a TRL trainer's compute_loss records for its logs (the estimation batches are not training steps)
_LOGGED = ("_metrics", "_total_train_tokens")


def init_lora_ga(trainer: TrainerT, *, num_batches: int | None = 64,
                 save_dir: str | os.PathLike[str] | None = None, adapter_name: str | None = None,
                 **preprocess_kwargs: Any) -> TrainerT:
    """Initialize the LoRA adapters of ``trainer``'s peft model with LoRA-GA, from the trainer's own batches and
    loss, before ``trainer.train()``; return the trainer.

    Args:
        trainer: a TRL trainer built with ``peft_config=LoraConfig(..., init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(...))`` (or any ``transformers.Trainer`` whose model is a ``PeftModel``
            with such a config), not yet trained.
        num_batches: batches of the trainer's train dataloader to estimate from (per process; default 64, the
            LoRA-GA paper's order of magnitude; None = one epoch). Training then starts from the same dataloader
            (its sampler is seeded by the arguments' ``seed``), so these are batches training sees.
        save_dir: if given, :func:`~loraga_fast.save_loraga_model_init` saves the initial adapter there (on every
            process; process 0 writes); after training, ``save_loraga_model_final(trainer.model, save_dir)`` then
            writes a plain LoRA adapter for the untouched base.
        adapter_name: the adapter to initialize (default: the model's active adapter).
        preprocess_kwargs: passed to :func:`~loraga_fast.preprocess_loraga` (``cache_file``, ``mode``,
            ``sketch_size``, ``passes``, ``quantized_offset``, ``until``, ``convergence_tol``, ``keep_base``,
            ``process_group``, ``progress``; default ``progress``: on the local main process unless the
            arguments' ``disable_tqdm``). Not ``rank_budget`` / ``min_rank`` / ``max_rank``: the ranks were fixed
            when the trainer built the adapters.

    Effects:
        Each LoRA layer of the adapter whose base layer saw a backward pass gets LoRA-GA's ``A``, ``B`` (and its
        base weight ``W - scaling B A``, unless ``keep_base``), exactly as ``preprocess_loraga`` +
        ``get_peft_model`` on the same batches would give; the others keep peft's default init (with a warning).
        The model's train/eval modes, ``requires_grad`` flags and the trainer's logged metrics are as before.

    Raises:
        UsageError: the trainer generates its own batches (GRPO, RLOO: online RL), its model is not a peft model,
            the adapter is not LoRA with ``init_lora_weights="lora_ga"`` and a ``lora_ga_config``, it uses DoRA, the
            adapter is no longer at peft's default init (``B != 0``: already initialized or trained), the trainer
            has trained, wrapped its model or stepped its optimizer, or a rank option is passed; and every refusal
            of ``preprocess_loraga`` (quantized layers other than bitsandbytes', ranks too large, no backward pass,
            ...), before any weight is touched.
    """
    peft_model, adapter, config = _check(trainer, adapter_name, preprocess_kwargs)
    layers = _lora_layers(peft_model, adapter)
    args = getattr(trainer, "args", None)
    if "progress" not in preprocess_kwargs:
        local_main = getattr(trainer, "is_local_process_zero", lambda: True)()
        preprocess_kwargs["progress"] = bool(local_main) and not getattr(args, "disable_tqdm", False)
    trainer_step = train_step_from_trainer(trainer, num_batches=num_batches)
    root = peft_model.get_base_model()
    bare = _BareBase(root, layers)

    def train_step() -> None:
        # the trainer's batches run through the peft model as it is (adapters disabled): trainers that ask peft
        # about its adapter layers (DPO's and KTO's reference passes under disable_adapter) find them
        with bare.restored():
            trainer_step()

    logged = {k: copy.deepcopy(trainer.__dict__[k]) for k in _LOGGED if k in trainer.__dict__}  # type: ignore[attr-defined]
    try:
        with peft_model.disable_adapter(), bare:
            # a copy: preprocess_loraga may fill in what peft left implicit; the model's own config stays as it is
            preprocess_loraga(root, copy.deepcopy(config), train_step, num_batches=num_batches, **preprocess_kwargs)
    finally:
        trainer.__dict__.update(logged)  # type: ignore[attr-defined]
    _reinitialize(layers, adapter, config)
    if save_dir is not None:
        save_loraga_model_init(peft_model, save_dir)
    return trainer


def _check(trainer: Any, adapter_name: str | None, kwargs: dict[str, Any]) -> tuple[Any, str, Any]:
    """The trainer's peft model, the adapter's name and its ``LoraConfig``, after every check that needs no data."""
    from peft import LoraConfig, PeftModel

    model = getattr(trainer, "model", None)
    if not isinstance(model, PeftModel):
        raise UsageError(f"init_lora_ga: the trainer's model is a {type(model).__name__}, not a peft model: build the "
                         "trainer with peft_config=LoraConfig(..., init_lora_weights='lora_ga', "
                         "lora_ga_config=LoraGAConfig()).")
    if getattr(trainer, "reward_funcs", None) is not None:
        raise UsageError(f"init_lora_ga: {type(trainer).__name__} generates its batches from the model it trains "
                         "(online RL), so estimating through it would consume its generation buffer and step counters "
                         "before training; estimate on fixed data instead (preprocess_loraga with "
                         "train_step_from_dataloader, then get_peft_model) and give the trainer that PeftModel.")
    passed = [k for k in _RANK_OPTIONS if k in kwargs]
    if passed:
        raise UsageError(f"init_lora_ga: {passed[0]}= changes the adapters' ranks, which the trainer's get_peft_model "
                         "already fixed; run preprocess_loraga(model, lora_config, ..., rank_budget=...) and "
                         "get_peft_model yourself and give the trainer that PeftModel.")
    step = getattr(getattr(trainer, "state", None), "global_step", 0) or 0
    if step > 0:
        raise UsageError(f"init_lora_ga: the trainer has already trained ({step} steps); call init_lora_ga(trainer) "
                         "right after building it, before trainer.train().")
    wrapped = getattr(trainer, "model_wrapped", model)
    if wrapped is not model or getattr(trainer, "deepspeed", None) is not None:
        raise UsageError(f"init_lora_ga: the trainer already wrapped its model ({type(wrapped).__name__}); call "
                         "init_lora_ga(trainer) before trainer.train().")
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is not None and len(getattr(optimizer, "state", ())) > 0:
        raise UsageError("init_lora_ga: the trainer's optimizer has already taken a step; call init_lora_ga(trainer) "
                         "before any training step.")
    adapter = adapter_name if adapter_name is not None else model.active_adapter
    config = model.peft_config.get(adapter)
    if config is None:
        raise UsageError(f"init_lora_ga: the model has no adapter {adapter!r} (it has {', '.join(model.peft_config)}).")
    if not isinstance(config, LoraConfig):
        raise UsageError(f"init_lora_ga: adapter {adapter!r} is a {type(config).__name__}; LoRA-GA initializes LoRA "
                         "adapters (peft_config=LoraConfig(...)).")
    if str(config.init_lora_weights).lower() != "lora_ga" or config.lora_ga_config is None:
        raise UsageError(f"init_lora_ga: adapter {adapter!r} has init_lora_weights={config.init_lora_weights!r}"
                         f"{' and no lora_ga_config' if config.lora_ga_config is None else ''}; build the trainer with "
                         "peft_config=LoraConfig(..., init_lora_weights='lora_ga', lora_ga_config=LoraGAConfig()).")
    if getattr(config, "use_dora", False):
        raise UsageError("init_lora_ga: DoRA (use_dora=True) is not supported: its magnitude vector was computed by "
                         "get_peft_model from the base weight before LoRA-GA's offset; use a plain LoRA config.")
    return model, adapter, config


def _lora_layers(peft_model: Any, adapter: str) -> list[Any]:
    """The outermost peft LoRA layers holding ``adapter``, each at its default init (checked: ``B == 0``)."""
    from peft.tuners.lora import LoraLayer

    layers: list[tuple[str, Any]] = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not any(name.startswith(outer + ".") for outer, _ in layers):
            layers.append((name, module))
    layers = [(n, m) for n, m in layers if adapter in m.lora_A]
    if not layers:
        raise UsageError(f"init_lora_ga: the model has no LoRA layer for adapter {adapter!r}.")
    for name, layer in layers:
        if adapter in layer.lora_variant:
            raise UsageError(f"init_lora_ga: layer '{name}' uses a LoRA variant "
                             f"({type(layer.lora_variant[adapter]).__name__}); LoRA-GA initializes plain LoRA layers.")
        if not hasattr(layer.lora_B[adapter], "weight"):  # lora.Embedding keeps its factors in lora_embedding_B
            continue
        if bool(layer.lora_B[adapter].weight.detach().ne(0).any()):
            raise UsageError(f"init_lora_ga: adapter {adapter!r} is not at peft's default init (lora_B of '{name}' is "
                             "nonzero): it was initialized or trained already; build a fresh trainer.")
    return [m for _, m in layers]


class _BareBase:
    """While entered, every LoRA layer of ``root`` is replaced by its base layer, so ``root`` is the model as it was
    before ``get_peft_model`` (its modules, their names, its function) for ``preprocess_loraga``'s plan, capture
    session and (ZeRO-3) temporary engine; :meth:`restored` puts the LoRA layers back for a block (the trainer's
    forward and backward passes, which reach the same base layers through them)."""

    def __init__(self, root: nn.Module, layers: Sequence[Any]) -> None:
        names = {id(m): n for n, m in root.named_modules()}
        self._slots: list[tuple[nn.Module, str, nn.Module]] = []
        for layer in layers:
            parent_name, _, child = names[id(layer)].rpartition(".")
            self._slots.append((root.get_submodule(parent_name), child, layer))
        self._bare = False

    def _put(self, bare: bool) -> None:
        for parent, child, layer in self._slots:
            setattr(parent, child, layer.get_base_layer() if bare else layer)
        self._bare = bare

    def __enter__(self) -> _BareBase:
        self._put(True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._put(False)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        was = self._bare
        self._put(False)
        try:
            yield
        finally:
            self._put(was)


def _reinitialize(layers: Sequence[Any], adapter: str, config: Any) -> None:
    """peft's ``lora_ga_init`` on each layer whose base has an estimated gradient, as ``get_peft_model`` calls it
    (``gather_params_ctx``: the whole base weight under DeepSpeed ZeRO-3); the same ``nn.Parameter`` objects keep
    the new factors (checked), so an optimizer built before holds the right ones."""
    from peft.utils.integrations import gather_params_ctx

    before = [(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight) for layer in layers
              if hasattr(layer.lora_B[adapter], "weight")]
    try:
        for layer in layers:
            base = layer.get_base_layer()
            if hasattr(base, _GRAD_ATTR):
                with gather_params_ctx(base.weight):
                    layer.lora_ga_init(adapter, config.lora_ga_config)
    finally:
        for layer in layers:  # a layer not consumed (an error above): nothing of the estimation stays on it
            base = layer.get_base_layer()
            if hasattr(base, _GRAD_ATTR):
                delattr(base, _GRAD_ATTR)
    after = [(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight) for layer in layers
             if hasattr(layer.lora_B[adapter], "weight")]
    assert all(a is c and b is d for (a, b), (c, d) in zip(before, after, strict=True)), "LoRA parameters were replaced"

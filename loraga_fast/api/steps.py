"""One-line ``train_step`` callbacks for :func:`loraga_fast.preprocess_loraga`: from a DataLoader or a Trainer.

LoRA-GA wants a full-fine-tuning-sized learning rate for the training that follows (the original authors use
about 2e-5 on 7B models), not a typical LoRA one: the adapters start aligned with the full gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["batch_loss", "train_step_from_dataloader", "train_step_from_trainer"]

LossFn = Callable[[Any, Any], torch.Tensor]


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The loss of one batch: dicts are passed as ``model(**batch)``, tuples/lists as ``model(*batch)``, a tensor
    as ``model(batch)``; the loss is ``loss_fn(outputs, batch)`` if given, else ``outputs.loss``.

    Raises:
        ValueError: the outputs carry no loss (and no ``loss_fn`` was given).
    """
    if isinstance(batch, Mapping):
        outputs = model(**batch)
    elif isinstance(batch, (list, tuple)):
        outputs = model(*batch)
    else:
        outputs = model(batch)
    if loss_fn is not None:
        return loss_fn(outputs, batch)
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise UsageError(
            f"The model's outputs ({type(outputs).__name__}) carry no loss: include labels in the batch "
            "(e.g. input_ids and labels for a causal LM) or pass loss_fn=lambda outputs, batch: ..."
        )
    return loss


def _model_device(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return param.device if param is not None else None


def train_step_from_dataloader(model: nn.Module, dataloader: Iterable[Any], *, num_batches: int | None = None,
                               device: torch.device | str | None = "auto",
                               loss_fn: LossFn | None = None) -> Callable[[], None]:
    """A ``train_step`` running forward and backward over ``dataloader`` (its first ``num_batches`` batches).

    Args:
        model: the model the batches go through.
        dataloader: any iterable of batches (dict, tuple/list or tensor).
        num_batches: stop after this many batches (default: the whole dataloader).
        device: where batches are moved; ``"auto"`` = the device of the model's first parameter, None = leave.
        loss_fn: ``loss_fn(outputs, batch) -> loss``; default ``outputs.loss``.

    Raises (when called):
        ValueError: the dataloader yielded no batch, or a batch gave no loss.
    """
    if num_batches is not None and num_batches < 1:
        raise UsageError(f"num_batches must be at least 1, got {num_batches}.")

    def train_step() -> None:
        target = _model_device(model) if device == "auto" else (torch.device(device) if device is not None else None)
        _backward_each(dataloader, num_batches, lambda b: batch_loss(model, _to_device(b, target), loss_fn),
                       "The dataloader yielded no batches: LoRA-GA needs at least one to estimate gradients.")

    return train_step


def _backward_each(batches: Iterable[Any], num_batches: int | None, loss_of: Callable[[Any], torch.Tensor],
                   empty: str) -> None:
    """``loss_of(batch).backward()`` for the first ``num_batches`` batches; raise ``UsageError(empty)`` if none."""
    seen = 0
    for batch in islice(batches, num_batches):
        loss_of(batch).backward()
        seen += 1
    if seen == 0:
        raise UsageError(empty)


def train_step_from_trainer(trainer: Any, *, num_batches: int | None = None) -> Callable[[], None]:
    """A ``train_step`` that runs the Trainer's own data path: its train dataloader (dataset, data collator,
    batch size), its input preparation (device placement) and its ``compute_loss`` (loss function, label
    smoothing), for ``num_batches`` batches (default: one epoch). Works for ``transformers.Trainer`` and its
    subclasses such as TRL's ``SFTTrainer``.
    """
    if num_batches is not None and num_batches < 1:
        raise UsageError(f"num_batches must be at least 1, got {num_batches}.")

    def train_step() -> None:
        model = trainer.model
        loader = trainer.get_train_dataloader()
        try:
            _backward_each(loader, num_batches, lambda b: trainer.compute_loss(model, trainer._prepare_inputs(b)),
                           "The Trainer's train dataloader yielded no batches.")
        finally:
            # accelerate's prepared loader registers itself in the GradientState when iterated and leaves it only
            # at its end: stopped after num_batches, it would stay there (and alive) while the trainer trains
            end = getattr(loader, "end", None)
            if callable(end):
                end()

    return train_step

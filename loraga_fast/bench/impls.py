"""The implementations the suites compare: ours and peft's ``preprocess_loraga`` (the baseline, run without
torch's warning about peft's own hooks), and how to undo what either leaves on a model."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["GRAD_ATTR", "IMPLS", "PEFT_HOOK_WARNING", "PreprocessFn", "clear_loraga_state", "get_impl"]

IMPLS: tuple[str, ...] = ("loraga_fast", "peft")
"""Implementations under test: ours first, then the baseline."""

GRAD_ATTR = "_peft_loraga_grad"
_PEFT_COUNT_ATTR = "_peft_loraga_grad_count"  # peft's temporary counter, removed by peft unless it failed midway

PreprocessFn = Callable[..., None]


def get_impl(impl: str) -> PreprocessFn:
    """``preprocess_loraga`` of ``"loraga_fast"`` (ours) or ``"peft"`` (the baseline)."""
    if impl == "loraga_fast":
        from loraga_fast import preprocess_loraga
    elif impl == "peft":
        from peft import preprocess_loraga as peft_preprocess

        return functools.partial(_quiet_peft_preprocess, peft_preprocess)
    else:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    return preprocess_loraga


PEFT_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"
"""What torch warns on every peft run: peft's ``preprocess_loraga`` registers full backward hooks on the target
layers, and the embeddings' outputs are the first to need a gradient. It is the baseline's, not a fault of the
benchmark: the suites run peft with it silenced."""


def _quiet_peft_preprocess(peft_preprocess: PreprocessFn, *args: Any, **kwargs: Any) -> Any:
    """peft's ``preprocess_loraga``, without torch's full-backward-hook warning (:data:`PEFT_HOOK_WARNING`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_HOOK_WARNING, category=UserWarning)
        return peft_preprocess(*args, **kwargs)


def clear_loraga_state(model: nn.Module) -> None:
    """Undo what a preprocess call leaves on the model: gradient attributes and any ``.grad``."""
    for module in model.modules():
        for attr in (GRAD_ATTR, _PEFT_COUNT_ATTR):
            if hasattr(module, attr):
                delattr(module, attr)
    for param in model.parameters():
        param.grad = None

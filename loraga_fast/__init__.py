"""loraga_fast: a drop-in replacement for peft's LoRA-GA preprocessing (fp32 gradient accumulation without
``.grad``, batched factorization, a low-memory mode; see the README for what is measured).

Usage (the only change from peft)::

    from loraga_fast import preprocess_loraga   # instead of: from peft import preprocess_loraga

    preprocess_loraga(model, lora_config, train_step)
    peft_model = peft.get_peft_model(model, lora_config)

Importing this package never touches a GPU and never requires one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _moved

from ._version import __version__

_EXPORTS = {
    "preprocess_loraga": "api.preprocess",
    "check_preprocess": "api.preprocess",
    "estimate_gradient": "api.original",
    "LoraGAContext": "api.original",
    "save_loraga_model_init": "api.original",
    "save_loraga_model_final": "api.original",
    "load_initialized": "api.runs",
    "save_offset_model": "api.export",
    "finalize_adapter": "api.finalize",
    "quantize_model": "api.quantize",
    "train_step_from_dataloader": "api.steps",
    "train_step_from_trainer": "api.steps",
    "init_lora_ga": "integrations.trl",
    "memory_estimate": "core.memory",
    "LowMemGradientUnavailable": "stores.placeholder",
    "UsageError": "errors",
}

__all__ = [  # noqa: RUF022 (the order of _EXPORTS)
    "__version__", "preprocess_loraga", "check_preprocess", "estimate_gradient", "LoraGAContext",
    "save_loraga_model_init", "save_loraga_model_final", "load_initialized", "save_offset_model", "finalize_adapter",
    "quantize_model",
    "train_step_from_dataloader", "train_step_from_trainer", "init_lora_ga", "memory_estimate",
    "LowMemGradientUnavailable", "UsageError",
]
assert set(__all__) == {"__version__", *_EXPORTS}

_moved.install()  # the 0.1 module paths (loraga_fast.peft_compat, ...) keep importing, with a DeprecationWarning

if TYPE_CHECKING:
    from .api.original import (
        LoraGAContext,
        estimate_gradient,
        save_loraga_model_final,
        save_loraga_model_init,
    )
    from .api.export import save_offset_model
    from .api.finalize import finalize_adapter
    from .api.preprocess import check_preprocess, preprocess_loraga
    from .api.quantize import quantize_model
    from .api.runs import load_initialized
    from .api.steps import train_step_from_dataloader, train_step_from_trainer
    from .core.memory import memory_estimate
    from .integrations.trl import init_lora_ga
    from .errors import UsageError
    from .stores.placeholder import LowMemGradientUnavailable


def __getattr__(name: str) -> Any:
    # peft and transformers are imported on first use, so `import loraga_fast` stays light (and trl never: the
    # integrations duck-type the trainer)
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'loraga_fast' has no attribute {name!r}")

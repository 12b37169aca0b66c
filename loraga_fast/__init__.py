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

__version__ = "0.1.0"

_EXPORTS = {
    "preprocess_loraga": "peft_compat",
    "estimate_gradient": "original",
    "LoraGAContext": "original",
    "save_loraga_model_init": "original",
    "save_loraga_model_final": "original",
    "load_initialized": "runs",
    "train_step_from_dataloader": "steps",
    "train_step_from_trainer": "steps",
    "memory_estimate": "memory",
    "UsageError": "errors",
}

__all__ = [  # noqa: RUF022 (the order of _EXPORTS)
    "__version__", "preprocess_loraga", "estimate_gradient", "LoraGAContext", "save_loraga_model_init",
    "save_loraga_model_final", "load_initialized", "train_step_from_dataloader", "train_step_from_trainer",
    "memory_estimate", "UsageError",
]
assert set(__all__) == {"__version__", *_EXPORTS}

if TYPE_CHECKING:
    from .errors import UsageError
    from .memory import memory_estimate
    from .original import (
        LoraGAContext,
        estimate_gradient,
        save_loraga_model_final,
        save_loraga_model_init,
    )
    from .peft_compat import preprocess_loraga
    from .runs import load_initialized
    from .steps import train_step_from_dataloader, train_step_from_trainer


def __getattr__(name: str) -> Any:
    # peft and transformers are imported on first use, so `import loraga_fast` stays light
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'loraga_fast' has no attribute {name!r}")

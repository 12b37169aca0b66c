"""loraga_fast: a fast, memory-lean drop-in replacement for peft's LoRA-GA preprocessing.

Usage (the only change from peft)::

    from loraga_fast import preprocess_loraga   # instead of: from peft import preprocess_loraga

    preprocess_loraga(model, lora_config, train_step)
    peft_model = peft.get_peft_model(model, lora_config)

Importing this package never touches a GPU and never requires one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "preprocess_loraga"]

if TYPE_CHECKING:
    from .peft_compat import preprocess_loraga


def __getattr__(name: str) -> Any:
    # peft and transformers are imported on first use, so `import loraga_fast` stays light
    if name == "preprocess_loraga":
        from .peft_compat import preprocess_loraga

        return preprocess_loraga
    raise AttributeError(f"module 'loraga_fast' has no attribute {name!r}")

"""Which layers LoRA-GA initializes and at which rank, by peft's own rules; the checks that need only shapes.

Shared by every entry point (``preprocess_loraga``, ``estimate_gradient``, ``LoraGAContext``, ``memory_estimate``)
so target discovery, rank checks and the "layers left out" warnings are written once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import UsageError
from .kinds import is_supported_layer
from .quantized import unsupported_quantized

__all__ = ["GRAD_ATTR", "check_ranks", "fill_default_target_modules", "find_targets", "layer_ranks", "short_list",
           "warn_left_out"]

logger = logging.getLogger("loraga_fast")

GRAD_ATTR = "_peft_loraga_grad"  # the attribute peft's lora_ga_init reads (same name as peft's)


def fill_default_target_modules(model: nn.Module, lora_config: Any) -> None:
    """Fill ``lora_config.target_modules`` from peft's per-architecture defaults when it is None, as peft does.

    Raises:
        ValueError: peft has no default for this model type (peft's own message).
    """
    if lora_config.target_modules is not None:
        return
    from peft.tuners.lora.model import LoraModel

    model_config = LoraModel.get_model_config(model)
    target_modules = LoraModel.target_module_mapping.get(model_config["model_type"])
    if target_modules is None:
        raise UsageError("Please specify `target_modules` in `peft_config`")
    lora_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)


def find_targets(model: nn.Module, lora_config: Any) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs LoRA-GA initializes: modules peft's own rules match whose type is
    ``nn.Linear`` or transformers ``Conv1D`` (other matched types are skipped, as in peft).

    bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers are targets like ``nn.Linear`` (their gradient with
    respect to the dequantized weight is captured).

    Raises:
        ValueError: a matched module is quantized by a library other than bitsandbytes.
    """
    from peft.tuners.lora.model import LoraModel

    targets = []
    for name, module in model.named_modules():
        if not LoraModel._check_target_module_exists(lora_config, name):
            continue
        kind = unsupported_quantized(module)
        if kind is not None:
            raise UsageError(
                f"Layer '{name}' is a {kind} quantized layer ({type(module).__module__}.{type(module).__qualname__}); "
                "loraga_fast captures nn.Linear, transformers Conv1D and bitsandbytes Linear4bit (nf4/fp4) and "
                "Linear8bitLt layers. Load the model with bitsandbytes quantization (BitsAndBytesConfig) or in "
                "floating point, or exclude the layer (exclude_modules=[...])."
            )
        if is_supported_layer(module):
            targets.append((name, module))
    return targets


def layer_ranks(lora_config: Any, names: Iterable[str]) -> dict[str, int]:
    """Each layer's LoRA rank as peft will set it (``rank_pattern`` matched with peft's own rule)."""
    from peft.utils.other import get_pattern_key

    pattern = getattr(lora_config, "rank_pattern", None) or {}
    return {name: pattern.get(get_pattern_key(pattern.keys(), name), lora_config.r) for name in names}


def check_ranks(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], names: Iterable[str]) -> None:
    """Raise ``ValueError`` for the first layer of ``names`` whose rank ``r`` has ``2 r > min(weight shape)``
    (LoRA-GA takes ``2r`` singular directions of the gradient)."""
    for name in names:
        shape = tuple(shapes[name])
        if 2 * ranks[name] > min(shape):
            raise UsageError(
                f"LoRA-GA needs 2 * r <= min(out_features, in_features), but layer '{name}' has a weight of shape "
                f"{shape} and r={ranks[name]}: r can be at most {min(shape) // 2} there; lower r (or set rank_pattern "
                "for it) or exclude the layer."
            )


def short_list(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c, ...``: the first ``limit`` names, for messages."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def warn_left_out(names: Sequence[str], seen: Iterable[str], zero: Iterable[str], *, what: str) -> None:
    """Log the targets that get no LoRA-GA init: those that saw no backward pass and those whose gradient is zero.

    ``what`` says what happens to them (e.g. "keep peft's default init", "are left out").
    """
    seen = set(seen)
    missing = [name for name in names if name not in seen]
    if missing:
        logger.warning("LoRA-GA: %d of %d target layers saw no backward pass in train_step and %s: %s",
                       len(missing), len(names), what, short_list(missing))
    zero = [name for name in names if name in set(zero)]
    if zero:
        logger.warning("LoRA-GA: the mean gradient of %d layer(s) is all zero (the loss never reached them); they get "
                       "peft's default LoRA init: %s", len(zero), short_list(zero))

"""What a target layer is: the layer types LoRA-GA initializes and how each stores its weight.

``nn.Linear`` stores ``(out, in)``; transformers' ``Conv1D`` (GPT-2 style) stores ``(in, out)``. Every module that
reads a target's shape or layout asks here, so the two layouts (and FSDP1's flattened views) are handled once.
"""

from __future__ import annotations

from torch import nn

__all__ = ["conv1d_class", "is_supported_layer", "math_shape", "weight_layout_transposed", "weight_shape"]


def conv1d_class() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` (GPT-2 style linear layer, weight stored ``(in, out)``), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the capture usable without it
        return None
    return Conv1D


def is_supported_layer(module: nn.Module) -> bool:
    """True for the layer types LoRA-GA targets: ``nn.Linear`` (bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``
    included) and transformers ``Conv1D``."""
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """The layer's 2-D weight shape, ``(out, in)`` for ``nn.Linear`` and ``(in, out)`` for ``Conv1D``, also when the
    weight is held flattened (FSDP1's sharded views outside forward)."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return (module.nx, module.nf)  # type: ignore[return-value]  # transformers Conv1D


def weight_layout_transposed(module: nn.Module) -> bool:
    """True when the layer stores its weight as ``(in, out)`` (``Conv1D``), False for ``(out, in)``."""
    return not isinstance(module, nn.Linear)


def math_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a target: the shape of ``A = G^T X`` whatever the storage layout."""
    rows, cols = weight_shape(module)
    return (cols, rows) if weight_layout_transposed(module) else (rows, cols)


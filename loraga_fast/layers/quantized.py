"""Quantized target layers (QLoRA bases): bitsandbytes ``Linear4bit`` (nf4 / fp4) and ``Linear8bitLt``.

A quantized layer computes ``y = x_c W_q^T + b`` with ``W_q`` its dequantized weight and ``x_c`` the input cast
to its compute dtype, so the gradient with respect to the (dequantized) weight is still ``G^T x_c``: the capture
op needs only ``G`` and ``x_c``, never a float copy of the weight. The layer's own forward (and its own input
gradient) runs unchanged; :mod:`loraga_fast.layers.capture` wraps it.

Other quantized kinds peft can wrap (GPTQ, AWQ, HQQ, EETQ, AQLM, torchao, ...) are refused with an error naming
the layer (:func:`unsupported_quantized`). bitsandbytes is imported only when such a layer is present.

The LoRA-GA base offset ``W - s B A`` cannot be stored exactly in 4 or 8 bits; :func:`offset_weight` implements
the strategies of ``preprocess_loraga(quantized_offset=...)``.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

__all__ = ["OFFSETS", "UNTOUCHED_BASES", "consumed_input", "dense_weight", "dequantized_weight", "is_bnb_quantized", "offset_weight",
           "unsupported_quantized"]

OFFSETS = ("requantize", "none")
"""``requantize``: dequantize, subtract ``s B A`` in fp32, quantize again with the layer's own settings (what the
original LoRA-GA repository does); ``none``: leave the quantized base untouched (the model's function then
changes by ``s B A`` at initialization)."""

UNTOUCHED_BASES: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""peft LoRA layers initialized by LoRA-GA whose quantized base was left as it was (``quantized_offset="none"``):
their trained adapter is, as saved, already the adapter for the untouched base (save_loraga_model_final)."""

# module path prefixes / class names of quantized linear layers peft can target, by library
_OTHER_KINDS = {
    "auto_gptq": "GPTQ (auto-gptq)", "gptqmodel": "GPTQ (gptqmodel)", "optimum.gptq": "GPTQ (optimum)",
    "awq": "AWQ", "hqq": "HQQ", "eetq": "EETQ", "aqlm": "AQLM", "torchao": "torchao", "optimum.quanto": "quanto",
    "quanto": "quanto", "compressed_tensors": "compressed-tensors", "vptq": "VPTQ",
}


def is_bnb_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes ``Linear4bit`` (and its ``LinearNF4`` / ``LinearFP4`` subclasses) and ``Linear8bitLt``."""
    if "bitsandbytes" not in sys.modules:
        return False
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def unsupported_quantized(module: nn.Module) -> str | None:
    """The kind of a quantized layer loraga_fast cannot capture (e.g. ``"GPTQ (auto-gptq)"``), or None."""
    if is_bnb_quantized(module):
        return None
    path = type(module).__module__
    for prefix, kind in _OTHER_KINDS.items():
        if path == prefix or path.startswith(prefix + "."):
            return kind
    weight = getattr(module, "weight", None)
    if hasattr(module, "quant_state") or hasattr(weight, "quant_state"):  # quantized by something else than bnb
        return f"non-bitsandbytes ({type(module).__qualname__} with a quant_state)"
    if hasattr(module, "qweight") or hasattr(module, "W_q"):
        return f"qweight-based ({type(module).__qualname__})"
    if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter) and \
            type(weight).__module__.split(".")[0] in ("torchao", "optimum", "quanto"):
        return f"{type(weight).__module__.split('.')[0]} tensor subclass ({type(weight).__qualname__})"
    return None


def consumed_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as the quantized matmul consumes it: ``Linear4bit`` casts it to its compute dtype (set from the
    first input when the layer has none yet), ``Linear8bitLt`` takes it as is."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        if not module.compute_type_is_set:
            return x  # the layer's own forward is about to set compute_dtype from x (its dtype)
        if module.compute_dtype is not None:
            return x.to(module.compute_dtype)
    return x


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the quantized matmul uses it, ``(out, in)`` in fp32 (a temporary copy)."""
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    state = module.state
    cb = state.CB if state.CB is not None else weight.data
    scb = state.SCB if state.SCB is not None else weight.SCB
    return cb.to(torch.float32) * (scb.to(torch.float32)[:, None] / 127.0)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight in fp32 as its forward uses it: dequantized for a quantized layer, else the weight (a
    copy only where a cast or dequantization is needed)."""
    if is_bnb_quantized(module):
        return dequantized_weight(module)
    return module.weight.detach().to(torch.float32)


@torch.no_grad()
def offset_weight(module: nn.Module, delta: torch.Tensor, strategy: str) -> None:
    """Apply ``W <- W - delta`` (``delta`` fp32 ``(out, in)``) to a quantized layer with ``strategy``
    (:data:`OFFSETS`): ``requantize`` quantizes ``dequantized - delta`` again with the layer's own settings
    (blocksize, quant type, double quantization, storage dtype); ``none`` leaves the weight untouched."""
    if strategy == "none":
        return
    if strategy != "requantize":
        raise ValueError(f"quantized_offset must be one of {', '.join(OFFSETS)}, got {strategy!r}")
    import bitsandbytes as bnb

    new = dequantized_weight(module)
    new.sub_(delta.to(new.device))
    weight = module.weight
    device = weight.device
    if isinstance(module, bnb.nn.Linear4bit):
        qs = weight.quant_state
        dtype = module.compute_dtype or qs.dtype or torch.float32
        module.weight = bnb.nn.Params4bit(
            new.to(dtype), requires_grad=False, quant_type=qs.quant_type, blocksize=qs.blocksize,
            compress_statistics=qs.nested, quant_storage=weight.quant_storage, module=module,
        ).to(device)
    else:
        module.weight = bnb.nn.Int8Params(new.to(torch.float16), requires_grad=False,
                                          has_fp16_weights=False).to(device)
        module.state.CB = None
        module.state.SCB = None

"""Loading a model quantized with bitsandbytes (QLoRA bases), as transformers does it: for library users and the
``loraga-fast init --quantize`` command alike."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from ..errors import UsageError

__all__ = ["QUANTIZE", "bnb_config", "quantize_model", "save_plain"]

QUANTIZE = ("nf4", "fp4", "int8")  # the kinds quantize_model (and loraga-fast init --quantize) take


def bnb_config(kind: str, dtype: Any) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of ``kind``: ``nf4`` / ``fp4`` (4-bit, ``dtype`` as compute dtype) or
    ``int8``."""
    from transformers import BitsAndBytesConfig

    if kind not in QUANTIZE:
        raise UsageError(f"unknown quantization {kind!r}: use one of {', '.join(QUANTIZE)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("quantizing a model needs bitsandbytes: pip install bitsandbytes")
    options = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype),
               "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=dtype),
               "int8": dict(load_in_8bit=True)}[kind]
    return BitsAndBytesConfig(**options)


def save_plain(model: Any, folder: str | os.PathLike[str]) -> None:
    """``model.save_pretrained(folder)``; a model transformers marks as quantized (one loaded from a GGUF file, which
    it refuses to save) is saved through a plain copy of its current weights."""
    import copy

    if getattr(model, "hf_quantizer", None) is None:
        model.save_pretrained(folder)
        return
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(model)(config).to(next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)


def quantize_model(model: Any, kind: str, dtype: Any, device: Any) -> Any:
    """``model`` loaded back quantized by transformers with bitsandbytes (:func:`bnb_config`), through a temporary
    folder, on ``device``. Every linear layer but the output head is quantized, as ``BitsAndBytesConfig`` does."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    config = bnb_config(kind, dtype)
    with tempfile.TemporaryDirectory(prefix="loraga_fast_quantize_") as folder:
        save_plain(model, folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                      device_map=str(torch.device(device)), dtype=dtype)
    # the model's name, not the deleted temporary folder (peft records it as the adapter's base_model_name_or_path)
    loaded.name_or_path = loaded.config._name_or_path = getattr(model, "name_or_path", "")
    return loaded


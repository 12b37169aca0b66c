"""What the ``loraga-fast init`` command reads: a model (folder, GGUF file, hub name or the embedded default) and
text (a file or the embedded default), turned into batches."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sysconfig
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["ByteTokenizer", "CliError", "QUANTIZE", "bnb_config", "load_model", "make_batches", "quantize_model",
           "read_text", "save_plain",
           "stdlib_text"]

# a hub id: "name" or "org/name" (letters, digits, "-", "_", "."), not starting with "." or "/"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")

STDLIB_FILES = ["functools.py", "inspect.py", "argparse.py", "dataclasses.py", "typing.py", "pathlib.py"]


class CliError(UsageError):
    """An error in the command's arguments or inputs; printed as one line, like the library's :class:`UsageError`."""


class ByteTokenizer:
    """The embedded default's tokenizer: UTF-8 bytes, ids 0..255."""

    vocab_size = 256

    def __call__(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def stdlib_text() -> str:
    """A real text corpus that ships with Python: some standard-library modules' source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / name).read_text(encoding="utf-8") for name in STDLIB_FILES if (root / name).exists())


def read_text(path: str, text_field: str) -> str:
    """Text of a ``.txt`` file, or the ``text_field`` of every line of a ``.jsonl`` file."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"--data file not found: {path}")
    if p.suffix in (".jsonl", ".json"):
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise CliError(f"{path}, line {i}: no field {text_field!r} (fields: {', '.join(record)}); set --text-field")
            texts.append(str(record[text_field]))
        return "\n\n".join(texts)
    return p.read_text(encoding="utf-8")


def load_model(model: str | None, dtype: Any, device: Any, seed: int) -> tuple[Any, Any, str]:
    """(model, tokenizer, description). ``model``: a folder, a ``.gguf`` file, a hub name, or None (default)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if model is None:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=256, intermediate_size=688,
                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=1024, use_cache=False)
        return LlamaForCausalLM(config).to(device=device, dtype=dtype), ByteTokenizer(), "embedded default (LLaMA config, 256 hidden, 4 layers, random weights)"
    path = Path(model)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CliError(f"--model GGUF file not found: {model}")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists():
        source = str(path)
    elif not _HUB_ID.fullmatch(model):  # a path (absolute, relative, or several levels deep) that is not there
        raise CliError(f"--model folder not found: {model}")
    else:
        source = model  # a hub id, "name" or "org/name": transformers resolves it (local cache, HF_HUB_OFFLINE)
    try:
        tok = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        where = ("" if source != model else " (not a local folder; looked up as a hub id in the local cache and, "
                 "unless HF_HUB_OFFLINE=1, on the hub)")
        raise CliError(f"could not load --model {model!r}{where}: {str(err).splitlines()[0]}") from err
    return loaded.to(device), tok, f"{type(loaded).__name__} from {model}"


def make_batches(text: str, tokenizer: Any, batches: int, batch_size: int, seq_len: int) -> list[Any]:
    import torch

    ids = tokenizer(text) if isinstance(tokenizer, ByteTokenizer) else tokenizer(text)["input_ids"]
    need = batches * batch_size * seq_len
    if len(ids) < need:
        raise CliError(
            f"the data has {len(ids)} tokens, but --batches {batches} x --batch-size {batch_size} x --seq-len {seq_len} "
            f"needs {need}: use more data or lower one of them"
        )
    t = torch.tensor(ids[:need], dtype=torch.long).view(batches, batch_size, seq_len)
    return [{"input_ids": b, "labels": b} for b in t]


# ------------------------------------------------------------------------------------------------- init


QUANTIZE = ("nf4", "fp4", "int8")


def bnb_config(kind: str, dtype: Any) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of ``kind``: ``nf4`` / ``fp4`` (4-bit, ``dtype`` as compute dtype) or
    ``int8``."""
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise CliError("--quantize needs bitsandbytes: pip install bitsandbytes")
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
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                    device_map=str(torch.device(device)), dtype=dtype)

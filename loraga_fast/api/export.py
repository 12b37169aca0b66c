"""The offset base as a complete transformers model folder (``loraga-fast init --export-model``: ``RUN/model``).

LoRA-GA rewrites the base weights (``W -> W - (alpha / r) B0 A0``), so its initial adapter, and every adapter trained
from it, works only on that rewritten base. Frameworks that fine-tune from a model folder plus an adapter
(LLaMA-Factory's ``model_name_or_path`` + ``adapter_name_or_path``, axolotl's ``base_model`` + ``lora_model_dir``, ...)
can start from LoRA-GA when the rewritten base is such a folder: :func:`save_offset_model` writes it, and
:func:`loraga_fast.finalize_adapter` turns what they trained into a plain adapter for the untouched base.

The folder is what ``PreTrainedModel.save_pretrained`` writes (``config.json``, ``generation_config.json``, safetensors
shards named ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``, or one
``model.safetensors``; the tokenizer's files when one is given), written shard by shard from the live model's
tensors: no second copy of the model is made (the host memory it needs is at most about two shards, for a model on
a GPU). Each shard's metadata and ``config.json`` (key ``loraga_fast_run_id``, which transformers keeps) carry the
run id; files get the user's umask (:func:`apply_umask`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..stores.files import umask
from .names import RUN_ID_KEY

__all__ = ["CONFIG_RUN_ID_KEY", "SHARD_BYTES", "apply_umask", "model_folder_run_id", "save_offset_model"]

SHARD_BYTES = 2 * 2**30
"""The largest shard :func:`save_offset_model` writes by default (2 GiB; a single larger tensor gets a shard of
its own, as in transformers): 7 shards for LLaMA-7B in bf16."""

CONFIG_RUN_ID_KEY = "loraga_fast_run_id"  # in the exported config.json (transformers keeps unknown keys)
_INDEX = "model.safetensors.index.json"


def save_offset_model(peft_model: Any, folder: str | os.PathLike[str], *, tokenizer: Any = None,
                      run_id: str | None = None, max_shard_bytes: int | None = None) -> None:
    """Write ``peft_model``'s base model, with its LoRA-GA offset weights, as a transformers model folder.

    ``AutoModelForCausalLM.from_pretrained(folder)`` then loads the offset base ``W - (alpha / r) B0 A0`` (no
    loraga_fast needed), and ``PeftModel.from_pretrained(that, init_adapter)`` gives the original model's outputs.
    Call it after ``get_peft_model`` (before training); the adapter itself is not written (use
    :func:`~loraga_fast.save_loraga_model_init`).

    Args:
        peft_model: a ``PeftModel`` whose LoRA-GA initialization offset its base weights in place, on one process
            (not sharded by FSDP or ZeRO-3), with floating-point weights.
        folder: the folder to write (created; files in it with the same names are replaced).
        tokenizer: its files are written too when given (anything with ``save_pretrained``).
        run_id: stamped into every shard's safetensors metadata (``loraga_fast.run_id``) and into ``config.json``
            (``loraga_fast_run_id``).
        max_shard_bytes: the largest shard (one larger tensor gets its own); default :data:`SHARD_BYTES`.

    Raises:
        UsageError: the base is quantized (bitsandbytes: its offset is not stored; see the docs), its weights are
            sharded or partitioned, or ``peft_model`` is not a peft model of a transformers model.
    """
    from safetensors.torch import save_file

    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else None
    if model is None or not hasattr(model, "config") or not hasattr(model, "can_generate"):
        raise UsageError("save_offset_model: expected the PeftModel of a transformers model (get_peft_model's result)")
    folder = Path(folder)
    state = _base_state_dict(model)
    _check_plain(state)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    config.dtype = str(dtype).split(".")[1]
    if _transformers_major() < 5:
        config.torch_dtype = config.dtype
    if run_id is not None:
        setattr(config, CONFIG_RUN_ID_KEY, run_id)
    config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    metadata = {"format": "pt", **({RUN_ID_KEY: run_id} if run_id is not None else {})}
    shards = list(_shards(state, SHARD_BYTES if max_shard_bytes is None else max_shard_bytes))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, shards):
        # CPU tensors are written as they are (views of the live weights); a GPU model's shard is copied to the host
        save_file({k: state[k].detach().contiguous().cpu() for k in keys}, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total, "total_parameters": sum(t.numel() for t in state.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    apply_umask(folder)


def apply_umask(folder: str | os.PathLike[str]) -> None:
    """Give every file under ``folder`` the mode ``0o666`` and every folder ``0o777``, less the user's umask, as
    ``open`` and ``mkdir`` do: safetensors writes its files with mode ``0o600`` whatever the umask (through a
    temporary file), so a shared model folder would be readable by its owner only."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def model_folder_run_id(folder: str | os.PathLike[str]) -> str | None:
    """The run id in a model folder's ``config.json`` (written by :func:`save_offset_model`), or None."""
    config = Path(folder) / "config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get(CONFIG_RUN_ID_KEY)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The state dict the bare transformers model would have: each peft LoRA layer contributes its base layer's
    tensors under the layer's own name (``q_proj.base_layer.weight`` -> ``q_proj.weight``), its adapter tensors
    are left out; tied weights are kept once and transformers' weight conversions reverted, as
    ``save_pretrained`` does. The tensors are the live ones (no copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrappers = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = max((w for w in wrappers if key.startswith(w + ".")), key=len, default=None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if not rest.startswith("base_layer."):  # the adapter's own tensors
                continue
            if owner.endswith(".base_layer"):
                raise UsageError(f"save_offset_model: '{owner}' nests one adapter layer in another: export a model "
                                 "with a single LoRA adapter")
            key = f"{owner}.{rest[len('base_layer.'):]}"
        state[key] = tensor
    return _untied(state, model)


def _untied(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    try:  # transformers >= 5: its own rules (which name of a tied pair to keep; conversions to revert)
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers 4: keep the first name of tensors sharing storage (from_pretrained re-ties)
        seen: set[tuple[int, int]] = set()
        kept = {}
        for key, tensor in state.items():
            ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.device.type != "meta" else (id(tensor), 0)
            if ptr not in seen:
                seen.add(ptr)
                kept[key] = tensor
        return kept
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def _check_plain(state: dict[str, torch.Tensor]) -> None:
    for key, tensor in state.items():
        kind = type(tensor).__name__
        if kind in ("Params4bit", "Int8Params") or (not tensor.is_floating_point() and key.endswith(".weight")
                                                     and tensor.dtype in (torch.uint8, torch.int8)):
            raise UsageError(f"save_offset_model: '{key}' is a quantized (bitsandbytes) weight: a quantized base is "
                             "left untouched by LoRA-GA here, so there is no offset base to export; train the initial "
                             "adapter on the original model loaded quantized the same way")
        if kind == "DTensor" or hasattr(tensor, "ds_id") or tensor.device.type == "meta":
            raise UsageError(f"save_offset_model: '{key}' is sharded, partitioned or offloaded ({kind} on "
                             f"{tensor.device.type}): export from one process with the whole model in memory")


def _shards(state: dict[str, torch.Tensor], limit: int) -> Iterator[list[str]]:
    """The keys in order, cut into runs of at most ``limit`` bytes (a larger tensor alone)."""
    shard: list[str] = []
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            yield shard
            shard, size = [], 0
        shard.append(key)
        size += nbytes
    if shard:
        yield shard

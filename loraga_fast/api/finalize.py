"""An adapter trained anywhere from a run's offset base, turned into a plain LoRA adapter for the untouched base.

``loraga-fast init --export-model`` writes ``RUN/model`` (the offset base ``W' = W - s B0 A0``, ``s = alpha / r``) and
``RUN/init_lora_checkpoint`` (``B0``, ``A0``). A framework trains the adapter on ``W'`` to ``B``, ``A``: the trained
model is ``W' + s B A = W + s (B A - B0 A0)``. :func:`finalize_adapter` writes that difference as a LoRA adapter of
rank ``2r`` for ``W`` itself, as peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does:
``B_final = [B, -B0]``, ``A_final = [A; A0]``, ``r`` and ``lora_alpha`` doubled (the scaling is unchanged), from the
adapter files alone (no model is loaded). With ``merge=True`` it loads the untouched base, applies that adapter and
writes the merged model folder instead.

The trained adapter must come from the run: the same LoRA tensors (targets) with the same shapes (ranks) and the same
scaling as the initial adapter; a run id in its safetensors metadata, where the framework kept it, must be the run's.
The output folder is written under a temporary name beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .names import ADAPTER_WEIGHTS, INIT_CHECKPOINT, OFFSETS_FILE, RUN_ID_KEY, SUMMARY_FILE

__all__ = ["FINAL_KEY", "finalize_adapter"]

FINAL_KEY = "loraga_fast.final"  # safetensors metadata of an adapter finalize_adapter wrote ("1")
_ADAPTER_CONFIG = "adapter_config.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fields of an adapter config that fix each layer's LoRA scaling alpha / r (or alpha / sqrt(r) with rslora)
_SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def finalize_adapter(run: str | os.PathLike[str], trained_adapter: str | os.PathLike[str],
                     out: str | os.PathLike[str], *, merge: bool = False,
                     base: str | os.PathLike[str] | None = None) -> Path:
    """Convert ``trained_adapter`` (trained from ``RUN/model`` and ``RUN/init_lora_checkpoint`` by any framework) into
    a plain LoRA adapter for the untouched original model, written to ``out``; or, with ``merge``, the original
    model with that adapter merged in, as a transformers model folder.

    The adapter is ``[B, -B0] [A; A0]`` at rank ``2r`` with ``lora_alpha`` doubled (peft's conversion; a run whose
    quantized base was left untouched, ``--quantize``, needs none: its adapter is copied as it is). Its config names
    the run's original model as ``base_model_name_or_path``, so ``PeftModel.from_pretrained(original, out)`` (or
    ``AutoPeftModelForCausalLM.from_pretrained(out)``) gives the trained model's outputs.

    Args:
        run: the ``--out`` folder of ``loraga-fast init``; or, from Python, the ``save_dir`` of
            :func:`~loraga_fast.save_loraga_model_init` (its ``init_lora_checkpoint``; with no run record, the base is
            taken to be offset, the merge needs ``base``, and no run id is checked).
        trained_adapter: the folder a framework saved the trained adapter in (``adapter_config.json`` and
            ``adapter_model.safetensors``, as peft's ``save_pretrained`` writes them).
        out: the folder to write; it must not exist yet (or be empty). Written under a temporary name beside it,
            then renamed, so it is never half-written; files get the user's umask.
        merge: write the merged model (``config.json``, safetensors shards, the tokenizer when the base has one)
            instead of the adapter; the base is loaded on the CPU in the run's ``--dtype``.
        base: with ``merge``, the original model (a folder, a ``.gguf`` file or a hub id); default: the ``--model``
            the run recorded.

    Returns:
        ``out``.

    Raises:
        UsageError: ``run`` is not a run folder, ``trained_adapter`` is not a LoRA adapter (missing, a model folder,
            pickled weights only, DoRA) or not one of this run (other targets, ranks or scaling; another run id), ``out``
            exists and is not empty or cannot be written, ``base`` is given without ``merge``, ``merge`` has no base
            to load or the base is not the run's model. Nothing is written then.
    """
    from .export import apply_umask
    from .runs import new_run_id, write_atomically

    run, trained, out = Path(run), Path(trained_adapter), Path(out)
    if base is not None and not merge:
        raise UsageError(f"--base {base} applies with --merge only (the adapter alone needs no base model): add --merge "
                         "or drop --base")
    summary, init_dir = _read_run(run)
    _check_out(out)
    init_config, init_tensors, init_meta = _read_adapter(init_dir, f"{run}'s initial adapter {init_dir}")
    config, tensors, meta = _read_adapter(trained, f"the trained adapter {trained}")
    run_id = summary.get("run_id")
    _check_belongs(trained, run, run_id, init_config, init_tensors, init_meta, config, tensors, meta)
    untouched = bool(summary.get("base_untouched"))
    final_tensors, final_config = (tensors, dict(config)) if untouched else _converted(config, tensors, init_tensors)
    final_config["base_model_name_or_path"] = summary.get("model_path")
    final_config["inference_mode"] = True
    base_path = None
    if merge:
        base_path = os.fspath(base) if base is not None else summary.get("model_path")
        if base_path is None:
            raise UsageError(f"--merge needs the untouched model and {run} records none (the embedded default model, or "
                             "a save_loraga_model_init folder): pass --base MODEL (its folder or hub id)")
        _check_base_source(base_path)
    metadata = {"format": "pt", FINAL_KEY: "1", **({RUN_ID_KEY: run_id} if run_id else {})}

    def write(folder: Path) -> None:
        adapter_dir = folder / ".adapter" if merge else folder
        _write_adapter(adapter_dir, final_config, final_tensors, metadata)
        if merge:
            _write_merged(folder, adapter_dir, str(base_path), run, summary)
        apply_umask(folder)

    write_atomically(out, new_run_id(), write)
    return out


def _read_run(run: Path) -> tuple[dict[str, Any], Path]:
    """The run's record and its initial adapter's folder, or a one-line error saying what ``run`` is instead."""
    from .runs import _check_one_run, run_ids

    what = "give the --out folder of loraga-fast init"
    if not run.exists():
        raise UsageError(f"run folder {run} not found: {what}")
    if not run.is_dir():
        raise UsageError(f"run folder {run} is a file, not a folder: {what}")
    summary_path = run / SUMMARY_FILE
    init_dir = run / INIT_CHECKPOINT
    if not summary_path.is_file() and not init_dir.is_dir():
        swapped = (" (it holds an adapter: is the order RUN TRAINED_ADAPTER swapped?)"
                   if (run / _ADAPTER_CONFIG).is_file() else "")
        raise UsageError(f"{run} is not a loraga-fast run folder (no {SUMMARY_FILE}, no {INIT_CHECKPOINT}/){swapped}: "
                         f"{what}")
    summary: dict[str, Any] = {}  # save_loraga_model_init's folder (Python) has the initial adapter and no record
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{summary_path} is not valid JSON ({err}): rerun loraga-fast init") from None
        if not isinstance(summary, dict):
            raise UsageError(f"{summary_path} does not hold a run record: rerun loraga-fast init")
    if not init_dir.is_dir():
        if (run / _ADAPTER_CONFIG).is_file():
            raise UsageError(f"{run} holds the final adapter already (save_loraga_model_final removed "
                             f"{INIT_CHECKPOINT}): it is for the untouched base as it is, there is nothing to finalize")
        raise UsageError(f"{run} has no {INIT_CHECKPOINT}/: {what}")
    _check_one_run(str(run), run_ids(run))
    return summary, init_dir


def _check_out(out: Path) -> None:
    from .runs import _check_writable

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: choose a new --out")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} already exists and is not empty: choose a new --out (finalize never replaces "
                         "files)")
    if out.is_dir() and os.path.ismount(out):
        raise UsageError(f"--out {out} is a mount point, which the finished folder cannot replace: give a folder inside "
                         "it")
    _check_writable(out)


def _read_adapter(folder: Path, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, safetensors metadata) of the LoRA adapter in ``folder``, or a one-line error saying what
    ``folder`` is instead (missing, a file, a model folder, a trainer's output folder, another kind of adapter)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    fix = "give the folder holding adapter_config.json and adapter_model.safetensors (peft's save_pretrained)"
    if not folder.exists():
        raise UsageError(f"{what} not found: {fix}")
    if not folder.is_dir():
        hint = f": give its folder, {folder.parent}" if folder.name in (ADAPTER_WEIGHTS, _ADAPTER_CONFIG) else f": {fix}"
        raise UsageError(f"{what} is a file, not a folder{hint}")
    config_path, weights = folder / _ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        names = {p.name for p in folder.iterdir()}
        if "config.json" in names and any(n.startswith(("model", "pytorch_model")) for n in names):
            raise UsageError(f"{what} is a model folder (config.json and model weights), not a LoRA adapter: a merged or "
                             f"fully fine-tuned model cannot be converted; {fix}")
        # a trainer's output folder: the adapters are in checkpoint-N sub-folders (the latest: the largest N)
        checkpoints = sorted((p.parent for p in folder.glob("*/" + _ADAPTER_CONFIG)),
                             key=lambda p: (int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
                                            p.name))
        if checkpoints:
            raise UsageError(f"{what} holds no adapter_config.json, but {checkpoints[-1]} does: pass that folder (a "
                             "trainer's checkpoint)")
        raise UsageError(f"{what} holds no adapter_config.json: {fix}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{config_path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise UsageError(f"{what} is {f'a {kind}' if kind else 'not a'} peft adapter, not LoRA: LoRA-GA trains a LoRA "
                         "adapter")
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise UsageError(f"{what} has no {ADAPTER_WEIGHTS}" + (
            " (only the pickled adapter_model.bin, which loraga-fast does not read): save it with "
            "save_pretrained(..., safe_serialization=True)" if pickled else f": {fix}"))
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{weights} cannot be read as safetensors ({err}): save the adapter again") from None
    return config, tensors, metadata


def _layer(key: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    name = key.split(".lora_", 1)[0]
    return name.removeprefix("base_model.model.")


def _check_belongs(trained: Path, run: Path, run_id: str | None, init_config: dict[str, Any],
                   init_tensors: dict[str, torch.Tensor], init_meta: dict[str, str], config: dict[str, Any],
                   tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Refuse, in one line naming what differs, an adapter that was not trained from this run's initial adapter."""
    head = f"the trained adapter {trained} is not from run {run}{f' ({run_id})' if run_id else ''}"
    if meta.get(FINAL_KEY) == "1":
        raise UsageError(f"the trained adapter {trained} is already a finalized adapter for the untouched base (written "
                         "by loraga-fast finalize): use it as it is")
    own = meta.get(RUN_ID_KEY)
    if own and run_id and own != run_id:
        raise UsageError(f"{head}: its weights carry run id {own} (another run's adapter): finalize it with its own run "
                         "folder")
    if config.get("use_dora"):
        raise UsageError(f"{head}: it is a DoRA adapter (use_dora), whose magnitudes depend on the base weights, so no "
                         "adapter for the untouched base reproduces it; train a plain LoRA adapter from the run")
    init_lora = {k for k in init_tensors if ".lora_" in k}
    lora = {k for k in tensors if ".lora_" in k}
    extra, missing = sorted(lora - init_lora), sorted(init_lora - lora)
    if extra or missing:
        targets = sorted({_layer(k).rsplit(".", 1)[-1] for k in init_lora})
        if extra:
            detail = f"'{extra[0]}' is not in the initial adapter" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        else:
            detail = f"it lacks '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        raise UsageError(f"{head}: other target layers ({detail}; the run's targets: {', '.join(targets)})")
    for key in sorted(init_lora):
        if tensors[key].shape != init_tensors[key].shape:
            got, want = tuple(tensors[key].shape), tuple(init_tensors[key].shape)
            rank = ".lora_A." in key and got[1:] == want[1:] or ".lora_B." in key and got[:1] == want[:1]
            what = (f"rank {got[0] if '.lora_A.' in key else got[1]}, the run's {want[0] if '.lora_A.' in key else want[1]}"
                    if rank else f"shape {got}, the run's {want}")
            raise UsageError(f"{head}: layer '{_layer(key)}' has {what}")
    for field in _SCALING_FIELDS:
        a, b = config.get(field), init_config.get(field)
        if (a or None) != (b or None):  # a missing field, False, {} and None alike
            raise UsageError(f"{head}: its {field} is {a!r}, the run's {b!r} (the LoRA scaling differs; train with the "
                             "initial adapter's config)")


def _converted(config: dict[str, Any], tensors: dict[str, torch.Tensor],
               init_tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """peft's ``path_initial_model_for_weight_conversion``: ``s B A - s B0 A0`` as ``[B, -B0] [A; A0]`` at rank 2r
    (alpha doubled, or times sqrt(2) under rslora: the scaling is unchanged). Other tensors (``modules_to_save``,
    trainable tokens) replace whole modules, which the LoRA-GA offset never touched: copied as they are."""
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise UsageError("the trained adapter uses rslora with rank_pattern or alpha_pattern, which peft's rank-2r "
                         "conversion does not support")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if ".lora_A." in key:
            init = init_tensors[key]
            dtype = torch.promote_types(value.dtype, init.dtype)
            out[key] = torch.cat([value.to(dtype), init.to(dtype)], dim=0).contiguous()
        elif ".lora_B." in key:
            init = init_tensors[key]
            dtype = torch.promote_types(value.dtype, init.dtype)
            out[key] = torch.cat([value.to(dtype), -init.to(dtype)], dim=1).contiguous()
        elif ".lora_" in key:
            raise UsageError(f"the trained adapter holds '{key}', a LoRA tensor kind peft's rank-2r conversion does not "
                             "handle (only lora_A / lora_B)")
        else:
            out[key] = value
    final = dict(config)
    final["r"] = 2 * config["r"]
    final["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    for field in ("rank_pattern", "alpha_pattern"):
        if final.get(field):
            final[field] = {k: 2 * v for k, v in final[field].items()}
    final["init_lora_weights"] = True
    final.pop("lora_ga_config", None)
    return out, final


def _write_adapter(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                   metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata=metadata)
    (folder / _ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_base_source(base: str) -> None:
    path = Path(base)
    if path.suffix == ".gguf" and not path.is_file():
        raise UsageError(f"--base GGUF file not found: {base}")
    if (path.is_absolute() or base.startswith(".") or base.count("/") > 1) and not path.exists():
        raise UsageError(f"--base {base} not found: give the untouched model's folder or hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"--base {base} is a folder with no config.json (not a transformers model folder)")


def _load_base(base: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer or None) of the untouched base, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(base)
    source, extra = (str(path.parent), {"gguf_file": path.name}) if path.suffix == ".gguf" else (base, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except (OSError, ValueError) as err:  # not found (a hub id: not in the cache, or offline), not a model
        raise UsageError(f"could not load --base {base!r}: {str(err).splitlines()[0]}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, TypeError):  # a checkpoint without a tokenizer
        tokenizer = None
    return model, tokenizer


def _write_merged(folder: Path, adapter_dir: Path, base: str, run: Path, summary: dict[str, Any]) -> None:
    """Load the base, check it is the run's model (the offset weights of the run are ``W - s B0 A0``), merge the
    adapter in ``adapter_dir`` into it and save the model folder into ``folder``; ``adapter_dir`` is removed."""
    import shutil

    from peft import PeftModel

    from .export import SHARD_BYTES

    model, tokenizer = _load_base(base, _DTYPES.get(summary.get("dtype", "fp32"), torch.float32))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        raise UsageError(f"--base {base} does not fit the run's adapter ({str(err).splitlines()[0]}): give the model "
                         f"{run} was initialized from") from err
    offsets_path = run / OFFSETS_FILE
    if offsets_path.is_file():
        _check_base_is_the_runs(peft_model, offsets_path, base, run)
    merged = peft_model.merge_and_unload()
    shutil.rmtree(adapter_dir)
    merged.save_pretrained(folder, max_shard_size=SHARD_BYTES)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _check_base_is_the_runs(peft_model: Any, offsets_path: Path, base: str, run: Path) -> None:
    """``W_base - s B0 A0`` must be the run's offset weight ``W'`` for every target (``B0 A0``: the second half of the
    final adapter, ``-B_final[:, r:] A_final[r:]``), to the rounding of the weights' dtype."""
    from safetensors import safe_open

    layers = {name: m for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")
              and "default" in m.lora_A}
    with safe_open(str(offsets_path), framework="pt") as f, torch.no_grad():
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            layer = layers.get(key.removesuffix(".weight"))
            if layer is None:
                continue
            a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
            r = a.shape[0] // 2
            init = -layer.scaling["default"] * (b[:, r:] @ a[r:])
            if getattr(layer, "fan_in_fan_out", False):
                init = init.T
            weight = layer.get_base_layer().weight
            offset = f.get_tensor(key).float()
            tol = 1e-3 if weight.dtype == torch.float32 else 3e-2
            err = float((weight.float() - init - offset).norm() / offset.norm().clamp_min(1e-30))
            if err > tol:
                raise UsageError(f"--base {base} is not the model {run} was initialized from: its '{key}' minus the "
                                 f"initial adapter differs from the run's offset weight by {err:.2g} (relative): give "
                                 "the untouched model the run started from")

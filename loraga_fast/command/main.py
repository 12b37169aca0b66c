"""The ``loraga-fast`` command (also ``python -m loraga_fast``).

``loraga-fast init``  -- load a model and text data, estimate LoRA-GA gradients, initialize the adapter, save it.
``loraga-fast bench`` -- run a benchmark suite of :mod:`loraga_fast.bench` against peft and print its tables.

With no ``--model``/``--data``, ``init`` runs on an embedded default that works offline on a fresh machine: a
small LLaMA-config model with random weights and a byte-level tokenizer, on Python standard-library source.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..api.quantize import QUANTIZE
from ..errors import UsageError
from .bench import add_bench_parser, run_bench
from .finalize import add_finalize_parser, run_finalize
from .init import run_init

__all__ = ["main"]

DEBUG_ENV = "LORAGA_FAST_DEBUG"  # =1: tracebacks for every error, as --debug

# ------------------------------------------------------------------------------------------------- main


def _parsed(text: str, convert: type, expected: str) -> Any:
    """``convert(text)``, or argparse's error naming what was ``expected``."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the option through argparse's own message)."""
    value = _parsed(text, int, "a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _budget(text: str) -> str | int:
    """argparse type: ``uniform`` or a whole number of LoRA parameters >= 1."""
    if text == "uniform":
        return text
    return _positive(str(_parsed(text.replace("_", ""), int, "'uniform' or a whole number of LoRA parameters")))


def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _parsed(text, float, "a number in (0, 1)")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where torch sees a GPU."""
    if text in ("auto", "cpu"):  # argparse converts the default too: no torch import for it (seconds)
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}, but torch sees no CUDA GPU on this machine: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: use auto, cpu, cuda or cuda:N")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line naming the command's help (argparse prints its whole usage
    block first, 15 lines for ``init``, before the line that says what is wrong)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
  model/                    with --export-model: the whole offset base as a transformers model folder
  loraga_fast_init.json     every parameter of the run, timings and peak memory
The folder is written as one unit (under a temporary name, then renamed) and its files carry one run id.
Then, in Python: model = loraga_fast.load_initialized(base_model, OUT); train; save_loraga_model_final(model, OUT)
leaves OUT holding a plain LoRA adapter for the untouched base. Or, with --export-model, train OUT/model plus
OUT/init_lora_checkpoint in any framework and run: loraga-fast finalize OUT TRAINED_ADAPTER --out FINAL.

Every check that needs no data (--out, --cache, model kind, targets, rank, memory) runs before the data is read.
With no --model / --data, it runs offline on an embedded default: a small LLaMA-config model with random weights
(seeded by --seed) and a byte tokenizer, on Python standard-library source."""

INIT_EXAMPLES = """\
examples:
  loraga-fast init                                   # the embedded default, into ./loraga_init
  loraga-fast init --model HuggingFaceTB/SmolLM2-135M --data train.jsonl --rank 16 --batches 64 --out runs/smol
  loraga-fast init --model ./llama-7b --dtype bf16 --mode lowmem --cache grads.safetensors --out runs/7b
  loraga-fast init --model ./smollm2 --data train.jsonl --batches 64 --until-converged --rank-budget uniform
  loraga-fast init --model ./llama-7b --data train.jsonl --dtype bf16 --export-model --out runs/7b   # for any trainer"""

def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="loraga-fast", formatter_class=_Help,
                                     description="LoRA-GA initialization for peft: estimate gradients with fp32 "
                                                 "accumulation and no .grad, initialize, save; and its benchmarks.")
    parser.add_argument("--version", action="version", version=f"loraga-fast {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of every error, including mistakes in the arguments (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{init,finalize,bench}")
    init = sub.add_parser("init", help="estimate gradients, initialize a LoRA-GA adapter, save the run folder",
                          description=INIT_DESCRIPTION, epilog=INIT_EXAMPLES, formatter_class=_Help)
    init.add_argument("--model", help="a model folder, a .gguf file or a hub id such as org/name (local cache "
                                      "first; HF_HUB_OFFLINE=1 is honoured); a causal LM (default: the embedded "
                                      "small LLaMA config)")
    init.add_argument("--data", help="the text to estimate on, read by its suffix: .jsonl (one JSON object per line), "
                                     ".json (a list of records or strings), .csv / .tsv (a header row naming the "
                                     "columns), anything else as plain UTF-8 text (.txt); binary, columnar and "
                                     "compressed files (.parquet, .arrow, .gz, .zip, ...) are refused, saying how to "
                                     "convert them (default: Python standard-library source)")
    init.add_argument("--text-field", default="text", help="the field of each .jsonl/.json record, or the column of "
                                                           "a .csv/.tsv file, holding the text")
    init.add_argument("--rank", type=_positive, default=8, help="LoRA rank r (LoRA-GA needs 2r <= both sides of "
                                                                "every target weight)")
    init.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    init.add_argument("--targets", default=None,
                      help="comma-separated module names, e.g. q_proj,k_proj,v_proj,o_proj (default: peft's "
                           "default for the model type, e.g. q_proj,v_proj for LLaMA)")
    init.add_argument("--batches", type=_positive, default=8, help="batches to estimate on (the paper uses 64-128); "
                                                                   "with --until-converged, the most it runs")
    init.add_argument("--until-converged", action="store_true",
                      help="stop estimating once the singular directions LoRA-GA gives every layer's A and B have "
                           "converged (checked every 4 batches; exact mode, or --mode lowmem --passes 1); the run "
                           "folder's JSON records the batches and tokens used")
    init.add_argument("--convergence-tol", type=_fraction, default=None,
                      help="with --until-converged: how much of their optimal gradient energy a layer's A and B "
                           "directions may still miss between checks (default: 0.05)")
    init.add_argument("--rank-budget", type=_budget, default=None,
                      help="allocate per-layer ranks from the gradient spectra under this many LoRA parameters, or "
                           "'uniform' (the parameter count of --rank on every target); written as peft's rank_pattern "
                           "(default: --rank everywhere)")
    init.add_argument("--keep-base", action="store_true",
                      help="an init that leaves the base weights untouched (A from the gradient's top-r right singular "
                           "vectors, B = 0): the run folder is then just an adapter for the original --model, which "
                           "any framework trains from (default: LoRA-GA's init and base offset)")
    init.add_argument("--min-rank", type=_positive, default=1, help="with --rank-budget: the smallest rank of a layer")
    init.add_argument("--max-rank", type=_positive, default=None,
                      help="with --rank-budget: the largest rank of a layer, at most min(m, n) / 2 of every target "
                           "(default: 4 x --rank, capped per layer)")
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
    init.add_argument("--passes", type=_positive, default=None,
                      help="passes over the data with --mode lowmem (default 3; 1: one pass, a running "
                           "truncated SVD per layer, more compute per batch; 2 or more: sketches)")
    init.add_argument("--seed", type=int, default=0, help="seeds the random weights of the embedded model only "
                                                          "(a given --model is loaded as is)")
    init.add_argument("--out", default="loraga_init", help="the run folder to write")
    init.add_argument("--overwrite", action="store_true",
                      help="replace an --out that holds an earlier run (it is replaced only once the new run is "
                           "complete; a folder with other files is never replaced)")
    init.add_argument("--export-model", action="store_true",
                      help="also write OUT/model: the offset base as a complete transformers model folder (config, "
                           "safetensors shards, tokenizer), for frameworks that train from a model folder plus an "
                           "adapter (LLaMA-Factory, axolotl, ms-swift, unsloth); then loraga-fast finalize. Not with "
                           "--quantize")
    add_finalize_parser(sub, _Help)
    add_bench_parser(sub, _Help)
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
        elif args.command == "finalize":
            run_finalize(args)
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
        left = f"; --out {args.out} was left as it was" if args.command in ("init", "finalize") else ""
        print(f"loraga-fast: interrupted{left}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

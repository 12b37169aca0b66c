"""The ``lowmem`` suite: low-memory mode's time per pass vs the fwd+bwd floor, total time and peak memory vs exact
mode and peft, and projected accumulator memory for LLaMA 7B-70B shapes.

``loraga-fast bench lowmem [--preset 70m] [--dtype fp32] [--batches N] [--impls floor lowmem ...] [--json PATH]``

``--preset llama-7b-cpu`` (``loraga-fast bench lowmem --preset llama-7b-cpu``) is LLaMA-7B in bf16 on a CPU host:
the model alone is 13.5 GB, exact mode is refused by its memory check (reported as refused, with the figures) and
peft is not run (its bf16 gradients would not fit beside the model in 24 GB; the figure is printed instead).

``--preset llama-13b-nf4-cpu`` (and ``llama-7b-nf4-cpu``) is a QLoRA base on a CPU host: LLaMA-2-13B with every
decoder linear in bitsandbytes nf4 (compute dtype bf16), built one weight at a time
(:func:`~loraga_fast.bench.workloads.build_quantized_model`; the bf16 model, 26 GB, never exists). By default only the
floor and low-memory mode run; exact mode is not run but its refusal is recorded from the memory check
(``check_preprocess(mode="exact")``, made in every worker after the model is built: ``exact_check`` in each run,
``refused["exact"]`` in the JSON), and peft refuses quantized bases.

Each implementation runs in a fresh process (:func:`loraga_fast.bench.harness.in_fresh_process`) on the preset's
seeded random LLaMA (:mod:`loraga_fast.bench.workloads` builders), after one untimed no-grad forward; on CUDA also
after one untimed call of the implementation itself (Triton compilation and cuBLAS/cuSOLVER start-up are not what a
pass costs; on CPU the measured call is the first, as RSS growth is only meaningful there). Memory is
:class:`loraga_fast.bench.memprobe.MemoryProbe`'s extra peak (RSS on CPU, allocated bytes on CUDA). A failing
implementation prints its error and the others still run (exit status 1); ``--json`` is rewritten after every
implementation. Implementations:

* ``floor``: one forward + backward over the batches with every target routed through the capture op but
  accumulating nothing (input gradients only) -- what any method must at least pay per pass;
* ``lowmem``: ``loraga_fast.preprocess_loraga(mode="lowmem")`` (3 passes by default);
* ``lowmem1``: ``loraga_fast.preprocess_loraga(mode="lowmem", passes=1)`` (one pass: a truncated SVD per layer,
  updated on every backward pass, :mod:`loraga_fast.stores.stream`);
* ``exact``: ``loraga_fast.preprocess_loraga`` (exact mode);
* ``peft``: ``peft.preprocess_loraga``.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from typing import Any

import peft
import torch

from ..api.preprocess import check_preprocess, preprocess_loraga
from ..core.memory import accumulator_bytes, memory_estimate
from ..errors import UsageError
from ..layers.capture import CaptureSession, Slot
from ..layers.targets import find_targets
from ..stores.sketch import DEFAULT_PASSES
from .harness import (
    WorkerFailed,
    in_fresh_process,
    nothing_measured,
    num,
    result_path,
    suite_parser,
    write_json,
)
from .memprobe import MemoryProbe
from .workloads import (
    LLAMA_SHAPES,
    PRESETS,
    build_model,
    clear_loraga_state,
    get_preset,
    layer_shapes,
    make_batches,
    make_lora_config,
    make_train_step,
    model_bytes,
    quantize_model,
)

IMPLS = ("floor", "lowmem1", "lowmem", "exact", "peft")
FLOP_TOKENS = 2048  # tokens per backward pass of the one-pass FLOP table (LLaMA-7B shapes)

class _NullSlot(Slot):
    """A capture slot that accumulates nothing."""

    def add(self, grad_out: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        pass


class _NullStore:
    """Capture slots that accumulate nothing: the capture op then only computes input gradients."""

    def __init__(self, names: list[str]):
        self.slots = {n: _NullSlot(n) for n in names}

    def __getitem__(self, name: str) -> Any:
        return self.slots[name]


def run_one(impl: str, preset: str, dtype: str, batches: int | None, warmup: bool | None = None,
            sketch_size: int | None = None, quantize: str | None = None) -> dict[str, Any]:
    """One implementation measured in this process (a fresh one: :func:`main` runs it through
    :func:`~loraga_fast.bench.harness.in_fresh_process`); ``refused`` instead of the figures when its memory check
    refused it. ``exact_check``: exact mode's memory check on this model (``check_preprocess(mode="exact")``), None
    when it fits, else its refusal."""
    p = get_preset(preset)
    if batches is not None:
        p = dataclasses.replace(p, num_batches=batches)
    if p.quant is not None and quantize not in (None, p.quant):
        raise ValueError(f"preset {p.name} is built quantized ({p.quant}): it takes no --quantize {quantize}")
    start = time.perf_counter()
    model = build_model(p, dtype)  # a preset with quant: built quantized, one weight at a time
    if quantize is not None and p.quant is None:
        model = quantize_model(model, quantize)
    quantize = quantize or p.quant
    build_s = time.perf_counter() - start
    data = make_batches(p, "auto")
    cfg = make_lora_config(p)
    step = make_train_step(model, data)
    device = next(model.parameters()).device
    with torch.no_grad():  # (quantized: in train mode, as bitsandbytes repacks 4-bit weights for no-grad eval calls)
        model.train(quantize is not None)(input_ids=data[0])
    model.eval()
    gc.collect()
    if impl == "floor":
        targets = find_targets(model, cfg)

        def call() -> None:
            with CaptureSession(model, targets, _NullStore([n for n, _ in targets])), torch.enable_grad():  # type: ignore[arg-type]
                step()
    elif impl == "peft":
        def call() -> None:
            peft.preprocess_loraga(model, cfg, step)
    else:
        mode = "exact" if impl == "exact" else "lowmem"
        options = {"passes": 1} if impl == "lowmem1" else {}

        def call() -> None:
            preprocess_loraga(model, cfg, step, mode=mode, sketch_size=sketch_size if mode == "lowmem" else None,
                              **options)
    warmup = device.type == "cuda" if warmup is None else warmup
    if warmup:
        call()
        clear_loraga_state(model)
        gc.collect()
    estimate = memory_estimate(model, cfg, sketch_size=sketch_size, passes=1 if impl == "lowmem1" else None)
    try:
        check_preprocess(model, cfg, mode="exact")
        exact_check = None
    except UsageError as err:
        exact_check = str(err)
    held = model_bytes(model)
    info = {"impl": impl, "device": str(device), "num_batches": p.num_batches, "tokens": p.num_batches * p.tokens_per_batch,
            "threads": torch.get_num_threads(), "warmed_up": warmup, "passes": DEFAULT_PASSES if impl == "lowmem" else 1,
            "sketch_size": sketch_size, "quantize": quantize,
            "build_s": build_s, "model_bytes": held["total"], "model_quantized_bytes": held["quantized"],
            "model_float_bytes": held["float"], "sketch_bytes": estimate.lowmem_bytes, "exact_check": exact_check,
            "estimate": {"exact_bytes": estimate.exact_bytes, "lowmem_bytes": estimate.lowmem_bytes,
                         "lowmem_peak_bytes": estimate.lowmem_peak_bytes}}
    with MemoryProbe(device) as probe:
        start = time.perf_counter()
        try:
            call()
        except UsageError as err:  # refused before the first forward pass (it cannot fit): an outcome, not a failure
            return {**info, "refused": str(err)}
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    assert probe.reading is not None
    return {**info, "time_s": elapsed, "peak_extra_bytes": probe.reading.peak_extra_bytes,
            "peak_bytes": probe.reading.peak_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("lowmem", __doc__)
    parser.add_argument("--preset", default="70m", choices=list(PRESETS))
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 for the *-cpu presets, else fp32")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--sketch-size", type=int, default=None, help="low-memory mode's k (default: the library's)")
    parser.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                        help="load the model quantized with bitsandbytes (QLoRA base; the floor and both modes "
                             "capture through the quantized layers)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                        help="what to run, in this order (floor first: the others are reported relative to it); "
                             "default all, except peft for the *-cpu presets (its bf16 gradients do not fit beside a "
                             "7B model in 24 GB: the process would be killed, not refused)")
    parser.add_argument("--json", "--out", dest="json", default=result_path(None, "lowmem"),
                        help="results file (default %(default)s)")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    if args.dtype is None:
        args.dtype = "bf16" if preset.init_in_dtype else "fp32"
    if preset.quant is not None and args.quantize not in (None, preset.quant):
        parser.error(f"--preset {args.preset} is built quantized ({preset.quant}): drop --quantize {args.quantize}")
    if args.impls is None:  # quantized presets: exact mode's refusal comes from each worker's check (exact_check)
        args.impls = [i for i in IMPLS if not (i == "peft" and args.preset.endswith("-cpu"))
                      and not (i == "exact" and preset.quant is not None)]

    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    projections = _projections()
    flops = onepass_flops()

    def save() -> None:
        write_json(args.json, {"preset": args.preset, "dtype": args.dtype, "passes": DEFAULT_PASSES, "runs": results,
                               "failed": failed, "refused": refused, "projections": projections,
                               "onepass_flops": flops})

    for impl in args.impls:
        start = time.perf_counter()
        try:
            run = in_fresh_process(run_one, impl=impl, preset=args.preset, dtype=args.dtype, batches=args.batches,
                                   sketch_size=args.sketch_size, quantize=args.quantize)
        except WorkerFailed as err:
            print(f"[lowmem] {impl}: FAILED (exit {err.exit_code})\n{err.stderr_tail}", file=sys.stderr)
            failed[impl] = err.record()
            run = None
        if run is not None and run.get("exact_check") and "exact" not in args.impls:
            refused.setdefault("exact", run["exact_check"])  # not run: its memory check on the built model
        if run is not None and "refused" in run:
            refused[impl] = run["refused"]
            print(f"[lowmem] {impl}: refused: {refused[impl]}", file=sys.stderr, flush=True)
        elif run is not None:
            results[impl] = run
            print(f"[lowmem] {impl}: {results[impl]['time_s']:.3f}s (process {time.perf_counter() - start:.1f}s)",
                  file=sys.stderr, flush=True)
        floor_run = results.get("floor")
        for res in results.values():
            if floor_run:
                res["x_floor"] = res["time_s"] / floor_run["time_s"]
                res["per_pass_x_floor"] = res["time_s"] / res.get("passes", 1) / floor_run["time_s"]
        save()
    if not results:
        return nothing_measured("lowmem")
    first = next(iter(results.values()))
    est = first["estimate"]
    quantized = f", {first['quantize']}: {first['model_quantized_bytes'] / 2**30:.2f} GiB quantized + " \
        f"{first['model_float_bytes'] / 2**30:.2f} GiB float" if first["quantize"] else ""
    print(f"preset {args.preset} ({args.dtype}, {first['num_batches']} batches, {first['tokens']} tokens, "
          f"{first['device']}, {first['threads']} threads); lowmem passes = {DEFAULT_PASSES}, lowmem1 = 1; model "
          f"{first['model_bytes'] / 2**30:.2f} GiB{quantized} (built in {first['build_s']:.0f} s); memory_estimate: "
          f"exact {est['exact_bytes'] / 2**30:.2f} GiB, lowmem peak {est['lowmem_peak_bytes'] / 2**30:.2f} GiB "
          f"(sketches {first['sketch_bytes'] / 2**30:.2f} GiB)")
    print(f"{'impl':8} {'time s':>8} {'x floor':>8} {'per pass x floor':>17} {'extra peak MiB':>15} {'peak GiB':>9}")
    for impl, res in results.items():
        print(f"{impl:8} {res['time_s']:8.2f} {num(res.get('x_floor'), '.2f'):>8} {num(res.get('per_pass_x_floor'), '.2f'):>17} "
              f"{res['peak_extra_bytes'] / 2**20:15.1f} {res['peak_bytes'] / 2**30:9.2f}")
    for impl in ("lowmem", "lowmem1"):
        if impl in results and "floor" in results:
            over = results[impl]["peak_extra_bytes"] - results["floor"]["peak_extra_bytes"]
            print(f"{impl} extra peak over the floor's: {over / 2**20:.1f} MiB; memory_estimate's low-memory peak "
                  f"{results[impl]['estimate']['lowmem_peak_bytes'] / 2**20:.1f} MiB")
    for impl, message in refused.items():
        how = "not run; its memory check on the built model" if impl not in args.impls else \
            "refused before the first forward pass"
        print(f"{impl:8} {how}: {message}")
    if "peft" not in args.impls and first["quantize"]:
        print("peft (not run): peft's preprocess_loraga refuses quantized layers")
    elif "peft" not in args.impls:
        grads = est["exact_bytes"] // 4 * (2 if args.dtype == "bf16" else 4)
        print(f"peft (not run): the .grad of every target weight in {args.dtype} alone would add "
              f"{grads / 2**30:.2f} GiB to the model")

    print("\nprojected accumulator memory (fp32, all 7 projections of every block), exact vs low-memory (k = 24 r, sketches + fingerprints):")
    print(f"{'model':6} {'r':>3} {'exact GiB':>10} {'lowmem GiB':>11} {'ratio':>7}")
    for p in projections:
        exact, low = p["exact_bytes"], p["lowmem_bytes"]
        print(f"{p['model']:6} {p['r']:3d} {exact / 2**30:10.2f} {low / 2**30:11.2f} {exact / low:7.1f}")
    print(f"\none-pass low-memory mode's work per backward pass vs the floor's (forward + input gradient, 4 t m n), "
          f"LLaMA-7B's 7 projections per block, t = {FLOP_TOKENS} tokens (GFLOP per block):")
    print(f"{'r':>3} {'l':>4} {'floor':>8} {'compress':>9} {'merge':>8} {'one pass x floor':>17} {'three passes x floor':>21}")
    for f in flops:
        print(f"{f['r']:3d} {f['l']:4d} {f['floor'] / 1e9:8.1f} {f['compress'] / 1e9:9.1f} {f['merge'] / 1e9:8.1f} "
              f"{1 + f['overhead']:17.3f} {f['three_pass_x_floor']:21.3f}")
    save()
    return 1 if failed else 0


def stream_flops(m: int, n: int, k: int, tokens: int) -> dict[str, float]:
    """FLOPs one-pass low-memory mode spends on one ``(m, n)`` layer per backward pass of ``tokens`` tokens, keeping
    ``k`` columns (:mod:`loraga_fast.ops.stream`; Householder QR with Q formed: ``4 rows cols^2``; the core's SVD
    with both factors: ``22 c^3``): ``compress`` (the range finder, when ``tokens > k``) and ``merge``."""
    width = min(tokens, k)
    compress = 4.0 * tokens * (m + n) * k + 4.0 * m * k * k if tokens > k else 0.0
    c = k + width
    merge = 4.0 * (m + n) * c * c + 2.0 * c**3 + 22.0 * c**3 + 2.0 * (m + n) * c * k
    return {"compress": compress, "merge": merge}


def onepass_flops(tokens: int = FLOP_TOKENS) -> list[dict[str, Any]]:
    """The FLOP table: per LLaMA-7B block, one-pass mode's compress + merge work against the floor's ``4 t m n`` per
    projection, and three-pass mode's (two more floors, plus its sketch products ``2 t (m + n) k`` per pass)."""
    hidden, inter, _, kv = LLAMA_SHAPES["7B"]
    shapes = layer_shapes(hidden, inter, 1, kv)
    rows = []
    for r in (8, 16):
        k = 24 * r
        floor = sum(4.0 * tokens * m * n for m, n in shapes)
        work = [stream_flops(m, n, min(k, m, n), tokens) for m, n in shapes]
        compress, merge = sum(w["compress"] for w in work), sum(w["merge"] for w in work)
        sketch = sum(2.0 * tokens * (m + n) * min(k, m, n) for m, n in shapes)
        rows.append({"r": r, "l": k, "tokens": tokens, "floor": floor, "compress": compress, "merge": merge,
                     "overhead": (compress + merge) / floor,
                     "three_pass_x_floor": DEFAULT_PASSES + DEFAULT_PASSES * sketch / floor})
    return rows


def _projections() -> list[dict[str, Any]]:
    projections = []
    for model_name, dims in LLAMA_SHAPES.items():
        for r in (8, 16, 64):
            exact, low = accumulator_bytes(layer_shapes(*dims), r)
            projections.append({"model": model_name, "r": r, "exact_bytes": exact, "lowmem_bytes": low})
    return projections


if __name__ == "__main__":
    raise SystemExit(main())

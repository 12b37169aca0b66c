"""The ``init`` suite: everything after estimation until ``peft.get_peft_model`` returns, ours vs peft.

* ours -- :func:`loraga_fast.core.handoff.hand_off` (checks, means, attach) followed by ``get_peft_model``, in
  which each shape group is factored by one batched randomized SVD when its first layer is initialized and
  every layer then gets peft's LoRA-GA math applied to its factors;
* peft -- ``get_peft_model`` after peft's own ``preprocess_loraga`` (one ``torch.svd_lowrank`` per layer inside).

Both start from their own library's estimation result (ours: fp32 grouped accumulators; peft: gradients in
the model's dtype), which is built before the measurement starts. Each measurement runs in a fresh process:
time of the call, and extra peak memory (RSS on CPU, the CUDA allocator's peak on GPU; see
:mod:`loraga_fast.bench.memprobe`).
Also reported, to show where the time goes: ours' ``finish`` vs ``get_peft_model`` time, the time spent in
our batched SVDs, and the time peft spends inside ``torch.svd_lowrank``. Each row records ``other_cpu_s``, the CPU
time other processes used during the call, and ``contended`` (:mod:`loraga_fast.bench.timing_flags`: more
than 10% of a core);
the table marks contended times and ratios with `` *`` (one call per measurement: no spread rule here).

Presets:

* ``70m`` / ``smollm2`` -- the end-to-end benchmark's presets (a LLaMA config; the pretrained SmolLM2-135M),
  gradients estimated on their 8 batches;
* ``7b-groups`` -- LLaMA-7B layer shapes (per block: 4 x 4096x4096, 2 x 11008x4096, 1 x 4096x11008, no bias)
  with synthetic gradients (rank-64 decaying spectrum plus noise); ``--layers`` blocks (32 is the full 7B;
  the default is 32 on CUDA and 1 on CPU, where 32 would not fit in memory);
* ``tiny-groups`` -- the same code path at the ``tiny`` preset's shapes (64 hidden, 176 MLP), 2 blocks by
  default: a smoke test in seconds (``bash bench/gpu.sh --dry-run``); ``tiny`` -- the end-to-end ``tiny`` preset.

``loraga-fast bench init --preset P`` maps the command's presets: ``llama-7b`` -> ``7b-groups``, ``tiny`` ->
``tiny-groups``, the others as they are; any preset of this suite can be given after ``--``.

    loraga-fast bench init --preset 70m --dtypes fp32 bf16
    loraga-fast bench init --preset llama-7b --ranks 8 64          # 7b-groups
    loraga-fast bench init -- --preset tiny --dtypes bf16           # the e2e tiny preset, real gradients

A failing measurement prints its worker's error and the others still run (exit status 1); the JSON is rewritten
after every measurement, so a run stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn

from ..core.handoff import hand_off
from ..core.passes import run_passes
from ..layers.targets import find_targets, layer_ranks
from ..stores import factors as ours_factors
from ..stores.exact import AccumulatorStore
from .envinfo import environment_info
from .harness import WorkerFailed, finish, in_fresh_process, nothing_measured, result_path, suite_parser, write_json
from .memprobe import MemoryProbe
from .timing_flags import Stopwatch, footnotes, is_contended, marks
from .workloads import IMPLS, TARGET_MODULES, build_model, make_batches, make_train_step, resolve_device
SHAPES_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
             "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
SHAPES_TINY = {"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (64, 64),
               "gate_proj": (176, 64), "up_proj": (176, 64), "down_proj": (64, 176)}
# (out, in) of each projection of one block, for the synthetic-gradient presets
GROUP_PRESETS = {"7b-groups": SHAPES_7B, "tiny-groups": SHAPES_TINY}
PRESETS = ["70m", "smollm2", "tiny", *GROUP_PRESETS]


class Block7B(nn.Module):
    def __init__(self, dtype: torch.dtype, device: torch.device, shapes: dict[str, tuple[int, int]] = SHAPES_7B):
        super().__init__()
        for name, (out_f, in_f) in shapes.items():
            layer = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
            nn.init.normal_(layer.weight, std=0.02)
            setattr(self, name, layer)


def _synthetic_grad(shape: tuple[int, int], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    m, n = shape
    u = torch.randn(m, 64, device=device, generator=gen)
    v = torch.randn(n, 64, device=device, generator=gen)
    s = 0.9 ** torch.arange(64, device=device, dtype=torch.float32)
    g = (u * s) @ v.T
    return g.add_(torch.randn(m, n, device=device, generator=gen), alpha=0.01)


def _lora_config(r: int) -> Any:
    from peft import LoraConfig, LoraGAConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGET_MODULES), init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _time_calls:
    """Replace ``owner.name`` by a wrapper adding each call's (synchronized) duration to ``seconds``."""

    def __init__(self, owner: Any, name: str, device: torch.device):
        self.owner, self.name, self.seconds = owner, name, 0.0
        self.real = real = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            _sync(device)
            t = time.perf_counter()
            out = real(*a, **k)
            _sync(device)
            self.seconds += time.perf_counter() - t
            return out

        setattr(owner, name, timed)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.real)


def worker(impl: str, preset: str, dtype_name: str, r: int, layers: int, device_name: str) -> dict[str, Any]:
    """One measurement in this process (a fresh one: :func:`main` runs it through
    :func:`~loraga_fast.bench.harness.in_fresh_process`)."""
    device = torch.device(device_name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg = _lora_config(r)
    if preset not in GROUP_PRESETS:  # an end-to-end preset: real estimated gradients
        model = build_model(preset, dtype_name, device)
        step = make_train_step(model, make_batches(preset, device))
    else:
        torch.manual_seed(0)
        model = nn.ModuleList([Block7B(dtype, device, GROUP_PRESETS[preset]) for _ in range(layers)])
        step = None
    targets = find_targets(model, cfg)
    store = None
    if impl == "loraga_fast":
        store = AccumulatorStore([(n, tuple(m.weight.shape), m.weight.device) for n, m in targets])
        if step is not None:
            run_passes(model, targets, store, step, ranks=layer_ranks(cfg, [n for n, _ in targets]))
        else:
            gen = torch.Generator(device=device).manual_seed(1)
            for n, m in targets:
                store.load(n, _synthetic_grad(tuple(m.weight.shape), device, gen))
    elif step is not None:
        peft.preprocess_loraga(model, cfg, step)
    else:
        gen = torch.Generator(device=device).manual_seed(1)
        for _, m in targets:  # what peft's preprocess leaves: the mean gradient in the weight's dtype
            m._peft_loraga_grad = _synthetic_grad(tuple(m.weight.shape), device, gen).to(dtype)
    for p in model.parameters():
        p.grad = None
    gc.collect()

    svd_time = _time_calls(torch, "svd_lowrank", device)  # peft's per-layer SVDs
    rsvd_time = _time_calls(ours_factors, "batched_rsvd", device)  # ours, per group
    _sync(device)
    with MemoryProbe(device) as probe, Stopwatch() as watch:
        if store is not None:
            hand_off(cfg, targets, store)
        _sync(device)
        t_factor = watch.elapsed()
        peft.get_peft_model(model, cfg)
        _sync(device)
    total, cpu, other = watch.time_s, watch.cpu_s, watch.other_cpu_s
    svd_time.restore()
    rsvd_time.restore()
    assert probe.reading is not None
    params = sum(m.weight.numel() for _, m in targets)
    return {"impl": impl, "preset": preset, "dtype": dtype_name, "r": r, "layers": len(targets),
            "target_params": params, "time_s": total, "finish_s": t_factor, "get_peft_model_s": total - t_factor,
            "batched_rsvd_s": rsvd_time.seconds, "peft_svd_lowrank_s": svd_time.seconds, "peak_extra_bytes": probe.reading.peak_extra_bytes,
            "cpu_s": cpu, "other_cpu_s": other, "contended": is_contended([total], [other])}


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("init", __doc__)
    parser.add_argument("--preset", choices=PRESETS, default="70m")
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--ranks", nargs="+", type=int, default=None, help="LoRA ranks (default: 8)")
    parser.add_argument("--layers", type=int, default=None,
                        help="7b-groups: decoder blocks (default 32 on CUDA, 1 on CPU); tiny-groups: default 2")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=result_path(None, "init"), help="results file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    ranks = args.ranks or [8]
    layers = args.layers or (2 if args.preset == "tiny-groups" else 32 if device.type == "cuda" else 1)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    env = environment_info(device)

    for dtype in args.dtypes:
        for r in ranks:
            for impl in args.impls:
                start = time.perf_counter()
                try:
                    rows.append(in_fresh_process(worker, impl=impl, preset=args.preset, dtype_name=dtype, r=r,
                                                 layers=layers, device_name=str(device)))
                    print(f"[init] {args.preset} {dtype} r={r} {impl}: {rows[-1]['time_s']:.3f}s "
                          f"(process {time.perf_counter() - start:.1f}s)", file=sys.stderr)
                except WorkerFailed as err:
                    print(f"[init] {args.preset} {dtype} r={r} {impl}: FAILED (exit {err.exit_code})\n"
                          f"{err.stderr_tail}", file=sys.stderr)
                    failed.append(err.record(impl=impl, dtype=dtype, r=r))
                write_json(args.json, {"environment": env, "preset": args.preset, "rows": rows, "failed": failed})
    if not rows:
        return nothing_measured("init")
    print(f"init benchmark, preset {args.preset} ({rows[0]['layers']} target layers, {rows[0]['target_params'] / 1e6:.1f}M "
          f"target weights), device {device}")
    print(f"{'dtype':<5} {'r':>3} {'impl':<12} {'time (s)':>9} {'finish (s)':>10} {'get_peft (s)':>12} "
          f"{'in SVDs (s)':>11} {'extra peak (MiB)':>16}")
    for row in rows:
        svd = row['batched_rsvd_s'] + row['peft_svd_lowrank_s']
        print(f"{row['dtype']:<5} {row['r']:>3} {row['impl']:<12} {row['time_s']:>9.3f}"
              f"{marks(bool(row.get('contended'))):<2} {row['finish_s']:>8.3f} "
              f"{row['get_peft_model_s']:>12.3f} {svd:>11.3f} {row['peak_extra_bytes'] / 2**20:>16.1f}")
    for dtype in args.dtypes:
        for r in ranks:
            pair = {row["impl"]: row for row in rows if row["dtype"] == dtype and row["r"] == r}
            if len(pair) == 2:
                o, p = pair["loraga_fast"], pair["peft"]
                flag = marks(bool(o.get("contended") or p.get("contended")))
                print(f"{dtype:<5} {r:>3} ours/peft    {o['time_s'] / p['time_s']:>8.3f}x{flag:<2}"
                      f"{'':>9} {'':>12} {'':>11} {o['peak_extra_bytes'] / max(p['peak_extra_bytes'], 1):>15.3f}x")
    for line in footnotes(any(row.get("contended") for row in rows)):
        print(line)
    write_json(args.json, {"environment": env, "preset": args.preset, "rows": rows, "failed": failed})
    return finish(args.json, failed)


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel estimation on torch.distributed (gloo, CPU): wall time and bytes communicated per rank.

For N in ``--ranks`` (default 1 2 3), N processes each run ``preprocess_loraga`` on their share of the preset's
batches (round-robin); the sums and counts are reduced once at the end (one all_reduce per shape group + one for
the counts). Reported per N: the wall time of the call on rank 0 (median of ``--repeats``), the all_reduce payload
per rank (every accumulator once, fp32) and the bytes a ring all_reduce sends per rank (2 (N-1)/N x payload).
Also printed: projected payloads for LLaMA-7B and LLaMA-2-70B with all seven projections targeted, for one
reduction at the end (ours) vs a per-step reduce-scatter of the gradients (what sharded estimation would send).

    python bench/distributed.py --preset 70m --ranks 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import build_model, make_batches, make_lora_config, make_train_step  # noqa: E402

# (name, hidden, layers, intermediate, kv_dim): all seven projections targeted
PROJECTIONS = {"llama-7b": (4096, 32, 11008, 4096), "llama-2-70b": (8192, 80, 28672, 1024)}


def target_params(hidden: int, layers: int, intermediate: int, kv_dim: int) -> int:
    return layers * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate)


def _worker(rank: int, world: int, init: str, preset: str, dtype: str, repeats: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        from loraga_fast import preprocess_loraga

        model = build_model(preset, dtype, "cpu")
        batches = make_batches(preset, "cpu")[rank::world]
        step = make_train_step(model, batches)
        times, payload = [], 0
        for _ in range(repeats + 1):  # the first call is a warm-up
            for m in model.modules():
                if hasattr(m, "_peft_loraga_grad"):
                    del m._peft_loraga_grad
            dist.barrier()
            start = time.perf_counter()
            preprocess_loraga(model, make_lora_config(preset), step)
            dist.barrier()
            times.append(time.perf_counter() - start)
            grads = [m._peft_loraga_grad for m in model.modules() if hasattr(m, "_peft_loraga_grad")]
            payload = sum(g.numel() * 4 for g in grads) + 8 * len(grads)
        if rank == 0:
            Path(out).write_text(json.dumps({"times_s": times[1:], "payload_bytes": payload}))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="70m")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            out = os.path.join(tmp, f"r{n}.json")
            mp.spawn(_worker, args=(n, os.path.join(tmp, f"init{n}"), args.preset, args.dtype, args.repeats, out),
                     nprocs=n, join=True)
            res = json.loads(Path(out).read_text())
            payload = res["payload_bytes"]
            rows.append({"ranks": n, "time_s": statistics.median(res["times_s"]), "payload_bytes": payload,
                         "ring_bytes_sent_per_rank": int(2 * (n - 1) / n * payload)})
    print(f"data-parallel preprocess_loraga, preset {args.preset} {args.dtype}, gloo on CPU "
          f"({os.cpu_count()} cores shared by all ranks)")
    print(f"{'ranks':>5} {'time (s)':>9} {'payload/rank (MiB)':>19} {'ring sent/rank (MiB)':>21}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['time_s']:>9.3f} {r['payload_bytes'] / 2**20:>19.1f} {r['ring_bytes_sent_per_rank'] / 2**20:>21.1f}")
    print("projected fp32 payload (all 7 projections): one reduction at the end vs a reduce-scatter every step")
    for name, shape in PROJECTIONS.items():
        p = target_params(*shape) * 4
        print(f"  {name}: {p / 2**30:.1f} GiB once (ring: 2(N-1)/N x that per rank); per-step reduce-scatter over 64 "
              f"steps: {64 * p / 2**30:.0f} GiB x (N-1)/N per rank")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"preset": args.preset, "dtype": args.dtype, "rows": rows}, indent=2))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()

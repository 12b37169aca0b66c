"""The ``distributed`` suite: estimation on torch.distributed (gloo, CPU): wall time, memory and bytes communicated
per rank.

Modes (``--modes``, default all):

* ``dp`` -- data parallel, every rank holds the whole model: N processes each run ``preprocess_loraga`` on their
  share of the preset's batches (round-robin); the sums and counts are reduced once at the end (one all_reduce
  per shape group + one for the counts). Bytes: the all_reduce payload per rank (every accumulator once, fp32)
  and what a ring all_reduce sends per rank (2 (N-1)/N x payload).
* ``fsdp2`` / ``fsdp1`` -- every decoder layer and the root ``fully_shard``-ed on a CPU mesh (or wrapped in
  FSDP1 ``FullyShardedDataParallel(use_orig_params=True)``); each rank keeps only its rows of
  the fp32 accumulators, filled by one reduce-scatter per backward pass per layer. Every rank gets the same
  number of batches (the preset's batches cut to a multiple of N). Bytes: the reduce-scatter inputs counted by
  wrapping ``dist.reduce_scatter_tensor``, and what a ring reduce-scatter sends per rank ((N-1)/N x that).
* ``zero3`` -- DeepSpeed ZeRO-3 (needs ``pip install deepspeed``): the model built under ``deepspeed.zero.Init``
  (every weight partitioned: ``stage3_param_persistence_threshold: 0``) and wrapped by a stage-3 engine without
  optimizer, whose hooks gather each layer's weight for its forward and backward; the accumulators are row-sharded
  and filled as for fsdp2. fp32 only. DeepSpeed's weight all-gathers are not in the bytes columns. How many
  gathered weights DeepSpeed keeps between forward and backward (``stage3_max_reuse_distance``,
  ``stage3_max_live_parameters``, ``stage3_prefetch_bucket_size``) shows in the extra peak: ``--zero3-options``.

Per N: the wall time of the call on rank 0 (median of ``--repeats``, after a warm-up), the accumulator bytes per
rank (the storages behind the attached gradients; the largest over the ranks) and the extra peak per rank: how far
the process's RSS rose above its level just before the warm-up call, the first in a fresh process (sampled every
millisecond, :class:`~loraga_fast.bench.memprobe.MemoryProbe`; the largest over the ranks). Also printed: projected
volumes for LLaMA-7B and LLaMA-2-70B with all seven projections targeted: one reduction at the end (dp) vs a
reduce-scatter every step (fsdp2).

    loraga-fast bench distributed --preset 70m --ranks 1 2 3
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

from ..api.preprocess import preprocess_loraga
from ..ops.rsvd import batched_rsvd
from .harness import result_path, suite_parser, write_json
from .memprobe import MemoryProbe
from .workloads import PRESETS, build_model, make_batches, make_lora_config, make_train_step

MODES = ["dp", "fsdp2", "fsdp1", "zero3"]
# (name, hidden, layers, intermediate, kv_dim): all seven projections targeted
PROJECTIONS = {"llama-7b": (4096, 32, 11008, 4096), "llama-2-70b": (8192, 80, 28672, 1024)}


def target_params(hidden: int, layers: int, intermediate: int, kv_dim: int) -> int:
    return layers * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate)


# every weight partitioned (none kept whole as "persistent"), no optimizer: the engine only gathers weights
ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
                                                                          "stage3_param_persistence_threshold": 0}}


def _zero3_model(rank: int, world: int, preset: str, options: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """The preset's model built partitioned under ``deepspeed.zero.Init`` and wrapped by a stage-3 engine
    (``options`` merged into ``zero_optimization``), and the engine (destroyed before the process group goes)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    from transformers import LlamaForCausalLM  # noqa: F401 (imported outside zero.Init: its class patches survive)

    # the optional shared-memory op only serves DeepSpeed's inference all-reduce; building it is a 2-minute compile
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    config = {**ZERO3_CONFIG, "zero_optimization": {**ZERO3_CONFIG["zero_optimization"], **options}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = build_model(preset, "fp32", "cpu")
    engine, *_ = deepspeed.initialize(model=model, config=config)  # its hooks stay on the model's layers
    return model, engine


def _worker(rank: int, world: int, init: str, preset: str, dtype: str, repeats: int, out: str, mode: str,
            zero3_options: dict[str, Any]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share this machine's cores: no oversubscription
    engine = None
    try:
        if mode == "zero3":
            model, engine = _zero3_model(rank, world, preset, zero3_options)
        else:
            model = build_model(preset, dtype, "cpu")
        batches = make_batches(preset, "cpu")
        if mode == "fsdp2":
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        elif mode == "fsdp1":
            layers = model.model.layers
            for i, layer in enumerate(layers):
                layers[i] = FullyShardedDataParallel(layer, device_id=torch.device("cpu"), use_orig_params=True)
            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
        if mode != "dp":
            batches = batches[: len(batches) // world * world]
        batches = batches[rank::world]
        step = make_train_step(model, batches)
        scattered = [0]
        reduce_scatter = dist.reduce_scatter_tensor

        def counting(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            scattered[0] += input.numel() * input.element_size()
            return reduce_scatter(output, input, *args, **kwargs)

        dist.reduce_scatter_tensor = counting  # type: ignore[assignment]
        times, payload, acc_bytes, peak_extra = [], 0, 0, 0
        for i in range(repeats + 1):  # the first call is a warm-up, and the one whose memory is measured
            for m in model.modules():
                if hasattr(m, "_peft_loraga_grad"):
                    del m._peft_loraga_grad
            scattered[0] = 0
            gc.collect()
            dist.barrier()
            probe = MemoryProbe(torch.device("cpu"))
            start = time.perf_counter()
            with probe if i == 0 else contextlib.nullcontext():
                preprocess_loraga(model, make_lora_config(preset), step)
            dist.barrier()
            times.append(time.perf_counter() - start)
            if i == 0:
                assert probe.reading is not None
                peak_extra = probe.reading.peak_extra_bytes
            grads = [m._peft_loraga_grad for m in model.modules() if hasattr(m, "_peft_loraga_grad")]
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            acc_bytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}.values())
            payload = sum(g.numel() * 4 for g in grads) + 8 * len(grads)
        factor_s, broadcast_s = _factor_vs_broadcast(grads) if mode == "dp" else (None, None)
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, (acc_bytes, peak_extra))
        if rank == 0:
            Path(out).write_text(json.dumps({"times_s": times[1:], "payload_bytes": payload, "acc_bytes": acc_bytes,
                                             "acc_bytes_per_rank": [a for a, _ in per_rank],
                                             "peak_extra_bytes_per_rank": [p for _, p in per_rank],
                                             "scattered_bytes": scattered[0], "batches_per_rank": len(batches),
                                             "factor_s": factor_s, "broadcast_s": broadcast_s}))
        # DeepSpeed's engine and FSDP's state go while the process group still exists, and every rank leaves
        # together: a process that tore its group down first aborted its peer's gloo threads ("terminate called")
        if engine is not None:
            engine.destroy()
        del model, grads, local
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _factor_vs_broadcast(grads: list[torch.Tensor], r: int = 8) -> tuple[float, float]:
    """Data parallel, after the reduction every rank holds the same mean gradients. Option A (ours): every rank
    runs the batched randomized SVD of every shape group itself. Option B: rank 0 runs it and broadcasts the
    factors. Returns (time of the factorization, slowest rank; time to broadcast its results): A costs the first,
    B the first plus the second (on one device per rank; ranks sharing CPU cores here also slow A down)."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(tuple(g.shape), []).append(g)
    stacks = [torch.stack(gs) for gs in groups.values()]
    dist.barrier()
    start = time.perf_counter()
    factors = [batched_rsvd(a, 2 * r, 4 * r, 4, generator=torch.Generator().manual_seed(0)) for a in stacks]
    dist.barrier()
    factor_s = time.perf_counter() - start
    start = time.perf_counter()
    for triple in factors:
        for t in triple:
            dist.broadcast(t.contiguous(), src=0)
    dist.barrier()
    return factor_s, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser("distributed", __doc__)
    parser.add_argument("--preset", default="70m", choices=list(PRESETS))
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="default: all (zero3 only where DeepSpeed is installed and --dtype is fp32)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--zero3-options", type=json.loads, default={}, metavar="JSON",
                        help="zero3: merged into DeepSpeed's zero_optimization, e.g. "
                             "'{\"stage3_max_reuse_distance\": 0}'")
    parser.add_argument("--json", type=Path, default=result_path(None, "distributed"), help="results file (default %(default)s)")
    args = parser.parse_args(argv)
    zero3_unavailable = ("needs DeepSpeed: pip install deepspeed" if importlib.util.find_spec("deepspeed") is None
                         else "runs in fp32 only (DeepSpeed sets a ZeRO-3 model's dtype from its own config)"
                         if args.dtype != "fp32" else None)
    if args.modes is None:
        args.modes = [m for m in MODES if m != "zero3" or zero3_unavailable is None]
        if zero3_unavailable is not None:
            print(f"zero3 left out: it {zero3_unavailable}")
    elif "zero3" in args.modes and zero3_unavailable is not None:
        parser.error(f"--modes zero3 {zero3_unavailable}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for n in args.ranks:
                out = os.path.join(tmp, f"{mode}{n}.json")
                mp.spawn(_worker, args=(n, os.path.join(tmp, f"init-{mode}{n}"), args.preset, args.dtype, args.repeats,
                                        out, mode, args.zero3_options), nprocs=n, join=True)
                res = json.loads(Path(out).read_text())
                payload = res["payload_bytes"]
                # dp: one ring all_reduce of every accumulator; fsdp2: a ring reduce-scatter per backward per layer
                sent = 2 * (n - 1) / n * payload if mode == "dp" else (n - 1) / n * res["scattered_bytes"]
                rows.append({"mode": mode, "ranks": n, "time_s": statistics.median(res["times_s"]),
                             "factor_every_rank_s": res["factor_s"], "broadcast_factors_s": res["broadcast_s"],
                             "batches_per_rank": res["batches_per_rank"],
                             "acc_bytes_per_rank": max(res["acc_bytes_per_rank"]),
                             "peak_extra_bytes_per_rank": max(res["peak_extra_bytes_per_rank"]),
                             "acc_bytes_each_rank": res["acc_bytes_per_rank"],
                             "peak_extra_bytes_each_rank": res["peak_extra_bytes_per_rank"],
                             "payload_bytes": payload, "reduce_scatter_input_bytes": res["scattered_bytes"],
                             "ring_bytes_sent_per_rank": int(sent)})
    print(f"distributed preprocess_loraga, preset {args.preset} {args.dtype}, gloo on CPU "
          f"({os.cpu_count()} cores shared by all ranks)")
    print(f"{'mode':>5} {'ranks':>5} {'batches/rank':>12} {'time (s)':>9} {'accumulators/rank (MiB)':>24} "
          f"{'extra peak/rank (MiB)':>22} {'ring sent/rank (MiB)':>21}")
    for r in rows:
        print(f"{r['mode']:>5} {r['ranks']:>5} {r['batches_per_rank']:>12} {r['time_s']:>9.3f} "
              f"{r['acc_bytes_per_rank'] / 2**20:>24.1f} {r['peak_extra_bytes_per_rank'] / 2**20:>22.1f} "
              f"{r['ring_bytes_sent_per_rank'] / 2**20:>21.1f}")
    for r in rows:
        if r["mode"] == "dp" and r["ranks"] > 1:
            print(f"dp {r['ranks']} ranks, factors (r=8): every rank factors {r['factor_every_rank_s']:.3f} s; rank 0 "
                  f"factors and broadcasts: + {r['broadcast_factors_s'] * 1e3:.1f} ms of broadcast")
    print("projected fp32 payload (all 7 projections): one reduction at the end vs a reduce-scatter every step")
    for name, shape in PROJECTIONS.items():
        p = target_params(*shape) * 4
        print(f"  {name}: {p / 2**30:.1f} GiB once (ring: 2(N-1)/N x that per rank); per-step reduce-scatter over 64 "
              f"steps: {64 * p / 2**30:.0f} GiB x (N-1)/N per rank")
    write_json(args.json, {"preset": args.preset, "dtype": args.dtype, "zero3_options": args.zero3_options,
                           "rows": rows})
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()

"""Data parallel on torch.distributed (gloo, CPU): 2 and 3 processes give the single-process answer. (FSDP1 refusals:
tests/distributed/test_sharding.py; FSDP runs: tests/distributed/test_fsdp.py.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loraga_fast import estimate_gradient, preprocess_loraga
from tests._helpers import (
    attached,
    lora_ga_config,
    reference_mean_grads,
    rel_err,
    tiny_llama,
    token_batches,
    train_step_for,
)

NUM_BATCHES = 5  # split unevenly over the ranks: 3/2 and 2/2/1


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from peft import get_peft_model

        batches = token_batches(n=NUM_BATCHES)[rank::world]
        model = tiny_llama()
        cfg = lora_ga_config()
        cache = os.path.join(out_dir, "cache.safetensors")
        preprocess_loraga(model, cfg, train_step_for(model, batches), cache_file=cache)
        grads = {n: g.clone() for n, g in attached(model).items()}
        pm = get_peft_model(model, cfg)
        factors = {n: m.lora_B["default"].weight.detach().clone() for n, m in pm.named_modules()
                   if hasattr(m, "lora_B") and "default" in m.lora_B}
        named = estimate_gradient(tiny_llama(), [{"input_ids": b, "labels": b} for b in batches], progress=False)
        torch.save({"grads": grads, "factors": factors, "estimate": named}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_equals_single_process(world: int, tmp_path: Path) -> None:
    batches = token_batches(n=NUM_BATCHES)
    single = tiny_llama()
    preprocess_loraga(single, lora_ga_config(), train_step_for(single, batches))
    expected = attached(single)
    reference = reference_mean_grads(tiny_llama(), list(expected), batches)

    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r, res in enumerate(results):
        assert res["grads"].keys() == expected.keys() and len(expected) == 14
        for n, g in res["grads"].items():
            assert rel_err(g, expected[n]) <= 1e-6, (r, n)
            assert rel_err(g, reference[n]) < 1e-5, (r, n)
            assert rel_err(res["estimate"][n], expected[n]) <= 1e-6, (r, n)  # estimate_gradient reduces too
        for n, b in res["factors"].items():  # every rank initializes the same adapters
            assert torch.equal(b, results[0]["factors"][n]), (r, n)
    assert (tmp_path / "cache.safetensors").is_file()  # written once, by rank 0


def test_accelerate_ddp_launch(tmp_path: Path) -> None:
    """estimate_gradient with an Accelerator and train_step_from_trainer under a real 2-process launch."""
    import subprocess

    script = Path(__file__).parent / "launched" / "accelerate_ddp.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "MASTER_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    rows = results[0]["rows"]
    batches = [torch.stack(rows[i : i + 2]) for i in range(0, len(rows), 2)]  # the union of both ranks' batches
    reference = reference_mean_grads(tiny_llama(), list(results[0]["trainer"]), batches)
    for r, res in enumerate(results):
        assert res["world"] == 2 and res["ddp"] == "DistributedDataParallel"
        assert len(res["trainer"]) == 14 and set(res["trainer"]) <= set(res["estimate"])
        for n, ref in reference.items():
            assert rel_err(res["estimate"][n], ref) < 1e-5, (r, n)  # all 4 batches, split over the ranks
            assert rel_err(res["trainer"][n], ref) < 1e-5, (r, n)

"""until="converged" on 2 gloo processes: data parallel and FSDP2 ranks decide together and stop at the same pass,
with the mean over the passes all of them ran, in exact mode and in one-pass low-memory mode (whose checks read the
processes' merged factorization, leaving the store alone); ranks running different numbers of forwards fail on every
rank instead of hanging."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests._helpers import spawn
from tests.core.test_convergence import (
    Probe,
    expected_stop,
    probe_batches,
    probe_config,
)

WORLD = 2
CHANGING = 8  # global batches that move the subspaces: 4 per rank


def _worker(rank: int, world: int, init_file: str, out_dir: str, layout: str, uneven: bool, mode: str = "exact") -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from loraga_fast.api.preprocess import run_plan
        from loraga_fast.core.plan import Plan, make_plan

        torch.manual_seed(0)
        model = Probe()
        if layout == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        batches = probe_batches(None if uneven else CHANGING, 40)[rank::world]
        if uneven:
            batches = batches[: 10 + 2 * rank]  # 10 and 12 forwards, never converging
        done: list[int] = []

        def step() -> None:
            for x, t in batches:
                model(x, t).backward()
                done.append(1)

        result: dict[str, object] = {}
        try:
            kwargs = {"mode": "lowmem", "passes": 1} if mode == "lowmem" else {}
            stores: list = []  # type: ignore[type-arg]
            new_store = Plan.new_store  # (this process's own class) keep a handle on the store the run uses
            Plan.new_store = lambda self: stores.append(new_store(self)) or stores[-1]  # type: ignore[method-assign]
            est = run_plan(model, make_plan(model, probe_config(), until="converged", **kwargs), step)
            if mode == "lowmem":  # factors, not a mean: the merged top 2r triplets (the same on both ranks)
                f = stores[0].factors({"lin": 1})["lin"]
                grad = (f.u * f.s) @ f.v.T
            else:
                grad = model.lin._peft_loraga_grad
                grad = grad.full_tensor() if layout == "fsdp2" else grad
            result = {"done": len(done), "est": est, "grad": grad}
        except ValueError as err:
            result = {"done": len(done), "error": str(err)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["exact", "lowmem"], ids=["exact", "lowmem-1pass"])
@pytest.mark.parametrize("layout", ["data_parallel", "fsdp2"])
def test_ranks_stop_together(layout: str, mode: str, tmp_path: Path) -> None:
    spawn(_worker, WORLD, tmp_path, layout, False, mode)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    local = expected_stop(CHANGING // WORLD, 4)  # checks after every 4 local passes, on the global sums
    batches = probe_batches(CHANGING, 40)[: WORLD * local]
    expected = sum(t.T @ x for x, t in batches) / len(batches)
    tol = {"rtol": 1e-6, "atol": 0.0}
    if mode == "lowmem":  # the top 2r = 2 triplets of the mean, as merged after the pass (checks left them alone)
        u, s, vh = torch.linalg.svd(expected.double())
        expected = ((u[:, :2] * s[:2]) @ vh[:2]).float()
        tol = {"rtol": 1e-5, "atol": 1e-5 * float(expected.abs().max())}
    for res in results:
        assert "error" not in res, res
        assert res["done"] == local and res["est"].backward_passes == WORLD * local
        assert res["est"].convergence["converged"]
        assert res["est"].convergence["last_check"]["backward_passes"] == WORLD * local
        torch.testing.assert_close(res["grad"], expected, **tol)
    assert torch.equal(results[0]["grad"], results[1]["grad"])


@pytest.mark.parametrize("layout", ["data_parallel", "fsdp2"])
def test_ranks_running_different_numbers_of_forwards_fail_on_every_rank(layout: str, tmp_path: Path) -> None:
    spawn(_worker, WORLD, tmp_path, layout, True)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert "until='converged': ranks ran different numbers of forward passes" in res.get("error", ""), res

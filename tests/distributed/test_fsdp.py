"""FSDP2 (``fully_shard`` on a CPU device mesh) and FSDP1 (``use_orig_params=True``), gloo: sharded accumulators,
the sharded randomized SVD and shard-wise initialization give the single-process answer; uneven step counts fail
loudly instead of hanging."""

from __future__ import annotations

import gc
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from loraga_fast import LoraGAContext, estimate_gradient, preprocess_loraga
from loraga_fast.ops.rsvd import batched_rsvd
from tests._helpers import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    attached,
    lora_ga_config,
    reference_mean_grads,
    rel_err,
    spawn,
    subspace_cos,
    tiny_gpt2,
    tiny_llama,
    token_batches,
    train_step_for,
)

NUM_BATCHES = 6  # 3/3 over two ranks, 2/2/2 over three
MODELS = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}


def _init(rank: int, world: int, init_file: str) -> object:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    return init_device_mesh("cpu", (world,))


def _shard(model: torch.nn.Module, mesh: object, version: int = 2) -> torch.nn.Module:
    """Each decoder block, then the root: FSDP2 ``fully_shard`` (in place), or FSDP1 with ``use_orig_params=True``."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    if version == 1:
        for i, block in enumerate(blocks):
            blocks[i] = FullyShardedDataParallel(block, device_id=torch.device("cpu"), use_orig_params=True)
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _bare(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FSDP1 module names without its wrapper segments."""
    return {n.replace("_fsdp_wrapped_module.", ""): t for n, t in named.items()}


def _factors(peft_model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for n, m in peft_model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}


def _options(mode: str) -> dict[str, object]:
    """``lowmem1``: one-pass low-memory mode (each process folds its batches into its own truncated SVDs, merged
    after the pass)."""
    return {"mode": "lowmem", "passes": 1} if mode == "lowmem1" else {"mode": mode}


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str, kind: str, scale: str, mode: str,
                 version: int) -> None:
    mesh = _init(rank, world, init_file)
    try:
        from peft import get_peft_model

        make, targets = MODELS[kind]
        model = _shard(make(), mesh, version)
        batches = token_batches(n=NUM_BATCHES)[rank::world]
        probe = token_batches(n=1, seed=7)[0]
        with torch.no_grad():
            before = model(input_ids=probe).logits
        cfg = lora_ga_config(targets, scale=scale)
        preprocess_loraga(model, cfg, train_step_for(model, batches), **_options(mode))
        if mode.startswith("lowmem"):  # placeholders, no gradients: only the initialization is compared
            pm = get_peft_model(model, cfg)
            with torch.no_grad():
                after = pm(input_ids=probe).logits
            torch.save({"factors": _bare(_factors(pm)), "out_diff": (after - before).abs().max().item(),
                        "out_scale": before.abs().max().item(), "left": attached(model)},
                       os.path.join(out_dir, f"rank{rank}.pt"))
            dist.barrier()
            return
        grads = _bare(attached(model))
        storages = {t.to_local().untyped_storage().data_ptr(): t.to_local().untyped_storage().nbytes()
                    for t in grads.values()}
        local_rows = {n: t.to_local().shape[0] for n, t in grads.items()}
        full = {n: t.full_tensor() for n, t in grads.items()}
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            after = pm(input_ids=probe).logits
        result = {"grads": full, "acc_bytes": sum(storages.values()), "local_rows": local_rows,
                  "factors": _bare(_factors(pm)), "out_diff": (after - before).abs().max().item(),
                  "out_scale": before.abs().max().item(), "left": attached(model)}
        if kind == "llama" and scale == "stable":  # the original utilities on a sharded model
            model2 = _shard(make(), mesh, version)
            named = estimate_gradient(model2, [{"input_ids": b, "labels": b} for b in batches], progress=False)
            result["estimate"] = _bare({n: g.full_tensor() for n, g in named.items()})
            with LoraGAContext(model2, named):
                pm2 = get_peft_model(model2, lora_ga_config())
            result["context_factors"] = _bare(_factors(pm2))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("version", "world", "kind", "scale", "mode"), [
    (2, 2, "llama", "stable", "exact"), (2, 3, "llama", "stable", "exact"), (2, 3, "llama", "weight_svd", "exact"),
    (2, 2, "gpt2", "stable", "exact"), (2, 2, "llama", "weight_svd", "lowmem"),
    (1, 2, "llama", "stable", "exact"), (1, 3, "llama", "gd_scale", "lowmem"), (2, 2, "llama", "stable", "lowmem1"),
])
def test_fsdp_equals_single_process(version: int, world: int, kind: str, scale: str, mode: str, tmp_path: Path) -> None:
    from peft import get_peft_model

    make, targets = MODELS[kind]
    batches = token_batches(n=NUM_BATCHES)
    single = make()
    cfg = lora_ga_config(targets, scale=scale)
    preprocess_loraga(single, cfg, train_step_for(single, batches), **_options(mode))
    expected = {n: g.clone() for n, g in attached(single).items()} if mode == "exact" else {}
    reference = reference_mean_grads(make(), list(expected), batches) if mode == "exact" else {}
    expected_factors = _factors(get_peft_model(single, cfg))
    full_bytes = 4 * sum(g.numel() for g in expected.values())

    spawn(_fsdp_worker, world, tmp_path, kind, scale, mode, version)
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert not res["left"]  # get_peft_model consumed every attached gradient
        assert res["out_diff"] <= 1e-5 * res["out_scale"], r  # W - s B A + s B A = W
        assert res["factors"].keys() == expected_factors.keys() and expected_factors
        for n, (a, b) in res["factors"].items():
            a0, b0 = expected_factors[n]
            assert subspace_cos(a.T, a0.T) > 0.9999 and subspace_cos(b, b0) > 0.9999, (r, n)
            torch.testing.assert_close(b.norm(dim=0), b0.norm(dim=0), rtol=1e-4, atol=1e-7)  # singular values
            assert rel_err(b @ a, b0 @ a0) < 1e-4, (r, n)
        if mode.startswith("lowmem"):
            continue
        assert res["grads"].keys() == expected.keys() and expected
        for n, g in res["grads"].items():
            assert rel_err(g, expected[n]) <= 1e-6, (r, n)
            assert rel_err(g, reference[n]) < 1e-5, (r, n)
            assert res["local_rows"][n] <= math.ceil(g.shape[0] / world), (r, n)
        # each rank holds its rows only: 1/N of the gradients, plus the zero rows padding uneven splits
        padded = 4 * sum(math.ceil(g.shape[0] / world) * g.shape[1] for g in expected.values())
        assert res["acc_bytes"] == padded, r
        assert full_bytes / world <= res["acc_bytes"] <= full_bytes / world * 1.2, r
        if "estimate" in res:
            assert set(expected) <= set(res["estimate"])  # estimate_gradient: every linear layer
            for n, g in expected.items():
                assert rel_err(res["estimate"][n], g) <= 1e-6, (r, n)
            for n, (a, b) in res["context_factors"].items():
                assert rel_err(b @ a, expected_factors[n][1] @ expected_factors[n][0]) < 1e-4, (r, n)


def _uneven_worker(rank: int, world: int, init_file: str, out_dir: str, version: int) -> None:
    mesh = _init(rank, world, init_file)
    try:
        model = _shard(tiny_llama(), mesh, version)
        batches = token_batches(n=3)[: 2 if rank == 0 else 1]  # rank 0 runs one step more
        flags = [p.requires_grad for p in model.parameters()]
        try:
            preprocess_loraga(model, lora_ga_config(), train_step_for(model, batches))
            message = "no error"
        except ValueError as e:
            message = str(e)
        restored = flags == [p.requires_grad for p in model.parameters()] and not attached(model)
        Path(out_dir, f"rank{rank}.txt").write_text(f"{restored}\n{message}")
        del model  # FSDP's state goes while the process group still exists
        gc.collect()
        dist.barrier()  # both ranks leave the error path before the process group is torn down
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("version", [2, 1])
def test_fsdp_uneven_steps_fail_loudly(version: int, tmp_path: Path) -> None:
    spawn(_uneven_worker, 2, tmp_path, version, timeout=120.0)
    for r in range(2):
        restored, message = (tmp_path / f"rank{r}.txt").read_text().split("\n", 1)
        assert "ranks ran different numbers of forward passes" in message and "same number of" in message, (r, message)
        assert restored == "True", r


def _rsvd_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    try:
        from loraga_fast.ops.rsvd import gather_rows, sharded_rsvd

        out = {}
        for name, (m, n) in {"tall": (37, 20), "wide": (13, 30)}.items():
            a = _matrices(m, n)
            c = math.ceil(m / world)
            local = torch.zeros(a.shape[0], c, n, dtype=a.dtype)
            rows = a[:, rank * c : (rank + 1) * c]
            local[:, : rows.shape[1]] = rows
            gen = torch.Generator().manual_seed(3)
            u, s, v = sharded_rsvd(local, m, 4, 8, 4, generator=gen)
            out[name] = (gather_rows(u, None)[:, :m], s, v)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _matrices(m: int, n: int) -> torch.Tensor:
    """A decaying spectrum, an exactly rank-2 matrix (orthonormalization fallback) and a zero matrix, float64."""
    g = torch.Generator().manual_seed(m * n)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    decaying = u @ torch.diag(0.7 ** torch.arange(min(m, n), dtype=torch.float64)) @ v.T
    rank2 = u[:, :2] @ v[:, :2].T
    return torch.stack([decaying, rank2, torch.zeros(m, n, dtype=torch.float64)])


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_rsvd_equals_batched(world: int, tmp_path: Path) -> None:
    spawn(_rsvd_worker, world, tmp_path)
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for name, (m, n) in {"tall": (37, 20), "wide": (13, 30)}.items():
            a = _matrices(m, n)
            u, s, v = res[name]
            u0, s0, v0 = batched_rsvd(a, 4, 8, 4, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(s, s0, rtol=1e-10, atol=1e-12)
            # decaying spectrum: the same factors (canonical signs); rank 2: the same leading pairs and product
            torch.testing.assert_close(u[0], u0[0], rtol=0, atol=1e-8)
            torch.testing.assert_close(v[0], v0[0], rtol=0, atol=1e-8)
            torch.testing.assert_close(u[1] @ torch.diag(s[1]) @ v[1].T, a[1], rtol=0, atol=1e-10)
            assert torch.isfinite(u[2]).all() and torch.isfinite(v[2]).all() and s[2].abs().max() == 0
            assert (u.mT @ u - torch.eye(4, dtype=u.dtype)).abs().max() < 1e-10, (r, name)

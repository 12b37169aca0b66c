"""FSDP-sharded models (:mod:`loraga_fast.distributed.layout`, :mod:`loraga_fast.distributed.dtensor`) in one process where possible: the
row split, layout detection, the refusals and their messages; and one two-process check of the row-sharded
accumulators. The end-to-end FSDP runs are in tests/distributed/test_fsdp.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from loraga_fast import UsageError, preprocess_loraga
from loraga_fast.distributed.dtensor import is_dtensor, local_tensor, rows_per_process
from loraga_fast.stores.sharded import ShardedStore, new_store
from loraga_fast.distributed.layout import ShardLayout, check_sharded_call, check_sharded_config, shard_layout
from loraga_fast.stores.exact import AccumulatorStore
from tests._helpers import attached, lora_ga_config, spawn, tiny_llama


@pytest.mark.parametrize("rows", [0, 1, 5, 7, 8, 9, 32])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rows_per_rank_is_torch_chunk(rows: int, world: int) -> None:
    """FSDP2's Shard(0) splits like torch.chunk: the first chunk's size, and every rank holds at most that many."""
    c = rows_per_process(rows, world)
    chunks = torch.arange(rows).chunk(world) if rows else ()
    assert c == (len(chunks[0]) if chunks else 0)
    assert c * world >= rows and (c - 1) * world < rows or rows == 0


def test_plain_tensors_and_models() -> None:
    t = torch.randn(3, 2)
    assert not is_dtensor(t) and local_tensor(t) is t
    model = tiny_llama()
    targets = [(n, m) for n, m in model.named_modules() if n.endswith("q_proj")]
    assert shard_layout(targets, model) is None and shard_layout(targets) is None
    store = new_store(targets, None)
    assert type(store) is AccumulatorStore and list(store.slots) == [n for n, _ in targets]


def test_sharded_call_and_config_refusals() -> None:
    group = object()
    fsdp2, fsdp1 = ShardLayout(mesh=None, process_group=group), ShardLayout(mesh=None, process_group=group, owners={})
    zero3 = ShardLayout(mesh=None, process_group=group, engine="zero3")
    check_sharded_call(fsdp2, None)
    check_sharded_call(fsdp2, group)  # the model's own group is fine
    with pytest.raises(UsageError, match="process_group differs from the process group the model is sharded over by FSDP"):
        check_sharded_call(fsdp2, object())
    with pytest.raises(UsageError, match="sharded over by DeepSpeed ZeRO-3"):
        check_sharded_call(zero3, object())
    check_sharded_config(fsdp2, lora_ga_config(scale="weight_svd"))  # FSDP2 serves weight_svd
    check_sharded_config(fsdp1, lora_ga_config(scale="stable"))
    with pytest.raises(UsageError, match="scale='weight_svd' is not supported on FSDP1"):
        check_sharded_config(fsdp1, lora_ga_config(scale="weight_svd"))


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """torch.distributed (gloo) with a single rank in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("orig_params", "scale", "message"), [
    (False, "stable", "'model.layers.0' was wrapped with use_orig_params=False.*use_orig_params=True"),
    (True, "weight_svd", "scale='weight_svd' is not supported on FSDP1"),
])
def test_unsupported_fsdp1_setups_are_refused_clearly(one_rank: None, orig_params: bool, scale: str,
                                                      message: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = tiny_llama()
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = FullyShardedDataParallel(layer, device_id=torch.device("cpu"),
                                                         use_orig_params=orig_params)
    called = []
    with pytest.raises(ValueError, match=message):
        preprocess_loraga(model, lora_ga_config(scale=scale), lambda: called.append(1))
    assert not called and not attached(model)


def test_fsdp2_layout_and_a_partly_sharded_model(one_rank: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    model = tiny_llama()
    fully_shard(model.model.layers[0], mesh=mesh)  # layer 1 is left plain
    targets = [(n, m) for n, m in model.named_modules() if n.endswith("q_proj")]
    with pytest.raises(UsageError, match="Layer 'model.layers.1.self_attn.q_proj' is not sharded while "
                                         "'model.layers.0.self_attn.q_proj' is.*fully_shard to the model's root"):
        shard_layout(targets, model)
    fully_shard(model.model.layers[1], mesh=mesh)
    layout = shard_layout(targets, model)
    assert layout is not None and layout.owners is None and layout.mesh == mesh
    store = new_store(targets, layout)
    assert isinstance(store, ShardedStore) and store.world == 1 and store.local_rows(32) == range(0, 32)


# ---- two ranks: row shards filled by a reduce-scatter per backward pass ----------------------------------------------

SHAPES = {"a": (5, 3), "b": (5, 3), "c": (4, 6)}  # 5 rows over 2 ranks: 3 + 2 (one padding row on rank 1)


def _pairs(rank: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each rank's own (G, X) for two backward passes per layer (every rank must run the same passes: each one is a
    reduce-scatter)."""
    g = torch.Generator().manual_seed(10 + rank)
    return {name: [(torch.randn(7, m, generator=g), torch.randn(7, n, generator=g)) for _ in range(2)]
            for name, (m, n) in SHAPES.items()}


def _store_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        store = ShardedStore([(n, s, torch.device("cpu")) for n, s in SHAPES.items()],
                             ShardLayout(mesh=mesh, process_group=mesh.get_group()))
        for name, pairs in _pairs(rank).items():
            for g, x in pairs:
                store[name].add(g, x, False)
                store[name].count += 1
        store.reduce()
        if rank == 1:
            store["c"].acc[0, 0] = float("nan")  # a NaN in one rank's rows is every rank's non-finite gradient
        maxabs = store.magnitudes()
        means = store.mean_gradients()
        out = {"rows": {n: tuple(store.local_rows(s[0])) for n, s in SHAPES.items()}, "counts": store.counts(),
               "local": {n: tuple(local_tensor(t).shape) for n, t in means.items()}, "maxabs": maxabs,
               "full": {n: t.full_tensor() for n, t in means.items() if n != "c"}, "nbytes": store.nbytes}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_store_holds_this_ranks_rows_of_the_sum(tmp_path: Path) -> None:
    spawn(_store_worker, 2, tmp_path, timeout=120.0)
    sums = {n: sum(g.double().T @ x.double() for r in range(2) for g, x in _pairs(r)[n]) for n in SHAPES}
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["rows"] == {"a": (0, 1, 2) if r == 0 else (3, 4), "b": (0, 1, 2) if r == 0 else (3, 4),
                               "c": (0, 1) if r == 0 else (2, 3)}
        assert res["counts"] == {"a": 4, "b": 4, "c": 4}  # 2 + 2 backward passes, summed over the ranks
        assert res["local"] == {"a": (3 - r, 3), "b": (3 - r, 3), "c": (2, 6)}  # padding rows are not shown
        assert res["nbytes"] == 4 * (2 * 3 * 3 + 2 * 6)  # (B, ceil(m / 2), n) per shape group
        for n in ("a", "b"):
            assert res["maxabs"][n] == pytest.approx(sums[n].abs().max().item(), rel=1e-5)
            torch.testing.assert_close(res["full"][n].double(), sums[n] / 4, rtol=1e-5, atol=1e-6)
        assert res["maxabs"]["c"] == float("inf")

"""One-pass low-memory mode's distributed merge (:meth:`loraga_fast.stores.stream.StreamStore.merged`, a binomial
tree of ``2 l``-wide merges) on 2, 3 and 4 gloo processes, fed ``G`` and ``X`` directly, in the regime users run:
every backward pass compressed (``T > l`` tokens) and the sum truncated (its rank exceeds ``l``). The tree's shape
depends on the process count (3: one process idle in the first round; 4: two rounds). Every process ends with the
same bits; they capture a float64 SVD of the very sum as well as one process folding all the batches; ``merged``
leaves the store as it was; the merge's workspace stays within the memory formula. End to end (data parallel):
tests/api/test_lowmem_onepass.py; ZeRO-3: tests/distributed/test_zero3_onepass.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loraga_fast.stores.sketch import SketchSpec
from loraga_fast.stores.stream import StreamStore

R = 4  # LoRA rank: the factors' 2 r = 8 columns
LAYERS = {"a": (60, 50, 16, False), "b": (60, 50, 16, False), "c": (40, 70, 16, True)}  # (m, n, l, Conv1D)
BATCHES, TOKENS = 12, 24  # 24 tokens > l = 16: every batch compressed; the sums have rank 50 / 40 > l: truncated


def _sum(m: int, n: int, seed: int) -> torch.Tensor:
    """A full-rank ``(m, n)`` float64 gradient with a decaying spectrum (``0.8^i``) and a gap after ``2 r``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64)).Q
    s = 0.8 ** torch.arange(min(m, n), dtype=torch.float64)
    s[2 * R :] *= 0.5
    return (u * s) @ v.T


def batches() -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer, ``BATCHES`` backward passes ``(G_t, X_t)`` of ``TOKENS`` tokens: ``X_t`` Gaussian, ``G_t = X_t
    a^T`` plus noise, so each batch has rank ``TOKENS`` and their sum (``~ a``) is full rank."""
    out = {}
    for i, (name, (m, n, _, _)) in enumerate(LAYERS.items()):
        gen = torch.Generator().manual_seed(100 + i)
        a = _sum(m, n, i)
        out[name] = []
        for _ in range(BATCHES):
            x = torch.randn(TOKENS, n, generator=gen, dtype=torch.float64) / (TOKENS * BATCHES) ** 0.5
            g = x @ a.T + 1e-3 * torch.randn(TOKENS, m, generator=gen, dtype=torch.float64)
            out[name].append((g.float(), x.float()))
    return out


def fold(which: slice) -> StreamStore:
    """A one-pass store of :data:`LAYERS` fed the batches ``which`` of each layer, in order."""
    store = StreamStore([SketchSpec(name, m, n, k, torch.device("cpu"), transposed=t)
                         for name, (m, n, k, t) in LAYERS.items()])
    for name, pairs in batches().items():
        slot = store[name]
        for g, x in pairs[which]:
            slot.add(g, x, slot.transposed)
            slot.count += 1
    return store


def _state(store: StreamStore) -> list[torch.Tensor]:
    return [t.clone() for g in store.shape_groups for t in (g.u, g.s, g.v)]


def _merge(store: StreamStore, process_group: object) -> dict[str, object]:
    """``merged`` (checked not to touch the store), then ``reduce`` under :class:`LiveBytes`, then the factors."""
    from tests.stores.test_stream_workspace import LiveBytes

    before = _state(store)
    merged = {slot.name: tuple(t.clone() for t in usv) for slot, *usv in store.merged(process_group)}
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _state(store)))
    with LiveBytes() as probe:
        store.reduce(process_group)
    after = {name: (slot.group.u[slot.index], slot.group.s[slot.index], slot.group.v[slot.index])
             for name, slot in store.slots.items()}
    factors = store.factors(dict.fromkeys(LAYERS, R))
    return {"merged": merged, "after": after, "unchanged": unchanged, "peak": probe.peak, "counts": store.counts(),
            "factors": {n: (f.u, f.s, f.v) for n, f in factors.items()}}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    torch.set_num_threads(1)  # 4 processes on a 2-core runner
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {4: _merge(fold(slice(rank, None, world)), None)}
        three = dist.new_group([1, 2, 3])  # group ranks 0, 1, 2 are global 1, 2, 3: sends and the broadcast translate
        if rank > 0:
            out[3] = _merge(fold(slice(rank - 1, None, 3)), three)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_tree_merge_on_3_and_4_processes_equals_one_process_and_is_bit_identical(tmp_path: Path) -> None:
    """One launch of 4 gloo processes: the world (two rounds) and a group of 3 of them (global ranks 1-3: one process
    idle in the first round). Measured (worst over layers and both): A/B energies 0.99998 / 0.99981, within 1.1e-4
    of one process folding all the batches (0.99999 / 0.99990); singular values within 0.59% of the float64 SVD's
    (one process: 0.24%); the workspace peak 9.6 of the formula's 12.7 blocks. The bars are several times that,
    far below what a dropped process (singular values a third or a quarter short) gives."""
    from loraga_fast.core.memory import stream_workspace_bytes
    from tests._helpers import factor_energy, spawn  # here: the spawned processes import this module, not peft

    spawn(_worker, 4, tmp_path, timeout=150.0)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    single = fold(slice(None)).factors(dict.fromkeys(LAYERS, R))
    reference = {name: sum(g.double().T @ x.double() for g, x in pairs) / BATCHES for name, pairs in batches().items()}
    bound = stream_workspace_bytes([(m, n, k) for m, n, k, _ in LAYERS.values()])
    for world in (4, 3):
        members = [res[world] for res in results if world in res]
        assert len(members) == world
        for r, res in enumerate(members):
            assert res["unchanged"], (world, r)  # merged() read the state, did not write it
            assert res["counts"] == dict.fromkeys(LAYERS, BATCHES), (world, r)
            assert res["peak"] <= bound, (world, r, res["peak"], bound)
            for name in LAYERS:
                # what reduce wrote is what merged yielded, bit for bit, and the same on every process
                assert all(torch.equal(a, b) for a, b in zip(res["merged"][name], res["after"][name])), (world, r, name)
                assert all(torch.equal(a, b) for a, b in zip(res["factors"][name], members[0]["factors"][name])), (
                    world, r, name)
        for name, (_, _, _, transposed) in LAYERS.items():
            grad = reference[name].T if transposed else reference[name]  # the weight's layout, as the factors
            u, s, v = members[0]["factors"][name]
            a, b = factor_energy(grad, u, v, R)
            one_a, one_b = factor_energy(grad, single[name].u, single[name].v, R)
            assert a > 0.9995 and b > 0.999, (world, name, a, b)
            assert abs(a - one_a) < 1e-3 and abs(b - one_b) < 1e-3, (world, name, a, one_a, b, one_b)
            s0 = torch.linalg.svdvals(grad)[: 2 * R]
            assert ((s.double() - s0).abs() / s0).max() < 0.02, (world, name, ((s.double() - s0).abs() / s0).max())

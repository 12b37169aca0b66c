"""Low-memory mode's store (:class:`loraga_fast.stores.sketch.SketchStore`) driven by hand, without the capture op:
its memory, its passes (seeded bases, the alternation, fingerprints) and the factors it ends with."""

from __future__ import annotations

import math

import pytest
import torch

from loraga_fast.stores.sketch import (
    DEFAULT_SKETCH_PER_LORA_RANK,
    FINGERPRINT_PROBES,
    SketchSpec,
    SketchStore,
    sketch_columns,
)
from tests._helpers import LLAMA_TARGETS, rel_err, subspace_cos, wide_llama

CPU = torch.device("cpu")


def test_accumulator_memory_is_the_skinny_formula() -> None:
    model = wide_llama()
    targets = [(n, mod) for n, mod in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    k = DEFAULT_SKETCH_PER_LORA_RANK * 2
    specs = [SketchSpec(n, *mod.weight.shape, k, mod.weight.device) for n, mod in targets]
    store = SketchStore(specs)
    expected = sum((mod.weight.shape[0] + mod.weight.shape[1]) * k * 4 for _, mod in targets)
    assert store.sketch_nbytes == expected
    assert expected == 4096 * 48 * 4  # sum of (m + n) over q, k, v, o, gate, up, down = 512 + 384 + 384 + 512 + 3 * 768
    # documented extras: a 4x4 fingerprint per layer, one (m + n) x 4 probe pair per shape group
    extras = sum(4 * 16 for _ in targets) + sum((g.m + g.n) * 4 * 4 for g in store.shape_groups)
    assert store.nbytes == expected + extras
    assert len(store.shape_groups) == 4  # q/o, k/v, gate/up, down
    assert extras == 7 * 64 + (512 + 384 + 768 + 768) * 16
    assert all(g.m_side.shape == (len(g.slots), g.m, k) and g.n_side.shape == (len(g.slots), g.n, k) for g in store.shape_groups)


def test_sketch_columns() -> None:
    assert sketch_columns(4096, 4096, 8, None) == 192  # 24 r
    assert sketch_columns(4096, 4096, 8, 40) == 40
    assert sketch_columns(100, 64, 8, None) == 64  # at most min(m, n): the sketch is the whole space
    assert sketch_columns(30, 64, 8, 50) == 30
    assert sketch_columns(5, 5, 0, None) == 1


def _data(m: int, n: int, rank: int, batches: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(G, X)`` per backward pass whose summed ``G^T X`` has rank at most ``rank``."""
    mix_g, mix_x = torch.randn(rank, m, generator=gen), torch.randn(rank, n, generator=gen)
    out = []
    for _ in range(batches):
        h = torch.randn(9, rank, generator=gen)
        out.append((h @ mix_g, torch.randn(9, rank, generator=gen) @ mix_x))
    return out


def _run(store: SketchStore, data: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """What run_passes does, by hand: every pass adds every layer's (G, X); returns each pass's fingerprints."""
    prints = []
    for index in range(store.passes):
        store.begin_pass(index)
        for name, pairs in data.items():
            slot = store[name]
            for g, x in pairs:
                slot.add(g, x, False)
                slot.count += 1
        prints.append(store.fingerprints())
    return prints


@pytest.mark.parametrize("passes", [2, 3, 4])
def test_factors_are_the_top_triplets_of_the_mean_gradient(passes: int) -> None:
    """k = 6 columns for gradients of rank 5 (the sketch holds all of them): the factors are exact up to rounding,
    for forward (odd pass counts) and adjoint (even) endings, and in the (in, out) layout of transposed layers."""
    gen = torch.Generator().manual_seed(0)
    specs = [SketchSpec("a", 20, 12, 6, CPU), SketchSpec("b", 20, 12, 6, CPU), SketchSpec("c", 20, 12, 6, CPU, True),
             SketchSpec("d", 9, 30, 6, CPU)]
    data = {s.name: _data(s.m, s.n, 5, 3, gen) for s in specs}
    store = SketchStore(specs, passes=passes)
    prints = _run(store, data)
    assert store.counts() == dict.fromkeys("abcd", 3)
    for later in prints[1:]:  # the same data in every pass: the same fingerprints
        for name, fp in later.items():
            torch.testing.assert_close(fp, prints[0][name], rtol=1e-5, atol=1e-5)
    factors = store.factors({"a": 2, "b": 1, "c": 2, "d": 2})
    assert list(factors) == ["a", "b", "c", "d"]
    for name, f in factors.items():
        mean = sum(g.double().T @ x.double() for g, x in data[name]) / 3  # (m, n)
        if name == "c":
            mean = mean.T  # a transposed (Conv1D) layer's factors are in its (in, out) weight layout
        u, s, vh = torch.linalg.svd(mean)
        k = 4  # 2 r, and 2 r_max of the group for 'b'
        assert f.u.shape == (mean.shape[0], k) and f.v.shape == (mean.shape[1], k) and f.s.shape == (k,)
        assert 1 - subspace_cos(f.u, u[:, :k]) < 1e-8 and 1 - subspace_cos(f.v, vh[:k].T) < 1e-8, name
        assert rel_err(f.s, s[:k]) < 1e-5, name


def test_first_basis_is_seeded_and_later_ones_are_orthonormal() -> None:
    specs = [SketchSpec("a", 20, 12, 6, CPU)]
    one, two, other = SketchStore(specs), SketchStore(specs), SketchStore(specs, seed=1)
    for store in (one, two, other):
        store.begin_pass(0)
    assert not SketchStore.adjoint_pass(0) and SketchStore.adjoint_pass(1) and not SketchStore.adjoint_pass(2)
    # pass 0 multiplies by a Gaussian (n, k) basis: the same on every rank and run for one seed
    assert torch.equal(one.shape_groups[0].n_side, two.shape_groups[0].n_side)
    assert torch.equal(one.shape_groups[0].probe_m, two.shape_groups[0].probe_m)
    assert not torch.equal(one.shape_groups[0].n_side, other.shape_groups[0].n_side)
    assert one.shape_groups[0].m_side.abs().sum() == 0
    gen = torch.Generator().manual_seed(1)
    for g, x in _data(20, 12, 5, 2, gen):
        one["a"].add(g, x, False)
        one["a"].count += 1
    one.begin_pass(1)  # the product becomes an orthonormal basis; the other side is zeroed, and so are the counts
    basis = one.shape_groups[0].m_side[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(6), rtol=0, atol=1e-5)
    assert one.shape_groups[0].n_side.abs().sum() == 0 and one.counts() == {"a": 0}
    assert one.shape_groups[0].fingerprints.abs().sum() == 0


def test_fingerprint_is_the_probed_gradient() -> None:
    gen = torch.Generator().manual_seed(2)
    store = SketchStore([SketchSpec("a", 20, 12, 6, CPU)])
    store.begin_pass(0)
    pairs = _data(20, 12, 5, 3, gen)
    for g, x in pairs:
        store["a"].add(g, x, False)
    a = sum(g.double().T @ x.double() for g, x in pairs)
    group = store.shape_groups[0]
    expected = group.probe_m.double().T @ a @ group.probe_n.double()
    assert store.fingerprints()["a"].shape == (FINGERPRINT_PROBES, FINGERPRINT_PROBES)
    assert rel_err(store.fingerprints()["a"], expected) < 1e-5


def test_magnitudes_reports_zero_and_non_finite_gradients() -> None:
    store = SketchStore([SketchSpec(n, 8, 6, 4, CPU) for n in ("live", "zero", "nan", "inf")])
    store.begin_pass(0)
    x = torch.randn(5, 6)
    store["live"].add(torch.randn(5, 8), x, False)
    store["zero"].add(torch.zeros(5, 8), x, False)
    store["nan"].add(torch.full((5, 8), float("nan")), x, False)
    store["inf"].add(torch.full((5, 8), float("inf")), x, False)  # inf times a Gaussian basis: inf or NaN
    values = store.magnitudes()
    assert values["live"] > 0 and values["zero"] == 0
    assert math.isnan(values["nan"]) and not math.isfinite(values["inf"])

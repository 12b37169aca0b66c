"""Factors per shape group (:mod:`loraga_fast.stores.factors`), against exact float64 SVDs: a group's top-``2 r_max``
triplets from one batched randomized SVD, for the layers asked and once; every weight's top singular value for
``scale="weight_svd"``; the grouping of precomputed factors; the finiteness check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loraga_fast.errors import UsageError
from loraga_fast.layers.kinds import weight_shape
from loraga_fast.stores.factors import (
    FactorGroup,
    GradientGroup,
    LayerFactors,
    check_finite,
    factor_groups,
    weight_top_sigma,
)
from tests._helpers import factor_energy

M, N = 48, 40


def _batch(spectra: list[list[float]], m: int = M, n: int = N, seed: int = 0) -> torch.Tensor:
    """``(B, m, n)`` float32 matrices ``U diag(s) V^T`` with random orthonormal ``U``, ``V`` and the given leading
    singular values; the rest of each spectrum is 1e-3 x the last one given (a gap after it)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for top in spectra:
        k = min(m, n)
        s = torch.full((k,), top[-1] * 1e-3, dtype=torch.float64)
        s[: len(top)] = torch.tensor(top, dtype=torch.float64)
        s = s.sort(descending=True).values
        u = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen)).Q
        v = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen)).Q
        out.append(u @ torch.diag(s) @ v.T)
    return torch.stack(out).float()


def _group(tensor: torch.Tensor, ranks: dict[str, int], names: list[str] | None = None) -> GradientGroup:
    names = names or [f"l{i}" for i in range(tensor.shape[0])]
    modules = {name: nn.Linear(tensor.shape[2], tensor.shape[1]) for name in names}
    group = GradientGroup(tensor, names, modules, ranks, weight_svd=False)
    group._keep = modules  # type: ignore[attr-defined]  # the group holds weak references only
    return group


def _exact_s(mat: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(mat.double())


def test_gradient_group_factors_are_the_exact_top_2r_triplets() -> None:
    r = 3  # 2r = 6 leading values, then a gap of 1e-3; equal neighbours only away from the split at r (where the
    # best rank-r part, and so B's share, would not be unique)
    spectra = [[10.0, 8.0, 6.5, 5.0, 4.0, 3.0], [1.0, 0.9, 0.5, 0.45, 0.2, 0.1], [7.0, 7.0, 3.5, 3.0, 2.0, 2.0]]
    tensor = _batch(spectra)
    group = _group(tensor, {f"l{i}": r for i in range(3)})
    factors = group.factors()
    assert list(factors) == ["l0", "l1", "l2"] and group.full
    for i, name in enumerate(factors):
        f = factors[name]
        assert f.u.shape == (M, 2 * r) and f.s.shape == (2 * r,) and f.v.shape == (N, 2 * r) and f.weight_sigma is None
        exact = _exact_s(tensor[i])[: 2 * r]
        assert ((f.s.double() - exact).abs() / exact).max().item() < 1e-4, (name, f.s, exact)
        # the triplets reconstruct the matrix's best rank-2r part, and LoRA-GA's split captures the optimal energy
        best = (tensor[i].double().norm() ** 2 - exact.square().sum()).clamp(min=0).sqrt()
        residual = (tensor[i].double() - f.u.double() @ torch.diag(f.s.double()) @ f.v.double().T).norm()
        assert residual.item() <= best.item() * (1 + 1e-2) + 1e-5 * exact[0].item()
        a, b = factor_energy(tensor[i], f.u, f.v, r)
        assert a > 1 - 1e-4 and b > 1 - 1e-4, (name, a, b)


def test_mixed_ranks_in_one_group_use_two_r_max() -> None:
    tensor = _batch([[5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.2, 1.0]] * 2)
    factors = _group(tensor, {"l0": 1, "l1": 4}).factors()
    for i, name in enumerate(("l0", "l1")):  # 2 * max(1, 4) = 8 triplets for both, each its own matrix's
        assert factors[name].u.shape == (M, 8) and factors[name].s.shape == (8,) and factors[name].v.shape == (N, 8)
        exact = _exact_s(tensor[i])[:8]
        assert ((factors[name].s.double() - exact).abs() / exact).max().item() < 1e-4


class _Counting(GradientGroup):
    """Records the batches it factors."""

    calls: list[torch.Tensor]

    def factorize(self, batch: torch.Tensor, k: int, q: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.calls.append(batch)
        return super().factorize(batch, k, q, gen)


def test_a_subset_of_names_factors_only_those_once() -> None:
    # distinct scales: factors handed to the wrong layer would show in the singular values
    tensor = _batch([[9.0, 8.0], [90.0, 80.0], [0.9, 0.8]])
    names = ["a", "b", "c"]
    modules = {name: nn.Linear(N, M) for name in names}
    group = _Counting(tensor, names, modules, {"a": 1, "c": 1}, weight_svd=False, zero=["c", "b"])
    group.calls = []
    assert not group.full and group.index == [0, 2] and list(group.ranks) == ["a", "c"] and group.zero == {"c"}
    first = group.factors()
    assert list(first) == ["a", "c"] and [tuple(b.shape) for b in group.calls] == [(2, M, N)]
    assert torch.equal(group.calls[0], tensor[[0, 2]])
    for i, name in ((0, "a"), (2, "c")):
        exact = _exact_s(tensor[i])[:2]
        assert ((first[name].s.double() - exact).abs() / exact).max().item() < 1e-4, name
    second = group.factors()  # computed once: the same objects, no second factorization
    assert second is first and all(second[n] is first[n] for n in first) and len(group.calls) == 1
    assert group.grads["a"] is not None and set(group.grads) == {"a", "c"}


def test_the_weights_top_singular_value_on_a_flat_spectrum() -> None:
    """Random weights have a flat spectrum, where peft's svd_lowrank(q=r, niter=4) underestimates the top value by
    up to a few percent; weight_top_sigma is within 1e-3, chunked or not."""
    torch.manual_seed(0)
    modules = [nn.Linear(96, 128) for _ in range(11)]
    ranks = [2, 1, 4, 2, 2, 1, 1, 2, 8, 2, 1]
    exact = [torch.linalg.svdvals(m.weight.double())[0].item() for m in modules]
    chunked = weight_top_sigma(modules, ranks, torch.Generator().manual_seed(0), chunk=4)
    whole = weight_top_sigma(modules, ranks, torch.Generator().manual_seed(0), chunk=64)
    assert len(chunked) == len(whole) == 11
    for got in (chunked, whole):
        assert max(abs(g - e) / e for g, e in zip(got, exact)) < 1e-3, (got, exact)
    assert max(abs(c - w) / w for c, w in zip(chunked, whole)) < 1e-3


def test_factor_groups_group_by_shape_and_device_and_set_weight_sigma_of_non_zero_layers() -> None:
    torch.manual_seed(0)
    modules = {"q0": nn.Linear(32, 48), "k0": nn.Linear(32, 24), "q1": nn.Linear(32, 48), "k1": nn.Linear(32, 24),
               "meta": nn.Linear(32, 48, device="meta"), "zero": nn.Linear(32, 48)}
    names = list(modules)
    factors = {name: LayerFactors(u=torch.zeros(weight_shape(m)[0], 2), s=torch.ones(2),
                                  v=torch.zeros(weight_shape(m)[1], 2)) for name, m in modules.items()}
    ranks = dict.fromkeys(names, 1)
    zero = {"meta", "zero"}  # a weight on the meta device is never read: it is all zero
    groups = factor_groups(modules, names, factors, ranks, zero, dict.fromkeys(names), weight_svd=True,
                           shape_of=weight_shape)
    assert all(isinstance(g, FactorGroup) for g in groups)
    assert [list(g.modules) for g in groups] == [["q0", "q1", "zero"], ["k0", "k1"], ["meta"]]
    assert [g.zero for g in groups] == [{"zero"}, set(), {"meta"}]
    assert [list(g.factors()) for g in groups] == [["q0", "q1", "zero"], ["k0", "k1"], ["meta"]]
    assert groups[0].factors()["q1"] is factors["q1"]
    for name in ("q0", "k0", "q1", "k1"):
        exact = torch.linalg.svdvals(modules[name].weight.double())[0].item()
        assert factors[name].weight_sigma is not None
        assert abs(factors[name].weight_sigma - exact) / exact < 1e-3, name
    assert factors["zero"].weight_sigma is None and factors["meta"].weight_sigma is None

    plain = {name: LayerFactors(u=f.u, s=f.s, v=f.v) for name, f in factors.items()}
    factor_groups(modules, names, plain, ranks, zero, dict.fromkeys(names), weight_svd=False, shape_of=weight_shape)
    assert all(f.weight_sigma is None for f in plain.values())


def test_check_finite_names_the_bad_layers() -> None:
    maxabs = {"fine": 3.0, "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "zero": 0.0}
    check_finite(maxabs, ["fine", "zero"])  # only the names asked about are checked
    with pytest.raises(UsageError, match=r"the mean gradient of 3 layer\(s\) is not finite \(NaN/Inf\), e.g. from an "
                                         r"overflowing fp16 step: nan, inf, ninf\. No weight was modified") as info:
        check_finite(maxabs, list(maxabs))
    assert "fine" not in str(info.value) and "zero" not in str(info.value)
    many = {f"layer{i}": math.nan for i in range(10)}
    with pytest.raises(UsageError, match=r"10 layer\(s\) .*: layer0, layer1, layer2, layer3, layer4, layer5, layer6, "
                                         r"layer7 and 2 more\. No weight"):
        check_finite(many, list(many))

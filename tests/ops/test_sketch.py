"""The low-memory sketch ops (:mod:`loraga_fast.ops.sketch`): ``sketch_accumulate`` and ``probe_accumulate``
against float64 products, ``factors_from_sketch`` against a dense SVD, and the whole low-memory estimation with
the torch and the Triton (interpreter) backends."""

from __future__ import annotations

import pytest
import torch

from loraga_fast import preprocess_loraga
from loraga_fast.core.passes import run_passes
from loraga_fast.ops.sketch import (
    factors_from_sketch,
    factors_from_sketch_ref,
    probe_accumulate,
    sketch_accumulate,
    sketch_accumulate_ref,
)
from loraga_fast.stores.sketch import SketchSpec, SketchStore
from tests._helpers import (
    lora_ga_config,
    prepared_factors,
    rel_err,
    subspace_cos,
    tiny_llama,
    token_batches,
    train_step_for,
)

# The products are fp32 on both backends whatever the input dtype (measured: <= 4e-7 relative to float64 products
# of the same bf16 values); the fingerprint probes are cast to the input's dtype, so a bf16 fingerprint is only
# bf16-accurate (measured 6e-3; it is compared between passes, never used as a value).
SKETCH_RTOL = 5e-6
PROBE_RTOL = {torch.float32: 5e-6, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("t,m,n,k", [(1, 5, 7, 3), (63, 40, 24, 8), (130, 33, 70, 16)], ids=str)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_sketch_accumulate_matches_reference(backend: str, t: int, m: int, n: int, k: int, dtype: torch.dtype,
                                             rtol: float) -> None:
    g = torch.randn(2, t, m).to(dtype)
    x = torch.randn(2, t, n).to(dtype)
    p = torch.randn(n, k)
    q = torch.randn(m, k)
    start = torch.randn(m, k)
    acc = start.clone()
    sketch_accumulate(acc, g, x, p)  # A P
    dense = g.double().reshape(-1, m).T @ x.double().reshape(-1, n)
    assert rel_err(acc - start, dense @ p.double()) < min(rtol, SKETCH_RTOL)
    ref = sketch_accumulate_ref(start.clone(), g, x, p)
    assert rel_err(acc, ref) < min(rtol, SKETCH_RTOL)
    acc_t = torch.zeros(n, k)
    sketch_accumulate(acc_t, x, g, q)  # A^T Q
    assert rel_err(acc_t, dense.T @ q.double()) < min(rtol, SKETCH_RTOL)
    fp = torch.zeros(3, 3)
    pm, pn = torch.randn(m, 3), torch.randn(n, 3)
    probe_accumulate(fp, g, x, pm, pn)
    assert rel_err(fp, pm.double().T @ dense @ pn.double()) < min(rtol, PROBE_RTOL[dtype])


def test_sketch_accumulate_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shapes do not match"):
        sketch_accumulate(torch.zeros(4, 3), torch.randn(5, 4), torch.randn(5, 6), torch.randn(7, 3))
    with pytest.raises(TypeError, match="must be float32"):
        sketch_accumulate(torch.zeros(4, 3, dtype=torch.float64), torch.randn(5, 4), torch.randn(5, 6), torch.randn(6, 3))


def test_factors_from_sketch_matches_dense_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 50, 8, generator=gen) @ torch.randn(2, 8, 30, generator=gen)  # rank 8
    basis = torch.linalg.qr(a.mT @ torch.randn(2, 50, 12, generator=gen)).Q  # (2, 30, 12) spans the row space
    u, s, v = factors_from_sketch(basis, a @ basis, 6)
    ur, sr, vr = factors_from_sketch_ref(basis, a @ basis, 6)
    u0, s0, vh0 = torch.linalg.svd(a.double())
    assert rel_err(s, s0[:, :6]) < 1e-5 and rel_err(sr, s0[:, :6]) < 1e-5
    for i in range(2):
        assert subspace_cos(u[i], u0[i, :, :6]) > 0.9999 and subspace_cos(v[i], vh0[i, :6].T) > 0.9999
        assert subspace_cos(u[i], ur[i]) > 0.9999 and subspace_cos(v[i], vr[i]) > 0.9999


def test_run_passes_under_the_triton_interpreter(backend: str) -> None:
    """The whole low-memory estimation with each backend gives the same factors."""
    model = tiny_llama()
    targets = [(n, mod) for n, mod in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    ranks = {n: 2 for n, _ in targets}
    # k = min(m, n): the sketch spans everything, so both backends must give the exact top subspaces
    store = SketchStore([SketchSpec(n, *mod.weight.shape, 32, mod.weight.device) for n, mod in targets], passes=3)
    run_passes(model, targets, store, train_step_for(model, token_batches(n=2)), ranks=ranks)
    assert min(store.magnitudes().values()) > 0 and set(store.counts().values()) == {2}
    factors = store.factors(ranks)
    ref_model = tiny_llama()
    preprocess_loraga(ref_model, lora_ga_config(["q_proj", "down_proj"]), train_step_for(ref_model, token_batches(n=2)))
    exact = prepared_factors(ref_model)
    for n, f in factors.items():
        assert subspace_cos(f.u, exact[n].u[:, :4]) > 0.99 and subspace_cos(f.v, exact[n].v[:, :4]) > 0.99, (backend, n)
        # measured on both backends: 1 - cos 7e-10, singular values 9e-7 off (relative); ~10x that
        assert 1 - subspace_cos(f.u, exact[n].u[:, :4]) < 1e-8, (backend, n)
        assert 1 - subspace_cos(f.v, exact[n].v[:, :4]) < 1e-8, (backend, n)
        assert rel_err(f.s, exact[n].s[:4]) < 1e-5, (backend, n)

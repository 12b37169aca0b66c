"""Batched randomized SVD against exact float64 SVD, degenerate inputs, and the orthonormalization."""

from __future__ import annotations

import pytest
import torch

from loraga_fast.ops.rsvd import batched_rsvd, orthonormalize, rsvd_ref
from tests._helpers import subspace_cos


def _decaying(b: int, m: int, n: int, decay: float = 0.8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(b, m, k, dtype=torch.float64, generator=g)).Q
    v = torch.linalg.qr(torch.randn(b, n, k, dtype=torch.float64, generator=g)).Q
    return (u * decay ** torch.arange(k, dtype=torch.float64)) @ v.mT


@pytest.mark.parametrize("b,m,n", [(3, 64, 40), (2, 40, 64), (4, 300, 130), (1, 17, 17)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_exact_svd(b: int, m: int, n: int, dtype: torch.dtype) -> None:
    a = _decaying(b, m, n)
    k = 8
    u, s, v = batched_rsvd(a.to(dtype), k, generator=torch.Generator().manual_seed(1))
    assert u.shape == (b, m, k) and s.shape == (b, k) and v.shape == (b, n, k)
    u0, s0, vh0 = torch.linalg.svd(a, full_matrices=False)
    assert ((s.double() - s0[:, :k]).abs() / s0[:, :k]).max() < 1e-4
    for i in range(b):
        # each singular vector (the spectrum has gaps) and the whole top-k subspaces
        assert (u[i].double() * u0[i, :, :k]).sum(0).abs().min() > 0.999
        assert subspace_cos(u[i], u0[i, :, :k]) > 0.999
        assert subspace_cos(v[i], vh0[i, :k].T) > 0.999
        assert torch.allclose(u[i].double().T @ u[i].double(), torch.eye(k, dtype=torch.float64), atol=1e-5)


def test_agrees_with_reference() -> None:
    a = _decaying(3, 50, 30).float()
    u, s, v = batched_rsvd(a, 6, 12)
    ur, sr, vr = rsvd_ref(a, 6, 12)
    torch.testing.assert_close(s, sr, rtol=1e-4, atol=1e-6)
    for i in range(3):
        assert subspace_cos(u[i], ur[i]) > 0.999 and subspace_cos(v[i], vr[i]) > 0.999


def test_seeded_and_reproducible() -> None:
    a = torch.randn(2, 40, 30)
    r1 = batched_rsvd(a, 4, generator=torch.Generator().manual_seed(3))
    r2 = batched_rsvd(a, 4, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))


@pytest.mark.parametrize(
    "make,low_rank",
    [
        pytest.param(lambda: torch.zeros(2, 30, 20), True, id="zero"),
        pytest.param(lambda: torch.randn(2, 30, 3) @ torch.randn(2, 3, 20), True, id="rank3<k"),
        pytest.param(lambda: torch.randn(2, 1, 20).expand(2, 30, 20).clone(), True, id="duplicated-rows"),
        pytest.param(lambda: torch.cat([torch.randn(1, 30, 20), torch.zeros(1, 30, 20)]), False, id="mixed-zero"),
    ],
)
def test_degenerate_inputs_are_finite_and_exact(make, low_rank: bool) -> None:  # type: ignore[no-untyped-def]
    a = make()
    k = 8
    u, s, v = batched_rsvd(a, k, q=16)
    assert all(torch.isfinite(t).all() for t in (u, s, v))
    s0 = torch.linalg.svdvals(a.double())[:, :k]
    torch.testing.assert_close(s.double(), s0, rtol=1e-4, atol=1e-5)
    if low_rank:  # the rank fits in k: the factorization reproduces the matrix
        torch.testing.assert_close((u * s.unsqueeze(1)) @ v.mT, a, rtol=1e-4, atol=1e-4)
    for i in range(a.shape[0]):
        assert torch.allclose(u[i].T @ u[i], torch.eye(k), atol=1e-4)
        assert torch.allclose(v[i].T @ v[i], torch.eye(k), atol=1e-4)


def test_q_equal_to_the_small_side() -> None:
    a = _decaying(2, 40, 12).float()
    u, s, v = batched_rsvd(a, 6, q=12)
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(a.double())[:, :6], rtol=1e-5, atol=1e-6)


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="k=9"):
        batched_rsvd(torch.randn(1, 8, 10), 9)
    with pytest.raises(ValueError, match="q=20"):
        batched_rsvd(torch.randn(1, 8, 10), 4, q=20)
    with pytest.raises(ValueError, match="batch"):
        batched_rsvd(torch.randn(8, 10), 4)


def test_orthonormalize_falls_back_where_cholesky_cannot() -> None:
    y = torch.randn(3, 50, 6)
    y[1] = 0  # Cholesky fails
    y[2, :, 3] = y[2, :, 0]  # rank-deficient: CholeskyQR2 is not orthonormal
    q = orthonormalize(y)
    eye = torch.eye(6)
    for i in range(3):
        assert torch.allclose(q[i].T @ q[i], eye, atol=1e-5)
    assert subspace_cos(q[0], y[0]) > 0.9999

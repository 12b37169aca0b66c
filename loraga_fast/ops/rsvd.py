"""Batched randomized low-rank SVD: the top ``k`` singular triplets of every matrix in a ``(B, m, n)`` batch.

Algorithm (Halko, Martinsson and Tropp 2011, Alg. 4.4 + 5.1 -- the same steps as ``torch.svd_lowrank``, which
peft's LoRA-GA runs once per layer), for all ``B`` matrices at once:

1. ``Y = A Omega`` with a seeded Gaussian ``Omega`` of ``q`` columns (the long side of ``A`` is kept as rows);
2. ``niter`` power iterations ``Q = orth(A^T Q)``, ``Q = orth(A Q)``, re-orthonormalizing at every step;
3. ``Bs = Q^T A`` (``q x n``), an exact SVD of ``Bs`` (batched), ``U = Q U_Bs``.

Orthonormalization (:func:`orthonormalize`) is shifted CholeskyQR2 (two GEMM-based passes; a small shift makes
the first Cholesky succeed on ill-conditioned blocks), checked for orthonormality, with batched Householder QR
for the matrices where it fails (zero matrices, rank below ``q``, duplicated rows).

:func:`rsvd_ref` is the reference: ``torch.svd_lowrank`` on each matrix.
"""

from __future__ import annotations

import torch

__all__ = ["batched_rsvd", "orthonormalize", "rsvd_ref"]


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``Q`` (``(B, m, q)``, ``m >= q``) of the columns of each ``y[b]``.

    Shifted CholeskyQR2; matrices whose result is not orthonormal to ``sqrt(m) * 1e3 * eps`` (or not finite) are
    redone with Householder QR, which also returns orthonormal columns for rank-deficient or zero inputs.
    """
    b, m, q = y.shape
    eps = torch.finfo(y.dtype).eps
    eye = torch.eye(q, dtype=y.dtype, device=y.device)
    norm2 = y.square().sum(dim=(1, 2), keepdim=True)
    shift = 11.0 * (m * q + q * (q + 1)) * eps * norm2
    x = y
    failed = torch.zeros(b, dtype=torch.bool, device=y.device)
    for s in (shift, None):
        gram = x.mT @ x
        if s is not None:
            gram = gram + s * eye
        chol, info = torch.linalg.cholesky_ex(gram)
        failed |= info != 0
        x = torch.linalg.solve_triangular(chol.mT, x, upper=True, left=False)
    err = (x.mT @ x - eye).abs().amax(dim=(1, 2))
    failed |= ~torch.isfinite(err) | (err > 1e3 * eps * max(m, 1) ** 0.5)
    if bool(failed.any()):
        idx = failed.nonzero().squeeze(1)
        x = x.clone()
        x[idx] = torch.linalg.qr(y[idx]).Q
    return x


def batched_rsvd(a: torch.Tensor, k: int, q: int | None = None, niter: int = 4, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of each matrix of ``a``.

    Args:
        a: ``(B, m, n)`` float32/float64 batch (not modified).
        k: triplets to return, ``k <= min(m, n)``.
        q: subspace size (oversampled rank), ``k <= q <= min(m, n)``; default ``min(2k, min(m, n))``, which is
            peft's ``min(4r, min(m, n))`` for ``k = 2r``.
        niter: power iterations (peft uses 4).
        generator: random generator for the Gaussian test matrix (seed it for reproducible results).

    Returns:
        ``U (B, m, k)``, ``S (B, k)`` (descending), ``V (B, n, k)`` with ``a[b] ~= U[b] diag(S[b]) V[b]^T``.
    """
    if a.dim() != 3:
        raise ValueError(f"batched_rsvd expects a (B, m, n) batch, got shape {tuple(a.shape)}.")
    _, m, n = a.shape
    small = min(m, n)
    if not 1 <= k <= small:
        raise ValueError(f"batched_rsvd: k={k} must be between 1 and min(m, n)={small}.")
    q = min(2 * k, small) if q is None else q
    if not k <= q <= small:
        raise ValueError(f"batched_rsvd: q={q} must be between k={k} and min(m, n)={small}.")
    wide = m < n
    mat = a.mT if wide else a  # tall: (B, rows, cols) with rows >= cols
    cols = mat.shape[2]
    omega = torch.randn(cols, q, dtype=a.dtype, device=a.device, generator=generator)
    basis = orthonormalize(mat @ omega)
    for _ in range(niter):
        basis = orthonormalize(mat.mT @ basis)
        basis = orthonormalize(mat @ basis)
    u_small, s, vh = torch.linalg.svd(basis.mT @ mat, full_matrices=False)
    u = basis @ u_small[..., :k]
    v = vh[:, :k].mT
    s = s[:, :k]
    return (v, s, u) if wide else (u, s, v)


def rsvd_ref(a: torch.Tensor, k: int, q: int | None = None, niter: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`batched_rsvd`: ``torch.svd_lowrank`` on each matrix (peft's per-layer method)."""
    small = min(a.shape[1], a.shape[2])
    q = min(2 * k, small) if q is None else q
    us, ss, vs = [], [], []
    for mat in a:
        u, s, v = torch.svd_lowrank(mat, q=q, niter=niter)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(v[:, :k])
    return torch.stack(us), torch.stack(ss), torch.stack(vs)

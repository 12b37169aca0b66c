"""Batched randomized low-rank SVD: the top ``k`` singular triplets of every matrix in a ``(B, m, n)`` batch.

Algorithm (Halko, Martinsson and Tropp 2011, Alg. 4.4 + 5.1 -- the same steps as ``torch.svd_lowrank``, which
peft's LoRA-GA runs once per layer), for all ``B`` matrices at once:

1. ``Y = A Omega`` with a seeded Gaussian ``Omega`` of ``q`` columns (the long side of ``A`` is kept as rows);
2. ``niter`` power iterations ``Q = orth(A^T Q)``, ``Q = orth(A Q)``, re-orthonormalizing at every step;
3. ``Bs = Q^T A`` (``q x n``), an exact SVD of ``Bs`` (batched), ``U = Q U_Bs``.

Every GEMM here runs in IEEE fp32 whatever the user's TF32 / matmul-precision settings (:mod:`._precision`).
Orthonormalization (:func:`orthonormalize`) is shifted CholeskyQR2 (two GEMM-based passes; a small shift makes
the first Cholesky succeed on ill-conditioned blocks), checked for orthonormality, with batched Householder QR
for the matrices where it fails (zero matrices, rank below ``q``, duplicated rows).

:func:`rsvd_ref` is the reference: ``torch.svd_lowrank`` on each matrix.

:func:`orthonormalize` and :func:`batched_rsvd` are built like every op of :mod:`loraga_fast.ops`: checks in the
public function, then the op registered with ``torch.library`` (``loraga_fast::orthonormalize``,
``loraga_fast::batched_rsvd``; fake implementations give the real shapes and strides) when ``torch.compile`` is
tracing, its implementation from the dispatch table (torch only) in eager mode. :func:`batched_rsvd` draws its
Gaussian test matrix itself and hands it to the op as a tensor. The row-sharded variants
(:func:`sharded_rsvd`, :func:`orthonormalize_sharded`, :func:`gather_rows`) stay plain functions: they take a
process group and a generator, which an op schema cannot hold, and run collectives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._dispatch import dispatch, register_impl, run_op
from ._precision import with_exact_fp32

__all__ = ["batched_rsvd", "canonical_signs", "gather_rows", "orthonormalize", "orthonormalize_sharded", "rsvd_ref", "sharded_rsvd"]


def _check_batch(op: str, a: torch.Tensor, layout: str) -> tuple[int, int, int]:
    if a.dim() != 3:
        raise ValueError(f"{op} expects a {layout} batch, got shape {tuple(a.shape)}.")
    return a.shape[0], a.shape[1], a.shape[2]


def _check_sizes(op: str, k: int, q: int | None, small: int) -> int:
    """Validate ``k`` and ``q`` against ``min(m, n)``; returns ``q`` (default ``min(2k, min(m, n))``)."""
    if not 1 <= k <= small:
        raise ValueError(f"{op}: k={k} must be between 1 and min(m, n)={small}.")
    q = min(2 * k, small) if q is None else q
    if not k <= q <= small:
        raise ValueError(f"{op}: q={q} must be between k={k} and min(m, n)={small}.")
    return q


def _cholesky_qr2(y: torch.Tensor, m: int, allsum: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted CholeskyQR2 of each ``y[b]`` (``(B, rows, q)``, the rows of an ``m``-row matrix, all of them or this
    rank's); ``allsum`` sums a ``q x q`` Gram matrix over the row blocks (identity when ``y`` holds all rows).

    Returns ``(x, failed)``: the orthonormalized blocks, and which matrices did not reach orthonormality to
    ``sqrt(m) * 1e3 * eps`` (or are not finite) and must be redone otherwise.
    """
    b, _, q = y.shape
    eps = torch.finfo(y.dtype).eps
    eye = torch.eye(q, dtype=y.dtype, device=y.device)
    x = y
    failed = torch.zeros(b, dtype=torch.bool, device=y.device)
    for first in (True, False):
        gram = allsum(x.mT @ x)
        if first:  # a small shift lets the first Cholesky succeed on ill-conditioned blocks
            norm2 = gram.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
            gram = gram + 11.0 * (m * q + q * (q + 1)) * eps * norm2 * eye
        chol, info = torch.linalg.cholesky_ex(gram)
        failed |= info != 0
        x = torch.linalg.solve_triangular(chol.mT, x, upper=True, left=False)
    err = (allsum(x.mT @ x) - eye).abs().amax(dim=(1, 2))
    failed |= ~torch.isfinite(err) | (err > 1e3 * eps * max(m, 1) ** 0.5)
    return x, failed


@with_exact_fp32
def _orthonormalize_torch(y: torch.Tensor) -> torch.Tensor:
    x, failed = _cholesky_qr2(y, y.shape[1], lambda t: t)
    if bool(failed.any()):
        idx = failed.nonzero().squeeze(1)
        x = x.clone()  # same strides as x
        x[idx] = torch.linalg.qr(y[idx]).Q
    return x


register_impl("orthonormalize", "torch", _orthonormalize_torch)


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``Q`` (``(B, m, q)``, ``m >= q``) of the columns of each ``y[b]``.

    Shifted CholeskyQR2; matrices whose result is not orthonormal (or not finite) are redone with Householder QR,
    which also returns orthonormal columns for rank-deficient or zero inputs (``torch.linalg.qr(y).Q`` is the
    reference).
    """
    if y.dim() != 3 or y.shape[1] < y.shape[2]:
        raise ValueError(f"orthonormalize expects a (B, m, q) batch with m >= q, got shape {tuple(y.shape)}.")
    return run_op(torch.ops.loraga_fast.orthonormalize, _orthonormalize_impl, y)


def _orthonormalize_impl(y: torch.Tensor) -> torch.Tensor:
    return dispatch("orthonormalize", y, y)(y)


@torch.library.custom_op("loraga_fast::orthonormalize", mutates_args=())
def _orthonormalize_op(y: torch.Tensor) -> torch.Tensor:
    """The registered op behind :func:`orthonormalize` (no argument checks)."""
    return _orthonormalize_impl(y)


@_orthonormalize_op.register_fake
def _orthonormal_layout(y: torch.Tensor) -> torch.Tensor:
    # CholeskyQR2 on fake tensors: the real result's shape and strides (the QR fallback writes into a clone of it)
    return _cholesky_qr2(y, y.shape[1], lambda t: t)[0]


# ---- row-sharded variants (torch.distributed) ------------------------------------------------------------
#
# A matrix is "row-sharded" over the ranks of a process group when rank i holds rows [i*c, (i+1)*c) of it as a
# local (B, c, n) block (the last ranks' blocks may be padded with zero rows, as FSDP2 pads its shards). Only
# small products travel: q x q Gram matrices, n x q sketches and the q x n projection.


def allsum(t: torch.Tensor, group: object) -> torch.Tensor:
    """``t`` summed over the processes of ``group``, in place (one all-reduce); returns ``t``."""
    import torch.distributed as dist

    dist.all_reduce(t, group=group)
    return t


def gather_rows(local: torch.Tensor, group: object) -> torch.Tensor:
    """All ranks' ``(B, c, k)`` row blocks stacked into the full ``(B, N*c, k)`` matrix (on every rank)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    b, c, k = local.shape
    out = torch.empty(world * c, b, k, dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, local.permute(1, 0, 2).contiguous(), group=group)
    return out.permute(1, 0, 2)


@with_exact_fp32
def orthonormalize_sharded(y: torch.Tensor, group: object) -> torch.Tensor:
    """:func:`orthonormalize` for a row-sharded ``y`` (local ``(B, c, q)`` blocks of ``(B, N*c, q)``, ``N*c >= q``).

    Shifted CholeskyQR2 with all-reduced ``q x q`` Gram matrices (three small all-reduces); matrices that fail
    the orthonormality check are gathered and redone with Householder QR (rare: zero or rank-deficient input).
    Every rank gets its own rows of the same ``Q``.
    """
    import torch.distributed as dist

    c = y.shape[1]
    x, failed = _cholesky_qr2(y, c * dist.get_world_size(group), lambda t: allsum(t, group))
    if bool(failed.any()):  # the same decision on every rank: all inputs of it were all-reduced
        idx = failed.nonzero().squeeze(1)
        full = gather_rows(y[idx], group)
        start = dist.get_rank(group) * c
        x = x.clone()
        x[idx] = torch.linalg.qr(full).Q[:, start : start + c]
    return x


@with_exact_fp32
def sharded_rsvd(a: torch.Tensor, rows: int, k: int, q: int | None = None, niter: int = 4, *, group: object = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batched_rsvd` of row-sharded matrices, without gathering them.

    Args:
        a: this rank's ``(B, c, n)`` row blocks; the global matrices are ``(B, rows, n)`` (blocks past ``rows``
            are zero padding). Not modified.
        rows: the global number of rows ``m`` (it decides the orientation, as in :func:`batched_rsvd`).
        k, q, niter, generator: as in :func:`batched_rsvd`; the generator must be seeded identically on every rank.
        group: the process group the rows are sharded over (default: the world).

    Returns:
        ``U`` (this rank's ``(B, c, k)`` rows), ``S (B, k)`` and ``V (B, n, k)`` (the same on every rank). In exact
        arithmetic the result equals :func:`batched_rsvd` of the gathered matrices with the same generator state.
    """
    import torch.distributed as dist

    _, c, n = _check_batch("sharded_rsvd", a, "(B, c, n)")
    q = _check_sizes("sharded_rsvd", k, q, min(rows, n))
    start = dist.get_rank(group) * c
    if rows >= n:  # tall: the sharded side is the long one
        omega = torch.randn(n, q, dtype=a.dtype, device=a.device, generator=generator)
        basis = orthonormalize_sharded(a @ omega, group)
        for _ in range(niter):
            z = orthonormalize(allsum(a.mT @ basis, group))
            basis = orthonormalize_sharded(a @ z, group)
        u_small, s, vh = torch.linalg.svd(allsum(basis.mT @ a, group), full_matrices=False)
        return canonical_signs(basis @ u_small[..., :k], s[:, :k], vh[:, :k].mT)
    # wide: batched_rsvd factors A^T, whose columns are sharded here
    omega = torch.randn(rows, q, dtype=a.dtype, device=a.device, generator=generator)
    omega_local = torch.zeros(c, q, dtype=a.dtype, device=a.device)
    mine = omega[start : start + c]
    omega_local[: mine.shape[0]] = mine
    basis = orthonormalize(allsum(a.mT @ omega_local, group))
    for _ in range(niter):
        w = orthonormalize_sharded(a @ basis, group)
        basis = orthonormalize(allsum(a.mT @ w, group))
    # SVD of basis^T A^T = (A basis)^T: A basis = Qw R (sharded CholeskyQR), then the SVD of the small R^T
    w = a @ basis
    qw = orthonormalize_sharded(w, group)
    r = allsum(qw.mT @ w, group)
    u_small, s, vh = torch.linalg.svd(r.mT, full_matrices=False)
    return canonical_signs(qw @ vh[:, :k].mT, s[:, :k], basis @ u_small[..., :k])


def batched_rsvd(a: torch.Tensor, k: int, q: int | None = None, niter: int = 4, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of each matrix of ``a``.

    Args:
        a: ``(B, m, n)`` float32/float64 batch (not modified).
        k: triplets to return, ``k <= min(m, n)``.
        q: subspace size (oversampled rank), ``k <= q <= min(m, n)``; default ``min(2k, min(m, n))``, which is
            peft's ``min(4r, min(m, n))`` for ``k = 2r``.
        niter: power iterations (peft uses 4).
        generator: random generator for the Gaussian test matrix (seed it for reproducible results). The matrix
            (``(min(m, n), q)``) is drawn here; the registered op ``loraga_fast::batched_rsvd`` receives it as a
            tensor (a ``torch.Generator`` cannot be an op argument).

    Returns:
        ``U (B, m, k)``, ``S (B, k)`` (descending), ``V (B, n, k)`` with ``a[b] ~= U[b] diag(S[b]) V[b]^T``.
    """
    _, m, n = _check_batch("batched_rsvd", a, "(B, m, n)")
    q = _check_sizes("batched_rsvd", k, q, min(m, n))
    omega = torch.randn(min(m, n), q, dtype=a.dtype, device=a.device, generator=generator)
    return run_op(torch.ops.loraga_fast.batched_rsvd, _batched_rsvd_impl, a, omega, k, niter)


def _batched_rsvd_impl(a: torch.Tensor, omega: torch.Tensor, k: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch("batched_rsvd", a, a)(a, omega, k, niter)


def _rsvd_factors(mat: torch.Tensor, basis: torch.Tensor, k: int, wide: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3 for the tall ``mat`` (``a`` or ``a^T``) and its range ``basis``; signs made canonical."""
    u_small, s, vh = torch.linalg.svd(basis.mT @ mat, full_matrices=False)
    u = basis @ u_small[..., :k]
    v = vh[:, :k].mT
    s = s[:, :k]
    return canonical_signs(v, s, u) if wide else canonical_signs(u, s, v)


@with_exact_fp32
def _batched_rsvd_torch(a: torch.Tensor, omega: torch.Tensor, k: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wide = a.shape[1] < a.shape[2]
    mat = a.mT if wide else a  # tall: (B, rows, cols) with rows >= cols
    basis = orthonormalize(mat @ omega)
    for _ in range(niter):
        basis = orthonormalize(mat.mT @ basis)
        basis = orthonormalize(mat @ basis)
    return _rsvd_factors(mat, basis, k, wide)


register_impl("batched_rsvd", "torch", _batched_rsvd_torch)


@torch.library.custom_op("loraga_fast::batched_rsvd", mutates_args=())
def _batched_rsvd_op(a: torch.Tensor, omega: torch.Tensor, k: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The registered op behind :func:`batched_rsvd`, given its Gaussian test matrix (no argument checks)."""
    return _batched_rsvd_impl(a, omega, k, niter)


@_batched_rsvd_op.register_fake
def _batched_rsvd_fake(a: torch.Tensor, omega: torch.Tensor, k: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # step 3 on fake tensors, from a basis laid out as orthonormalize's: the real shapes and strides
    wide = a.shape[1] < a.shape[2]
    mat = a.mT if wide else a
    return _rsvd_factors(mat, _orthonormal_layout(mat @ omega), k, wide)


def canonical_signs(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip each singular pair ``(u_j, v_j)`` so that the largest-magnitude entry of ``v_j`` is positive.

    An SVD fixes each pair only up to a joint sign; this convention makes the factors independent of how they
    were computed (single process or sharded over any number of ranks), up to rounding. ``v`` is the factor every
    rank holds whole.
    """
    idx = v.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(v, 1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, s, v * sign


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

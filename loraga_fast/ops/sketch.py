"""Skinny products with a layer's gradient, computed from its captured ``G`` and ``X`` (low-memory mode).

For a linear layer with output gradient ``G`` (``(T, M)``) and input ``X`` (``(T, N)``), the weight gradient of a
backward pass is ``A = G^T X`` (``(M, N)``). Low-memory mode never forms ``A``; it accumulates products of ``A``
with a tall basis, which cost ``O(T (M + N) K)`` and ``O((M + N) K)`` memory:

* ``A P   = G^T (X P)`` (``P`` is ``(N, K)``, result ``(M, K)``),
* ``A^T Q = X^T (G Q)`` (``Q`` is ``(M, K)``, result ``(N, K)``).

Both are one op, :func:`sketch_accumulate` (``acc += L^T (R B)`` with ``(L, R)`` = ``(G, X)`` or ``(X, G)``):

* :func:`sketch_accumulate_ref` -- the plain-torch reference (fp32 throughout, IEEE whatever the user's matmul
  precision settings), also the torch backend;
* the Triton backend runs the kernel of :func:`loraga_fast.ops.accumulate_triton` twice: ``R B`` into an fp32
  ``(T, K)`` buffer (``R`` read in its own dtype through a transposed view, upcast tile by tile, IEEE fp32), then
  ``L^T (R B)`` into the accumulator. The products stay fp32 on both backends (no rounding of ``R B`` to the model
  dtype) and no full-size fp32 copy of ``L`` or ``R`` is made;
* :func:`sketch_accumulate` -- the public op: checks, then dispatches through
  :func:`loraga_fast.ops._dispatch.select_backend` (the same policy as ``accumulate``).

:func:`probe_accumulate` adds a tiny ``P x P`` sketch ``Phi_M^T A Phi_N`` (the pass fingerprint: equal batches
give equal values) and :func:`factors_from_sketch` turns a final skinny product into top singular triplets
(:func:`factors_from_sketch_ref` is its dense reference).
"""

from __future__ import annotations

import torch

from ._accumulate_triton import accumulate_triton
from ._dispatch import as_2d, select_backend
from ._precision import exact_fp32, with_exact_fp32

__all__ = ["factors_from_sketch", "factors_from_sketch_ref", "probe_accumulate", "sketch_accumulate",
           "sketch_accumulate_ref"]


def sketch_accumulate_ref(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Reference implementation of :func:`sketch_accumulate` (same contract): IEEE fp32 GEMMs, inputs upcast first."""
    lhs = as_2d(left).to(torch.float32)
    rhs = as_2d(right).to(torch.float32)
    with exact_fp32():
        acc.addmm_(lhs.t(), rhs @ basis)
    return acc


def _sketch_accumulate_triton(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    rhs = as_2d(right)
    projected = torch.zeros((rhs.shape[0], basis.shape[1]), dtype=torch.float32, device=acc.device)
    accumulate_triton(projected, rhs.t(), basis)  # (R^T)^T B = R B: (T, K) in fp32
    return accumulate_triton(acc, as_2d(left), projected)


_IMPLS = {"torch": sketch_accumulate_ref, "triton": _sketch_accumulate_triton}


def sketch_accumulate(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Add ``L^T (R B)`` into an fp32 accumulator, in place, without forming ``L^T R``.

    With ``(L, R) = (G, X)`` this is ``A B`` for the layer's weight gradient ``A = G^T X``; with ``(X, G)`` it is
    ``A^T B``.

    Args:
        acc: fp32 ``(ML, K)``, updated in place.
        left: ``(..., ML)``; fp32, bf16 or fp16.
        right: ``(..., NR)`` with the same leading (token) dimensions as ``left``; fp32, bf16 or fp16.
        basis: fp32 ``(NR, K)``.

    Returns:
        ``acc``.
    """
    if acc.dtype != torch.float32 or basis.dtype != torch.float32:
        raise TypeError(f"sketch_accumulate: acc and basis must be float32, got {acc.dtype} and {basis.dtype}.")
    if left.shape[:-1] != right.shape[:-1]:
        raise ValueError(f"sketch_accumulate: left {tuple(left.shape)} and right {tuple(right.shape)} must share their "
                         "leading (token) dimensions.")
    expected_acc = (left.shape[-1], basis.shape[-1])
    if basis.dim() != 2 or basis.shape[0] != right.shape[-1] or tuple(acc.shape) != expected_acc:
        raise ValueError(f"sketch_accumulate: shapes do not match: acc {tuple(acc.shape)} (expected {expected_acc}), "
                         f"left {tuple(left.shape)}, right {tuple(right.shape)}, basis {tuple(basis.shape)}.")
    if left.numel() == 0:
        return acc
    backend = select_backend("sketch_accumulate", acc, left, right)
    return _IMPLS[backend](acc, left, right, basis)


@with_exact_fp32
def probe_accumulate(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, probe_left: torch.Tensor,
                     probe_right: torch.Tensor) -> torch.Tensor:
    """``acc += (L Phi_L)^T (R Phi_R)``: a ``(P, P)`` sketch ``Phi_L^T (L^T R) Phi_R``, cost ``O(T (ML + NR) P)``.

    Args:
        acc: fp32 ``(P, P)``, updated in place.
        left, right: ``(..., ML)`` and ``(..., NR)``, as in :func:`sketch_accumulate`.
        probe_left, probe_right: fp32 ``(ML, P)`` and ``(NR, P)``.
    """
    lhs, rhs = as_2d(left), as_2d(right)
    acc.addmm_((lhs @ probe_left.to(lhs.dtype)).to(torch.float32).t(), (rhs @ probe_right.to(rhs.dtype)).to(torch.float32))
    return acc


@with_exact_fp32
def factors_from_sketch(basis: torch.Tensor, product: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of ``A ~= product @ basis^T`` for a batch, from skinny matrices only.

    ``basis`` (``(B, N, K)``, orthonormal columns) and ``product = A basis`` (``(B, M, K)``, the last pass) give
    the generalized Nystrom approximation ``A ~= Y (Z^T P)^+ Z^T`` with ``P = orth(Z)``, which equals
    ``Y P^T = A P P^T`` when ``Z`` has full column rank: ``A`` projected onto the sketched row space. Its SVD is
    ``Y = U S W^T`` (``(M, K)``, cheap), so ``A ~= U S (P W)^T``.

    Returns:
        ``U (B, M, k)``, ``S (B, k)`` descending, ``V (B, N, k)``.
    """
    u, s, wh = torch.linalg.svd(product, full_matrices=False)
    return u[..., :k], s[:, :k], basis @ wh[:, :k].mT


def factors_from_sketch_ref(basis: torch.Tensor, product: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`factors_from_sketch`: the dense ``product @ basis^T``, then an exact SVD (float64)."""
    dense = product.double() @ basis.double().mT
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return u[..., :k], s[:, :k], vh[:, :k].mT

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
* ``torch.ops.loraga_fast.sketch_accumulate_`` -- the op registered with ``torch.library`` (mutates ``acc``; a
  fake implementation for tracing), running the entry of the one dispatch table
  (:func:`loraga_fast.ops._dispatch.dispatch`, the same policy as ``accumulate``);
* :func:`sketch_accumulate` -- the public function: checks, then the registered op when ``torch.compile`` is
  tracing and its implementation directly in eager mode.

:func:`probe_accumulate` (``torch.ops.loraga_fast.probe_accumulate_``, torch only) adds a tiny ``P x P`` sketch
``Phi_M^T A Phi_N`` (the pass fingerprint: equal batches give equal values) and :func:`factors_from_sketch`
(``torch.ops.loraga_fast.factors_from_sketch``, torch only; :func:`factors_from_sketch_ref` is its dense
reference) turns a final skinny product into top singular triplets. Both are built the same way: checks in the
public function, a registered op with a fake implementation, an entry of the dispatch table.
"""

from __future__ import annotations

import torch

from ._accumulate_triton import accumulate_triton
from ._dispatch import as_2d, check_operands, dispatch, register_impl, run_op
from ._precision import exact_fp32, with_exact_fp32

__all__ = ["factors_from_sketch", "factors_from_sketch_ref", "probe_accumulate", "sketch_accumulate",
           "sketch_accumulate_ref"]


# ---- sketch_accumulate: acc += L^T (R B) --------------------------------------------------------------------


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


register_impl("sketch_accumulate", "torch", sketch_accumulate_ref)
register_impl("sketch_accumulate", "triton", _sketch_accumulate_triton)


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
    check_operands("sketch_accumulate", {"acc": acc, "basis": basis}, ("left", left), ("right", right))
    expected_acc = (left.shape[-1], basis.shape[-1])
    if basis.dim() != 2 or basis.shape[0] != right.shape[-1] or tuple(acc.shape) != expected_acc:
        raise ValueError(f"sketch_accumulate: shapes do not match: acc {tuple(acc.shape)} (expected {expected_acc}), "
                         f"left {tuple(left.shape)}, right {tuple(right.shape)}, basis {tuple(basis.shape)}.")
    if left.numel() == 0:
        return acc
    run_op(torch.ops.loraga_fast.sketch_accumulate_, _sketch_accumulate_impl, acc, left, right, basis)
    return acc


def _sketch_accumulate_impl(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, basis: torch.Tensor) -> None:
    dispatch("sketch_accumulate", acc, left, right)(acc, left, right, basis)


@torch.library.custom_op("loraga_fast::sketch_accumulate_", mutates_args=("acc",))
def _sketch_accumulate_op(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, basis: torch.Tensor) -> None:
    """``acc += L^T (R B)``, in place: the registered op behind :func:`sketch_accumulate` (no argument checks)."""
    _sketch_accumulate_impl(acc, left, right, basis)


@_sketch_accumulate_op.register_fake
def _sketch_accumulate_fake(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, basis: torch.Tensor) -> None:
    return None


# ---- probe_accumulate: acc += (L Phi_L)^T (R Phi_R) ------------------------------------------------------------


@with_exact_fp32
def _probe_accumulate_torch(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, probe_left: torch.Tensor,
                            probe_right: torch.Tensor) -> torch.Tensor:
    """The torch implementation of :func:`probe_accumulate` (also its reference: there is no kernel)."""
    lhs, rhs = as_2d(left), as_2d(right)
    acc.addmm_((lhs @ probe_left.to(lhs.dtype)).to(torch.float32).t(), (rhs @ probe_right.to(rhs.dtype)).to(torch.float32))
    return acc


register_impl("probe_accumulate", "torch", _probe_accumulate_torch)


def probe_accumulate(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, probe_left: torch.Tensor,
                     probe_right: torch.Tensor) -> torch.Tensor:
    """``acc += (L Phi_L)^T (R Phi_R)``: a ``(P, P)`` sketch ``Phi_L^T (L^T R) Phi_R``, cost ``O(T (ML + NR) P)``.

    The probes are cast to the dtype of ``left`` / ``right`` before the skinny products (a bf16 fingerprint is
    bf16-accurate; it is compared between passes, never used as a value); the products are added in IEEE fp32.

    Args:
        acc: fp32 ``(P, P)``, updated in place.
        left, right: ``(..., ML)`` and ``(..., NR)``, as in :func:`sketch_accumulate`.
        probe_left, probe_right: fp32 ``(ML, P)`` and ``(NR, P)``.

    Returns:
        ``acc``.
    """
    check_operands("probe_accumulate", {"acc": acc}, ("left", left), ("right", right))
    expected_acc = (probe_left.shape[-1], probe_right.shape[-1])
    if (probe_left.dim() != 2 or probe_right.dim() != 2 or probe_left.shape[0] != left.shape[-1]
            or probe_right.shape[0] != right.shape[-1] or tuple(acc.shape) != expected_acc):
        raise ValueError(f"probe_accumulate: shapes do not match: acc {tuple(acc.shape)} (expected {expected_acc}), "
                         f"left {tuple(left.shape)}, right {tuple(right.shape)}, probes {tuple(probe_left.shape)} and "
                         f"{tuple(probe_right.shape)}.")
    run_op(torch.ops.loraga_fast.probe_accumulate_, _probe_accumulate_impl, acc, left, right, probe_left, probe_right)
    return acc


def _probe_accumulate_impl(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, probe_left: torch.Tensor,
                           probe_right: torch.Tensor) -> None:
    dispatch("probe_accumulate", acc, left, right)(acc, left, right, probe_left, probe_right)


@torch.library.custom_op("loraga_fast::probe_accumulate_", mutates_args=("acc",))
def _probe_accumulate_op(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, probe_left: torch.Tensor,
                         probe_right: torch.Tensor) -> None:
    """``acc += (L Phi_L)^T (R Phi_R)``, in place: the registered op behind :func:`probe_accumulate`."""
    _probe_accumulate_impl(acc, left, right, probe_left, probe_right)


@_probe_accumulate_op.register_fake
def _probe_accumulate_fake(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, probe_left: torch.Tensor,
                           probe_right: torch.Tensor) -> None:
    return None


# ---- factors_from_sketch: top singular triplets from skinny matrices -------------------------------------------


def _factors(basis: torch.Tensor, product: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, wh = torch.linalg.svd(product, full_matrices=False)
    return u[..., :k], s[:, :k], basis @ wh[:, :k].mT


_factors_from_sketch_torch = with_exact_fp32(_factors)
register_impl("factors_from_sketch", "torch", _factors_from_sketch_torch)


def factors_from_sketch(basis: torch.Tensor, product: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of ``A ~= product @ basis^T`` for a batch, from skinny matrices only.

    ``basis`` (``(B, N, K)``, orthonormal columns) and ``product = A basis`` (``(B, M, K)``, the last pass) give
    the generalized Nystrom approximation ``A ~= Y (Z^T P)^+ Z^T`` with ``P = orth(Z)``, which equals
    ``Y P^T = A P P^T`` when ``Z`` has full column rank: ``A`` projected onto the sketched row space. Its SVD is
    ``Y = U S W^T`` (``(M, K)``, cheap), so ``A ~= U S (P W)^T``.

    Returns:
        ``U (B, M, k)``, ``S (B, k)`` descending, ``V (B, N, k)`` (``k`` capped at ``min(M, K)``).
    """
    if basis.dim() != 3 or product.dim() != 3 or basis.shape[0] != product.shape[0] or basis.shape[2] != product.shape[2]:
        raise ValueError(f"factors_from_sketch: expects basis (B, N, K) and product (B, M, K), got "
                         f"{tuple(basis.shape)} and {tuple(product.shape)}.")
    return run_op(torch.ops.loraga_fast.factors_from_sketch, _factors_from_sketch_impl, basis, product, k)


def _factors_from_sketch_impl(basis: torch.Tensor, product: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch("factors_from_sketch", product, basis, product)(basis, product, k)


@torch.library.custom_op("loraga_fast::factors_from_sketch", mutates_args=())
def _factors_from_sketch_op(basis: torch.Tensor, product: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The registered op behind :func:`factors_from_sketch` (no argument checks)."""
    return _factors_from_sketch_impl(basis, product, k)


@_factors_from_sketch_op.register_fake
def _factors_from_sketch_fake(basis: torch.Tensor, product: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the same torch ops on fake tensors: their meta functions give the real shapes and strides on every device
    return _factors(basis, product, k)


def factors_from_sketch_ref(basis: torch.Tensor, product: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`factors_from_sketch`: the dense ``product @ basis^T``, then an exact SVD (float64)."""
    dense = product.double() @ basis.double().mT
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return u[..., :k], s[:, :k], vh[:, :k].mT

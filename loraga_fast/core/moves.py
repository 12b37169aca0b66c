"""The algebra of :mod:`loraga_fast.core.convergence`'s checks: LoRA-GA's A and B index sets per direction, the move
of each set (:func:`measure_moves`, the measure derived below), and the products with a
running sum for each way the sums are held (whole, data-parallel partial sums, FSDP row shards), with the warm-started
subspace iteration that factors them (:func:`subspace_step`).

**What is measured.** LoRA-GA takes ``A`` from right singular vectors of the mean gradient and ``B`` from left ones,
at index sets fixed by ``lora_ga_config.direction`` (0-based; ``r`` the layer's rank; :mod:`~loraga_fast.core.layer_init`):

    direction        A (right vectors)       B (left vectors)
    ArB2r (default)  0 .. r-1                r .. 2r-1
    A2rBr            r .. 2r-1               0 .. r-1
    ArBr             1, 3, .., 2r-1          0, 2, .., 2r-2
    random           0 .. 2r-1               0 .. 2r-1   (r of these 2r, drawn at init: only the whole is fixed)

Each set ``I`` of one side is measured on its own. ``E`` is the indices below ``max(I)`` that are not in ``I`` (for
ArB2r's ``B``, ``0 .. r-1``), and ``M_E`` is ``M`` with the current ``E`` directions projected out (from the other
side: ``(1 - U_E U_E^T) M`` for a right set, ``M (1 - V_E V_E^T)`` for a left one; the same matrix for exact
singular vectors), so ``I`` is exactly the top ``|I|`` directions of ``M_E``. The set's move is the share of its
optimal energy that the previous check's vectors of ``I`` (``P``) miss:

    moved_I = 1 - ||P^T M_E||^2 / sum_{i in I} sigma_i(M)^2        (right side: ||M_E P||^2)

(0: the previous directions are still optimal; at most 1, Ky Fan). A previous band vector that has moved into the
top ``r`` (two singular values swapping across index ``r``: the top-``2r`` subspace unchanged, ``A`` replaced)
captures nothing of ``M_E``, so a swap reads as a move. The measure is energy-based rather than a per-vector
angle because neighbouring singular values of real gradients nearly tie: vectors that rotate among (nearly) equal
values keep their energy and read as a small move, as they change LoRA-GA's first step little. A layer's move is
the worse of ``A``'s and ``B``'s; with ``rank_budget=`` the allocation picks each rank after the stop, so every rank
in ``[min_rank, max_rank]`` is measured (``2 max_rank`` directions watched) and the worst counts. A set whose
optimal energy is numerically zero (singular values at or below ``sigma_1 max(m, n) eps_fp32``, numpy's
matrix-rank threshold, below which LoRA-GA's B columns start at zero) counts as moved 0.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError
from ..ops.rsvd import allsum, orthonormalize, orthonormalize_sharded

__all__ = ["direction_sets", "measure_moves", "subspace_step"]


# --- the measure ---------------------------------------------------------------------------------------------------


def direction_sets(direction: str, r: int) -> tuple[list[int], list[int]]:
    """LoRA-GA's singular-vector indices at rank ``r`` (0-based): ``A``'s (right vectors) and ``B``'s (left
    vectors), as :func:`~loraga_fast.core.layer_init.init_layer_from_factors` picks them (``random``: the whole top
    ``2r``, from which it draws)."""
    if direction == "ArB2r":
        return list(range(r)), list(range(r, 2 * r))
    if direction == "A2rBr":
        return list(range(r, 2 * r)), list(range(r))
    if direction == "ArBr":
        return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    if direction == "random":
        return list(range(2 * r)), list(range(2 * r))
    raise UsageError(f"Unknown LoRA-GA direction {direction!r}.")


def _set_masks(direction: str, ranks: range, k: int, device: torch.device) -> torch.Tensor:
    """``(4, R, k)`` float64 0/1 masks for each candidate rank: ``I_A, E_A, I_B, E_B`` (``E``: the indices below
    ``max(I)`` not in ``I``), clipped to the ``k`` watched columns."""
    masks = torch.zeros(4, len(ranks), k, dtype=torch.float64)
    for j, r in enumerate(ranks):
        for side, idx in enumerate(direction_sets(direction, r)):
            chosen = set(idx)
            excluded = [i for i in range(max(idx)) if i not in chosen]
            masks[2 * side, j, [i for i in idx if i < k]] = 1.0
            masks[2 * side + 1, j, [i for i in excluded if i < k]] = 1.0
    return masks.to(device)


def measure_moves(s: torch.Tensor, right: tuple[torch.Tensor, torch.Tensor], left: tuple[torch.Tensor, torch.Tensor],
                  masks: torch.Tensor, valid: torch.Tensor, swapped: torch.Tensor, size: int) -> torch.Tensor:
    """Each layer's move (module docstring) from the products of the current running sums ``M`` with the previous
    check's vectors.

    Args:
        s: ``(B, >= k)`` the current singular values, descending.
        right: ``(||M p_i||^2 (B, k), u_e^T M p_i (B, k, k))`` for the previous right vectors ``p_i`` and the current
            left vectors ``u_e``; ``left``: the same for the previous left vectors and ``M^T`` (``v_e^T M^T p_i``).
        masks: :func:`_set_masks` ``(4, R, k)``; ``valid``: ``(B, R)`` the candidate ranks each layer may get.
        swapped: ``(B,)`` the sum is stored ``(in, out)`` (Conv1D in exact mode): ``A`` comes from its left vectors.
        size: ``max(m, n)`` (the numerical-zero threshold).

    Returns:
        ``(B,)`` float64 moves in ``[0, 1]``: the worst over ``A``, ``B`` and the valid ranks.
    """
    k = masks.shape[2]
    s2 = s[:, :k].double().square()
    floor = (s[:, :1].double() * size * torch.finfo(torch.float32).eps).square()  # (B, 1)

    def moved(products: tuple[torch.Tensor, torch.Tensor], chosen: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
        norms, gram = products
        kept = norms.double() @ chosen.T - torch.einsum("ber,re->br", gram.double().square() @ chosen.T, excluded)
        opt = s2 @ chosen.T
        zero = opt <= chosen.sum(1) * floor
        return torch.where(zero, 0.0, 1.0 - (kept / torch.where(zero, 1.0, opt)).clamp(0.0, 1.0))

    ia, ea, ib, eb = masks
    plain = torch.maximum(moved(right, ia, ea), moved(left, ib, eb))
    turned = torch.maximum(moved(left, ia, ea), moved(right, ib, eb))
    worst = torch.where(swapped[:, None], turned, plain)
    return torch.where(valid, worst, 0.0).amax(1)


# --- the algebra of one check, for each way the sums are held ------------------------------------------------------


class _Local:
    """Whole sums ``a (B, m, n)`` in this process: products with skinny matrices, and orthonormal bases (the
    subclasses run their collectives over ``process_group``)."""

    def __init__(self, process_group: Any = None):
        self.process_group = process_group

    def mv(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``M x`` (``x (B, n, q)``; rows as this process holds them)."""
        return a @ x

    def mtv(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``M^T y`` (``y`` in the row layout of :meth:`mv`); whole on every process."""
        return a.mT @ y

    def orth_rows(self, y: torch.Tensor) -> torch.Tensor:
        return orthonormalize(y)

    def rowsum(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over rows, completed over the processes that hold other rows."""
        return t


class _Additive(_Local):
    """Data parallel: each process holds a partial sum; products with skinny matrices are all-reduced."""

    def mv(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return allsum(a @ x, self.process_group)

    def mtv(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return allsum(a.mT @ y, self.process_group)


class _RowSharded(_Local):
    """FSDP: each process holds its rows of the reduced sums (zero padding past the last row)."""

    def mtv(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return allsum(a.mT @ y, self.process_group)

    def orth_rows(self, y: torch.Tensor) -> torch.Tensor:
        return orthonormalize_sharded(y, self.process_group)

    def rowsum(self, t: torch.Tensor) -> torch.Tensor:
        return allsum(t, self.process_group)


def subspace_step(algebra: _Local, a: torch.Tensor, start: torch.Tensor, k: int, niter: int,
                  previous_left: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Top-``k`` triplets of each ``M = a[b]`` by subspace iteration from the right basis ``start (B, n, q)``
    (a Gaussian, or the previous check's right singular vectors in its first ``p`` columns: a warm start),
    ``niter >= 1`` iterations; and, when ``previous_left (B, rows, p)`` is given, ``M`` times the previous vectors.

    Returns ``(U, S, V_all, right, left)``: ``U`` (``k`` columns, rows as held), ``S (B, q)`` descending, ``V_all
    (B, n, q)`` (all ``q`` right vectors, the next warm start), and ``right = M start[..., :p]`` (rows as held),
    ``left = M^T previous_left`` (whole) from the first sweeps (None without ``previous_left``). Sweeps over ``M``:
    ``2 niter + 1``.
    """
    right = left = None
    basis = start
    for i in range(niter):
        y = algebra.mv(a, basis)
        q_left = algebra.orth_rows(y)
        if i == 0 and previous_left is not None:  # one sweep for both: [Q_L, U_prev]
            p = previous_left.shape[2]
            right = y[..., :p]
            z = algebra.mtv(a, torch.cat([q_left, previous_left], dim=2))
            z, left = z[..., : q_left.shape[2]], z[..., q_left.shape[2]:]
        else:
            z = algebra.mtv(a, q_left)
        basis = orthonormalize(z)
    y = algebra.mv(a, basis)  # M R = L (L^T M R): the SVD of the small L^T M R gives M's triplets
    q_left = algebra.orth_rows(y)
    u_small, s, vh = torch.linalg.svd(algebra.rowsum(q_left.mT @ y), full_matrices=False)
    return q_left @ u_small[..., :k], s, basis @ vh.mT, right, left

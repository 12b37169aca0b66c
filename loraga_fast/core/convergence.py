"""Stopping the estimation once the top-``2r`` subspaces of every mean gradient have converged (``until="converged"``).

Every :data:`CHECK_EVERY` backward passes (at the start of the next forward of the model: a pass boundary, so no
backward is half-recorded), :class:`ConvergenceMonitor` factors each layer's running sum, batched per shape group,
and measures how far its top-``2r`` subspaces moved since the previous check: the share of the optimal top-``2r``
energy of the current running mean ``M`` that the previous check's directions capture,

    moved = 1 - min(||M V_prev||^2, ||U_prev^T M||^2) / sum_{i <= 2r} sigma_i(M)^2

(``V_prev`` / ``U_prev``: the previous check's top-``2r`` right / left singular vectors; the same energy measure
the tests use against exact SVDs; 0 = the previous directions are still optimal). Once every layer has moved less
than the tolerance at two checks in a row, the next forward of the model raises :class:`Converged`, which
:func:`~loraga_fast.core.passes.run_passes` catches: ``train_step`` is abandoned at a clean pass boundary, the
model is restored by the capture session, and the result is the mean over the passes actually run.

The factorization is a randomized subspace iteration (``q = 4r`` columns) whose start holds the previous check's
top-``2r`` right singular vectors beside ``2r`` Gaussian columns: two iterations, five sweeps over each sum, and the
captured energies come out of the same sweeps; only the first check starts from a Gaussian alone, with peft's four
iterations. One iteration was measured to misjudge moves by up to 0.02 on SmolLM2-135M (as large as the
tolerance), two by about a tenth of that. A check costs a few percent of a forward+backward pass at the default
interval (measured: docs/benchmarks.md, "Stopping when converged").

Distributed, the decision is collective and made at the same backward count on every rank: one small all-reduce
per forward carries the ranks' pass counts (and detects ranks running different numbers of forwards, like
:class:`~loraga_fast.distributed.guard.StepGuard`), and the checks factor the sums where they are: data parallel
sums through all-reduced skinny products, FSDP row shards with all-reduced Gram matrices (no sum is gathered).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distributed.collectives import is_distributed
from ..distributed.guard import StepGuard
from ..errors import UsageError
from ..ops._precision import with_exact_fp32
from ..ops.rsvd import allsum, orthonormalize, orthonormalize_sharded
from ..stores.exact import AccumulatorStore
from ..stores.factors import DEFAULT_SEED, NITER
from ..stores.sharded import ShardedStore

__all__ = ["CHECK_EVERY", "DEFAULT_TOL", "UNTIL", "Check", "Converged", "ConvergenceMonitor", "StopRule",
           "stop_rule"]

logger = logging.getLogger("loraga_fast")

UNTIL = (None, "converged")
DEFAULT_TOL = 0.05  # measured on SmolLM2-135M: loraga_fast/bench/stopping.py, docs/benchmarks.md "Stopping when converged"
CHECK_EVERY = 4  # backward passes between checks (the same measurement; a check costs 0.23 pass: 5.7% overhead)
DEFAULT_WATCH_RANK = 8  # estimate_gradient without a LoraConfig watches 2 x 8 directions (peft's default r)


@dataclass(frozen=True)
class StopRule:
    """``until="converged"``: check every ``every`` backward passes; stop after two checks in a row where every
    layer moved less than ``tol``."""

    tol: float = DEFAULT_TOL
    every: int = CHECK_EVERY
    iterations: int = 2  # subspace iterations of a check started from the previous one (bench/stopping.py)


def stop_rule(until: str | None, tol: float | None, mode: str = "exact", every: int | None = None) -> StopRule | None:
    """The checked stopping rule of ``until`` / ``convergence_tol`` (None: run all of ``train_step``).

    Raises:
        UsageError: an unknown ``until``, a tolerance outside ``(0, 1)`` or without ``until="converged"``, a
            check interval below 1, or low-memory mode (see the message).
    """
    if until not in UNTIL:
        raise UsageError(f"until must be None (all of train_step's batches) or 'converged', got {until!r}.")
    if until is None:
        if tol is not None:
            raise UsageError("convergence_tol applies to until='converged' only.")
        return None
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
        raise UsageError(f"convergence_tol must be a number in (0, 1) (the share of the top-2r gradient energy the "
                         f"subspaces may still move by; default {DEFAULT_TOL}), got {tol!r}.")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise UsageError(f"the convergence check interval must be a whole number >= 1, got {every!r}.")
    if mode == "lowmem":
        raise UsageError(
            "until='converged' is not available in low-memory mode: its first pass holds only the sketch A Omega of "
            "each running gradient sum, which shows the left singular subspace through a random projection but not "
            "the right one (where LoRA-GA's A factor comes from), and the later passes must replay exactly the "
            "batches the first one ran. Use mode='exact' with until='converged', or give low-memory mode a fixed "
            "number of batches (e.g. the count an exact-mode run with until='converged' used on similar data)."
        )
    return StopRule(tol=float(tol) if tol is not None else DEFAULT_TOL, every=every or CHECK_EVERY)


class Converged(BaseException):
    """Raised at the start of a forward of the model once the subspaces have converged; caught by the passes.

    A ``BaseException`` (like ``KeyboardInterrupt``), so a ``train_step`` that catches ``Exception`` around its
    batches does not swallow it."""


@dataclass(frozen=True)
class Check:
    """One check: after ``backward_passes`` (over all ranks), the largest ``moved`` (``worst_layer``'s) and the
    number of layers above the tolerance. ``moved`` is None at the first check (nothing to compare with)."""

    backward_passes: int
    moved: float | None
    worst_layer: str | None
    above_tol: int | None
    seconds: float


def _in_backward() -> bool:
    """Inside autograd's backward (a forward recomputed by activation checkpointing)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


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
    (a Gaussian, or the previous check's right singular vectors: a warm start), ``niter`` iterations; and, when
    ``previous_left`` is given, what the previous check's directions capture of ``M``.

    Returns ``(U, S, V_all, right, left)``: ``U`` (``k`` columns, rows as held), ``S (B, q)`` descending, ``V_all
    (B, n, q)`` (all ``q`` right vectors, the next warm start), and ``right[b, j] = ||M start_j||^2``, ``left[b, j]
    = ||previous_left_j^T M||^2`` (None without ``previous_left``). Sweeps over ``M``: ``2 niter + 1``.
    """
    right = left = None
    basis = start
    for i in range(niter):
        y = algebra.mv(a, basis)
        if i == 0 and previous_left is not None:
            right = algebra.rowsum(y.square().sum(1))
        q_left = algebra.orth_rows(y)
        if i == 0 and previous_left is not None:  # one sweep for both: [Q_L, U_prev]
            z = algebra.mtv(a, torch.cat([q_left, previous_left], dim=2))
            z, left = z[..., : q_left.shape[2]], z[..., q_left.shape[2]:].square().sum(1)
        else:
            z = algebra.mtv(a, q_left)
        basis = orthonormalize(z)
    y = algebra.mv(a, basis)  # M R = L (L^T M R): the SVD of the small L^T M R gives M's triplets
    q_left = algebra.orth_rows(y)
    u_small, s, vh = torch.linalg.svd(algebra.rowsum(q_left.mT @ y), full_matrices=False)
    return q_left @ u_small[..., :k], s, basis @ vh.mT, right, left


@dataclass(eq=False)
class _Watched:
    """One shape group of the store and what the previous check left of it."""

    tensor: torch.Tensor
    rows: int
    names: list[str]
    ks: list[int]  # 2 r per layer
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # U (k columns) and V (all q) of the previous check


class ConvergenceMonitor:
    """Watches an exact-mode store during a pass and stops ``train_step`` once the subspaces have converged.

    Args:
        store: the pass's accumulators (whole, data-parallel partial sums, or FSDP row shards).
        ranks: each layer's LoRA rank (``2 r`` directions are watched, at most ``min(m, n)``).
        rule: the tolerance and the check interval.
        process_group: data parallel: the group the sums are reduced over (the checks reduce skinny products).
        sharded: the store holds row shards (FSDP); its own group is used.
    """

    def __init__(self, store: AccumulatorStore, ranks: Mapping[str, int], rule: StopRule, *,
                 process_group: Any = None):
        self.store = store
        self.rule = rule
        self.checks: list[Check] = []
        self.moves: dict[str, float] = {}  # each layer's move at the last check
        self.stopped = False
        self._calm = 0  # consecutive checks with every layer within the tolerance
        self._next = rule.every
        self.process_group: Any = None  # the process group of the collectives (None: the world)
        self.distributed = False
        if isinstance(store, ShardedStore):
            self.algebra: _Local = _RowSharded(store.process_group)
            self.process_group, self.distributed = store.process_group, is_distributed(store.process_group)
        elif is_distributed(process_group):
            self.algebra, self.process_group, self.distributed = _Additive(process_group), process_group, True
        else:
            self.algebra = _Local()
        self.watched: list[_Watched] = []
        for g in store.shape_groups:
            small = min(g.shape)
            ks = [min(2 * ranks.get(s.name, DEFAULT_WATCH_RANK), small) for s in g.slots]
            self.watched.append(_Watched(g.tensor, g.shape[0], [s.name for s in g.slots], ks))

    def local_done(self) -> int:
        """Backward passes completed in this process so far in this pass (the most any target has seen)."""
        return max((slot.count for slot in self.store.slots.values()), default=0)

    def attach(self, model: nn.Module, device: torch.device) -> Any:
        """Install the check on ``model``'s forward: a pre-hook ahead of every other (FSDP's included); distributed, a
        :class:`StepGuard` that also carries the pass counts. Returns what to ``.remove()``."""
        if self.distributed:
            return _CountingGuard(model, self.process_group, device, self)
        return model.register_forward_pre_hook(lambda module, args: self.at_forward(self.local_done()), prepend=True)

    def at_forward(self, done: int) -> None:
        """At the start of a forward, ``done`` backward passes in (the same value on every rank): check when due,
        and stop when converged."""
        if _in_backward():  # a forward recomputed inside backward (checkpointing of the whole model)
            return
        if self.stopped:
            raise Converged
        if done < self._next:
            return
        self._next = done + self.rule.every
        self.check(done)
        if self._calm >= 2:
            self.stopped = True
            raise Converged

    @torch.no_grad()
    @with_exact_fp32
    def check(self, done: int) -> Check:
        """Factor every running sum, measure how far each layer's subspaces moved since the previous check."""
        start = time.perf_counter()
        moved: list[tuple[float, str]] = []
        for w in self.watched:
            k = max(w.ks)
            n = w.tensor.shape[2]
            q = min(2 * k, min(w.rows, n))
            # a Gaussian start, the same on every rank; from the second check on, its first k columns are the previous
            # check's top-k right vectors (what is measured, and a warm start), the others stay random so that
            # directions orthogonal to the previous subspace are found too
            gen = torch.Generator(device=w.tensor.device).manual_seed(DEFAULT_SEED + len(self.checks))
            start_basis = torch.randn(w.tensor.shape[0], n, q, device=w.tensor.device, generator=gen)
            if w.previous is None:  # the first check: peft's iterations
                u, s, v, _, _ = subspace_step(self.algebra, w.tensor, start_basis, k, NITER)
            else:
                start_basis[..., :k] = w.previous[1][..., :k]
                u, s, v, right, left = subspace_step(self.algebra, w.tensor, start_basis, k, self.rule.iterations,
                                                         w.previous[0])
                assert right is not None and left is not None
                captured = torch.minimum(right.cumsum(1)[:, :k], left.cumsum(1))
                best = s.square().cumsum(1)
                for j, (name, kj) in enumerate(zip(w.names, w.ks)):
                    opt = float(best[j, kj - 1])
                    moved.append((max(0.0, 1.0 - float(captured[j, kj - 1]) / opt) if opt > 0 else 0.0, name))
            w.previous = (u, v)
        self.moves = {name: m for m, name in moved}
        worst, name = max(moved, default=(None, None))  # type: ignore[type-var]
        above = sum(1 for m, _ in moved if m > self.rule.tol) if moved else None
        if self.distributed and moved:  # identical inputs everywhere; make the decision provably identical too
            import torch.distributed as dist

            flags = torch.tensor([above], dtype=torch.int64, device=self.watched[0].tensor.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
            above = int(flags.item())
        total = done * (torch.distributed.get_world_size(self.process_group) if self.distributed else 1)
        record = Check(total, worst, name, above, time.perf_counter() - start)
        self.checks.append(record)
        self._calm = self._calm + 1 if above == 0 else 0
        logger.debug("LoRA-GA convergence check after %d backward passes: largest move %s (%s), %s above %g",
                     total, worst, name, above, self.rule.tol)
        return record

    def summary(self) -> dict[str, Any]:
        """What a run reports: the rule, whether it stopped, and the last check's figures."""
        last = self.checks[-1] if self.checks else None
        return {"tol": self.rule.tol, "check_every": self.rule.every, "converged": self.stopped,
                "checks": len(self.checks),
                "last_check": None if last is None else {"backward_passes": last.backward_passes, "moved": last.moved,
                                                         "worst_layer": last.worst_layer,
                                                         "layers_above_tol": last.above_tol}}


class _CountingGuard(StepGuard):
    """A :class:`StepGuard` whose per-forward all-reduce also sums the ranks' completed backward passes, so every
    rank decides whether to check (and stop) from the same number, at the same forward."""

    situation = "with until='converged'"
    why = "so that all stop at the same pass"

    def __init__(self, model: nn.Module, process_group: Any, device: torch.device, monitor: ConvergenceMonitor):
        self.monitor = monitor
        self._done = 0
        super().__init__(model, process_group, device)

    def _sync(self, flag: int) -> int:
        t = torch.tensor([flag, self.monitor.local_done() if flag else 0], dtype=torch.int64, device=self.device)
        allsum(t, self.process_group)
        self._done = int(t[1]) // self.world
        return int(t[0])


    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        super()._pre_forward(module, args)
        self.monitor.at_forward(self._done)

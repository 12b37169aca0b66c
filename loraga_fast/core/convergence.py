"""Stopping the estimation once LoRA-GA's directions stop changing with more batches (``until="converged"``).

Every :data:`CHECK_EVERY` backward passes (at the start of the next forward of the model: a pass boundary, so no
backward is half-recorded), :class:`ConvergenceMonitor` factors each layer's running sum ``M`` and measures how far
the singular directions LoRA-GA turns into ``A`` and ``B`` moved since the previous check. Once every layer has
moved less than the tolerance at two checks in a row, the next forward of the model raises :class:`Converged`,
which :func:`~loraga_fast.core.passes.run_passes` catches: ``train_step`` is abandoned at a clean pass boundary,
the model is restored by the capture session, and the result is the mean over the passes actually run.

**What is measured** (:mod:`~loraga_fast.core.moves`): LoRA-GA's ``A`` and ``B`` index sets of the config's
direction, each apart, by the share of its optimal energy the previous check's vectors miss; a layer's move is the
worse of the two; with ``rank_budget=`` every rank in ``[min_rank, max_rank]`` is measured and the worst counts.

**Targets not reached yet** (an MoE expert, a conditional branch) have nothing to measure. A target no backward pass
has reached (on any process) counts as moved 1 at the first :data:`UNREACHED_CHECKS` checks that find it so, which
blocks the stop; from its third such check on it is taken as one this ``train_step`` does not reach and no longer
blocks (it then gets no gradient and peft its default init, as without ``until``: a target never reached cannot
make stopping impossible). A target first reached since the previous check counts as moved 1 at the first check
that sees its gradient (nothing to compare with) and is measured from the next check on. A target whose sum is
exactly zero although backward passes reached it (no gradient flows into it) counts as moved 0.

**The factorization.** Exact mode: a randomized subspace iteration (``q = 4r`` columns) whose start holds the
previous check's top-``2r`` right singular vectors beside ``2r`` Gaussian columns: two iterations, five sweeps over
each sum, and the products with the previous vectors come out of the same sweeps; the first check starts from a
Gaussian alone with peft's four iterations, and a shape group with a newly reached target runs four (that target's
columns start Gaussian). One iteration was
measured to misjudge moves by up to 0.02 on SmolLM2-135M (as large as the tolerance), two by about a tenth of that.
A check costs a few percent of a forward+backward pass at the default interval (measured: docs/benchmarks.md,
"Stopping when converged"). One-pass low-memory mode (``mode="lowmem", passes=1``): the store already holds each
running sum as ``U diag(s) V^T`` (:mod:`~loraga_fast.stores.stream`), so a check reads its leading columns, with no
iteration; it keeps a copy of the previous check's top ``2r`` vectors (``4 (m + n) 2r`` bytes per layer, a twelfth
of the store at the default sketch size). Low-memory mode with ``passes >= 2`` is refused (its first pass holds
only a sketch ``A Omega`` of each sum: no right singular vectors to measure).

Distributed, the decision is collective and made at the same backward count on every rank: one small all-reduce
per forward carries the ranks' pass counts (and detects ranks running different numbers of forwards, like
:class:`~loraga_fast.distributed.guard.StepGuard`), one per check the layers' pass counts, and the checks factor
the sums where they are: data parallel sums through all-reduced skinny products, FSDP row shards with all-reduced
Gram matrices (no sum is gathered); one-pass low-memory mode reads the processes' merged factorization (the
store's :meth:`~loraga_fast.stores.stream.StreamStore.merged`, which leaves its state alone: per check and layer,
``ceil(log2 P)`` merges of width ``2 l`` and a broadcast, as at the end of the pass).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..distributed.collectives import is_distributed
from ..distributed.guard import StepGuard
from ..errors import UsageError
from ..ops._precision import with_exact_fp32
from ..ops.rsvd import allsum
from ..stores.exact import AccumulatorStore
from ..stores.factors import DEFAULT_SEED, NITER
from ..stores.sharded import ShardedStore
from ..stores.stream import StreamStore
from .moves import _Additive, _Local, _RowSharded, _set_masks, direction_sets, measure_moves, subspace_step

__all__ = ["CHECK_EVERY", "DEFAULT_TOL", "DIRECTIONS", "UNREACHED_CHECKS", "UNTIL", "Check", "Converged",
           "ConvergenceMonitor", "StopRule", "direction_sets", "stop_rule"]

logger = logging.getLogger("loraga_fast")

UNTIL = (None, "converged")
DEFAULT_TOL = 0.05  # measured on SmolLM2-135M: loraga_fast/bench/stopping.py, docs/benchmarks.md "Stopping when converged"
CHECK_EVERY = 4  # backward passes between checks (the same measurement; a check costs 0.23 pass: 5.7% overhead)
DEFAULT_WATCH_RANK = 8  # estimate_gradient without a LoraConfig watches 2 x 8 directions (peft's default r)
DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")  # peft's LoraGAConfig.direction values
DEFAULT_DIRECTION = "ArB2r"  # peft's default (estimate_gradient without a LoRA-GA config)
UNREACHED_CHECKS = 2  # checks at which a target no backward pass has reached yet blocks the stop


@dataclass(frozen=True)
class StopRule:
    """``until="converged"``: check every ``every`` backward passes; stop after two checks in a row where every
    layer moved less than ``tol``; ``direction``: the LoRA-GA direction whose ``A`` and ``B`` index sets are
    measured."""

    tol: float = DEFAULT_TOL
    every: int = CHECK_EVERY
    iterations: int = 2  # subspace iterations of a check started from the previous one (bench/stopping.py)
    direction: str = DEFAULT_DIRECTION


def stop_rule(until: str | None, tol: float | None, mode: str = "exact", every: int | None = None, *,
              passes: int = 1, direction: str = DEFAULT_DIRECTION) -> StopRule | None:
    """The checked stopping rule of ``until`` / ``convergence_tol`` (None: run all of ``train_step``); ``passes``:
    low-memory mode's, ``direction``: the LoRA-GA config's.

    Raises:
        UsageError: an unknown ``until``, a tolerance outside ``(0, 1)`` or without ``until="converged"``, a
            check interval below 1, an unknown direction, or low-memory mode with ``passes >= 2`` (see the message).
    """
    if until not in UNTIL:
        raise UsageError(f"until must be None (all of train_step's batches) or 'converged', got {until!r}.")
    if until is None:
        if tol is not None:
            raise UsageError("convergence_tol applies to until='converged' only.")
        return None
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
        raise UsageError(f"convergence_tol must be a number in (0, 1) (the share of a layer's A or B gradient energy "
                         f"their directions may still move by; default {DEFAULT_TOL}), got {tol!r}.")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise UsageError(f"the convergence check interval must be a whole number >= 1, got {every!r}.")
    if direction not in DIRECTIONS:
        raise UsageError(f"lora_ga_config.direction must be one of {', '.join(map(repr, DIRECTIONS))} (until='converged' "
                         f"measures the singular directions it gives A and B), got {direction!r}.")
    if mode == "lowmem" and passes != 1:
        raise UsageError(
            f"until='converged' in low-memory mode needs passes=1: with passes={passes} the first pass holds only the "
            "sketch A Omega of each running gradient sum, which shows the left singular subspace through a random "
            "projection and not the right one (where LoRA-GA's A comes from), so there is nothing to check a stop on. "
            "Use passes=1 (one pass over the data; each sum's truncated SVD, which the check reads), or mode='exact'."
        )
    return StopRule(tol=float(tol) if tol is not None else DEFAULT_TOL, every=every or CHECK_EVERY,
                    direction=direction)


class Converged(BaseException):
    """Raised at the start of a forward of the model once the directions have converged; caught by the passes.

    A ``BaseException`` (like ``KeyboardInterrupt``), so a ``train_step`` that catches ``Exception`` around its
    batches does not swallow it."""


@dataclass(frozen=True)
class Check:
    """One check: after ``backward_passes`` (over all ranks), the largest ``moved`` (``worst_layer``'s) and the
    number of layers above the tolerance (both counting a layer not measured yet that blocks the stop as moved 1),
    and the targets no backward pass has reached yet. ``moved`` is None when no layer could be compared with a
    previous check (the first check)."""

    backward_passes: int
    moved: float | None
    worst_layer: str | None
    above_tol: int | None
    seconds: float
    unreached: int = 0


def _in_backward() -> bool:
    """Inside autograd's backward (a forward recomputed by activation checkpointing)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


@dataclass(eq=False)
class _Watched:
    """One shape group of the store and what the previous check left of it."""

    group: Any  # the store's ShapeGroup (exact) or StreamGroup (one pass)
    rows: int
    cols: int
    names: list[str]
    k: int  # directions watched: 2 x the largest candidate rank of the group, at most min(m, n)
    masks: torch.Tensor  # _set_masks over the group's candidate ranks
    valid: torch.Tensor  # (B, R): the candidate ranks of each layer
    swapped: torch.Tensor  # (B,): stored (in, out), A from the left vectors
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # U and V (k columns each) of the previous check
    reached: list[bool] = field(default_factory=list)  # a backward pass had reached each layer by the previous check


class ConvergenceMonitor:
    """Watches a one-pass store (exact mode's accumulators, or one-pass low-memory mode's truncated SVDs) during
    its pass and stops ``train_step`` once LoRA-GA's directions have converged (module docstring).

    Args:
        store: the pass's store: whole accumulators, data-parallel partial sums, FSDP row shards, or a
            :class:`~loraga_fast.stores.stream.StreamStore`.
        ranks: each layer's LoRA rank; with a rank budget, the largest it may get (``max_rank``). ``2 r``
            directions are watched, at most ``min(m, n)``; a layer not in it: 8 (peft's default ``r``).
        rule: the tolerance, the check interval and the LoRA-GA direction.
        process_group: data parallel: the group the sums are reduced over (the checks reduce skinny products).
        min_rank: with a rank budget, the smallest rank the allocation may give: every rank from it to ``ranks``'s
            is measured and the worst counts (None: ``ranks``'s only).
        transposed: the layers whose accumulator is stored ``(in, out)`` (Conv1D in exact mode; ignored for the
            one-pass store, which holds ``(out, in)``).
    """

    def __init__(self, store: AccumulatorStore | StreamStore, ranks: Mapping[str, int], rule: StopRule, *,
                 process_group: Any = None, min_rank: int | None = None, transposed: Collection[str] = ()):
        self.store = store
        self.rule = rule
        self.checks: list[Check] = []
        self.moves: dict[str, float] = {}  # at the last check: each layer measured or blocking the stop (1.0)
        self.stopped = False
        self._calm = 0  # consecutive checks with every layer within the tolerance
        self._next = rule.every
        self._unreached: dict[str, int] = {}  # checks that found each layer without a backward pass
        self.process_group: Any = None  # the process group of the collectives (None: the world)
        self.distributed = False
        self.stream = isinstance(store, StreamStore)
        if isinstance(store, ShardedStore):
            self.algebra: _Local = _RowSharded(store.process_group)
            self.process_group, self.distributed = store.process_group, is_distributed(store.process_group)
        elif is_distributed(process_group):
            self.algebra, self.process_group, self.distributed = _Additive(process_group), process_group, True
        else:
            self.algebra = _Local()
        flipped = set() if self.stream else set(transposed)
        self.watched: list[_Watched] = []
        for g in store.shape_groups:
            rows, cols = (g.m, g.n) if self.stream else g.shape
            small = min(rows, cols)
            his = [max(1, min(ranks.get(s.name, DEFAULT_WATCH_RANK), small // 2)) for s in g.slots]
            los = [min(hi, min_rank) if min_rank is not None else hi for hi in his]
            k = min(2 * max(his), small, g.k if self.stream else small)
            candidates = range(min(los), max(his) + 1)
            device = g.u.device if self.stream else g.tensor.device
            valid = torch.tensor([[lo <= r <= hi for r in candidates] for lo, hi in zip(los, his)], device=device)
            self.watched.append(_Watched(
                g, rows, cols, [s.name for s in g.slots], k, _set_masks(rule.direction, candidates, k, device), valid,
                torch.tensor([s.name in flipped for s in g.slots], device=device)))

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

    def _counts(self) -> dict[str, int]:
        """Every watched layer's backward passes so far, over all processes."""
        names = [name for w in self.watched for name in w.names]
        if not names:
            return {}
        device = self.watched[0].valid.device
        counts = torch.tensor([self.store.slots[name].count for name in names], dtype=torch.int64, device=device)
        if self.distributed:
            allsum(counts, self.process_group)
        return dict(zip(names, counts.tolist()))

    def _exact_products(self, w: _Watched, fresh: bool) -> tuple[Any, ...]:
        """Factor an accumulator group by subspace iteration: ``(U, s, V, right, left)`` (module docstring)."""
        a = w.group.tensor
        n = a.shape[2]
        q = min(2 * w.k, w.rows, n)
        # a Gaussian start, the same on every rank; from the second check on, its first k columns are the previous
        # check's top-k right vectors of the layers measured then (what is measured, and a warm start), the others
        # stay random so that directions orthogonal to the previous subspace are found too
        gen = torch.Generator(device=a.device).manual_seed(DEFAULT_SEED + len(self.checks))
        start = torch.randn(a.shape[0], n, q, device=a.device, generator=gen)
        if w.previous is None:  # the first check: peft's iterations
            u, s, v, _, _ = subspace_step(self.algebra, a, start, w.k, NITER)
            return u, s, v[..., : w.k], None, None
        keep = torch.tensor(w.reached, device=a.device)[:, None, None]
        start[..., : w.k] = torch.where(keep, w.previous[1], start[..., : w.k])
        u, s, v, y, z = subspace_step(self.algebra, a, start, w.k, NITER if fresh else self.rule.iterations,
                                      w.previous[0])
        assert y is not None and z is not None  # (the products of layers not measured before are not used)
        right = (self.algebra.rowsum(y.square().sum(1)), self.algebra.rowsum(u.mT @ y))
        left = (z.square().sum(1), v[..., : w.k].mT @ z)
        return u, s, v[..., : w.k], right, left

    def _stream_products(self, w: _Watched, layers: list[tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]]
                         ) -> tuple[Any, ...]:
        """A one-pass group from its layers' factorizations ``(slot, u, s, v)`` (merged over the processes when
        distributed): ``(U, s, V, right, left)``, the products with the previous vectors from ``U diag(s) V^T``
        itself, one layer at a time (no copy of the state beyond the top ``k`` vectors kept for the next check)."""
        k = w.k
        u = torch.stack([lu[:, :k] for _, lu, _, _ in layers])
        s = torch.stack([ls for _, _, ls, _ in layers])
        v = torch.stack([lv[:, :k] for _, _, _, lv in layers])
        if w.previous is None:
            return u, s, v, None, None
        su, sv = [], []
        for j, (_, lu, ls, lv) in enumerate(layers):  # u_e^T M p = s_e v_e^T p, ||M p||^2 = sum_e (s_e v_e^T p)^2
            su.append(ls[:, None] * (lu.mT @ w.previous[0][j]))
            sv.append(ls[:, None] * (lv.mT @ w.previous[1][j]))
        cu, cv = torch.stack(su), torch.stack(sv)  # (B, l, k)
        return u, s, v, (cv.square().sum(1), cv[:, :k]), (cu.square().sum(1), cu[:, :k])

    @torch.no_grad()
    @with_exact_fp32
    def check(self, done: int) -> Check:
        """Factor every running sum, measure how far each layer's directions moved since the previous check."""
        start = time.perf_counter()
        counts = self._counts()
        measured: dict[str, float] = {}
        blocking: list[str] = []
        unreached = 0
        merged: Any = None  # one-pass store, distributed: every layer's factorization merged over the processes,
        if self.stream and self.distributed:  # in group order (collective: a tree per layer; the store is left alone)
            merged = iter(self.store.merged(self.process_group))  # type: ignore[union-attr]
        for w in self.watched:
            reached = [counts[name] > 0 for name in w.names]
            fresh = any(now and not before for now, before in zip(reached, w.reached))
            if self.stream:
                g = w.group
                layers = ([next(merged) for _ in w.names] if merged is not None
                          else [(slot, g.u[slot.index], g.s[slot.index], g.v[slot.index]) for slot in g.slots])
                u, s, v, right, left = self._stream_products(w, layers)
            else:
                u, s, v, right, left = self._exact_products(w, fresh)
            moves = None
            if right is not None and left is not None:
                moves = measure_moves(s, right, left, w.masks, w.valid, w.swapped, max(w.rows, w.cols)).tolist()
            for j, name in enumerate(w.names):
                if not reached[j]:
                    unreached += 1
                    self._unreached[name] = self._unreached.get(name, 0) + 1
                    if self._unreached[name] <= UNREACHED_CHECKS:
                        blocking.append(name)
                elif moves is not None and w.reached[j]:
                    measured[name] = moves[j]
                else:  # first reached since the previous check: nothing to compare with yet
                    blocking.append(name)
            w.previous = (u, v)
            w.reached = reached
        worst = name = above = None
        if measured:
            self.moves = measured | dict.fromkeys(blocking, 1.0)
            worst, name = max((m, n) for n, m in self.moves.items())
            above = sum(1 for m in self.moves.values() if m > self.rule.tol)
        else:
            self.moves = {}
        if self.distributed and measured:  # identical inputs everywhere; make the decision provably identical too
            import torch.distributed as dist

            flags = torch.tensor([above], dtype=torch.int64, device=self.watched[0].valid.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
            above = int(flags.item())
        total = done * (torch.distributed.get_world_size(self.process_group) if self.distributed else 1)
        record = Check(total, worst, name, above, time.perf_counter() - start, unreached)
        self.checks.append(record)
        self._calm = self._calm + 1 if above == 0 else 0
        logger.debug("LoRA-GA convergence check after %d backward passes: largest move %s (%s), %s above %g, %d not "
                     "reached yet", total, worst, name, above, self.rule.tol, unreached)
        return record

    def summary(self) -> dict[str, Any]:
        """What a run reports: the rule, whether it stopped, and the last check's figures."""
        last = self.checks[-1] if self.checks else None
        return {"tol": self.rule.tol, "check_every": self.rule.every, "converged": self.stopped,
                "checks": len(self.checks),
                "last_check": None if last is None else {"backward_passes": last.backward_passes, "moved": last.moved,
                                                         "worst_layer": last.worst_layer,
                                                         "layers_above_tol": last.above_tol,
                                                         "layers_not_reached": last.unreached}}


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

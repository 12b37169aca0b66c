"""Per-layer LoRA ranks under a parameter budget, from the spectra of the mean gradients (``rank_budget=``).

The criterion: the first-order loss decrease of the first SGD step on the adapters LoRA-GA actually builds. A layer
with mean gradient ``G = sum_i sigma_i u_i v_i^T`` (``m x n``) gets ``A`` (``r x n``) and ``B`` (``m x r``) with the
LoRA scaling ``s`` (``alpha / r``, or ``alpha / sqrt(r)``), and the base offset makes ``W + s B A`` start at ``W``.
The adapters' gradients are ``s B^T G`` and ``s G A^T``; one SGD step of learning rate ``eta`` changes the
effective weight by ``-eta s^2 (B B^T G + G A^T A) + O(eta^2)``, so the loss falls by

    eta s^2 (||G A^T||^2 + ||B^T G||^2)

to first order. peft's init (:mod:`loraga_fast.core.layer_init`) takes ``A = a V_IA^T`` (orthonormal rows, ``a`` = 1,
or ``1 / s`` under ``gd_scale``) and ``B = c U_IB diag(sigma_IB)`` for two index sets ``IA``, ``IB`` of size ``r``
(``ArB2r``: ``IA = 1..r``, ``IB = r+1..2r``; ``A2rBr`` the other way round; ``ArBr`` even and odd positions of
``1..2r``; ``random``: the same random half of ``1..2r`` for both, taken in expectation), and ``c`` from ``scale``
(``stable``: ``d^(1/4) / sqrt(stable_gamma)`` with the ``d`` the installed peft reads; ``unit``: 1; ``gd_scale``:
``1 / s``; ``weight_svd``: ``sigma_1(W) / sigma_{IB[0]}``). Then ``||G A^T||^2 = a^2 sum_{i in IA} sigma_i^2`` and
``||B^T G||^2 = c^2 sum_{j in IB} sigma_j^4``, and the predicted decrease of layer ``l`` at rank ``r`` is

    D_l(r) = s_l^2 (a_l^2 sum_{i in IA(r)} sigma_i^2 + c_l(r)^2 sum_{j in IB(r)} sigma_j^4)   (per unit eta).

Summed over layers this is the whole first step's decrease: its currency is the loss, so it compares layers of any
shape and scale. At mean-gradient magnitudes (``sigma`` well below 1) under ``stable`` / ``unit`` / ``gd_scale`` the
``sigma^4`` term is negligible and ``D_l(r) ~ s^2 sum_{i in IA} sigma_i^2``: for ``ArB2r`` the gain of rank
``r -> r + 1`` is about ``s^2 sigma_{r+1}^2`` -- A's top-``r`` right directions, not the top ``2r``. Under
``weight_svd`` the B term is ``sigma_1(W)^2 sum_j sigma_j^4 / sigma_{IB[0]}^2``, comparable to or larger than the A
term, and it is what makes ``D`` depend on the scale. (Adam's first step is sign-like and does not follow this
formula; the criterion is for the SGD step the derivation describes.) A rank ``r_l`` costs ``r_l (m_l + n_l)``
parameters. tests/core/test_allocation_outcome.py checks the prediction against the loss decrease measured after
one SGD step on ``get_peft_model``'s adapters, and that the allocation's measured decrease beats uniform ranks'.

The budget is met as follows (:func:`allocate`): every layer starts at ``min_rank``; the layer whose next step
gains the most per parameter grows first, where a step is the run of ``k >= 1`` increments with the best average
gain per parameter (``k = 1`` whenever the gains are concave, e.g. ``ArB2r`` under ``stable``; ``weight_svd``'s
and ``ArBr``'s are not always); a step is taken only if it fits, shortened to what fits otherwise, and a layer none
of whose increments fit stops growing. So the allocation never exceeds the budget, and what is left is smaller
than every growable layer's next increment. For concave gains this greedy is within one increment of the
fractional (LP) optimum -- the classic bound for a knapsack with concave per-item gains, exact when every layer
costs the same and the budget is a whole number of increments; it is not claimed optimal otherwise.

Compared with GoRA (arXiv 2502.12171): GoRA scores a layer by ``|W * G|`` averaged (a weight-times-gradient
sensitivity) and gives ranks proportional to the scores under a parameter budget; the score says how much the
loss reacts to the layer, not how much of that an adapter of rank ``r`` can capture. EVA allocates by explained
variance of the *activations*, normalized per layer, which equalizes layers whatever their gradient magnitude.
Here the score is the first-step loss decrease the LoRA-GA init of that rank produces.

The ranks go to peft's standard ``rank_pattern`` / ``alpha_pattern`` of the user's ``LoraConfig`` (module names as
keys, anchored where one name would also match another), with each layer's scaling (``alpha / r``) kept at the
config's. ``use_rslora`` is refused with a budget: peft cannot convert a LoRA-GA adapter back to the untouched
base (``path_initial_model_for_weight_conversion``, used by ``save_loraga_model_final``) when rslora is combined
with ``rank_pattern`` / ``alpha_pattern``, which the user would only learn after training.
"""

from __future__ import annotations

import heapq
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["DIRECTION_INDICES", "RankBudget", "allocate", "apply_ranks", "decrease_curve", "first_step_decrease",
           "lora_params", "rank_budget"]

DEFAULT_MAX_RANK_FACTOR = 4  # max_rank=None: 4 x the config's rank (capped at min(m, n) / 2 per layer)


@dataclass(frozen=True)
class RankBudget:
    """A checked ``rank_budget``: ``params`` LoRA parameters over the targets, ranks within ``[min_rank, max_ranks]``.

    Attributes:
        costs: ``m + n`` per layer (the parameters of one rank).
        scaling: each layer's LoRA scaling under the config (kept at the allocated rank).
    """

    params: int
    min_rank: int
    max_ranks: dict[str, int]
    costs: dict[str, int]
    scaling: dict[str, float]
    uniform: bool

    def alpha(self, name: str, rank: int) -> float:
        """The ``lora_alpha`` that gives layer ``name`` its config scaling ``alpha / r`` at ``rank``."""
        return self.scaling[name] * rank


def lora_params(ranks: Mapping[str, int], costs: Mapping[str, int]) -> int:
    """LoRA parameters of ``ranks``: ``sum r (m + n)``."""
    return sum(r * costs[name] for name, r in ranks.items())


def rank_budget(lora_config: Any, shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], budget: Any,
                min_rank: Any = 1, max_rank: Any = None, *, sketch_columns: Mapping[str, int] | None = None
                ) -> RankBudget | None:
    """Check ``rank_budget`` / ``min_rank`` / ``max_rank`` against the targets' shapes (before any data is read).

    Args:
        shapes: each target's weight ``(m, n)``; ranks: its rank under the config (``"uniform"`` is their count).
        sketch_columns: low-memory mode: each layer's sketch columns ``k`` (the spectrum is known up to ``k``).

    Raises:
        UsageError: a budget that is not ``"uniform"`` or a positive whole number, one below ``min_rank`` on every
            target, ``min_rank < 1``, ``max_rank < min_rank``, ``max_rank > min(m, n) / 2`` for some layer, or
            ``2 max_rank`` above a low-memory sketch; ``min_rank`` / ``max_rank`` without a budget; a budget with
            ``use_rslora=True`` (peft cannot convert the trained adapter back to the untouched base then).
    """
    if budget is None:
        if min_rank != 1 or max_rank is not None:
            raise UsageError("min_rank and max_rank apply to rank_budget only (rank_budget='uniform' or a number of "
                             "LoRA parameters).")
        return None
    uniform = isinstance(budget, str)
    if uniform and budget != "uniform" or not uniform and not _whole(budget, 1):
        raise UsageError(f"rank_budget must be 'uniform' (the parameter count of the config's ranks) or a whole number "
                         f"of LoRA parameters >= 1, got {budget!r}.")
    if getattr(lora_config, "use_rslora", False):
        raise UsageError("rank_budget cannot be combined with use_rslora=True: peft cannot convert the trained adapter "
                         "for the untouched base (save_loraga_model_final, path_initial_model_for_weight_conversion) "
                         "when rslora meets rank_pattern/alpha_pattern. Use use_rslora=False with lora_alpha = alpha * "
                         "sqrt(r) for the same scaling alpha / sqrt(r) at the config's rank r (every layer keeps it), "
                         "or drop rank_budget.")
    if not _whole(min_rank, 1):
        raise UsageError(f"min_rank must be a whole number >= 1, got {min_rank!r}.")
    if max_rank is not None and not _whole(max_rank, 1):
        raise UsageError(f"max_rank must be a whole number >= 1 or None, got {max_rank!r}.")
    if max_rank is not None and max_rank < min_rank:
        raise UsageError(f"max_rank={max_rank} is below min_rank={min_rank}.")
    min_rank = int(min_rank)
    costs = {name: m + n for name, (m, n) in shapes.items()}
    max_ranks: dict[str, int] = {}
    top = max(ranks.values())
    for name, (m, n) in shapes.items():
        cap = min(m, n) // 2
        if max_rank is not None and max_rank > cap:
            raise UsageError(f"max_rank={max_rank} is over min(m, n) / 2 = {cap} for layer '{name}' (weight {m} x {n}): "
                             "LoRA-GA takes 2r singular directions of its gradient. Lower max_rank.")
        if min_rank > cap:
            raise UsageError(f"min_rank={min_rank} is over min(m, n) / 2 = {cap} for layer '{name}' (weight {m} x {n}).")
        limit = int(max_rank) if max_rank is not None else max(min_rank, min(DEFAULT_MAX_RANK_FACTOR * top, cap))
        if sketch_columns is not None and 2 * limit > sketch_columns[name]:
            if max_rank is not None:
                raise UsageError(f"max_rank={max_rank} needs 2 x {max_rank} singular directions, but low-memory mode's "
                                 f"sketch of layer '{name}' has {sketch_columns[name]} columns: raise sketch_size to at "
                                 f"least {2 * limit} or lower max_rank.")
            limit = max(min_rank, sketch_columns[name] // 2)
        max_ranks[name] = limit
    params = lora_params(ranks, costs) if uniform else int(budget)
    floor = lora_params({name: min_rank for name in shapes}, costs)
    if params < floor:
        raise UsageError(f"rank_budget={budget!r} ({params} LoRA parameters) is smaller than min_rank={min_rank} on every "
                         f"target, which takes {floor}: raise the budget or lower min_rank.")
    scaling = {name: _scaling(lora_config, name, ranks[name]) for name in shapes}
    return RankBudget(params=params, min_rank=min_rank, max_ranks=max_ranks, costs=costs, scaling=scaling,
                      uniform=uniform)


def _whole(value: Any, least: int) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return float(value).is_integer() and value >= least


def _scaling(lora_config: Any, name: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    pattern = getattr(lora_config, "alpha_pattern", None) or {}
    alpha = pattern.get(get_pattern_key(pattern.keys(), name), lora_config.lora_alpha)
    return alpha / rank


DIRECTION_INDICES = ("ArBr", "A2rBr", "ArB2r")


def _index_sets(direction: str, r: int) -> tuple[range, range]:
    """LoRA-GA's (0-based) singular indices of A's rows and B's columns at rank ``r`` (:mod:`.layer_init`)."""
    if direction == "ArBr":
        return range(1, 2 * r, 2), range(0, 2 * r, 2)
    if direction == "A2rBr":
        return range(r, 2 * r), range(0, r)
    if direction == "ArB2r":
        return range(0, r), range(r, 2 * r)
    raise UsageError(f"Unknown LoRA-GA direction {direction!r}.")


def first_step_decrease(s: Sequence[float], rank: int, direction: str, scale: str, *, scaling: float,
                        stable_factor: float = 1.0, weight_sigma: float | None = None) -> float:
    """The first-order loss decrease, per unit learning rate, of one SGD step on the adapters of LoRA-GA's init of
    rank ``rank``: ``s^2 (||G A^T||^2 + ||B^T G||^2) = s^2 (a^2 sum_{IA} sigma_i^2 + c^2 sum_{IB} sigma_j^4)`` (see
    the module docstring).

    Args:
        s: the mean gradient's singular values, descending (missing ones count as 0).
        direction, scale: the ``LoraGAConfig``'s; ``"random"`` gives the expectation over its random index set.
        scaling: the layer's LoRA scaling ``s``.
        stable_factor: ``scale="stable"``'s B factor ``d^(1/4) / sqrt(stable_gamma)``.
        weight_sigma: ``scale="weight_svd"``: the weight's top singular value.
    """
    sq = [float(x) ** 2 for x in s]

    def at(i: int) -> float:
        return sq[i] if i < len(sq) else 0.0

    def b_factor(first: float) -> float:  # c^2 for B's first singular value squared ``first``
        if scale == "stable":
            return stable_factor**2
        if scale == "weight_svd":
            return (weight_sigma or 0.0) ** 2 / first if first > 0 else 1.0
        if scale == "gd_scale":
            return 1.0 / scaling**2
        if scale == "unit":
            return 1.0
        raise UsageError(f"Unknown LoRA-GA scale {scale!r}.")

    a2 = 1.0 / scaling**2 if scale == "gd_scale" else 1.0
    if rank <= 0:
        return 0.0
    if direction == "random":  # A and B share a uniformly random half I of 1..2r: each index is in I w.p. 1/2
        top = [at(i) for i in range(2 * rank)]
        b_term = sum(e * e for e in top) / 2
        # weight_svd: c is set by I's first index, uniform over 1..2r
        c2 = sum(b_factor(e) for e in top) / len(top) if scale == "weight_svd" else b_factor(top[0])
        return scaling**2 * (a2 * sum(top) / 2 + c2 * b_term)
    ia, ib = _index_sets(direction, rank)
    b_sq = [at(j) for j in ib]
    return scaling**2 * (a2 * sum(at(i) for i in ia) + b_factor(b_sq[0]) * sum(e * e for e in b_sq))


def decrease_curve(s: Sequence[float], max_rank: int, direction: str, scale: str, *, scaling: float,
                   stable_factor: float = 1.0, weight_sigma: float | None = None) -> list[float]:
    """``[D(0), D(1), ..., D(max_rank)]``: :func:`first_step_decrease` at every rank (``D(0) = 0``)."""
    return [first_step_decrease(s, r, direction, scale, scaling=scaling, stable_factor=stable_factor,
                                weight_sigma=weight_sigma) for r in range(max_rank + 1)]


def allocate(curves: Mapping[str, Sequence[float]], costs: Mapping[str, int], params: int, min_rank: int,
             max_ranks: Mapping[str, int]) -> dict[str, int]:
    """Ranks with a large ``sum_l D_l(r_l)`` under ``sum_l r_l costs_l <= params``, ``min_rank <= r_l <=
    max_ranks[l]``: greedy by gain per parameter over steps of the best average gain (see the module docstring).

    Args:
        curves: each layer's predicted decrease ``D_l(r)`` for ``r = 0 .. max_ranks[l]`` (:func:`decrease_curve`;
            a shorter curve is extended by its last value). Layers absent from ``curves`` but in ``costs`` get
            ``min_rank``.
        costs: ``m + n`` per layer, for every layer of the allocation.

    Ties are broken by name, so the result is the same on every process.
    """
    ranks = {name: min_rank for name in costs}
    left = params - lora_params(ranks, costs)
    if left < 0:
        raise UsageError(f"the budget of {params} LoRA parameters is below min_rank={min_rank} on every layer.")

    def value(name: str, r: int) -> float:
        c = curves.get(name, ())
        return float(c[min(r, len(c) - 1)]) if len(c) else 0.0

    def best_step(name: str, cap: int) -> tuple[float, int]:  # (best average gain per increment, its length)
        r, base = ranks[name], value(name, ranks[name])
        best, length = -math.inf, 1
        for k in range(1, cap - r + 1):
            g = (value(name, r + k) - base) / k
            if g > best:
                best, length = g, k
        return best, length

    def push(name: str, cap: int) -> None:
        if ranks[name] < cap:
            gain, k = best_step(name, cap)
            heapq.heappush(heap, (-gain / costs[name], name, k, cap))

    heap: list[tuple[float, str, int, int]] = []
    for name in sorted(costs):
        push(name, max_ranks[name])
    while heap:
        _, name, k, cap = heapq.heappop(heap)
        fits = left // costs[name]
        if fits == 0:
            continue  # its increments all cost the same: it cannot grow any more
        if k > fits:  # the best step does not fit: the best of the steps that do, ranked again
            push(name, min(cap, ranks[name] + fits))
            continue
        ranks[name] += k
        left -= k * costs[name]
        push(name, max_ranks[name])
    return ranks


def apply_ranks(lora_config: Any, budget: RankBudget, ranks: Mapping[str, int]) -> None:
    """Write ``ranks`` into ``lora_config.rank_pattern`` and the alphas that keep each layer's scaling into
    ``alpha_pattern`` (peft's own fields, so ``get_peft_model``, ``save_pretrained`` and
    ``PeftModel.from_pretrained`` use them unchanged). Keys are the module names; an existing pattern entry that
    matches one of these layers is dropped (the allocation replaces it), the others are kept after ours."""
    from peft.utils.other import get_pattern_key

    def merged(old: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        keys = _keys(list(new))
        out = {keys[name]: value for name, value in new.items()}
        out.update({k: v for k, v in (old or {}).items() if not any(_matches(k, name) for name in new)})
        for name in new:  # peft takes the first key that matches a name: it must be this layer's own
            if get_pattern_key(out.keys(), name) != keys[name]:
                raise UsageError(f"rank_budget: peft would read layer '{name}''s rank from the pattern key "
                                 f"'{get_pattern_key(out.keys(), name)}', not its own '{keys[name]}'; rename the "
                                 "clashing rank_pattern/alpha_pattern entry of the LoraConfig.")
        return out

    lora_config.rank_pattern = merged(lora_config.rank_pattern, {name: int(r) for name, r in ranks.items()})
    lora_config.alpha_pattern = merged(lora_config.alpha_pattern,
                                       {name: _tidy(budget.alpha(name, r)) for name, r in ranks.items()})


def _matches(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _keys(names: Sequence[str]) -> dict[str, str]:
    """Each name as a pattern key; where peft's match (``(.*\\.)?(key)$``, :func:`_matches`) would let it also
    match another layer (``proj`` matches ``block.proj``), escaped and anchored at the start (``^proj``), which
    matches that one full name only."""
    keys = {}
    for name in names:
        clash = any(other != name and _matches(name, other) for other in names)
        keys[name] = "^" + re.escape(name) if clash else name
    return keys


def _tidy(x: float) -> float | int:
    """An integral alpha as an int (peft's json stays readable), others as floats."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x

"""Per-layer LoRA ranks under a parameter budget, from the spectra of the mean gradients (``rank_budget=``).

The criterion, from LoRA-GA's own objective. LoRA-GA initializes ``A`` from the top ``r`` right singular vectors of
a layer's mean gradient ``G`` and ``B`` from the next ``r`` left ones, so that the first LoRA step approximates the
full fine-tuning step projected on those ``2r`` directions: the update is ``-eta (G A^T A + B B^T G)`` (up to the
per-layer scale), and the first-order loss decrease it buys is ``eta <G, G A^T A + B B^T G> ~ eta (sum_{i<=r}
sigma_i^2 + sum_{r<i<=2r} sigma_i^2) = eta sum_{i<=2r} sigma_i(G)^2``. Summed over layers, the loss decrease the
adapters can capture is ``sum_l sum_{i<=2 r_l} sigma_{l,i}^2`` -- raw singular values, not normalized per layer:
the currency is the loss, which every layer's gradient is a derivative of. A rank ``r_l`` costs ``r_l (m_l + n_l)``
parameters. The gain of one more rank, ``sigma_{2r+1}^2 + sigma_{2r+2}^2``, never grows with ``r`` (singular
values descend), so the gains are concave and choosing increments greedily by gain per parameter is optimal up to
the integrality of the last increment (a fractional knapsack over concave gains).

The budget is met as follows (:func:`allocate`): every layer starts at ``min_rank``; increments are taken best gain
per parameter first, each only if it still fits; a layer whose next increment does not fit stops growing (its
increments all cost the same). So the allocation never exceeds the budget, and what is left is smaller than the
cost of every layer's next increment (zero whenever the increments can fill it, e.g. when every layer has the same
``m + n`` and the budget is the uniform one).

Compared with GoRA (arXiv 2502.12171): GoRA scores a layer by ``|W * G|`` averaged (a weight-times-gradient
sensitivity) and gives ranks proportional to the scores under a parameter budget; the score says how much the
loss reacts to the layer, not how much of that an adapter of rank ``r`` can capture, so it does not see that a
layer with a flat spectrum needs more rank than one with a spiky spectrum for the same share. EVA allocates by
explained variance of the *activations*, normalized per layer, which equalizes layers whatever their gradient
magnitude. Here the score is the captured gradient energy itself, per parameter, which is what LoRA-GA's
initialization turns into the first step.

The ranks go to peft's standard ``rank_pattern`` / ``alpha_pattern`` of the user's ``LoraConfig`` (module names as
keys), with each layer's scaling (``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``) kept at the config's.
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

__all__ = ["RankBudget", "allocate", "apply_ranks", "lora_params", "rank_budget"]

DEFAULT_MAX_RANK_FACTOR = 4  # max_rank=None: 4 x the config's rank (capped at min(m, n) / 2 per layer)


@dataclass(frozen=True)
class RankBudget:
    """A checked ``rank_budget``: ``params`` LoRA parameters over the targets, ranks within ``[min_rank, max_ranks]``.

    Attributes:
        costs: ``m + n`` per layer (the parameters of one rank).
        scaling: each layer's LoRA scaling under the config (kept at the allocated rank).
        rslora: the config uses ``use_rslora`` (scaling ``alpha / sqrt(r)``).
    """

    params: int
    min_rank: int
    max_ranks: dict[str, int]
    costs: dict[str, int]
    scaling: dict[str, float]
    rslora: bool
    uniform: bool

    def alpha(self, name: str, rank: int) -> float:
        """The ``lora_alpha`` that gives layer ``name`` its config scaling at ``rank``."""
        return self.scaling[name] * (math.sqrt(rank) if self.rslora else rank)


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
            ``2 max_rank`` above a low-memory sketch; ``min_rank`` / ``max_rank`` without a budget.
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
                      rslora=bool(getattr(lora_config, "use_rslora", False)), uniform=uniform)


def _whole(value: Any, least: int) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return float(value).is_integer() and value >= least


def _scaling(lora_config: Any, name: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    pattern = getattr(lora_config, "alpha_pattern", None) or {}
    alpha = pattern.get(get_pattern_key(pattern.keys(), name), lora_config.lora_alpha)
    return alpha / (math.sqrt(rank) if getattr(lora_config, "use_rslora", False) else rank)


def allocate(spectra: Mapping[str, torch.Tensor | Sequence[float]], costs: Mapping[str, int], params: int,
             min_rank: int, max_ranks: Mapping[str, int]) -> dict[str, int]:
    """Ranks maximizing ``sum_l sum_{i <= 2 r_l} sigma_{l,i}^2`` with ``sum_l r_l costs_l <= params``,
    ``min_rank <= r_l <= max_ranks[l]`` (greedy by gain per parameter; see the module docstring).

    Args:
        spectra: each layer's singular values, descending (at least ``2 max_ranks[l]`` of them, or fewer: missing
            values count as 0). Layers absent from ``spectra`` but in ``costs`` get ``min_rank``.
        costs: ``m + n`` per layer, for every layer of the allocation.

    Ties are broken by name, so the result is the same on every process.
    """
    ranks = {name: min_rank for name in costs}
    left = params - lora_params(ranks, costs)
    if left < 0:
        raise UsageError(f"the budget of {params} LoRA parameters is below min_rank={min_rank} on every layer.")
    energy = {name: [float(x) ** 2 for x in (s.tolist() if isinstance(s, torch.Tensor) else s)]
              for name, s in spectra.items()}

    def gain(name: str, r: int) -> float:  # the energy rank r + 1 adds: sigma_{2r+1}^2 + sigma_{2r+2}^2
        e = energy.get(name, [])
        return sum(e[i] for i in range(2 * r, min(2 * r + 2, len(e))))

    heap = [(-gain(name, min_rank) / costs[name], name) for name in sorted(costs) if min_rank < max_ranks[name]]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if costs[name] > left:
            continue  # its increments all cost the same: it cannot grow any more
        ranks[name] += 1
        left -= costs[name]
        if ranks[name] < max_ranks[name]:
            heapq.heappush(heap, (-gain(name, ranks[name]) / costs[name], name))
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
        for name in new:  # peft takes the first key that matches a name: make sure it is this layer's own
            assert get_pattern_key(out.keys(), name) == keys[name], name
        return out

    lora_config.rank_pattern = merged(lora_config.rank_pattern, {name: int(r) for name, r in ranks.items()})
    lora_config.alpha_pattern = merged(lora_config.alpha_pattern,
                                       {name: _tidy(budget.alpha(name, r)) for name, r in ranks.items()})


def _matches(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _keys(names: Sequence[str]) -> dict[str, str]:
    """Each name as a pattern key; escaped where peft's regex match would let it also match another layer first."""
    keys = {}
    for name in names:
        clash = any(other != name and _matches(name, other) for other in names)
        keys[name] = re.escape(name) if clash else name
    return keys


def _tidy(x: float) -> float | int:
    """An integral alpha as an int (peft's json stays readable), others as floats."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x

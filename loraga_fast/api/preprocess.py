"""The drop-in surface: :func:`preprocess_loraga`, with peft's contract.

``from loraga_fast import preprocess_loraga`` replaces ``from peft import preprocess_loraga``; the user's
``peft.get_peft_model(model, lora_config)`` then initializes LoRA-GA from what is attached here. The work goes
through the one flow every mode shares: plan (:mod:`~loraga_fast.core.plan`: targets, checks, store) -> capture
passes (:mod:`~loraga_fast.core.passes`) -> hand-off (:mod:`~loraga_fast.core.handoff`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from ..core.handoff import hand_off
from ..core.passes import run_passes
from ..core.plan import Plan, make_plan
from ..distributed.collectives import is_distributed
from ..stores.base import GradientSource
from ..stores.cached import load_factors, load_gradients

__all__ = ["Estimation", "check_preprocess", "preprocess_loraga", "run_plan"]

logger = logging.getLogger("loraga_fast")


def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[], None],
    cache_file: str | os.PathLike[str] | None = None,
    *,
    num_batches: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
    mode: str = "exact",
    sketch_size: int | None = None,
    passes: int | None = None,
    quantized_offset: str = "requantize",
    until: str | None = None,
    convergence_tol: float | None = None,
    rank_budget: int | str | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    keep_base: bool | str = False,
) -> None:
    """Estimate the mean gradient of every LoRA-GA target layer and attach it for ``peft.get_peft_model``.

    A drop-in replacement for ``peft.preprocess_loraga`` with the same arguments and effects, computed without
    autograd weight gradients: each target ``nn.Linear`` / ``Conv1D`` is routed through a capture op whose
    backward adds ``G^T X`` (output gradient times input, all tokens) into an fp32 accumulator.

    Args:
        model: the model to preprocess (not yet wrapped by peft).
        lora_config: a ``LoraConfig`` with ``init_lora_weights="lora_ga"`` and ``lora_ga_config`` set. When its
            ``target_modules`` is None, it is filled from peft's defaults for the model type (as peft does).
        train_step: callback that runs forward and backward passes (``loss.backward()``) over the estimation
            batches. It may call ``model.zero_grad()``; the result is still the mean over all backward passes.
        cache_file: optional safetensors file. If it exists and is non-empty, gradients are loaded from it and
            ``train_step`` is not called; otherwise they are estimated and saved there.
        num_batches: optional number of backward passes ``train_step`` will run, for the progress bar.
        progress: show a progress bar (default: only when ``num_batches`` is given).
        process_group: data parallel. When ``torch.distributed`` is initialized, every rank runs ``train_step`` on
            its own batches and the sums and pass counts are reduced over this group (default: the world) with one
            collective per shape group, so every rank ends with the mean over all ranks' backward passes (ranks may
            run different numbers of batches). Only rank 0 writes ``cache_file``. FSDP-sharded models (FSDP2
            ``fully_shard`` with ``Shard(0)`` on a 1-D mesh; FSDP1 with ``use_orig_params=True``) are handled too: the
            accumulators are row-sharded over the model's process group (``process_group`` must be left unset) and
            every rank must run the same number of forward passes (a mismatch raises on every rank instead of
            hanging). See :mod:`loraga_fast.distributed.layout`.
        mode: ``"exact"`` (default): one fp32 accumulator per target (4 bytes per weight), ``train_step`` runs once.
            ``"lowmem"``: only skinny sketches of each gradient (``4 (m + n) k`` bytes per layer, ``k = 24 r``), from
            which the top ``2r`` singular triplets are reconstructed; ``train_step`` runs ``passes`` times and must be
            re-runnable and see the same batches each time (checked; the global random state is reset before each
            pass). ``_peft_loraga_grad`` is then a placeholder, not a tensor, and ``cache_file`` holds the factors.
            See :mod:`loraga_fast.stores.sketch`.
        sketch_size: low-memory mode only: sketch columns ``k`` per layer (default ``24 r``, capped at
            ``min(m, n)``); must be at least ``2 r``.
        passes: low-memory mode only: calls of ``train_step`` (default 3). ``1``: one call; each layer keeps a
            rank-``k`` truncated SVD of its gradient sum, updated on every backward pass (the same ``4 (m + n) k``
            bytes; more compute per backward pass, no replay of the batches; ``until="converged"`` works with it; see
            :mod:`loraga_fast.stores.stream`).
            ``2`` or more: sketches, one call of ``train_step`` per pass; more passes are more accurate (each is one
            power iteration).
        quantized_offset: bitsandbytes 4-/8-bit targets only (QLoRA): how ``get_peft_model`` applies LoRA-GA's base
            offset ``W - s B A``, which 4 or 8 bits cannot store exactly: ``"requantize"`` (default: dequantize,
            subtract in fp32, quantize again with the layer's own settings, as the original LoRA-GA repository
            does) or ``"none"`` (the quantized base is left untouched; the model's function then changes by
            ``s B A``). Quantized targets are captured through their own forward (the gradient with respect to the
            dequantized weight); no float copy of a weight is made.
        until: None (default): the mean over every backward pass ``train_step`` runs. ``"converged"`` (exact mode,
            or low-memory mode with ``passes=1``): every 4 backward passes each running mean is factored and the
            singular directions LoRA-GA gives ``A`` and ``B`` (the index sets of ``lora_ga_config.direction``, each
            set apart) are compared with the previous check's: the share of each set's optimal energy the previous
            directions miss, the worse of ``A`` and ``B`` (with ``rank_budget``: over every rank the allocation may
            give). Once every layer's moved by less than ``convergence_tol`` at two checks in a row, ``train_step`` is
            stopped at the start of its next forward of ``model`` (cleanly: the model is restored, and the result is
            the mean over the passes actually run); a ``train_step`` whose gradients do not converge runs to its
            end. A target no backward pass has reached yet blocks the stop at the first two checks that find it so,
            then no longer (peft gives a target never reached its default init); one first reached counts as moved
            until it has been measured at a second check. Distributed (data parallel, FSDP), every rank stops at the
            same pass, and the ranks must run the same number of forwards. See :mod:`loraga_fast.core.convergence`.
        convergence_tol: with ``until="converged"``: the tolerance, in ``(0, 1)`` (default 0.05).
        rank_budget: None (default): every target gets the config's rank. ``"uniform"`` (the LoRA parameter count of
            the config's ranks) or a number of LoRA parameters: per-layer ranks are allocated to maximize the
            first-order loss decrease of one SGD step on the adapters LoRA-GA builds at those ranks (for the
            config's direction and scale: ``s^2 (sum_{i in IA} sigma_i^2 + c^2 sum_{j in IB} sigma_j^4)`` per
            layer), under ``sum_l r_l (m_l + n_l) <= rank_budget``, and written to ``lora_config.rank_pattern``
            and ``alpha_pattern`` (each layer's scaling kept at the config's), which ``get_peft_model``,
            ``save_pretrained`` and ``PeftModel.from_pretrained`` use as usual. Not with ``use_rslora=True``
            (peft cannot convert such an adapter back to the untouched base). See
            :mod:`loraga_fast.core.allocation`.
        min_rank, max_rank: with ``rank_budget``: the bounds of every layer's rank (``max_rank=None``: 4 x the
            config's rank, at most ``min(m, n) / 2``; a given ``max_rank`` must be at most ``min(m, n) / 2`` for
            every target).

        keep_base: False (default): LoRA-GA's init, with peft's base offset ``W -= scaling * B A`` (the trained
            adapter then works on the offset base only, or after ``save_loraga_model_final``'s conversion). True (or
            ``"a-only"``): ``A`` from the top-``r`` right singular vectors of the mean gradient and ``B = 0``, the
            base weights untouched, so the model's function is unchanged and the adapter (initial or trained) is a
            plain LoRA adapter for the original base; ``"lora-one"``: LoRA-One's ``B A = -G_r / stable_gamma``, the
            base untouched and the model one step down the gradient. See
            :func:`loraga_fast.core.layer_init.keep_base_factors` and docs/usage.md. Not with ``rank_budget``.

    Effects:
        Each target module gets ``module._peft_loraga_grad``: fp32, the weight's shape and layout, on the
        weight's device, equal to the sum of the weight gradients over the backward passes through the module
        divided by their number (for an FSDP-sharded model: a ``DTensor`` row-sharded over the model's group). Targets that
        saw no backward pass get none (peft then falls back to its default init for them). If anything fails, the
        model is left as it was.

    Raises:
        ValueError: ``lora_config.lora_ga_config`` is missing, a target is quantized by a library other than
            bitsandbytes, no supported layer matches, ``2 r > min(m, n)`` for a target, the accumulators do not fit
            in memory (all checked from shapes and config before ``train_step`` runs); a target's forward is not
            the standard linear forward; ``train_step`` ran no backward pass through any target; or the cache does
            not match the model. An ``until``, ``convergence_tol``, ``rank_budget``, ``min_rank`` or ``max_rank``
            that cannot work (a tolerance outside ``(0, 1)``, a budget below ``min_rank`` on every target,
            ``max_rank > min(m, n) / 2``, ``until="converged"`` in low-memory mode with ``passes >= 2``, ...) raises
            before any data is read.
    """
    plan = make_plan(model, lora_config, cache_file, mode=mode, sketch_size=sketch_size, passes=passes,
                     quantized_offset=quantized_offset, process_group=process_group, until=until,
                     convergence_tol=convergence_tol, rank_budget=rank_budget, min_rank=min_rank, max_rank=max_rank,
                     keep_base=keep_base)
    run_plan(model, plan, train_step, num_batches=num_batches, progress=progress)


@dataclass(frozen=True)
class Estimation:
    """What :func:`run_plan` did: the backward passes the mean is over (None when read from a cache), the
    convergence checks' summary (``until="converged"``), and the allocated ranks and their LoRA parameter count
    (``rank_budget``)."""

    backward_passes: int | None
    convergence: dict[str, Any] | None = None
    ranks: dict[str, int] | None = None
    lora_params: int | None = None


def run_plan(model: nn.Module, plan: Plan, train_step: Callable[[], None], *, num_batches: int | None = None,
             progress: bool | None = None) -> Estimation:
    """:func:`preprocess_loraga` after its checks: the memory fit, then the passes (or the cache) and the hand-off,
    for a :class:`~loraga_fast.core.plan.Plan` made (and possibly bound) by the caller."""
    logger.info("%s", plan.memory)
    plan.check_fits()
    start = time.perf_counter()
    source: GradientSource
    backwards: int | None = None
    convergence = None
    if plan.cached and plan.mode == "lowmem":
        need = plan.budget.max_ranks if plan.budget is not None else plan.ranks
        source = load_factors(plan.cache_file, dict(plan.targets), need)  # type: ignore[arg-type]
        how = f"loaded from {plan.cache_file}"
    else:
        store = plan.new_store()
        if plan.cached:
            load_gradients(plan.cache_file, store)  # type: ignore[arg-type]
            how = f"loaded from {plan.cache_file}"
        else:
            guard = plan.layout.process_group if plan.layout is not None else None
            with plan.layout.estimating(model, plan.targets) if plan.layout is not None else contextlib.nullcontext():
                monitor = run_passes(model, plan.targets, store, train_step, ranks=plan.ranks,
                                     process_group=plan.process_group, guard_group=guard, num_batches=num_batches,
                                     progress=progress, stop=plan.stop,
                                     watch_ranks=plan.budget.max_ranks if plan.budget is not None else None,
                                     min_rank=plan.budget.min_rank if plan.budget is not None else None)
            backwards = max(store.counts().values(), default=0)
            how = (f"estimated in {store.passes} passes over {backwards} backward passes each" if store.passes > 1
                   else f"estimated over {backwards} backward passes")
            if monitor is not None:
                convergence = monitor.summary()
                how += _converged_note(convergence)
        logger.info("LoRA-GA: %d target layers %s in %.2fs (%s: %.1f MiB)", len(plan.targets), how,
                    time.perf_counter() - start, "sketches" if plan.mode == "lowmem" else "fp32 accumulators",
                    store.nbytes / 2**20)
        source = store
    writer = not is_distributed(plan.process_group) or torch.distributed.get_rank(plan.process_group) == 0
    ranks = hand_off(plan.lora_config, plan.targets, source, layout=plan.layout,
                     cache_file=plan.cache_file if not plan.cached else None, writer=writer,
                     quantized_offset=plan.quantized_offset, budget=plan.budget, keep_base=plan.keep_base)
    params = None
    if ranks is not None:
        assert plan.budget is not None
        params = sum(r * plan.budget.costs[name] for name, r in ranks.items())
        logger.info("LoRA-GA: ranks %d to %d allocated under a budget of %d LoRA parameters%s (%d used)",
                    min(ranks.values()), max(ranks.values()), plan.budget.params,
                    " (the config's uniform ranks)" if plan.budget.uniform else "", params)
    return Estimation(backwards, convergence, ranks, params)


def _converged_note(summary: dict[str, Any]) -> str:
    last = summary["last_check"]
    if summary["converged"]:
        return (f" (converged: every layer's A and B directions moved by < {summary['tol']:g} at the last two checks; "
                f"largest {last['moved']:.2g})")
    if last is None or last["moved"] is None:
        return " (until='converged': train_step ended before two checks)"
    return (f" (all of train_step: not converged, {last['layers_above_tol']} layer(s) moved by >= {summary['tol']:g} at "
            f"the last check, the most {last['worst_layer']} by {last['moved']:.2g})")


def check_preprocess(model: nn.Module, lora_config: LoraConfig, cache_file: str | os.PathLike[str] | None = None, *,
                     mode: str = "exact", sketch_size: int | None = None, passes: int | None = None,
                     quantized_offset: str = "requantize", process_group: Any = None, until: str | None = None,
                     convergence_tol: float | None = None, rank_budget: int | str | None = None, min_rank: int = 1,
                     max_rank: int | None = None, keep_base: bool | str = False) -> Plan:
    """Every check :func:`preprocess_loraga` makes from shapes and config before it runs ``train_step`` (LoRA-GA
    config, targets, ``2 r <= min(m, n)``, arguments, cache path, sharded layout, memory fit), without running
    anything: for callers that want to fail before spending time on data preparation. Fills
    ``lora_config.target_modules`` from peft's defaults when it is None, as :func:`preprocess_loraga` does.

    Returns:
        The :class:`~loraga_fast.core.plan.Plan` (targets, ranks, memory), which :func:`run_plan` can carry out.

    Raises:
        ValueError: the first failed check, with the message :func:`preprocess_loraga` would give.
    """
    plan = make_plan(model, lora_config, cache_file, mode=mode, sketch_size=sketch_size, passes=passes,
                     quantized_offset=quantized_offset, process_group=process_group, until=until,
                     convergence_tol=convergence_tol, rank_budget=rank_budget, min_rank=min_rank, max_rank=max_rank,
                     keep_base=keep_base)
    plan.check_fits()
    return plan

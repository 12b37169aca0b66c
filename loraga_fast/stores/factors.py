"""Top singular factors of the mean gradients, per shape group, as the ``get_peft_model`` hand-off consumes them.

A :class:`PreparedGroup` holds the layers of one weight shape and device and gives their factors on demand:

* :class:`GradientGroup` -- exact mode: one batched randomized SVD over the group's ``(B, m, n)`` mean
  gradients (:func:`loraga_fast.ops.rsvd.batched_rsvd`), run when ``get_peft_model`` initializes the group's first
  layer, while no weight of the group has been offset yet; :class:`ShardedGradientGroup` does it on row shards;
* :class:`FactorGroup` -- low-memory mode and factor caches: the factors exist already.

For ``scale="weight_svd"`` each group also carries every weight's top singular value (:func:`weight_top_sigma`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distributed.dtensor import is_dtensor, local_tensor, rows_per_process
from ..distributed.zero3 import gathered, is_zero3
from ..errors import UsageError
from ..layers.kinds import weight_shape
from ..layers.quantized import dense_weight
from ..ops.rsvd import batched_rsvd, gather_rows, sharded_rsvd

__all__ = ["DEFAULT_SEED", "NITER", "FactorGroup", "GradientGroup", "LayerFactors", "PreparedGroup",
           "ShardedGradientGroup", "check_finite", "factor_groups", "weight_top_sigma"]

DEFAULT_SEED = 0
NITER = 4  # peft's power iterations


@dataclass(eq=False)
class LayerFactors:
    """Top singular triplets of one layer's mean gradient, in the gradient's stored (weight) layout.

    ``grad ~= u diag(s) v^T`` with ``u (rows, k)``, ``s (k,)`` descending, ``v (cols, k)``; ``weight_sigma`` is the
    top singular value of the base weight when ``scale="weight_svd"`` was requested.
    """

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    weight_sigma: float | None = None


def check_finite(magnitudes: Mapping[str, float], names: Collection[str]) -> None:
    """Raise ``ValueError`` naming the layers among ``names`` whose mean gradient has NaN or Inf entries."""
    bad = [name for name in names if not math.isfinite(magnitudes[name])]
    if bad:
        raise UsageError(
            f"LoRA-GA: the mean gradient of {len(bad)} layer(s) is not finite (NaN/Inf), e.g. from an overflowing "
            f"fp16 step: {', '.join(bad[:8])}{f' and {len(bad) - 8} more' if len(bad) > 8 else ''}. No weight was "
            "modified; use a bf16 or fp32 model, or a loss scale, for the estimation."
        )


class PreparedGroup(ABC):
    """Layers of one shape group, ready for the ``get_peft_model`` hand-off.

    Attributes:
        keep_base: None (LoRA-GA's init and offset), or the construction of an init that leaves the base
            untouched (:data:`loraga_fast.core.layer_init.KEEP_BASE`; set by the hand-off).
        quantized_offset: how a quantized base takes the offset ``W - s B A``
            (:data:`loraga_fast.layers.quantized.OFFSETS`; set by the hand-off).
        modules: ``{name: weakref to the base layer}`` (weak: the hand-off's registry maps modules to groups).
        grads: ``{name: the object attached as _peft_loraga_grad}``; the hand-off recognises a prepared layer by
            identity with it, so a gradient the user replaced goes to peft's own path.
        ranks: ``{name: LoRA rank}`` the factors were prepared for.
        zero: layers whose mean gradient is all zero (they get peft's default init).
    """

    def __init__(self, names: Sequence[str], modules: Mapping[str, nn.Module], ranks: Mapping[str, int],
                 grads: Mapping[str, Any], zero: Collection[str]):
        self.modules = {name: weakref.ref(modules[name]) for name in names}
        self.grads = {name: grads[name] for name in names}
        self.ranks = {name: ranks[name] for name in names}
        self.zero = {name for name in names if name in set(zero)}
        self.quantized_offset = "requantize"
        self.keep_base: str | None = None

    @abstractmethod
    def factors(self) -> dict[str, LayerFactors]:
        """``{name: factors}`` for every non-zero layer of the group (computed once, on first call)."""

    def live_modules(self, names: Sequence[str]) -> list[nn.Module]:
        mods = [self.modules[n]() for n in names]
        if any(m is None for m in mods):
            raise RuntimeError("LoRA-GA: a prepared layer was freed before its group was initialized.")
        return mods  # type: ignore[return-value]


class GradientGroup(PreparedGroup):
    """Mean gradients of one shape group (a ``(B, m, n)`` tensor; ``names[i]`` is ``tensor[i]``), factored together
    on first use: top ``2 r_max`` triplets with ``q = min(4 r_max, min(m, n))`` (peft's ``q`` for the largest rank,
    at least peft's for the others) and peft's 4 power iterations."""

    def __init__(self, tensor: torch.Tensor, names: Sequence[str], modules: Mapping[str, nn.Module],
                 ranks: Mapping[str, int], *, weight_svd: bool, zero: Collection[str] = (),
                 attached: Mapping[str, Any] | None = None, seed: int = DEFAULT_SEED,
                 shape: tuple[int, int] | None = None):
        self.index = [i for i, name in enumerate(names) if name in ranks]
        mine = [names[i] for i in self.index]
        super().__init__(mine, modules, ranks, attached if attached is not None else dict(zip(names, tensor)), zero)
        self.tensor = tensor
        self.shape = tuple(shape) if shape is not None else tuple(tensor.shape[1:])  # the whole gradients' shape
        self.full = len(self.index) == len(names)
        self.weight_svd = weight_svd
        self.seed = seed
        self._factors: dict[str, LayerFactors] | None = None

    def factors(self) -> dict[str, LayerFactors]:
        if self._factors is None:
            self._factors = self._compute()
        return self._factors

    def _compute(self) -> dict[str, LayerFactors]:
        small = min(self.shape)
        k = 2 * max(self.ranks.values())
        q = min(2 * k, small)
        gen = torch.Generator(device=self.tensor.device).manual_seed(self.seed)
        batch = self.tensor if self.full else self.tensor[self.index]
        u, s, v = self.factorize(batch, k, q, gen)
        names = list(self.modules)
        sigmas: list[float | None] = [None] * len(names)
        if self.weight_svd:
            sigmas = weight_top_sigma(self.live_modules(names), [self.ranks[n] for n in names], gen)  # type: ignore[assignment]
        return {name: LayerFactors(u=u[j], s=s[j], v=v[j], weight_sigma=sigmas[j]) for j, name in enumerate(names)}

    def factorize(self, batch: torch.Tensor, k: int, q: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``k`` triplets of each matrix of ``batch``."""
        return batched_rsvd(batch, k, q, NITER, generator=gen)


class ShardedGradientGroup(GradientGroup):
    """A :class:`GradientGroup` over row shards (``tensor`` holds this process's ``(B, c, n)`` rows of ``shape``
    gradients): :func:`~loraga_fast.ops.rsvd.sharded_rsvd` all-reduces only ``q``-wide products, then the ``2r``-wide
    left factors are gathered, so every process holds the same factors and offsets its own rows of each weight."""

    def __init__(self, *args: Any, process_group: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rows = self.shape[0]
        self.process_group = process_group

    def factorize(self, batch: torch.Tensor, k: int, q: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u, s, v = sharded_rsvd(batch, self.rows, k, q, NITER, group=self.process_group, generator=gen)
        return gather_rows(u, self.process_group)[:, : self.rows], s, v


class FactorGroup(PreparedGroup):
    """Layers whose factors were computed already (low-memory mode, factor caches)."""

    def __init__(self, names: Sequence[str], modules: Mapping[str, nn.Module], ranks: Mapping[str, int],
                 grads: Mapping[str, Any], zero: Collection[str], factors: Mapping[str, LayerFactors]):
        super().__init__(names, modules, ranks, grads, zero)
        self._factors = {name: factors[name] for name in names if name in factors}

    def factors(self) -> dict[str, LayerFactors]:
        return self._factors


def factor_groups(modules: Mapping[str, nn.Module], names: Sequence[str], factors: Mapping[str, LayerFactors],
                  ranks: Mapping[str, int], zero: Collection[str], grads: Mapping[str, Any], *,
                  weight_svd: bool, shape_of: Any) -> list[FactorGroup]:
    """One :class:`FactorGroup` per weight shape and device over ``names``. With ``weight_svd`` each non-zero layer's
    factors get its weight's top singular value now (before any weight is offset). ``shape_of(module)`` gives a
    layer's weight shape."""
    by_shape: dict[tuple[tuple[int, ...], torch.device], list[str]] = {}
    for name in names:
        by_shape.setdefault((tuple(shape_of(modules[name])), modules[name].weight.device), []).append(name)
    groups = []
    for (_, device), members in by_shape.items():
        active = [n for n in members if n not in zero]
        if weight_svd and active:
            gen = torch.Generator(device=device).manual_seed(DEFAULT_SEED)
            sigmas = weight_top_sigma([modules[n] for n in active], [ranks[n] for n in active], gen)
            for n, sigma in zip(active, sigmas):
                factors[n].weight_sigma = sigma
        groups.append(FactorGroup(members, modules, ranks, grads, zero, factors))
    return groups


def weight_top_sigma(modules: list[nn.Module], ranks: list[int], gen: torch.Generator, chunk: int = 8) -> list[float]:
    """Top singular value of each weight (same shape), batched over chunks (bounded workspace).

    peft estimates it with ``svd_lowrank(W, q=r, niter=4)``, which underestimates it on flat spectra (random
    or freshly initialized weights) by up to a few percent; a wider subspace and twice the power iterations
    make ours accurate to about 1e-3 there, at a cost that is small next to the gradient factorization.
    FSDP2 ``Shard(0)`` weights are factored on their row shards (the same value in every process).
    """
    rows, cols = weight_shape(modules[0])
    q = min(rows, cols, max(4 * max(ranks), 16))
    if is_dtensor(modules[0].weight):
        mesh = modules[0].weight.device_mesh
        c = rows_per_process(rows, mesh.size())
        local = local_tensor(modules[0].weight)
        blocks = torch.zeros(len(modules), c, cols, dtype=torch.float32, device=local.device)
        for j, module in enumerate(modules):
            shard = local_tensor(module.weight)
            blocks[j, : shard.shape[0]] = shard
        return sharded_rsvd(blocks, rows, 1, q, 2 * NITER, group=mesh.get_group(), generator=gen)[1][:, 0].tolist()
    out: list[float] = []
    for start in range(0, len(modules), chunk):
        part = modules[start : start + chunk]
        with gathered(part) if is_zero3(part[0].weight) else contextlib.nullcontext():  # ZeRO-3: a chunk at a time
            weights = torch.stack([dense_weight(m) for m in part])  # dequantized if quantized
        q_chunk = min(rows, cols, max(4 * max(ranks[start : start + chunk]), 16))
        out += batched_rsvd(weights, 1, q_chunk, 2 * NITER, generator=gen)[1][:, 0].tolist()
    return out

"""LoRA-GA initialization from batched factorizations of the mean gradients.

Two halves:

* :class:`PreparedGroup` -- for every shape group of the accumulator store, one batched randomized SVD
  (:func:`loraga_fast.ops.batched_rsvd`), run when ``get_peft_model`` initializes the group's first layer,
  gives the top ``2r`` singular triplets of every layer's mean gradient (and, for ``scale="weight_svd"``, one
  batched estimate of each weight's top singular value);
* :func:`init_layer_from_factors` -- peft's per-layer LoRA-GA math (direction, scale, dtype cast, base-weight
  offset ``W -= scaling * B @ A`` in fp32 from the cast factors) applied to those factors, writing into a peft
  ``LoraLayer``. It reads ``r`` and ``scaling`` from the layer, so ``rank_pattern``, ``alpha_pattern`` and
  ``use_rslora`` come from peft itself, and peft's DoRA set-up runs after it on the offset weight.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .ops.rsvd import batched_rsvd, gather_rows, sharded_rsvd
from .store import AccumulatorStore, Group, ShardedStore

__all__ = ["LayerFactors", "PreparedGroup", "ShardedPreparedGroup", "check_finite", "init_layer_from_factors", "layer_ranks", "max_abs",
           "prepare_groups"]

logger = logging.getLogger("loraga_fast")

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


def layer_ranks(lora_config: object, names: list[str]) -> dict[str, int]:
    """Each layer's LoRA rank as peft will set it (``rank_pattern`` matched with peft's own rule)."""
    from peft.utils.other import get_pattern_key

    pattern = getattr(lora_config, "rank_pattern", None) or {}
    return {name: pattern.get(get_pattern_key(pattern.keys(), name), lora_config.r) for name in names}  # type: ignore[attr-defined]


def max_abs(store: AccumulatorStore) -> dict[str, float]:
    """Each layer's largest absolute gradient entry: one reduction per shape group, no full-size temporary.

    NaN and Inf propagate through it, so a non-finite value marks a non-finite gradient and 0 an all-zero one.
    """
    out: dict[str, float] = {}
    for group in store.groups:
        norms = store.global_max(torch.linalg.vector_norm(group.tensor.flatten(1), ord=float("inf"), dim=1)).tolist()
        out.update({slot.name: norm for slot, norm in zip(group.slots, norms)})
    return out


def check_finite(maxabs: Mapping[str, float], names: Collection[str]) -> None:
    """Raise ``ValueError`` naming the layers among ``names`` whose mean gradient has NaN or Inf entries."""
    bad = [name for name in names if not math.isfinite(maxabs[name])]
    if bad:
        raise ValueError(
            f"LoRA-GA: the mean gradient of {len(bad)} layer(s) is not finite (NaN/Inf), e.g. from an overflowing "
            f"fp16 step: {', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}. No weight was modified; use a bf16 "
            "or fp32 model, or a loss scale, for the estimation."
        )


class PreparedGroup:
    """Layers of one shape group whose mean gradients are attached, factored together on first use.

    ``factors()`` runs one batched randomized SVD over the group's gradients (top ``2 r_max`` triplets with
    ``q = min(4 r_max, min(m, n))``: peft's ``q`` for the largest rank, at least peft's for the others) the
    first time a layer of the group is initialized, while no weight of the group has been offset yet; the
    workspace is this group's alone.
    """

    def __init__(self, group: Group, modules: Mapping[str, nn.Module], ranks: Mapping[str, int], *,
                 weight_svd: bool, zero: Collection[str] = (), seed: int = DEFAULT_SEED,
                 attached: Mapping[str, torch.Tensor] | None = None):
        self.index = [i for i, slot in enumerate(group.slots) if slot.name in ranks]
        self.group = group
        names = [group.slots[i].name for i in self.index]
        # weak: the registry maps modules to their group, so a strong reference here would keep them alive
        self.modules = {name: weakref.ref(modules[name]) for name in names}
        # the tensors attached as _peft_loraga_grad (identity tells a user-replaced gradient apart)
        self.grads = {name: attached[name] if attached is not None else group.slots[i].acc
                      for i, name in zip(self.index, names)}
        self.ranks = {name: ranks[name] for name in names}
        self.weight_svd = weight_svd
        self.zero = {name for name in names if name in zero}
        self.seed = seed
        self._factors: dict[str, LayerFactors] | None = None

    def factors(self) -> dict[str, LayerFactors]:
        if self._factors is None:
            self._factors = self._compute()
        return self._factors

    def _compute(self) -> dict[str, LayerFactors]:
        group = self.group
        small = min(group.shape)
        k = 2 * max(self.ranks.values())
        q = min(2 * k, small)
        gen = torch.Generator(device=group.device).manual_seed(self.seed)
        batch = group.tensor if len(self.index) == len(group.slots) else group.tensor[self.index]
        u, s, v = self._factorize(batch, k, q, gen)
        names = list(self.modules)
        sigmas: list[float | None] = [None] * len(names)
        if self.weight_svd:
            mods = [self.modules[n]() for n in names]
            assert all(m is not None for m in mods), "a prepared layer was freed during initialization"
            sigmas = _weight_top_sigma(mods, [self.ranks[n] for n in names], gen)  # type: ignore[arg-type]
        return {
            name: LayerFactors(u=u[j], s=s[j], v=v[j], weight_sigma=sigmas[j])
            for j, name in enumerate(names)
        }

    def _factorize(self, batch: torch.Tensor, k: int, q: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``k`` triplets of each matrix of ``batch`` (the group's accumulators)."""
        return batched_rsvd(batch, k, q, NITER, generator=gen)


class ShardedPreparedGroup(PreparedGroup):
    """A :class:`PreparedGroup` whose accumulators are row shards (:class:`~loraga_fast.store.ShardedStore`): the
    randomized SVD runs on the shards (:func:`~loraga_fast.ops.rsvd.sharded_rsvd`: only ``q``-wide products are
    all-reduced), then the ``2r``-wide left factors are gathered (small), so every rank holds the same factors
    and writes its own rows of the base-weight offset."""

    def __init__(self, group: Group, store: ShardedStore, *args: object, **kwargs: object):
        super().__init__(group, *args, **kwargs)  # type: ignore[arg-type]
        self.store = store

    def _factorize(self, batch: torch.Tensor, k: int, q: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.group.shape[0]
        u, s, v = sharded_rsvd(batch, rows, k, q, NITER, group=self.store.group, generator=gen)
        return gather_rows(u, self.store.group)[:, :rows], s, v


def _local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a weight: the local shard of an FSDP2 ``DTensor``, else the weight itself."""
    to_local = getattr(weight, "to_local", None)
    return to_local() if to_local is not None else weight


def prepare_groups(store: AccumulatorStore, modules: Mapping[str, nn.Module], ranks: Mapping[str, int], *,
                   weight_svd: bool = False, zero: Collection[str] = (), seed: int = DEFAULT_SEED,
                   attached: Mapping[str, torch.Tensor] | None = None) -> list[PreparedGroup]:
    """One :class:`PreparedGroup` per shape group holding at least one layer of ``ranks``; layers in ``zero``
    (all-zero gradients) will get peft's default init. ``attached``: the tensors attached as ``_peft_loraga_grad``
    when they are not the store's own views (sharded stores attach DTensors)."""
    kwargs = {"weight_svd": weight_svd, "zero": zero, "seed": seed, "attached": attached}
    return [
        ShardedPreparedGroup(g, store, modules, ranks, **kwargs) if isinstance(store, ShardedStore)
        else PreparedGroup(g, modules, ranks, **kwargs)  # type: ignore[arg-type]
        for g in store.groups
        if any(slot.name in ranks for slot in g.slots)
    ]


def _weight_top_sigma(modules: list[nn.Module], ranks: list[int], gen: torch.Generator, chunk: int = 8) -> list[float | None]:
    """Top singular value of each weight, batched over chunks of same-shape weights (bounded workspace).

    peft estimates it with ``svd_lowrank(W, q=r, niter=4)``, which underestimates it on flat spectra (random
    or freshly initialized weights) by up to a few percent; a wider subspace and twice the power iterations
    make ours accurate to about 1e-3 there, at a cost that is small next to the gradient factorization.
    """
    if hasattr(modules[0].weight, "to_local"):
        return _sharded_weight_top_sigma(modules, ranks, gen)
    out: list[float | None] = []
    for start in range(0, len(modules), chunk):
        part = modules[start : start + chunk]
        weights = torch.stack([m.weight.detach().to(torch.float32) for m in part])
        small = min(weights.shape[1:])
        q = min(small, max(4 * max(ranks[start : start + chunk]), 16))
        _, s, _ = batched_rsvd(weights, 1, q, 2 * NITER, generator=gen)
        out += s[:, 0].tolist()
    return out


def _sharded_weight_top_sigma(modules: list[nn.Module], ranks: list[int], gen: torch.Generator) -> list[float | None]:
    """:func:`_weight_top_sigma` for same-shape FSDP2 ``Shard(0)`` weights: the sharded randomized SVD of the local
    row shards (only ``q``-wide products travel), the same value on every rank."""
    weight = modules[0].weight
    rows, cols = weight.shape
    mesh = weight.device_mesh  # type: ignore[attr-defined]
    c = -(-rows // mesh.size())
    local = _local_weight(weight)
    blocks = torch.zeros(len(modules), c, cols, dtype=torch.float32, device=local.device)
    for j, module in enumerate(modules):
        shard = _local_weight(module.weight)
        blocks[j, : shard.shape[0]] = shard
    q = min(min(rows, cols), max(4 * max(ranks), 16))
    _, s, _ = sharded_rsvd(blocks, rows, 1, q, 2 * NITER, group=mesh.get_group(), generator=gen)
    return s[:, 0].tolist()


def _transpose(t: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return t.T if fan_in_fan_out else t


@torch.no_grad()
def init_layer_from_factors(layer: nn.Module, adapter_name: str, lora_ga_config: object, factors: LayerFactors, *,
                            in_place: bool = False) -> None:
    """peft's ``LoraLayer.lora_ga_init`` computed from precomputed factors (same math, same order of casts).

    The offset base weight replaces the weight's data, as peft does; ``in_place=True`` writes it into the existing
    storage instead (FSDP1's ``summon_full_params(writeback=True)`` copies that storage back to the shards).
    """
    base = layer.get_base_layer()  # type: ignore[operator]
    weight = base.weight
    dtype = weight.dtype
    r = layer.r[adapter_name]  # type: ignore[index]
    scaling = layer.scaling[adapter_name]  # type: ignore[index]
    fan_in_fan_out = layer.fan_in_fan_out  # type: ignore[attr-defined]
    # peft factors transpose(grad, fan_in_fan_out): swapping U and V is the SVD of the transpose
    u, s, v = (factors.v, factors.s, factors.u) if fan_in_fan_out else (factors.u, factors.s, factors.v)
    vh = v.T
    direction = lora_ga_config.direction  # type: ignore[attr-defined]
    if direction == "ArBr":
        a_w, b_idx = vh[1 : 2 * r : 2], slice(0, 2 * r, 2)
    elif direction == "A2rBr":
        a_w, b_idx = vh[r : 2 * r], slice(0, r)
    elif direction == "ArB2r":
        a_w, b_idx = vh[:r], slice(r, 2 * r)
    elif direction == "random":
        indices = torch.randperm(2 * r)[:r]
        a_w, b_idx = vh[indices], indices
    else:
        raise ValueError(f"Unknown LoRA-GA direction {direction!r}.")
    s_b = s[b_idx]
    b_w = u[:, b_idx] * s_b

    scale = lora_ga_config.scale  # type: ignore[attr-defined]
    if scale == "stable":
        b_w = b_w * (weight.shape[0] ** 0.25 / lora_ga_config.stable_gamma**0.5)  # type: ignore[attr-defined]
    elif scale == "weight_svd":
        sigma = factors.weight_sigma
        if sigma is None:  # the config changed after preprocessing: estimate as peft does
            w = _transpose(weight.detach().to(torch.float32), fan_in_fan_out)
            sigma = float(torch.svd_lowrank(w, q=r, niter=NITER)[1][0])
        if s_b[0] > 0:
            b_w = b_w * (sigma / s_b[0])
    elif scale == "gd_scale":
        a_w = a_w / scaling
        b_w = b_w / scaling
    elif scale != "unit":
        raise ValueError(f"Unknown LoRA-GA scale {scale!r}.")

    a_w = a_w.to(dtype).contiguous()
    b_w = b_w.to(dtype).contiguous()
    layer.lora_A[adapter_name].weight.data = a_w  # type: ignore[index]
    layer.lora_B[adapter_name].weight.data = b_w  # type: ignore[index]
    # W -= scaling * B @ A in fp32 from the cast factors, as peft does; one fused GEMM into the fp32 copy
    if hasattr(weight, "to_local"):  # an FSDP2 DTensor (Shard(0)): offset this rank's rows in place
        _offset_shard(weight, b_w.float(), a_w.float(), scaling, fan_in_fan_out)
        return
    w32 = _transpose(weight.data.to(torch.float32, copy=True), fan_in_fan_out)
    w32.addmm_(b_w.float(), a_w.float(), alpha=-scaling)
    if in_place:
        weight.data.copy_(_transpose(w32, fan_in_fan_out))
    else:
        base.weight.data = _transpose(w32.to(dtype), fan_in_fan_out)


def _offset_shard(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> None:
    """``W -= scaling * B @ A`` on this rank's rows of a ``Shard(0)`` DTensor weight, in place (FSDP2 keeps
    views of the local shard's storage, so it must not be replaced)."""
    from torch.distributed.tensor import Shard

    if tuple(weight.placements) != (Shard(0),):  # type: ignore[attr-defined]
        raise ValueError(f"LoRA-GA: cannot offset a weight with placements {weight.placements}; only FSDP2's "  # type: ignore[attr-defined]
                         "Shard(0) on a 1-D mesh is supported.")
    local = weight.to_local()  # type: ignore[attr-defined]
    rows, world = weight.shape[0], weight.device_mesh.size()  # type: ignore[attr-defined]
    c = -(-rows // world)
    start = min(weight.device_mesh.get_local_rank() * c, rows)  # type: ignore[attr-defined]
    if local.shape[0] == 0:
        return
    stop = start + local.shape[0]
    # weight rows are B's rows (out features), or A's columns (in features) for a transposed (Conv1D) layout
    delta = b[start:stop] @ a if not fan_in_fan_out else (b @ a[:, start:stop]).T
    w32 = local.to(torch.float32, copy=True)
    w32.sub_(delta, alpha=scaling)
    local.copy_(w32)

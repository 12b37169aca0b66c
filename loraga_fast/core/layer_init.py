"""peft's per-layer LoRA-GA math, applied to precomputed factors and written into a peft ``LoraLayer``.

Direction (which singular vectors go to A and B), scale, the cast to the base dtype and the base-weight offset
``W -= scaling * B @ A`` (fp32, from the cast factors) follow peft's ``LoraLayer.lora_ga_init`` step by step. ``r``
and ``scaling`` are read from the layer, so ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` come from peft
itself, and peft's DoRA set-up runs after it on the offset weight.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..distributed.dtensor import is_dtensor, rows_per_process
from ..distributed.zero3 import is_zero3, offset_partition
from ..errors import UsageError
from ..layers.kinds import math_shape, weight_shape
from ..layers.quantized import UNTOUCHED_BASES, dense_weight, is_bnb_quantized, offset_weight
from ..ops._precision import with_exact_fp32
from ..stores.factors import NITER, LayerFactors

__all__ = ["KEEP_BASE", "PEFT_STABLE_READS_OUT_FEATURES", "init_layer_from_factors", "keep_base_factors",
           "stable_features"]

logger = logging.getLogger("loraga_fast")


def _peft_stable_reads_out_features() -> bool:
    import peft
    from packaging.version import Version

    return Version(peft.__version__).release >= (0, 22)


PEFT_STABLE_READS_OUT_FEATURES = _peft_stable_reads_out_features()
"""The installed peft's ``stable`` scale reads the layer's ``out_features`` (peft >= 0.22); earlier releases read
``weight.shape[0]``, which for a transformers ``Conv1D`` (weight ``(in, out)``) is its in_features."""


KEEP_BASE = ("a-only", "lora-one")
"""The inits that leave the base weight untouched (``keep_base=``): see :func:`keep_base_factors`."""


def keep_base_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int, construction: str,
                      gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of an init that needs no base offset, from the mean gradient's top triplets (``G ~= U diag(s)
    Vh``, math layout ``(out, in)``):

    * ``"a-only"``: ``A = Vh[:r]`` (the top-``r`` right singular vectors), ``B = 0``. ``B A = 0``, so the model's
      function is unchanged; the first SGD step gives ``dB = -eta s G A^T``, i.e. the weight moves by
      ``-eta s^2 G V_r V_r^T``: the top-``r`` part of the full fine-tuning step, LoRA-GA's dominant A term.
    * ``"lora-one"`` (LoRA-One, arXiv 2502.01235): ``B = -U_r diag(s_r)^(1/2) / sqrt(gamma)``, ``A = diag(s_r)^(1/2)
      Vh[:r] / sqrt(gamma)``, so ``B A = -G_r / gamma`` (``G_r`` the best rank-``r`` approximation): the model
      starts one gradient step ``scaling / gamma`` down the top-``r`` gradient, and ``A``, ``B`` are balanced.
    """
    if construction == "a-only":
        return vh[:r], torch.zeros(u.shape[0], r, dtype=u.dtype, device=u.device)
    if construction == "lora-one":
        root = s[:r].clamp_min(0).sqrt() / gamma**0.5
        return root[:, None] * vh[:r], -(u[:, :r] * root)
    raise UsageError(f"keep_base must be False, True or one of {', '.join(map(repr, KEEP_BASE))}, got {construction!r}.")


def stable_features(base: nn.Module) -> int:
    """The feature count ``d`` of ``scale="stable"``'s factor ``d ** 0.25 / stable_gamma ** 0.5`` as the installed
    peft computes it: the layer's out_features (peft >= 0.22), or the first dimension of the stored weight (peft
    0.19-0.21; the same for ``nn.Linear``, in_features for ``Conv1D``)."""
    return math_shape(base)[0] if PEFT_STABLE_READS_OUT_FEATURES else weight_shape(base)[0]


def _transpose(t: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return t.T if fan_in_fan_out else t


@torch.no_grad()
@with_exact_fp32
def init_layer_from_factors(layer: nn.Module, adapter_name: str, lora_ga_config: object, factors: LayerFactors, *,
                            in_place: bool = False, name: str = "", quantized_offset: str = "requantize",
                            keep_base: str | None = None) -> None:
    """peft's ``LoraLayer.lora_ga_init`` computed from precomputed factors (same math, same order of casts).

    The offset base weight replaces the weight's data, as peft does; ``in_place=True`` writes it into the existing
    storage instead (FSDP1's ``summon_full_params(writeback=True)`` copies that storage back to the shards).

    Numerically zero singular directions (``s <= s_max * max(m, n) * eps_fp32``, numpy's matrix-rank threshold: a
    gradient of rank below ``2r``, e.g. from few tokens) are never used to build B: their B columns are zero and
    their A rows keep the (orthonormal, otherwise arbitrary) singular vectors, so ``B A`` gets nothing from them and
    training can grow them as in a plain LoRA init; ``weight_svd`` never divides by such a value. A warning names
    the layer (``name``) and its numerical rank. peft divides by them (its B can reach ~1e7 there).

    A quantized base (bitsandbytes 4-/8-bit): the adapters keep the dtype peft gave them, ``weight_svd`` reads the
    dequantized weight, and the offset follows ``quantized_offset`` (:func:`loraga_fast.layers.quantized.offset_weight`).

    ``keep_base`` (one of :data:`KEEP_BASE`): instead of LoRA-GA's direction and scale, the init of
    :func:`keep_base_factors`, and the base weight is not touched at all (the layer joins ``UNTOUCHED_BASES``, so
    ``save_loraga_model_final`` saves the trained adapter as it is).
    """
    base = layer.get_base_layer()  # type: ignore[operator]
    weight = base.weight
    quantized = is_bnb_quantized(base)
    dtype = layer.lora_A[adapter_name].weight.dtype if quantized else weight.dtype  # type: ignore[index]
    r = layer.r[adapter_name]  # type: ignore[index]
    scaling = layer.scaling[adapter_name]  # type: ignore[index]
    fan_in_fan_out = layer.fan_in_fan_out  # type: ignore[attr-defined]
    # peft factors transpose(grad, fan_in_fan_out): swapping U and V is the SVD of the transpose
    u, s, v = (factors.v, factors.s, factors.u) if fan_in_fan_out else (factors.u, factors.s, factors.v)
    vh = v.T
    if keep_base is not None:
        a_w, b_w = keep_base_factors(u, s, vh, r, keep_base, lora_ga_config.stable_gamma)  # type: ignore[attr-defined]
        layer.lora_A[adapter_name].weight.data = a_w.to(dtype).contiguous()  # type: ignore[index]
        layer.lora_B[adapter_name].weight.data = b_w.to(dtype).contiguous()  # type: ignore[index]
        UNTOUCHED_BASES.add(layer)
        return
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
        raise UsageError(f"Unknown LoRA-GA direction {direction!r}.")
    s_b = s[b_idx]
    tol = float(s[0]) * max(u.shape[0], v.shape[0]) * torch.finfo(torch.float32).eps
    live = s_b > tol
    if not bool(live.all()):
        logger.warning("LoRA-GA: layer '%s' has a mean gradient of numerical rank %d < 2r = %d; the B columns of its %d "
                       "numerically zero direction(s) start at zero (training can grow them).", name or "?",
                       int((s > tol).sum()), 2 * r, int((~live).sum()))
    b_w = u[:, b_idx] * torch.where(live, s_b, torch.zeros_like(s_b))

    scale = lora_ga_config.scale  # type: ignore[attr-defined]
    if scale == "stable":
        b_w = b_w * (stable_features(base) ** 0.25 / lora_ga_config.stable_gamma**0.5)  # type: ignore[attr-defined]
    elif scale == "weight_svd":
        sigma = factors.weight_sigma
        if sigma is None:  # the config changed after preprocessing: estimate as peft does
            w = _transpose(dense_weight(base), fan_in_fan_out)
            sigma = float(torch.svd_lowrank(w, q=r, niter=NITER)[1][0])
        if bool(live.any()):  # peft's ratio S_W[0] / S_B[0], over a live direction only
            b_w = b_w * (sigma / (s_b[0] if bool(live[0]) else s_b[live].max()))
    elif scale == "gd_scale":
        a_w = a_w / scaling
        b_w = b_w / scaling
    elif scale != "unit":
        raise UsageError(f"Unknown LoRA-GA scale {scale!r}.")

    a_w = a_w.to(dtype).contiguous()
    b_w = b_w.to(dtype).contiguous()
    layer.lora_A[adapter_name].weight.data = a_w  # type: ignore[index]
    layer.lora_B[adapter_name].weight.data = b_w  # type: ignore[index]
    # W -= scaling * B @ A in fp32 from the cast factors, as peft does; one fused GEMM into the fp32 copy
    if quantized:
        offset_weight(base, torch.mm(b_w.float(), a_w.float()).mul_(scaling), quantized_offset)
        if quantized_offset == "none":
            UNTOUCHED_BASES.add(layer)
        return
    if is_dtensor(weight):  # an FSDP2 DTensor (Shard(0)): offset this process's rows in place
        _offset_shard(weight, b_w.float(), a_w.float(), scaling, fan_in_fan_out)
        return
    if is_zero3(weight):  # DeepSpeed ZeRO-3: this process's flat partition, nothing gathered
        offset_partition(weight, b_w.float(), a_w.float(), scaling, fan_in_fan_out)
        return
    w32 = _transpose(weight.data.to(torch.float32, copy=True), fan_in_fan_out)
    w32.addmm_(b_w.float(), a_w.float(), alpha=-scaling)
    if in_place:
        weight.data.copy_(_transpose(w32, fan_in_fan_out))
    else:
        base.weight.data = _transpose(w32.to(dtype), fan_in_fan_out)


def _offset_shard(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> None:
    """``W -= scaling * B @ A`` on this process's rows of a ``Shard(0)`` DTensor weight, in place (FSDP2 keeps
    views of the local shard's storage, so it must not be replaced)."""
    from torch.distributed.tensor import Shard

    if tuple(weight.placements) != (Shard(0),):  # type: ignore[attr-defined]
        raise UsageError(f"LoRA-GA: cannot offset a weight with placements {weight.placements}; only FSDP2's "  # type: ignore[attr-defined]
                         "Shard(0) on a 1-D mesh is supported.")
    local = weight.to_local()  # type: ignore[attr-defined]
    rows, world = weight.shape[0], weight.device_mesh.size()  # type: ignore[attr-defined]
    c = rows_per_process(rows, world)
    start = min(weight.device_mesh.get_local_rank() * c, rows)  # type: ignore[attr-defined]
    if local.shape[0] == 0:
        return
    stop = start + local.shape[0]
    # weight rows are B's rows (out features), or A's columns (in features) for a transposed (Conv1D) layout
    delta = b[start:stop] @ a if not fan_in_fan_out else (b @ a[:, start:stop]).T
    w32 = local.to(torch.float32, copy=True)
    w32.sub_(delta, alpha=scaling)
    local.copy_(w32)

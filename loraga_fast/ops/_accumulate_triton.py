"""The Triton kernel behind :func:`loraga_fast.ops.accumulate`, its launcher and its fixed config table.

``_accumulate_kernel`` -- one program per ``(BLOCK_M, BLOCK_N)`` tile of ``C`` (and per token split), reading ``G``
and ``X`` in their own dtype through strides, multiplying with fp32 accumulation and adding into ``C`` in the same
kernel (no ``dW`` temporary, no second pass). 16-bit pairs use the tensor cores (fp32 accumulation: products of
bf16/fp16 values are exact in fp32). Any other pair (fp32, or a mixed pair such as bf16 with fp32) is upcast tile by
tile inside the kernel and multiplied in IEEE fp32 (no TF32, no full-size upcast copy).

Kernel choice is deterministic, never timed inside the user's backward pass: :func:`kernel_config` picks a config
from a table keyed by (GPU architecture, operand width, shape class) with the heuristic documented there; a
table measured by ``python bench/kernel_bench.py --tune`` can be opted into with ``LORAGA_FAST_KERNEL_TABLE=path``.
The token split (small ``M x N`` on a large GPU) depends only on the shape and the GPU's SM count, and its fp32
partials are summed in a fixed order, so the same inputs on the same GPU model give bit-identical accumulators.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ._dispatch import LOW_PRECISION, as_2d, interpreter_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no triton
    triton = None

__all__ = ["TABLE_ENV", "KernelConfig", "accumulate_triton", "kernel_config", "kernel_flags", "shape_class"]

TABLE_ENV = "LORAGA_FAST_KERNEL_TABLE"


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of the accumulate kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


INTERPRETER_CONFIG = KernelConfig(32, 32, 16, group_m=4, num_warps=1, num_stages=1)


def shape_class(m: int, n: int) -> str:
    """``"large"`` (both sides >= 2048: the 7B projections), ``"small"`` (``m n < 2^20``) or ``"medium"``."""
    if min(m, n) >= 2048:
        return "large"
    return "small" if m * n < 2**20 else "medium"


def default_config(capability: tuple[int, int], tensor_cores: bool, shape: str) -> KernelConfig:
    """The built-in table.

    16-bit operands (tensor cores): Hopper (sm_90) and A100/H100-class shared memory (sm_80: 164 KiB) take
    128x256x64 tiles with 8 warps and 3 stages on large shapes (the tile Triton's matmul tutorial and CUTLASS use
    for bf16 GEMMs of this size; 144 KiB of operand buffers), 128x128x64 / 4 warps / 4 stages on medium ones;
    GPUs with ~100 KiB of shared memory (sm_86, sm_89, ...) take 128x128x32. Small layers take 64x128x64 so more
    programs run (with the token split filling the GPU). IEEE fp32 (CUDA cores): 64x64x32, 4 warps, 3 stages.
    """
    if not tensor_cores:
        return KernelConfig(64, 64, 32, group_m=8, num_warps=4, num_stages=3)
    big_smem = capability in ((8, 0), (9, 0)) or capability[0] >= 10
    if shape == "small":
        return KernelConfig(64, 128, 64, num_warps=4, num_stages=3 if big_smem else 2)
    if not big_smem:
        return KernelConfig(128, 128, 32, num_warps=4, num_stages=3)
    if shape == "large":
        return KernelConfig(128, 256, 64, num_warps=8, num_stages=3)
    return KernelConfig(128, 128, 64, num_warps=4, num_stages=4)


@functools.cache
def _user_table(path: str) -> dict[str, dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def table_key(device_name: str, tensor_cores: bool, shape: str) -> str:
    """The key of a tuned table entry: ``"<GPU name>|<16bit|fp32>|<shape class>"``."""
    return f"{device_name}|{'16bit' if tensor_cores else 'fp32'}|{shape}"


def kernel_config(device: torch.device, tensor_cores: bool, m: int, n: int) -> KernelConfig:
    """The config for an ``(m, n)`` accumulator on ``device``: the user's tuned table entry when
    ``LORAGA_FAST_KERNEL_TABLE`` names a file holding one for this GPU, else :func:`default_config`."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    shape = shape_class(m, n)
    path = os.environ.get(TABLE_ENV)
    if path:
        entry = _user_table(path).get(table_key(torch.cuda.get_device_name(device), tensor_cores, shape))
        if entry is not None:
            return KernelConfig(**entry)
    return default_config(torch.cuda.get_device_capability(device), tensor_cores, shape)


if triton is not None:

    # Not decorated here: triton.jit decides between the compiler and the CPU interpreter when it wraps the
    # function, so the wrapping happens on first use (see _kernel), after TRITON_INTERPRET has been read.
    def _accumulate_kernel(
        G, X, C, P,  # G (T, M), X (T, N), C (M, N) through strides, P (SPLIT_T, M, N) fp32 partials
        T, M, N, T_PER_SPLIT,
        stride_gt, stride_gm, stride_xt, stride_xn, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr, TO_PARTIALS: tl.constexpr,
        T_STATIC: tl.constexpr,  # T_PER_SPLIT as a compile-time constant (interpreter), or 0: run-time bound (GPUs)
    ):
        # tile order grouped along M so neighbouring programs share X columns in L2
        pid = tl.program_id(0)
        split = tl.program_id(1)
        # (no tl.cdiv / tl.zeros: they are jitted helpers, which the interpreter cannot call when triton was
        # imported before TRITON_INTERPRET was set)
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        t_start = split * T_PER_SPLIT
        t_end = tl.minimum(T, t_start + T_PER_SPLIT)
        mask_m = rm < M
        mask_n = rn < N
        g_cols = rm.to(tl.int64) * stride_gm
        x_cols = rn.to(tl.int64) * stride_xn

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        # The interpreter of triton < 3.7 turns range() bounds into ints with int() of a 1-element numpy array,
        # which numpy >= 2.4 rejects; run-time arguments (T_PER_SPLIT too) and every assigned value are such arrays
        # there. A constexpr stop is a plain int, so the interpreter gets T_STATIC (written inline: an assignment
        # would make it an array again); GPUs get 0 and the run-time bound (one compiled kernel for every T).
        for t0 in range(0, T_STATIC if T_STATIC else T_PER_SPLIT, BLOCK_K):
            t = t_start + t0 + rk
            mask_t = t < t_end
            t64 = t.to(tl.int64)
            g = tl.load(G + t64[:, None] * stride_gt + g_cols[None, :], mask=mask_t[:, None] & mask_m[None, :], other=0.0)
            x = tl.load(X + t64[:, None] * stride_xt + x_cols[None, :], mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # fp32 / mixed pairs, and the interpreter (whose tl.dot multiplies raw bf16 bit patterns)
                g = g.to(tl.float32)
                x = x.to(tl.float32)
            if IEEE:  # fp32 operands: no TF32 rounding
                acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(g), x, acc)

        mask = mask_m[:, None] & mask_n[None, :]
        if TO_PARTIALS:
            p = P + split.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
            tl.store(p, acc, mask=mask)
        else:
            c = C + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
            tl.store(c, tl.load(c, mask=mask) + acc, mask=mask)

    @functools.cache
    def _kernel(interpret: bool) -> Any:
        """The jitted kernel (``interpret``: jitted while ``TRITON_INTERPRET=1``, so it runs in the interpreter)."""
        return triton.jit(_accumulate_kernel)


def kernel_flags(g_dtype: torch.dtype, x_dtype: torch.dtype, interpreting: bool) -> dict[str, bool]:
    """The kernel's operand handling: a 16-bit pair of one dtype goes to the tensor cores as is (``UPCAST`` and
    ``IEEE`` off); any other pair is upcast tile by tile and multiplied in IEEE fp32; the interpreter always upcasts
    (its ``tl.dot`` multiplies raw bf16 bit patterns)."""
    tensor_cores = g_dtype == x_dtype and g_dtype in LOW_PRECISION
    return {"UPCAST": interpreting or not tensor_cores, "IEEE": not tensor_cores}


def _split_count(acc: torch.Tensor, t: int, m: int, n: int) -> int:
    """Token splits so a small ``M x N`` still fills the GPU: about two waves of 128x128 tiles."""
    if acc.device.type != "cuda":
        return 1
    tiles = -(-m // 128) * -(-n // 128)
    return max(1, min((2 * _sm_count(acc.device.index)) // max(tiles, 1), t // 512, 16))


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count


def accumulate_triton(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, *, transposed: bool = False,
                      split_t: int | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """Triton launcher for :func:`loraga_fast.ops.accumulate` (same contract); ``split_t`` overrides the token-split
    heuristic and ``config`` the config table (benchmarks and tuning)."""
    if triton is None:
        raise RuntimeError("accumulate_triton needs triton: pip install triton")
    g = as_2d(grad_out)
    x = as_2d(inp)
    t, m = g.shape
    n = x.shape[1]
    if t == 0 or m == 0 or n == 0:
        return acc
    stride_cm, stride_cn = (acc.stride(1), acc.stride(0)) if transposed else (acc.stride(0), acc.stride(1))
    interpreting = interpreter_enabled()
    flags = kernel_flags(g.dtype, x.dtype, interpreting)
    if config is None:
        config = INTERPRETER_CONFIG if interpreting else kernel_config(acc.device, not flags["IEEE"], m, n)
    splits = split_t if split_t is not None else _split_count(acc, t, m, n)
    splits = max(1, min(splits, t))
    t_per_split = -(-(-(-t // splits)) // config.block_k) * config.block_k
    splits = -(-t // t_per_split)
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=acc.device) if splits > 1 else acc
    flags.update(TO_PARTIALS=splits > 1, T_STATIC=t_per_split if interpreting else 0)
    grid = (-(-m // config.block_m) * -(-n // config.block_n), splits)
    _kernel(interpreting)[grid](
        g, x, acc, partials, t, m, n, t_per_split,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), stride_cm, stride_cn,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages, **flags,
    )
    if splits > 1:  # fixed-order reduction of the partials: deterministic
        (acc.t() if transposed else acc).add_(partials.sum(0))
    return acc


def config_dict(config: KernelConfig) -> dict[str, int]:
    """A config as the JSON a tuned table holds."""
    return asdict(config)

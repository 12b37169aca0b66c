"""``C_fp32 += G^T X``: the weight-gradient accumulation of a linear layer, without a weight gradient.

For a linear layer ``y = x W^T + b`` with output gradient ``G = dL/dy``, the weight gradient summed over all
tokens is ``dL/dW = G^T X`` where ``G`` is ``(T, M)`` and ``X`` is ``(T, N)`` (T = tokens, flattened over
batch and sequence). This op adds that product straight into an fp32 accumulator ``C``.

Layers:

* ``_accumulate_kernel`` -- Triton: one program per ``(BLOCK_M, BLOCK_N)`` tile of ``C`` (and per token split),
  reading ``G`` and ``X`` in their own dtype through strides, multiplying with fp32 accumulation and adding into
  ``C`` in the same kernel (no bf16 ``dW`` temporary, no second pass);
* :func:`accumulate_triton` -- the launcher (autotuned on GPU; one config and fp32 operands under
  ``TRITON_INTERPRET=1``, whose ``tl.dot`` mishandles bf16);
* :func:`accumulate_ref` -- the plain-torch reference (fp32 GEMM, ``beta=1``); the torch backend
  (``_accumulate_torch``) runs it, through oneDNN's bf16 matrix engine for bf16 inputs on CPUs that have one;
* ``torch.ops.loraga_fast.accumulate_`` -- the op registered with ``torch.library`` (mutates ``acc``, returns
  nothing; a fake implementation for tracing), dispatching through :func:`loraga_fast.ops._dispatch.select_backend`;
* :func:`accumulate` -- the public function: checks its arguments, then runs the registered op when
  ``torch.compile`` is tracing (one opaque op in the graph) and its implementation directly in eager mode.

Determinism: without a token split each tile of ``C`` is owned by one program; with a split (small ``M x N``
on a large GPU) every split writes its own fp32 partial and the partials are summed in a fixed order. No
atomics, so results are bit-reproducible.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ._dispatch import as_2d, available_backends, interpreter_enabled, select_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no triton
    triton = None

__all__ = ["accumulate", "accumulate_ref", "accumulate_triton"]

def accumulate_ref(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Reference implementation of :func:`accumulate` (same contract).

    Low-precision inputs are upcast to fp32 before one ``addmm_`` into ``acc``: products of bf16/fp16 values
    are exact in fp32, so the only rounding is fp32 accumulation.
    """
    g = as_2d(grad_out)
    x = as_2d(inp)
    if g.dtype != acc.dtype:
        g = g.to(acc.dtype)
    if x.dtype != acc.dtype:
        x = x.to(acc.dtype)
    if transposed:
        acc.addmm_(x.t(), g)
    else:
        acc.addmm_(g.t(), x)
    return acc


@functools.lru_cache(maxsize=None)
def _onednn_bf16_usable() -> bool:
    mkldnn = torch.backends.mkldnn
    return (
        mkldnn.is_available()
        and hasattr(mkldnn, "matmul")
        and hasattr(mkldnn.matmul, "fp32_precision")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def _accumulate_torch(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """The torch backend: :func:`accumulate_ref`, with bf16 inputs on a CPU with a bf16 matrix engine (AMX,
    AVX512-BF16) run through oneDNN's bf16 mode for fp32 GEMMs. That mode rounds fp32 operands to bf16, which is
    exact here because they were upcast from bf16, and accumulates and writes fp32: the same result, 2-3x faster.
    """
    if acc.device.type == "cpu" and grad_out.dtype == inp.dtype == torch.bfloat16 and _onednn_bf16_usable():
        matmul = torch.backends.mkldnn.matmul
        previous = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        try:
            return accumulate_ref(acc, grad_out, inp, transposed=transposed)
        finally:
            matmul.fp32_precision = previous
    return accumulate_ref(acc, grad_out, inp, transposed=transposed)


if triton is not None:

    # Not decorated here: triton.jit decides between the compiler and the CPU interpreter when it wraps the
    # function, so the wrapping happens on first use (see _kernel), after TRITON_INTERPRET has been read.
    def _accumulate_kernel(
        G, X, C, P,  # G (T, M), X (T, N), C (M, N) through strides, P (SPLIT_T, M, N) fp32 partials
        T, M, N, T_PER_SPLIT, T_BUCKET,  # T_BUCKET: power of two >= T, only an autotuning key
        stride_gt, stride_gm, stride_xt, stride_xn, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr, TO_PARTIALS: tl.constexpr,
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
        for t0 in range(t_start, t_end, BLOCK_K):
            t = t0 + rk
            mask_t = t < t_end
            t64 = t.to(tl.int64)
            g = tl.load(G + t64[:, None] * stride_gt + g_cols[None, :], mask=mask_t[:, None] & mask_m[None, :], other=0.0)
            x = tl.load(X + t64[:, None] * stride_xt + x_cols[None, :], mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # the interpreter multiplies raw bf16 bit patterns in tl.dot
                g = g.to(tl.float32)
                x = x.to(tl.float32)
            if IEEE:  # fp32 inputs: no TF32 rounding
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

    def _gpu_configs() -> list:
        # Hopper and Ampere: large tiles, deep pipelines for the 7B shapes; smaller ones for skinny layers
        shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3),
                  (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in shapes
        ]

    @functools.lru_cache(maxsize=2)
    def _kernel(interpret: bool) -> Any:
        """The jitted kernel: one fixed config for the interpreter, autotuned (restoring C) for GPUs."""
        jitted = triton.jit(_accumulate_kernel)
        if interpret:
            return jitted
        return triton.autotune(
            configs=_gpu_configs(), key=["M", "N", "T_BUCKET", "UPCAST", "IEEE", "TO_PARTIALS"], restore_value=["C"],
        )(jitted)

_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}


def _split_count(acc: torch.Tensor, t: int, m: int, n: int) -> int:
    """Token splits so a small ``M x N`` still fills the GPU: about two waves of 128x128 tiles."""
    if acc.device.type != "cuda":
        return 1
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    return max(1, min((2 * _sm_count(acc.device.index)) // max(tiles, 1), t // 512, 16))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count


def accumulate_triton(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, *, transposed: bool = False,
                      split_t: int | None = None) -> torch.Tensor:
    """Triton launcher for :func:`accumulate` (same contract); ``split_t`` overrides the token-split heuristic."""
    if triton is None:
        raise RuntimeError("accumulate_triton needs triton: pip install triton")
    g = as_2d(grad_out)
    x = as_2d(inp)
    if g.dtype != x.dtype:  # e.g. autocast: one operand dtype for tl.dot, fp32 keeps both exact
        g, x = g.float(), x.float()
    t, m = g.shape
    n = x.shape[1]
    if t == 0 or m == 0 or n == 0:
        return acc
    stride_cm, stride_cn = (acc.stride(1), acc.stride(0)) if transposed else (acc.stride(0), acc.stride(1))
    interpreting = interpreter_enabled()
    splits = split_t if split_t is not None else _split_count(acc, t, m, n)
    splits = max(1, min(splits, t))
    t_per_split = triton.cdiv(triton.cdiv(t, splits), 16) * 16
    splits = triton.cdiv(t, t_per_split)
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=acc.device) if splits > 1 else acc
    flags = dict(UPCAST=interpreting and g.dtype != torch.float32, IEEE=g.dtype == torch.float32, TO_PARTIALS=splits > 1)
    args = (g, x, acc, partials, t, m, n, t_per_split, triton.next_power_of_2(t), g.stride(0), g.stride(1), x.stride(0), x.stride(1), stride_cm, stride_cn)
    if interpreting:
        grid = (triton.cdiv(m, _INTERPRETER_BLOCKS["BLOCK_M"]) * triton.cdiv(n, _INTERPRETER_BLOCKS["BLOCK_N"]), splits)
        _kernel(True)[grid](*args, **_INTERPRETER_BLOCKS, **flags)
    else:
        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), splits)

        _kernel(False)[grid](*args, **flags)
    if splits > 1:  # fixed-order reduction of the partials: deterministic
        (acc.t() if transposed else acc).add_(partials.sum(0))
    return acc


_IMPLS = {"torch": _accumulate_torch, "triton": accumulate_triton}


def accumulate(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Add the weight gradient of a linear layer into an fp32 accumulator, in place.

    Math: ``acc += G^T X`` (``transposed=False``, ``nn.Linear`` layout ``(M, N)``) or ``acc += X^T G``
    (``transposed=True``, transformers ``Conv1D`` layout ``(N, M)``), where ``G = grad_out`` flattened to
    ``(T, M)`` and ``X = inp`` flattened to ``(T, N)``.

    Args:
        acc: fp32 accumulator, ``(M, N)`` or ``(N, M)`` when ``transposed``; updated in place.
        grad_out: output gradient ``(..., M)``; fp32, bf16 or fp16; any strides.
        inp: layer input ``(..., N)`` with the same leading dimensions; fp32, bf16 or fp16; any strides.
        transposed: write ``X^T G`` (the ``Conv1D`` weight layout) instead of ``G^T X``.

    Returns:
        ``acc``.
    """
    if acc.dtype != torch.float32:
        raise TypeError(f"accumulate: the accumulator must be float32, got {acc.dtype}.")
    if acc.dim() != 2:
        raise ValueError(f"accumulate: the accumulator must be 2-D, got shape {tuple(acc.shape)}.")
    if grad_out.shape[:-1] != inp.shape[:-1]:
        raise ValueError(
            f"accumulate: grad_out {tuple(grad_out.shape)} and inp {tuple(inp.shape)} must share their leading (token) dimensions."
        )
    m, n = grad_out.shape[-1], inp.shape[-1]
    expected = (n, m) if transposed else (m, n)
    if tuple(acc.shape) != expected:
        raise ValueError(f"accumulate: accumulator shape {tuple(acc.shape)} does not match {expected} for grad_out {tuple(grad_out.shape)} and inp {tuple(inp.shape)}.")
    if not (grad_out.is_floating_point() and inp.is_floating_point()):
        raise TypeError(f"accumulate: grad_out and inp must be floating point, got {grad_out.dtype} and {inp.dtype}.")
    if torch.compiler.is_compiling():  # one opaque, registered op in the graph
        torch.ops.loraga_fast.accumulate_(acc, grad_out, inp, transposed)
    else:  # eager: skip the dispatcher's Python overhead (~30 us per call), same implementation
        _accumulate_impl(acc, grad_out, inp, transposed)
    return acc


def _accumulate_impl(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, transposed: bool) -> None:
    # fp32 operands: the kernel would multiply on CUDA cores (exact IEEE, no TF32); cuBLAS SGEMM does that
    # better, so the automatic choice keeps the Triton kernel for 16-bit operands
    low_precision = grad_out.dtype != torch.float32 or inp.dtype != torch.float32
    backends = available_backends()
    backend = select_backend("accumulate", acc, backends, auto=backends if low_precision else ("torch",))
    _IMPLS[backend](acc, grad_out, inp, transposed=transposed)


@torch.library.custom_op("loraga_fast::accumulate_", mutates_args=("acc",))
def _accumulate_op(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, transposed: bool) -> None:
    """``acc += G^T X`` (or ``X^T G``), in place: the registered op behind :func:`accumulate` (no argument checks)."""
    _accumulate_impl(acc, grad_out, inp, transposed)


@_accumulate_op.register_fake
def _accumulate_fake(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, transposed: bool) -> None:
    return None

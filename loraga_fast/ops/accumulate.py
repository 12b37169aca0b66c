"""``C_fp32 += G^T X``: the weight-gradient accumulation of a linear layer, without a weight gradient.

For a linear layer ``y = x W^T + b`` with output gradient ``G = dL/dy``, the weight gradient summed over all
tokens is ``dL/dW = G^T X`` where ``G`` is ``(T, M)`` and ``X`` is ``(T, N)`` (T = tokens, flattened over
batch and sequence). This op adds that product straight into an fp32 accumulator ``C``.

Layers:

* :func:`accumulate_triton` -- the Triton kernel and its launcher (:mod:`._accumulate_triton`: 16-bit operands on
  the tensor cores with fp32 accumulation, any other pair upcast tile by tile and multiplied in IEEE fp32; a fixed
  config table, no timing-based autotuning);
* :func:`accumulate_ref` -- the plain-torch reference (fp32 GEMM, ``beta=1``); the torch backend
  (``_accumulate_torch``) runs it, through oneDNN's bf16 matrix engine for bf16 inputs on CPUs that have one;
* ``torch.ops.loraga_fast.accumulate_`` -- the op registered with ``torch.library`` (mutates ``acc``, returns
  nothing; a fake implementation for tracing), running the entry of the one dispatch table
  (:func:`loraga_fast.ops._dispatch.dispatch`: ``("accumulate", "torch")`` is ``_accumulate_torch``,
  ``("accumulate", "triton")`` is :func:`accumulate_triton`);
* :func:`accumulate` -- the public function: checks its arguments, then runs the registered op when
  ``torch.compile`` is tracing (one opaque op in the graph) and its implementation directly in eager mode.

Backend choice (:func:`loraga_fast.ops._dispatch.select_backend`): the Triton kernel for 16-bit operands on CUDA,
the torch path otherwise. A mixed pair (bf16 ``G`` with fp32 ``X``) is never copied to fp32 as a whole: the Triton
kernel upcasts tile by tile; the torch path upcasts the 16-bit operand (the reference's own behaviour).

Determinism: without a token split each tile of ``C`` is owned by one program; with a split (small ``M x N``
on a large GPU) every split writes its own fp32 partial and the partials are summed in a fixed order. No
atomics and no timing-based kernel choice, so results are bit-reproducible.
"""

from __future__ import annotations

import functools

import torch

from ._accumulate_triton import accumulate_triton
from ._dispatch import as_2d, check_operands, dispatch, register_impl, run_op
from ._precision import exact_fp32

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


@functools.cache
def _onednn_bf16_usable() -> bool:
    mkldnn = torch.backends.mkldnn
    return (
        mkldnn.is_available()
        and hasattr(mkldnn, "matmul")
        and hasattr(mkldnn.matmul, "fp32_precision")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def _accumulate_torch(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """The torch backend: :func:`accumulate_ref` in IEEE fp32 whatever the user's TF32 / matmul-precision settings
    (:func:`~loraga_fast.ops._precision.exact_fp32`), except that bf16 inputs on a CPU with a bf16 matrix engine
    (AMX, AVX512-BF16) run through oneDNN's bf16 mode for fp32 GEMMs. That mode rounds fp32 operands to bf16, which
    is exact here because they were upcast from bf16, and accumulates and writes fp32: the same result, 2-3x faster.
    """
    with exact_fp32():
        if acc.device.type == "cpu" and grad_out.dtype == inp.dtype == torch.bfloat16 and _onednn_bf16_usable():
            matmul = torch.backends.mkldnn.matmul
            matmul.fp32_precision = "bf16"
            try:
                return accumulate_ref(acc, grad_out, inp, transposed=transposed)
            finally:
                matmul.fp32_precision = "ieee"
        return accumulate_ref(acc, grad_out, inp, transposed=transposed)


register_impl("accumulate", "torch", _accumulate_torch)
register_impl("accumulate", "triton", accumulate_triton)


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
    check_operands("accumulate", {"the accumulator": acc}, ("grad_out", grad_out), ("inp", inp))
    if acc.dim() != 2:
        raise ValueError(f"accumulate: the accumulator must be 2-D, got shape {tuple(acc.shape)}.")
    m, n = grad_out.shape[-1], inp.shape[-1]
    expected = (n, m) if transposed else (m, n)
    if tuple(acc.shape) != expected:
        raise ValueError(f"accumulate: accumulator shape {tuple(acc.shape)} does not match {expected} for grad_out {tuple(grad_out.shape)} and inp {tuple(inp.shape)}.")
    if not (grad_out.is_floating_point() and inp.is_floating_point()):
        raise TypeError(f"accumulate: grad_out and inp must be floating point, got {grad_out.dtype} and {inp.dtype}.")
    run_op(torch.ops.loraga_fast.accumulate_, _accumulate_impl, acc, grad_out, inp, transposed)
    return acc


def _accumulate_impl(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, transposed: bool) -> None:
    dispatch("accumulate", acc, grad_out, inp)(acc, grad_out, inp, transposed=transposed)


@torch.library.custom_op("loraga_fast::accumulate_", mutates_args=("acc",))
def _accumulate_op(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, transposed: bool) -> None:
    """``acc += G^T X`` (or ``X^T G``), in place: the registered op behind :func:`accumulate` (no argument checks)."""
    _accumulate_impl(acc, grad_out, inp, transposed)


@_accumulate_op.register_fake
def _accumulate_fake(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, transposed: bool) -> None:
    return None

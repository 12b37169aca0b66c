"""``C_fp32 += G^T X``: the weight-gradient accumulation of a linear layer, without a weight gradient.

For a linear layer ``y = x W^T + b`` with output gradient ``G = dL/dy``, the weight gradient summed over all
tokens is ``dL/dW = G^T X`` where ``G`` is ``(T, M)`` and ``X`` is ``(T, N)`` (T = tokens, flattened over
batch and sequence). This op adds that product straight into an fp32 accumulator ``C``.

Layers:

* :func:`accumulate_ref` -- the plain-torch reference (fp32 GEMM, ``beta=1``), also the CPU path;
* :func:`accumulate` -- the public op: checks its arguments and dispatches through
  :func:`loraga_fast.ops._dispatch.select_backend` (the Triton kernel plugs in there).
"""

from __future__ import annotations

import torch

from ._dispatch import select_backend

__all__ = ["accumulate", "accumulate_ref"]

_BACKENDS = ("torch",)


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def accumulate_ref(acc: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Reference implementation of :func:`accumulate` (same contract).

    Low-precision inputs are upcast to fp32 before one ``addmm_`` into ``acc``: products of bf16/fp16 values
    are exact in fp32, so the only rounding is fp32 accumulation.
    """
    g = _as_2d(grad_out)
    x = _as_2d(inp)
    if g.dtype != acc.dtype:
        g = g.to(acc.dtype)
    if x.dtype != acc.dtype:
        x = x.to(acc.dtype)
    if transposed:
        acc.addmm_(x.t(), g)
    else:
        acc.addmm_(g.t(), x)
    return acc


_IMPLS = {"torch": accumulate_ref}


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
    backend = select_backend("accumulate", acc, _BACKENDS)
    return _IMPLS[backend](acc, grad_out, inp, transposed=transposed)

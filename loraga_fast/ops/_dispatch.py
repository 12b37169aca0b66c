"""Backend selection for the ops in :mod:`loraga_fast.ops`: one policy, one override.

:func:`select_backend` decides, for every op (``accumulate``, ``sketch_accumulate``), from the device of the
tensor the op writes and the dtypes of the operands it reads:

* ``LORAGA_FAST_BACKEND=torch`` forces the plain-torch path (any device);
* ``LORAGA_FAST_BACKEND=triton`` forces the Triton kernel (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``) and raises an actionable error when that is impossible;
* ``LORAGA_FAST_BACKEND=auto`` (the default): the Triton kernel when the output is on a CUDA device (or on the
  CPU under the interpreter), ``triton`` is installed and some operand is 16-bit (bf16/fp16: the kernel reads it
  as is, with no upcast copy, and accumulates in fp32); the torch path otherwise. All-fp32 operands go to torch
  because cuBLAS/oneDNN SGEMM (in IEEE fp32, see :mod:`._precision`) is faster than a Triton fp32 kernel.

:func:`choose` is the policy as a pure function of plain values, so it can be tested for any device.
Nothing here probes the hardware at import time; the environment is read when an op is called.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable

import torch

BACKEND_ENV = "LORAGA_FAST_BACKEND"
_CHOICES = ("auto", "torch", "triton")
LOW_PRECISION = (torch.bfloat16, torch.float16)

__all__ = ["BACKEND_ENV", "as_2d", "choose", "interpreter_enabled", "requested_backend", "select_backend",
           "triton_importable"]


def interpreter_enabled() -> bool:
    """True when Triton kernels are to run in the CPU interpreter (``TRITON_INTERPRET`` set to a value triton itself
    reads as on: 1, true, on, yes)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package can be found (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` -> ``(T, K)``: the token matrix of a layer input or output gradient (a view when possible)."""
    return t.reshape(-1, t.shape[-1])


def requested_backend() -> str:
    """The backend asked for through ``LORAGA_FAST_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(_CHOICES)}.")
    return value


def choose(op: str, device_type: str, dtypes: Iterable[torch.dtype], *, requested: str, interpreter: bool,
           triton_installed: bool) -> str:
    """The policy: ``"torch"`` or ``"triton"`` for ``op`` writing on ``device_type`` and reading ``dtypes``.

    Raises:
        RuntimeError: ``requested == "triton"`` where the kernel cannot run (naming what to change).
    """
    if requested == "torch":
        return "torch"
    triton_possible = device_type == "cuda" or (device_type == "cpu" and interpreter)
    if requested == "triton":
        if not triton_installed:
            raise RuntimeError(f"{BACKEND_ENV}=triton was requested for '{op}', but triton is not installed: pip install triton")
        if not triton_possible:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton was requested for '{op}' on a {device_type} tensor; Triton kernels run on CUDA "
                "tensors, or on CPU tensors with TRITON_INTERPRET=1 (slow, for tests)."
            )
        return "triton"
    low_precision = any(d in LOW_PRECISION for d in dtypes)
    return "triton" if triton_possible and triton_installed and low_precision else "torch"


def select_backend(op: str, out: torch.Tensor, *operands: torch.Tensor) -> str:
    """The backend that runs ``op`` writing ``out`` from ``operands`` here and now (:func:`choose` applied to the
    environment: ``LORAGA_FAST_BACKEND``, ``TRITON_INTERPRET``, whether triton is installed)."""
    return choose(op, out.device.type, [t.dtype for t in operands], requested=requested_backend(),
                  interpreter=interpreter_enabled(), triton_installed=triton_importable())

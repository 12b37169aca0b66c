"""Backend selection for the ops in :mod:`loraga_fast.ops`.

One function, :func:`select_backend`, decides which implementation of an op runs:

* ``LORAGA_FAST_BACKEND=torch`` forces the plain-torch reference path (any device);
* ``LORAGA_FAST_BACKEND=triton`` forces the Triton kernel (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``) and raises an actionable error when that is impossible;
* ``LORAGA_FAST_BACKEND=auto`` (the default) picks Triton for CUDA tensors (and for CPU tensors under the
  interpreter) when the op has a Triton kernel and ``triton`` imports, and the torch path otherwise.

Nothing here probes the hardware at import time; the environment is read when an op is called.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Collection

import torch

BACKEND_ENV = "LORAGA_FAST_BACKEND"
_CHOICES = ("auto", "torch", "triton")


def interpreter_enabled() -> bool:
    """True when Triton kernels are to run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """True when the ``triton`` package can be found (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def available_backends() -> tuple[str, ...]:
    """The backends an op with a Triton kernel can run on here: ``("torch", "triton")`` or ``("torch",)``."""
    return ("torch", "triton") if triton_importable() else ("torch",)


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` -> ``(T, K)``: the token matrix of a layer input or output gradient (a view when possible)."""
    return t.reshape(-1, t.shape[-1])


def requested_backend() -> str:
    """The backend asked for through ``LORAGA_FAST_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(_CHOICES)}.")
    return value


def select_backend(op: str, tensor: torch.Tensor, available: Collection[str],
                   auto: Collection[str] | None = None) -> str:
    """Return the backend (``"torch"`` or ``"triton"``) that runs ``op`` on ``tensor``.

    Args:
        op: the op's name, used in error messages.
        tensor: a tensor the op writes (its device decides the automatic choice).
        available: the backends this op implements (any of them can be forced).
        auto: the backends the automatic choice may pick for this call (default: ``available``), for cases
            where a kernel exists but another backend is known to be better.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    triton_possible = tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreter_enabled())
    if requested == "triton":
        if "triton" not in available:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton was requested, but loraga_fast has no Triton kernel for '{op}' yet; "
                f"unset {BACKEND_ENV} or set it to 'torch'."
            )
        if not triton_importable():
            raise RuntimeError(f"{BACKEND_ENV}=triton was requested for '{op}', but triton is not installed: pip install triton")
        if not triton_possible:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton was requested for '{op}' on a {tensor.device.type} tensor; Triton kernels run on "
                "CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 (slow, for tests)."
            )
        return "triton"
    if "triton" in (available if auto is None else auto) and triton_possible and triton_importable():
        return "triton"
    return "torch"

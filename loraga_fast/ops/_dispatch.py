"""Backends of the ops in :mod:`loraga_fast.ops`: one table, one policy, one override.

The table, :data:`IMPLS`, maps ``(op, backend)`` to the function that runs ``op`` on ``backend`` (``"torch"`` or
``"triton"``). Each op module fills it when it is imported (:func:`register_impl`); every op then runs
``dispatch(op, out, *operands)(...)``, which is :func:`select_backend` followed by a look-up in the table, and
nothing else picks an implementation. Tests and benchmarks patch entries of this one table.

:func:`select_backend` decides, for every op, from the device of the tensor the op writes and the dtypes of the
operands it reads. An op with no ``"triton"`` entry (``probe_accumulate``, ``factors_from_sketch``,
``batched_rsvd``, ``orthonormalize``) always runs its torch implementation, whatever is requested. For the ops
with a kernel (``accumulate``, ``sketch_accumulate``):

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
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

BACKEND_ENV = "LORAGA_FAST_BACKEND"
BACKENDS = ("torch", "triton")
_CHOICES = ("auto", *BACKENDS)
LOW_PRECISION = (torch.bfloat16, torch.float16)

__all__ = ["BACKENDS", "BACKEND_ENV", "IMPLS", "as_2d", "backends", "check_operands", "choose", "dispatch",
           "implementation", "interpreter_enabled", "register_impl", "registered_ops", "requested_backend", "run_op",
           "select_backend", "triton_importable"]

F = TypeVar("F", bound=Callable[..., Any])

IMPLS: dict[tuple[str, str], Callable[..., Any]] = {}
"""The one dispatch table: ``(op, backend) -> implementation``, filled by the op modules as they are imported."""


def register_impl(op: str, backend: str, fn: F) -> F:
    """Enter ``fn`` as the ``backend`` implementation of ``op`` (once per pair); returns ``fn``."""
    if backend not in BACKENDS:
        raise ValueError(f"register_impl: backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    if (op, backend) in IMPLS:
        raise ValueError(f"register_impl: '{op}' already has a {backend} implementation.")
    IMPLS[(op, backend)] = fn
    return fn


def implementation(op: str, backend: str) -> Callable[..., Any]:
    """The ``backend`` implementation of ``op`` from the table.

    Raises:
        LookupError: none is registered.
    """
    try:
        return IMPLS[(op, backend)]
    except KeyError:
        raise LookupError(f"no {backend} implementation of '{op}' is registered "
                          f"(registered ops: {', '.join(registered_ops())}).") from None


def registered_ops() -> tuple[str, ...]:
    """The ops in the table, sorted."""
    return tuple(sorted({op for op, _ in IMPLS}))


def backends(op: str) -> tuple[str, ...]:
    """The backends ``op`` has an implementation for, in :data:`BACKENDS` order."""
    return tuple(b for b in BACKENDS if (op, b) in IMPLS)


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
           triton_installed: bool, has_kernel: bool = True) -> str:
    """The policy: ``"torch"`` or ``"triton"`` for ``op`` writing on ``device_type`` and reading ``dtypes``
    (``has_kernel``: whether ``op`` has a Triton implementation at all; without one the answer is ``"torch"``).

    Raises:
        RuntimeError: ``requested == "triton"`` where the kernel cannot run (naming what to change).
    """
    if requested == "torch" or not has_kernel:
        return "torch"
    triton_possible = device_type == "cuda" or (device_type == "cpu" and interpreter)
    if requested == "triton":
        if not triton_installed:
            raise RuntimeError(f"{BACKEND_ENV}=triton was requested for '{op}', but triton is not installed: "
                               f"{TRITON_INSTALL}")
        if not triton_possible:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton was requested for '{op}' on a {device_type} tensor; Triton kernels run on CUDA "
                "tensors, or on CPU tensors with TRITON_INTERPRET=1 (slow, for tests)."
            )
        return "triton"
    low_precision = any(d in LOW_PRECISION for d in dtypes)
    if device_type == "cuda" and low_precision and not triton_installed:
        _warn_without_triton(op)
    return "triton" if triton_possible and triton_installed and low_precision else "torch"


TRITON_INSTALL = "pip install 'loraga_fast[cuda]' (or pip install triton; CUDA builds of torch on Linux bring it)"
_WARNED_WITHOUT_TRITON: set[str] = set()


def _warn_without_triton(op: str) -> None:
    """Once per op and process: a low-precision CUDA op that has a Triton kernel runs the plain-torch path because
    triton is missing (the same fp32 result, slower; triton is the ``[cuda]`` extra, not a dependency, since a CPU
    install never runs it)."""
    if op in _WARNED_WITHOUT_TRITON:
        return
    _WARNED_WITHOUT_TRITON.add(op)
    warnings.warn(f"loraga_fast: triton is not installed, so '{op}' on low-precision CUDA tensors runs the plain-torch "
                  f"path (the same fp32 result, slower): {TRITON_INSTALL}", RuntimeWarning, stacklevel=3)


def select_backend(op: str, out: torch.Tensor, *operands: torch.Tensor) -> str:
    """The backend that runs ``op`` writing ``out`` from ``operands`` here and now (:func:`choose` applied to the
    environment: ``LORAGA_FAST_BACKEND``, ``TRITON_INTERPRET``, whether triton is installed, and to the table:
    whether ``op`` has a Triton implementation)."""
    return choose(op, out.device.type, [t.dtype for t in operands], requested=requested_backend(),
                  interpreter=interpreter_enabled(), triton_installed=triton_importable(),
                  has_kernel=(op, "triton") in IMPLS)


def dispatch(op: str, out: torch.Tensor, *operands: torch.Tensor) -> Callable[..., Any]:
    """The implementation that runs ``op`` writing ``out`` (for a functional op: its main input) from
    ``operands``: :func:`select_backend`, then the table. Every op in :mod:`loraga_fast.ops` calls this."""
    return implementation(op, select_backend(op, out, *operands))


def check_operands(op: str, fp32: dict[str, torch.Tensor], left: tuple[str, torch.Tensor],
                   right: tuple[str, torch.Tensor]) -> None:
    """The checks every accumulating op makes: the tensors of ``fp32`` (its output and fp32 inputs) are float32,
    and the ``(name, tensor)`` operands ``left`` and ``right`` share their leading (token) dimensions."""
    for name, t in fp32.items():
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {t.dtype}.")
    if left[1].shape[:-1] != right[1].shape[:-1]:
        raise ValueError(f"{op}: {left[0]} {tuple(left[1].shape)} and {right[0]} {tuple(right[1].shape)} must share "
                         "their leading (token) dimensions.")


def run_op(registered: Callable[..., Any], impl: Callable[..., Any], *args: Any) -> Any:
    """The registered op while ``torch.compile`` traces (one opaque op in the graph); its implementation directly in
    eager mode (no dispatcher overhead, ~30 us per call; the same code). Returns what they return."""
    return registered(*args) if torch.compiler.is_compiling() else impl(*args)

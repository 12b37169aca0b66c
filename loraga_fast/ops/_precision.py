"""IEEE fp32 for the library's own fp32 GEMMs, whatever the user set for the rest of the program.

Training scripts often enable TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``,
``torch.set_float32_matmul_precision("high")``) or bf16 for fp32 matmuls on CPU (``"medium"`` reaches oneDNN).
Those settings are global, so without care they would silently turn loraga_fast's "exact fp32" accumulations,
randomized SVDs, Gram matrices and sketches into TF32/bf16 ones. :func:`exact_fp32` sets IEEE fp32 for the
duration of a block (one op call, one factorization) and puts the user's settings back on every exit, exceptions
included, so the user's own model keeps running with whatever precision they chose.

With torch's per-backend API (``torch.backends.{cuda,mkldnn}.matmul.fp32_precision``, torch >= 2.9) the exact
values are saved and restored, which never mixes the legacy and the new API (torch refuses such a mix). Older
torch has only the legacy switches, saved and restored the same way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["exact_fp32", "with_exact_fp32"]

F = TypeVar("F", bound=Callable[..., Any])


def _new_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.mkldnn, "matmul")


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Run the block with IEEE fp32 matmuls on CUDA (no TF32) and on CPU (no oneDNN bf16), then restore."""
    if _new_api():
        cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
        saved = (cuda.fp32_precision, mkldnn.fp32_precision)
        if saved == ("ieee", "ieee"):
            yield
            return
        cuda.fp32_precision = "ieee"
        mkldnn.fp32_precision = "ieee"
        try:
            yield
        finally:
            cuda.fp32_precision, mkldnn.fp32_precision = saved
        return
    precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def with_exact_fp32(fn: F) -> F:
    """Decorator: ``fn`` runs inside :func:`exact_fp32`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with exact_fp32():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

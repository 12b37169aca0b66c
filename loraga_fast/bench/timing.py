"""Timing and checking the accumulate kernel and its alternatives, shared by the ``kernels`` suite
(:mod:`loraga_fast.bench.kernels`) and the tuner (:mod:`loraga_fast.bench.tuning`): median time of a call
(``triton.testing.do_bench`` on CUDA), TFLOP/s, the relative error against a float64 product, and the device's
name and versions for the JSON."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..ops._dispatch import interpreter_enabled

__all__ = ["device_name", "environment", "first_line", "rel_err", "sync", "tflops", "time_ms"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup_ms: int = 25,
            rep_ms: int = 100) -> float:
    """Median milliseconds of one call: ``triton.testing.do_bench`` on CUDA (CUDA events as a fallback), the
    median of ``repeats`` ``perf_counter`` timings after one warm-up call on CPU."""
    if device.type == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except (ImportError, TypeError, AttributeError) as err:  # a triton without do_bench/return_mode
            print(f"[kernels] do_bench unavailable ({err}); timing with CUDA events", file=sys.stderr)
            return _cuda_events_ms(fn, device, repeats=max(repeats, 20))
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cuda_events_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tflops(flop: int, ms: float | None) -> float | None:
    """TFLOP/s of ``flop`` operations in ``ms`` milliseconds; None without a time."""
    return flop / (ms * 1e-3) / 1e12 if ms else None


def rel_err(result: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``result`` against the float64 ``ref``."""
    return ((result.double() - ref).norm() / ref.norm()).item()


def first_line(err: BaseException, limit: int = 120) -> str:
    """``Type: first line of the message``, for a table cell or a note: a line over ``limit`` characters ends at
    its first sentence's end when that fits, else at the last word that fits, followed by "..." (never mid-word)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        end = text.find(". ")
        text = text[: end + 1] if 0 < end < limit else text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {text}"


def device_name(device: torch.device) -> str:
    """The GPU's name as :func:`loraga_fast.ops._accumulate_triton.table_key` uses it; ``"interpreter"`` / ``"cpu"``
    elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "interpreter" if interpreter_enabled() else "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """torch and triton versions, the device, and on CUDA its capability and SM count."""
    env: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "device_name": device_name(device),
                           "interpreter": interpreter_enabled()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["capability"] = list(torch.cuda.get_device_capability(device))
        env["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
        env["cuda"] = torch.version.cuda
    return env


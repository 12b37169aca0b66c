"""pytest-benchmark suite for the accumulate op (``--benchmark-enable`` to time; never asserts on time).

Shapes: ``LORAGA_BENCH_KERNEL_PRESET`` (default: ``llama-7b`` on CUDA, ``tiny`` otherwise).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.kernels import IMPLS, SHAPES, _make

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("LORAGA_BENCH_KERNEL_PRESET", "llama-7b" if DEVICE.type == "cuda" else "tiny")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,m,n", SHAPES[PRESET], ids=[f"T{t}-{m}x{n}" for t, m, n in SHAPES[PRESET]])
def test_accumulate(benchmark, impl: str, t: int, m: int, n: int) -> None:  # type: ignore[no-untyped-def]
    fn = _make(impl, t, m, n, torch.bfloat16, DEVICE)
    if isinstance(fn, str):
        pytest.skip(fn)  # an alternative this torch/device does not offer, not a failure of ours
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def step() -> None:
        fn()
        sync()

    benchmark.extra_info["flop"] = 2 * t * m * n
    benchmark(step)

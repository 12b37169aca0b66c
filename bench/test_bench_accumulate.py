"""pytest-benchmark suite for the accumulate op (``--benchmark-enable`` to time; never asserts on time).

Cases: ``LORAGA_BENCH_KERNEL_PRESET`` (default: ``llama-7b`` on CUDA, ``tiny`` otherwise); implementations as in
the ``kernels`` suite, :mod:`loraga_fast.bench.kernels` (ours, cuBLAS with fp32 output, autograd's bf16 GEMM).
"""

from __future__ import annotations

import os

import pytest
import torch

from loraga_fast.bench.kernels import IMPLS, SHAPES, make_call

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("LORAGA_BENCH_KERNEL_PRESET", "llama-7b" if DEVICE.type == "cuda" else "tiny")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SHAPES[PRESET], ids=[c.label.replace(" ", "-") for c in SHAPES[PRESET]])
def test_accumulate(benchmark, impl: str, case) -> None:  # type: ignore[no-untyped-def]
    fn = make_call(impl, case, torch.bfloat16, DEVICE)
    if isinstance(fn, str):
        pytest.skip(fn)  # an alternative this torch/device does not offer, not a failure of ours
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def step() -> None:
        fn()
        sync()

    benchmark.extra_info["flop"] = case.flop
    benchmark(step)

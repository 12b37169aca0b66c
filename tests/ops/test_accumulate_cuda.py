"""The compiled Triton kernel on a real GPU (these need CUDA; the same kernel runs under the interpreter in
tests/ops/test_accumulate.py on every machine)."""

from __future__ import annotations

import pytest
import torch

from loraga_fast import preprocess_loraga
from loraga_fast.ops import accumulate
from loraga_fast.ops.accumulate import accumulate_triton
from tests._helpers import (
    attached,
    lora_ga_config,
    reference_mean_grads,
    rel_err,
    tiny_llama,
    token_batches,
    train_step_for,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("t,m,n", [(1, 5, 7), (63, 17, 33), (130, 300, 131), (2048, 4096, 4096)])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_kernel_matches_float64(dtype: torch.dtype, t: int, m: int, n: int, transposed: bool) -> None:
    g = torch.randn(t, m, dtype=dtype, device="cuda")
    x = torch.randn(t, 2 * n, dtype=dtype, device="cuda")[:, ::2]
    start = torch.randn((n, m) if transposed else (m, n), device="cuda")
    acc = start.clone()
    accumulate(acc, g, x, transposed=transposed)  # the first call of a shape autotunes: C must be added once
    prod = g.double().t() @ x.double()
    expected = start.double() + (prod.t() if transposed else prod)
    # products are exact in fp32; fp32 summation over T tokens errs by ~eps * sqrt(T) (TF32 would give ~1e-3)
    rtol = max(1e-6, 2e-7 * t**0.5)
    assert ((acc.double() - expected).norm() / expected.norm()).item() < rtol


@pytest.mark.parametrize("split_t", [None, 1, 4])
def test_kernel_deterministic(split_t: int | None) -> None:
    g = torch.randn(4096, 512, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4096, 256, dtype=torch.bfloat16, device="cuda")
    a = torch.zeros(512, 256, device="cuda")
    b = torch.zeros(512, 256, device="cuda")
    accumulate_triton(a, g, x, split_t=split_t)
    accumulate_triton(b, g, x, split_t=split_t)
    assert torch.equal(a, b)


def test_preprocess_on_cuda_matches_float64() -> None:
    batches = token_batches()
    model = tiny_llama().cuda()
    preprocess_loraga(model, lora_ga_config(), train_step_for(model, [b.cuda() for b in batches]))
    ours = attached(model)
    ref = reference_mean_grads(tiny_llama(), list(ours), batches)
    assert len(ours) == 14
    for n, grad in ours.items():
        assert grad.is_cuda and grad.dtype == torch.float32
        assert rel_err(grad.cpu(), ref[n]) < 1e-5, n

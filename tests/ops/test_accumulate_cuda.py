"""The compiled Triton kernel on a real GPU: 7B shapes, partial tile groups, mixed dtypes, strides, determinism.

These need CUDA and skip cleanly elsewhere; `bash bench/gpu.sh` runs them (`pytest -m cuda`). Each has a CPU
interpreter counterpart at small shapes in tests/ops/test_accumulate.py. The fixture below makes sure the compiled
kernel runs (no TRITON_INTERPRET, no forced backend), whatever the environment says.
"""

from __future__ import annotations

import pytest
import torch

from loraga_fast import preprocess_loraga
from loraga_fast.ops import accumulate
from loraga_fast.ops._accumulate_triton import (
    accumulate_triton,
    default_config,
    kernel_config,
)
from loraga_fast.ops._dispatch import IMPLS
from tests._helpers import (
    attached,
    lora_ga_config,
    reference_mean_grads,
    rel_err,
    tiny_llama,
    token_batches,
    train_step_for,
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# LLaMA-7B: T = 4096 tokens (2 x 2048), hidden 4096, MLP 11008 (11008 / 128 = 86 tiles: 86 % 8 != 0)
SHAPES_7B = [(4096, 4096, 4096), (4096, 11008, 4096), (4096, 4096, 11008)]


@pytest.fixture(autouse=True)
def _compiled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LORAGA_FAST_BACKEND", raising=False)


def _rel(acc: torch.Tensor, expected: torch.Tensor) -> float:
    return ((acc.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("t,m,n", [(1, 5, 7), (63, 17, 33), (130, 300, 131), *SHAPES_7B])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_kernel_matches_float64(dtype: torch.dtype, t: int, m: int, n: int, transposed: bool) -> None:
    g = torch.randn(t, m, dtype=dtype, device="cuda")
    x = torch.randn(t, 2 * n, dtype=dtype, device="cuda")[:, ::2]  # non-contiguous
    start = torch.randn((n, m) if transposed else (m, n), device="cuda")
    acc = start.clone()
    accumulate_triton(acc, g, x, transposed=transposed)
    prod = g.double().t() @ x.double()
    expected = start.double() + (prod.t() if transposed else prod)
    # products are exact in fp32; fp32 summation over T tokens errs by ~eps * sqrt(T) (TF32 would give ~1e-3)
    assert _rel(acc, expected) < max(1e-6, 2e-7 * t**0.5)


@pytest.mark.parametrize("g_dtype,x_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_mixed_pairs_are_exact(g_dtype: torch.dtype, x_dtype: torch.dtype) -> None:
    t, m, n = 4096, 11008, 512
    g = torch.randn(t, m, device="cuda").to(g_dtype)
    x = torch.randn(t, n, device="cuda").to(x_dtype)
    acc = torch.zeros(m, n, device="cuda")
    accumulate(acc, g, x)
    assert _rel(acc, g.double().t() @ x.double()) < 2e-7 * t**0.5


def test_bf16_pair_goes_to_the_16bit_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.dtype, torch.dtype]] = []
    real = IMPLS[("accumulate", "triton")]
    monkeypatch.setitem(IMPLS, ("accumulate", "triton"),
                        lambda a, g, x, **k: calls.append((g.dtype, x.dtype)) or real(a, g, x, **k))
    g = torch.randn(256, 512, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(256, 128, dtype=torch.bfloat16, device="cuda")
    accumulate(torch.zeros(512, 128, device="cuda"), g, x)
    assert calls == [(torch.bfloat16, torch.bfloat16)]
    config = kernel_config(g.device, True, 11008, 4096)
    assert config == default_config(torch.cuda.get_device_capability(), True, "large")


@pytest.mark.parametrize("t,m,n", SHAPES_7B[:2])
@pytest.mark.parametrize("split_t", [None, 1, 4])
def test_kernel_bit_identical_run_to_run(t: int, m: int, n: int, split_t: int | None) -> None:
    g = torch.randn(t, m, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(t, n, dtype=torch.bfloat16, device="cuda")
    runs = []
    for _ in range(3):
        acc = torch.zeros(m, n, device="cuda")
        accumulate_triton(acc, g, x, split_t=split_t)
        runs.append(acc)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_small_layer_token_split_is_deterministic_through_accumulate() -> None:
    g = torch.randn(8192, 256, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(8192, 128, dtype=torch.bfloat16, device="cuda")
    a, b = torch.zeros(256, 128, device="cuda"), torch.zeros(256, 128, device="cuda")
    accumulate(a, g, x)
    accumulate(b, g, x)
    assert torch.equal(a, b) and _rel(a, g.double().t() @ x.double()) < 1e-5


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

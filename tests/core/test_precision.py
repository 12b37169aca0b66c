"""Precision whatever the user set: autocast operands, TF32 / "medium" matmul settings, fp32 sketch products."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from loraga_fast import preprocess_loraga
from loraga_fast.ops._precision import exact_fp32
from loraga_fast.ops.sketch import sketch_accumulate, sketch_accumulate_ref
from tests._helpers import (
    attached,
    hook_reference,
    lm_loss,
    lora_ga_config,
    rel_err,
    tiny_llama,
    token_batches,
    use_backend,
)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_autocast_captures_the_operands_the_matmul_consumed(backend_name: str) -> None:
    """fp32 weights + bf16 autocast (Trainer(bf16=True)): X is taken in bf16, as autograd's weight gradient takes it,
    and the result is their exact fp32 sum (not within 5e-2 of an fp32 re-run: within 1e-6 of these operands)."""
    batches = token_batches()
    base = tiny_llama()
    model = copy.deepcopy(base)

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    import importlib

    store_module = importlib.import_module("loraga_fast.stores.exact")
    real = store_module.accumulate

    def spy(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append((g.dtype, x.dtype))
        return real(acc, g, x, **kw)  # type: ignore[arg-type]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for b in batches:
                lm_loss(model, b).backward()

    with pytest.MonkeyPatch.context() as mp, use_backend(backend_name):
        mp.setattr(store_module, "accumulate", spy)
        preprocess_loraga(model, lora_ga_config(), step)
    ours = attached(model)
    assert len(ours) == 14 and all(g.dtype == torch.float32 for g in ours.values())
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}  # two 16-bit operands: the tensor-core path on CUDA
    ref = hook_reference(base, list(ours), batches, context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    worst = max(rel_err(ours[n], ref[n]) for n in ref)
    assert worst < 1e-6, worst
    # and the model is left as it was: fp32 weights, the same values and requires_grad flags
    for (name, p), p0 in zip(model.named_parameters(), base.parameters()):
        assert p.dtype == torch.float32 and p.requires_grad == p0.requires_grad and torch.equal(p, p0), name


@pytest.fixture
def user_precision() -> Iterator[None]:
    """A training script that asked for fast, inexact fp32 matmuls (TF32 on CUDA, bf16 through oneDNN on CPU)."""
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = (cuda.fp32_precision, mkldnn.fp32_precision)
    torch.set_float32_matmul_precision("medium")
    mkldnn.fp32_precision = "bf16"
    try:
        yield
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = saved


@pytest.mark.parametrize("mode", ["exact", "lowmem"])
def test_user_matmul_precision_does_not_reach_our_gemms(user_precision: None, mode: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    modules = [importlib.import_module(f"loraga_fast.ops.{m}") for m in ("accumulate", "sketch", "rsvd")]
    during: list[tuple[str, str]] = []
    real_addmm = torch.Tensor.addmm_

    def addmm_spy(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        during.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return real_addmm(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "addmm_", addmm_spy)
    assert modules
    batches = token_batches()
    model = tiny_llama()
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    preprocess_loraga(model, lora_ga_config(), lambda: [lm_loss(model, b).backward() for b in batches], mode=mode)
    after = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    assert before == after == ("tf32", "bf16")  # the user's settings, untouched afterwards
    assert during and set(during) == {("ieee", "ieee")}  # every fp32 accumulation of ours ran in IEEE fp32
    if mode == "exact":
        # the reference is a float64 sum over the very X and G the model produced under the user's settings (on a
        # CPU with a bf16 matrix engine "medium" makes the model's own fp32 matmuls bf16, so a float64 re-run of
        # the model would differ by ~5e-3); our accumulation in bf16 would miss it by ~1e-3
        ours = attached(model)
        ref = hook_reference(tiny_llama(), list(ours), batches)
        worst = max(rel_err(ours[n], ref[n]) for n in ref)
        assert worst < 1e-6, worst


def test_exact_fp32_restores_on_exceptions(user_precision: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), exact_fp32():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        raise RuntimeError("boom")
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    assert torch.get_float32_matmul_precision() == "medium"  # the legacy view of the same settings, too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sides", ["forward", "adjoint"])
def test_sketch_products_stay_fp32_on_both_backends(dtype: torch.dtype, sides: str) -> None:
    """Triton (interpreter) and torch sketch paths agree to 1e-6 on 16-bit inputs: R B is never rounded to 16 bits."""
    g = torch.randn(2, 37, 48).to(dtype)  # G: (..., M)
    x = torch.randn(2, 37, 40).to(dtype)  # X: (..., N)
    left, right = (g, x) if sides == "forward" else (x, g)
    basis = torch.randn(right.shape[-1], 12)
    start = torch.randn(left.shape[-1], 12)
    expected = start.double() + left.reshape(-1, left.shape[-1]).double().t() @ (
        right.reshape(-1, right.shape[-1]).double() @ basis.double())
    results = {}
    for name in ("torch", "triton"):
        acc = start.clone()
        with use_backend(name):
            sketch_accumulate(acc, left, right, basis)
        results[name] = acc
        assert rel_err(acc, expected) < 1e-6, (name, rel_err(acc, expected))
    assert rel_err(results["triton"], results["torch"]) < 1e-6
    ref = sketch_accumulate_ref(start.clone(), left, right, basis)
    assert rel_err(ref, expected) < 1e-6

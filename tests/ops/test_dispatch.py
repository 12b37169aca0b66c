"""One dispatch policy for every op: which backend runs, for any device, dtype pair and environment."""

from __future__ import annotations

import pytest
import torch

from loraga_fast.ops import accumulate, accumulate_ref
from loraga_fast.ops._dispatch import BACKEND_ENV, choose, select_backend
from loraga_fast.ops.sketch import sketch_accumulate

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    "device,dtypes,interpreter,expected",
    [
        ("cuda", (BF16, BF16), False, "triton"),  # the 16-bit tensor-core kernel
        ("cuda", (FP16, FP16), False, "triton"),
        ("cuda", (BF16, FP32), False, "triton"),  # a mixed pair: upcast tile by tile in the kernel, no copy
        ("cuda", (FP32, FP32), False, "torch"),  # cuBLAS SGEMM in IEEE fp32
        ("cpu", (BF16, BF16), False, "torch"),
        ("cpu", (FP32, FP32), False, "torch"),
        ("cpu", (BF16, BF16), True, "triton"),  # the interpreter runs the kernel on CPU tensors
        ("cpu", (FP32, FP32), True, "torch"),
        ("mps", (BF16, BF16), True, "torch"),
    ],
)
def test_auto_policy(device: str, dtypes: tuple[torch.dtype, ...], interpreter: bool, expected: str) -> None:
    assert choose("accumulate", device, dtypes, requested="auto", interpreter=interpreter, triton_installed=True) == expected
    # the same policy for the sketch op, and nothing but torch without triton
    assert choose("sketch_accumulate", device, dtypes, requested="auto", interpreter=interpreter,
                  triton_installed=True) == expected
    assert choose("accumulate", device, dtypes, requested="auto", interpreter=interpreter,
                  triton_installed=False) == "torch"


def test_forcing_a_backend() -> None:
    assert choose("op", "cuda", (BF16, BF16), requested="torch", interpreter=False, triton_installed=True) == "torch"
    assert choose("op", "cuda", (FP32, FP32), requested="triton", interpreter=False, triton_installed=True) == "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        choose("op", "cpu", (BF16,), requested="triton", interpreter=False, triton_installed=True)
    with pytest.raises(RuntimeError, match="pip install triton"):
        choose("op", "cuda", (BF16,), requested="triton", interpreter=False, triton_installed=False)


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu16 = torch.zeros(2, dtype=BF16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert select_backend("accumulate", torch.zeros(1), cpu16, cpu16) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("accumulate", torch.zeros(1), cpu16, cpu16) == "triton"
    assert select_backend("accumulate", torch.zeros(1), torch.zeros(1), torch.zeros(1)) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert select_backend("accumulate", torch.zeros(1), cpu16, cpu16) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        select_backend("accumulate", torch.zeros(1), cpu16)


@pytest.mark.parametrize("op", ["accumulate", "sketch"])
def test_ops_run_what_the_policy_chooses(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ops go through the one policy: with the interpreter on, bf16 operands reach the Triton kernel and fp32
    ones the torch path (a spy on the kernel launcher counts the launches)."""
    import importlib

    kernel_module = importlib.import_module("loraga_fast.ops._accumulate_triton")
    acc_module = importlib.import_module("loraga_fast.ops.accumulate")  # the module, not the function ops exports
    sketch_module = importlib.import_module("loraga_fast.ops.sketch")

    launches: list[int] = []
    real = kernel_module.accumulate_triton

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        launches.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setitem(acc_module._IMPLS, "triton", spy)
    monkeypatch.setattr(sketch_module, "accumulate_triton", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    for dtype, expected in ((BF16, True), (FP32, False)):
        launches.clear()
        g, x = torch.randn(9, 6, dtype=dtype), torch.randn(9, 5, dtype=dtype)
        if op == "accumulate":
            out = accumulate(torch.zeros(6, 5), g, x)
            ref = accumulate_ref(torch.zeros(6, 5), g, x)
        else:
            basis = torch.randn(5, 3)
            out = sketch_accumulate(torch.zeros(6, 3), g, x, basis)
            ref = g.double().t() @ (x.double() @ basis.double())
        assert bool(launches) == expected, (op, dtype)
        torch.testing.assert_close(out.double(), ref.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "g,x,interpreting,upcast,ieee",
    [
        (BF16, BF16, False, False, False),  # the 16-bit tensor-core kernel: operands read as they are
        (FP16, FP16, False, False, False),
        (BF16, FP32, False, True, True),  # mixed: upcast tile by tile, IEEE fp32
        (FP32, FP32, False, True, True),
        (BF16, FP16, False, True, True),
        (BF16, BF16, True, True, False),  # the interpreter's tl.dot needs fp32 operands
    ],
)
def test_kernel_flags(g: torch.dtype, x: torch.dtype, interpreting: bool, upcast: bool, ieee: bool) -> None:
    from loraga_fast.ops._accumulate_triton import kernel_flags

    assert kernel_flags(g, x, interpreting) == {"UPCAST": upcast, "IEEE": ieee}

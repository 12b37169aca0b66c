"""One dispatch policy and one table for every op: which backend runs, for any device, dtype pair and environment,
and every op reaching its implementation through them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraga_fast.ops import (
    accumulate,
    accumulate_ref,
    accumulate_triton,
    batched_rsvd,
    compress_update,
    factors_from_sketch,
    merge_update,
    orthonormalize,
    probe_accumulate,
    sketch_accumulate,
)
from loraga_fast.ops._dispatch import (
    BACKEND_ENV,
    IMPLS,
    backends,
    choose,
    implementation,
    register_impl,
    registered_ops,
    select_backend,
)
from tests._helpers import use_backend

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
    with pytest.raises(RuntimeError, match=r"pip install 'loraga_fast\[cuda\]'"):
        choose("op", "cuda", (BF16,), requested="triton", interpreter=False, triton_installed=False)


def test_a_cuda_run_without_triton_is_told_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """triton is the [cuda] extra, not a dependency: a bf16 CUDA run without it says so (once), and still runs."""
    from loraga_fast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_WARNED_WITHOUT_TRITON", set())
    with pytest.warns(RuntimeWarning, match=r"triton is not installed, so 'acc' on low-precision CUDA tensors runs "
                                            r"the plain-torch path .*pip install 'loraga_fast\[cuda\]'") as record:
        for _ in range(3):
            assert choose("acc", "cuda", (BF16,), requested="auto", interpreter=False, triton_installed=False) == "torch"
    assert len(record) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: CPU, fp32 on CUDA (no kernel would run), triton present
        assert choose("other", "cpu", (BF16,), requested="auto", interpreter=False, triton_installed=False) == "torch"
        assert choose("other", "cuda", (FP32,), requested="auto", interpreter=False, triton_installed=False) == "torch"
        assert choose("other", "cuda", (BF16,), requested="auto", interpreter=False, triton_installed=True) == "triton"


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
    kernel_module = importlib.import_module("loraga_fast.ops._accumulate_triton")
    sketch_module = importlib.import_module("loraga_fast.ops.sketch")

    launches: list[int] = []
    real = kernel_module.accumulate_triton

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        launches.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setitem(IMPLS, ("accumulate", "triton"), spy)
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


# ---- the one table ---------------------------------------------------------------------------------------------

KERNELS = {"accumulate", "sketch_accumulate"}  # the ops with a Triton implementation


def _calls() -> dict[str, Callable[[], Any]]:
    """One call of each public op (bf16 tokens, so that the auto policy under the interpreter picks Triton too)."""
    g, x = torch.randn(9, 6, dtype=BF16), torch.randn(9, 5, dtype=BF16)
    return {
        "accumulate": lambda: accumulate(torch.zeros(6, 5), g, x),
        "sketch_accumulate": lambda: sketch_accumulate(torch.zeros(6, 3), g, x, torch.randn(5, 3)),
        "probe_accumulate": lambda: probe_accumulate(torch.zeros(2, 2), g, x, torch.randn(6, 2), torch.randn(5, 2)),
        "factors_from_sketch": lambda: factors_from_sketch(torch.linalg.qr(torch.randn(2, 8, 3)).Q, torch.randn(2, 6, 3), 2),
        "batched_rsvd": lambda: batched_rsvd(torch.randn(2, 8, 6), 2),
        "orthonormalize": lambda: orthonormalize(torch.randn(2, 8, 3)),
        "compress_update": lambda: compress_update(g, x, torch.randn(5, 2)),
        "merge_update": lambda: merge_update(torch.zeros(6, 2), torch.zeros(2), torch.zeros(5, 2), torch.randn(6, 1),
                                             torch.randn(5, 1)),
    }


def test_every_op_has_a_torch_entry_and_its_kernel_a_triton_one() -> None:
    assert set(registered_ops()) == set(_calls())
    for op in registered_ops():
        assert backends(op) == (("torch", "triton") if op in KERNELS else ("torch",)), op
    assert implementation("accumulate", "triton") is accumulate_triton
    assert set(IMPLS) == {(op, b) for op in registered_ops() for b in backends(op)}


def test_table_rejects_duplicates_unknown_backends_and_missing_entries() -> None:
    with pytest.raises(ValueError, match="already has a torch implementation"):
        register_impl("accumulate", "torch", accumulate_ref)
    with pytest.raises(ValueError, match="not one of"):
        register_impl("new_op", "cuda", accumulate_ref)
    with pytest.raises(LookupError, match="no triton implementation of 'orthonormalize'"):
        implementation("orthonormalize", "triton")
    assert ("new_op", "cuda") not in IMPLS and implementation("accumulate", "torch") is IMPLS[("accumulate", "torch")]


@pytest.mark.parametrize("requested", ["triton", "auto"])
def test_ops_without_a_kernel_run_torch_whatever_is_requested(requested: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose("op", "cuda", (BF16,), requested=requested, interpreter=False, triton_installed=True,
                  has_kernel=False) == "torch"
    monkeypatch.setenv(BACKEND_ENV, requested)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu16 = torch.zeros(2, dtype=BF16)
    assert select_backend("probe_accumulate", torch.zeros(1), cpu16, cpu16) == "torch"
    assert select_backend("sketch_accumulate", torch.zeros(1), cpu16, cpu16) == "triton"


class _RegisteredOps(TorchDispatchMode):
    """Records the ``loraga_fast`` ops that pass through the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "loraga_fast":
            self.seen.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["eager", "registered"])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("op", sorted(_calls()))
def test_every_op_runs_through_the_policy_and_the_table(op: str, backend_name: str, path: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Spies on every table entry and on select_backend: an op that picked its implementation any other way (its
    own table, a direct call of a backend, a policy of its own) would leave them silent. ``registered``: the path
    ``torch.compile`` takes (the public function calls the registered op, which must dispatch the same way)."""
    dispatch_module = importlib.import_module("loraga_fast.ops._dispatch")
    entered: list[tuple[str, str]] = []
    selected: list[tuple[str, str]] = []

    def spy(key: tuple[str, str], fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *a, **k: entered.append(key) or fn(*a, **k)

    for key, fn in list(IMPLS.items()):
        monkeypatch.setitem(IMPLS, key, spy(key, fn))
    real_select = dispatch_module.select_backend

    def select_spy(name: str, *tensors: torch.Tensor) -> str:
        selected.append((name, chosen := real_select(name, *tensors)))
        return chosen

    monkeypatch.setattr(dispatch_module, "select_backend", select_spy)
    if path == "registered":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    call = _calls()[op]
    expected = (op, backend_name if op in KERNELS else "torch")
    with use_backend(backend_name), _RegisteredOps() as mode:
        call()
    assert selected and selected[0] == expected, selected
    assert entered and entered[0] == expected, entered
    assert len(entered) == len(selected)  # every implementation that ran was chosen by the policy
    registered = {"accumulate": "accumulate_", "sketch_accumulate": "sketch_accumulate_",
                  "probe_accumulate": "probe_accumulate_"}.get(op, op)
    assert mode.seen[:1] == ([registered] if path == "registered" else []), mode.seen

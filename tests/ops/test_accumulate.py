"""The accumulate op against a float64 reference, its argument checks, and backend dispatch (its registered op:
tests/ops/test_registered_ops.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from loraga_fast.ops import accumulate, accumulate_ref
from loraga_fast.ops._dispatch import BACKEND_ENV, IMPLS, select_backend
from loraga_fast.ops.accumulate import accumulate_triton
from tests._helpers import use_backend

# (dtype, rtol on the relative Frobenius error against float64 of the same low-precision inputs)
DTYPES = [
    pytest.param(torch.float32, 1e-6, id="fp32"),
    pytest.param(torch.bfloat16, 1e-6, id="bf16"),
    pytest.param(torch.float16, 1e-6, id="fp16"),
]
SHAPES = [pytest.param(t, m, n, id=f"T{t}-M{m}-N{n}") for t, m, n in [(1, 5, 7), (63, 17, 33), (130, 64, 31)]]


def _inputs(t: int, m: int, n: int, dtype: torch.dtype, strided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if strided:  # 3-D activations seen through non-contiguous views
        g = torch.randn(2 * m + 1, t, dtype=dtype).t()[:, 1 : 2 * m + 1 : 2]
        x = torch.randn(t, 3, 2 * n, dtype=dtype)[:, 1, ::2]
        assert not g.is_contiguous() and not x.is_contiguous()
    else:
        g = torch.randn(t, m, dtype=dtype)
        x = torch.randn(t, n, dtype=dtype)
    return g, x


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("t,m,n", SHAPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_matches_float64(backend: str, dtype: torch.dtype, rtol: float, t: int, m: int, n: int, strided: bool, transposed: bool) -> None:
    start = torch.randn((n, m) if transposed else (m, n))
    acc = start.clone()
    expected = start.double()
    for _ in range(3):  # accumulation over several calls into a non-zero accumulator
        g, x = _inputs(t, m, n, dtype, strided)
        accumulate(acc, g, x, transposed=transposed)
        prod = g.double().t() @ x.double()
        expected += prod.t() if transposed else prod
    err = ((acc.double() - expected).norm() / expected.norm()).item()
    assert err < rtol, err


def test_leading_dims_flattened(backend: str) -> None:
    g = torch.randn(2, 3, 4, 5)
    x = torch.randn(2, 3, 4, 6)
    acc = torch.zeros(5, 6)
    accumulate(acc, g, x)
    torch.testing.assert_close(acc, g.reshape(-1, 5).t() @ x.reshape(-1, 6))


def test_writes_through_strided_accumulator_view(backend: str) -> None:
    big = torch.zeros(3, 4, 5)
    g, x = torch.randn(7, 4), torch.randn(7, 5)
    accumulate(big[1], g, x)
    torch.testing.assert_close(big[1], g.t() @ x)
    assert big[0].abs().sum() == 0 and big[2].abs().sum() == 0


def test_deterministic(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit-reproducible through the public op, into a non-zero accumulator (where the order of the additions shows
    in the bits), and right (float64), so a no-op cannot pass. On the Triton backend the token-split path is forced
    (on CPU the heuristic never splits): the result must then be the documented fixed-order reduction,
    ``start + (p0 + p1 + p2)`` with each ``p_i`` the kernel on split ``i``'s tokens alone, which differs in the bits
    from adding the partials into ``acc`` one by one as atomics would."""
    t, m, n, splits = 130, 33, 17, 3
    g, x = torch.randn(t, m, dtype=torch.bfloat16), torch.randn(t, n, dtype=torch.bfloat16)
    start = torch.randn(m, n)
    if backend == "triton":
        kernel_module = importlib.import_module("loraga_fast.ops._accumulate_triton")
        monkeypatch.setattr(kernel_module, "_split_count", lambda *args: splits)
    runs = [accumulate(start.clone(), g, x) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    expected = start.double() + g.double().t() @ x.double()
    assert ((runs[0].double() - expected).norm() / expected.norm()).item() < 1e-6
    if backend == "triton":
        from loraga_fast.ops._accumulate_triton import INTERPRETER_CONFIG

        block = INTERPRETER_CONFIG.block_k
        per = -(-(-(-t // splits)) // block) * block  # the launcher's tokens per split (whole K blocks)
        bounds = range(0, t, per)
        assert len(bounds) == splits
        partials = [accumulate_triton(torch.zeros(m, n), g[s : s + per], x[s : s + per], split_t=1) for s in bounds]
        assert torch.equal(runs[0], start + torch.stack(partials).sum(0))
        one_by_one = start.clone()
        for p in partials:
            one_by_one += p
        assert not torch.equal(one_by_one, runs[0])  # the check above can tell the two orders apart


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("split_t", [1, 2, 5])
def test_triton_token_splits(transposed: bool, split_t: int) -> None:
    """Split-T partials reduce in a fixed order: exact against float64 and bit-identical across runs."""
    with use_backend("triton"):
        g, x = torch.randn(130, 40, dtype=torch.bfloat16), torch.randn(130, 3, 50, dtype=torch.bfloat16)[:, 1]
        shape = (50, 40) if transposed else (40, 50)
        start = torch.randn(shape)
        a, b = start.clone(), start.clone()
        accumulate_triton(a, g, x, transposed=transposed, split_t=split_t)
        accumulate_triton(b, g, x, transposed=transposed, split_t=split_t)
    prod = g.double().t() @ x.double()
    expected = start.double() + (prod.t() if transposed else prod)
    assert torch.equal(a, b)
    assert ((a.double() - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_triton_partial_last_tile_group_mixed_and_strided(transposed: bool) -> None:
    """The interpreter counterpart of the CUDA 7B-shape tests: M = 11 tiles of 32 rows, GROUP_M = 4 (11 % 4 != 0: the
    last group of tiles is partial), N not a multiple of the block, a mixed bf16/fp32 pair read through strides."""
    from loraga_fast.ops._accumulate_triton import INTERPRETER_CONFIG

    m, n, t = 11 * INTERPRETER_CONFIG.block_m, 3 * INTERPRETER_CONFIG.block_n + 5, 70
    assert (m // INTERPRETER_CONFIG.block_m) % INTERPRETER_CONFIG.group_m != 0
    g = torch.randn(t, 2 * m, dtype=torch.bfloat16)[:, ::2]
    x = torch.randn(n, t).t()  # fp32, transposed strides
    start = torch.randn((n, m) if transposed else (m, n))
    with use_backend("triton"):
        a = accumulate(start.clone(), g, x, transposed=transposed)
        b = accumulate(start.clone(), g, x, transposed=transposed)
    prod = g.double().t() @ x.double()
    expected = start.double() + (prod.t() if transposed else prod)
    assert torch.equal(a, b)
    assert ((a.double() - expected).norm() / expected.norm()).item() < 1e-6


def test_triton_never_reads_outside_the_accumulator() -> None:
    """A NaN-filled buffer around a zeroed accumulator view stays NaN: no read or write past the view."""
    with use_backend("triton"):
        buf = torch.full((3, 40, 50), float("nan"))
        buf[1] = 0
        g, x = torch.randn(63, 40), torch.randn(63, 50)
        accumulate(buf[1], g, x)
    torch.testing.assert_close(buf[1], g.t() @ x, rtol=1e-5, atol=1e-5)
    assert buf[0].isnan().all() and buf[2].isnan().all()


@pytest.mark.parametrize(
    "acc,g,x,err",
    [
        (torch.zeros(4, 5, dtype=torch.bfloat16), torch.randn(3, 4), torch.randn(3, 5), TypeError),
        (torch.zeros(5, 4), torch.randn(3, 4), torch.randn(3, 5), ValueError),
        (torch.zeros(4, 5), torch.randn(3, 4), torch.randn(2, 5), ValueError),
        (torch.zeros(1, 4, 5), torch.randn(3, 4), torch.randn(3, 5), ValueError),
        (torch.zeros(4, 5), torch.randint(0, 3, (3, 4)), torch.randn(3, 5), TypeError),
    ],
    ids=["bf16-acc", "wrong-shape", "token-mismatch", "3d-acc", "int-input"],
)
def test_rejects_bad_arguments(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor, err: type[Exception]) -> None:
    with pytest.raises(err, match="accumulate"):
        accumulate(acc, g, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_path_is_the_torch_backend_and_exact(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the interpreter, CPU tensors take the torch path (the policy), and it is exact against float64."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g, x = torch.randn(301, 40, dtype=dtype), torch.randn(301, 24, dtype=dtype)
    assert select_backend("accumulate", torch.zeros(1), g, x) == "torch"
    acc = torch.zeros(40, 24)
    accumulate(acc, g, x)
    expected = g.double().t() @ x.double()
    assert ((acc.double() - expected).norm() / expected.norm()).item() < 1e-6


def test_cpu_bf16_path_is_exact_and_restores_the_matmul_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "torch")
    mode = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    g, x = torch.randn(200, 96, dtype=torch.bfloat16), torch.randn(200, 80, dtype=torch.bfloat16)
    a, b = torch.zeros(96, 80), torch.zeros(96, 80)
    accumulate(a, g, x)
    accumulate_ref(b, g, x)
    expected = g.double().t() @ x.double()
    assert ((a.double() - expected).norm() / expected.norm()).item() < 1e-6
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    assert getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == mode
    # and fp32 GEMMs outside the op keep full precision
    p, q = torch.randn(64, 64), torch.randn(64, 64)
    torch.testing.assert_close((p @ q).double(), p.double() @ q.double(), rtol=1e-5, atol=1e-5)


def test_forced_triton_backend_runs_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setitem(IMPLS, ("accumulate", "triton"), lambda *a, **k: calls.append(1) or accumulate_triton(*a, **k))
    with use_backend("triton"):
        accumulate(torch.zeros(4, 3), torch.randn(5, 4), torch.randn(5, 3))
    assert calls == [1]

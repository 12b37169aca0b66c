"""Every op registered with ``torch.library`` (``torch.ops.loraga_fast.*``): ``opcheck`` (schema and mutation,
fake implementation against the real outputs' shapes and strides, autograd registration, AOT dispatch), the
registered op giving the same bits as the eager public function, and ``torch.compile`` seeing one opaque op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from loraga_fast.ops import (
    accumulate,
    accumulate_ref,
    batched_rsvd,
    compress_update,
    compress_update_ref,
    factors_from_sketch,
    factors_from_sketch_ref,
    merge_update,
    merge_update_ref,
    orthonormalize,
    probe_accumulate,
    sketch_accumulate,
    sketch_accumulate_ref,
)
from loraga_fast.ops._dispatch import registered_ops
from tests._helpers import rel_err

OPS = torch.ops.loraga_fast
# the registered op of each op in the dispatch table
REGISTERED = {
    "accumulate": "accumulate_",
    "sketch_accumulate": "sketch_accumulate_",
    "probe_accumulate": "probe_accumulate_",
    "factors_from_sketch": "factors_from_sketch",
    "batched_rsvd": "batched_rsvd",
    "orthonormalize": "orthonormalize",
    "compress_update": "compress_update",
    "merge_update": "merge_update",
}
TOKEN_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
LINALG_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


def _same(a: Any, b: Any) -> bool:
    """Bitwise equal, with the same shapes and strides (tensors or tuples of them)."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) and a.stride() == b.stride()


def _tokens(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``G (2, 5, 16)`` and ``X (2, 5, 8)``: leading (token) dimensions the ops flatten, an odd token count."""
    return torch.randn(2, 5, 16).to(dtype), torch.randn(2, 5, 8).to(dtype)


def _check(op: str, args: tuple[Any, ...]) -> None:
    """``opcheck`` on fresh copies of ``args`` (it mutates in-place arguments)."""
    torch.library.opcheck(getattr(OPS, op).default, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))


def test_every_registered_op_is_in_the_table_and_checked_here() -> None:
    assert set(REGISTERED) == set(registered_ops())
    assert set(REGISTERED.values()) == set(OPS)  # nothing registered under loraga_fast that this file misses


# ---- the in-place ops, on both backends (Triton through the interpreter) -------------------------------------


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", TOKEN_DTYPES)
def test_accumulate_(backend: str, dtype: torch.dtype, transposed: bool) -> None:
    g, x = _tokens(dtype)
    start = torch.randn((8, 16) if transposed else (16, 8))
    _check("accumulate_", (start, g, x, transposed))
    acc = start.clone()
    OPS.accumulate_(acc, g, x, transposed)
    assert torch.equal(acc, accumulate(start.clone(), g, x, transposed=transposed))
    assert rel_err(acc, accumulate_ref(start.double(), g.double(), x.double(), transposed=transposed)) < 1e-6


@pytest.mark.parametrize("adjoint", [False, True], ids=["A-B", "At-B"])
@pytest.mark.parametrize("dtype", TOKEN_DTYPES)
def test_sketch_accumulate_(backend: str, dtype: torch.dtype, adjoint: bool) -> None:
    g, x = _tokens(dtype)
    left, right = (x, g) if adjoint else (g, x)  # A^T B = X^T (G B), A B = G^T (X B)
    basis = torch.randn(right.shape[-1], 3)
    start = torch.randn(left.shape[-1], 3)
    _check("sketch_accumulate_", (start, left, right, basis))
    acc = start.clone()
    OPS.sketch_accumulate_(acc, left, right, basis)
    assert torch.equal(acc, sketch_accumulate(start.clone(), left, right, basis))
    expected = start.double() + left.double().reshape(-1, left.shape[-1]).T @ right.double().reshape(-1, right.shape[-1]) @ basis.double()
    assert rel_err(acc, expected) < 5e-6
    assert rel_err(acc, sketch_accumulate_ref(start.clone(), left, right, basis)) < 5e-6


@pytest.mark.parametrize("adjoint", [False, True], ids=["A", "At"])
@pytest.mark.parametrize("dtype,rtol", [pytest.param(torch.float32, 5e-6, id="fp32"), pytest.param(torch.bfloat16, 2e-2, id="bf16")])
def test_probe_accumulate_(backend: str, dtype: torch.dtype, rtol: float, adjoint: bool) -> None:
    g, x = _tokens(dtype)
    left, right = (x, g) if adjoint else (g, x)
    probe_left, probe_right = torch.randn(left.shape[-1], 3), torch.randn(right.shape[-1], 4)
    start = torch.randn(3, 4)
    _check("probe_accumulate_", (start, left, right, probe_left, probe_right))
    acc = start.clone()
    OPS.probe_accumulate_(acc, left, right, probe_left, probe_right)
    assert torch.equal(acc, probe_accumulate(start.clone(), left, right, probe_left, probe_right))
    dense = left.double().reshape(-1, left.shape[-1]).T @ right.double().reshape(-1, right.shape[-1])
    # the probes are cast to the operands' dtype (a bf16 fingerprint is bf16-accurate)
    assert rel_err(acc - start, probe_left.double().T @ dense @ probe_right.double()) < rtol


# ---- the functional ops (torch only) ---------------------------------------------------------------------------


@pytest.mark.parametrize("m,k", [(50, 6), (50, 12), (50, 20), (7, 10)], ids=["k<K", "k=K", "k>K", "M<K"])
@pytest.mark.parametrize("dtype", LINALG_DTYPES)
def test_factors_from_sketch(dtype: torch.dtype, m: int, k: int) -> None:
    basis = torch.linalg.qr(torch.randn(2, 30, 12, dtype=dtype)).Q
    product = torch.randn(2, m, 12, dtype=dtype)
    _check("factors_from_sketch", (basis, product, k))
    out = OPS.factors_from_sketch(basis, product, k)
    assert _same(out, factors_from_sketch(basis, product, k))
    kk = min(k, m, 12)
    assert [t.shape for t in out] == [(2, m, kk), (2, kk), (2, 30, kk)]
    # (the dense reference has rank K, so its values past K are ~0: compared on the first min(k, M, K))
    torch.testing.assert_close(out[1].double(), factors_from_sketch_ref(basis, product, k)[1][:, :kk], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,n,q", [(30, 20, 8), (20, 30, 8), (20, 20, 20)], ids=["tall", "wide", "q=min"])
@pytest.mark.parametrize("dtype", LINALG_DTYPES)
def test_batched_rsvd(dtype: torch.dtype, m: int, n: int, q: int) -> None:
    a = torch.randn(2, m, n, dtype=dtype)
    omega = torch.randn(min(m, n), q, dtype=dtype, generator=torch.Generator().manual_seed(7))
    _check("batched_rsvd", (a, omega, 4, 2))
    out = OPS.batched_rsvd(a, omega, 4, 2)
    # the public function draws exactly this test matrix from the generator and hands it to the same op
    assert _same(out, batched_rsvd(a, 4, q, 2, generator=torch.Generator().manual_seed(7)))
    assert [t.shape for t in out] == [(2, m, 4), (2, 4), (2, n, 4)]


@pytest.mark.parametrize("degenerate", [False, True], ids=["full-rank", "householder-fallback"])
@pytest.mark.parametrize("dtype", LINALG_DTYPES)
def test_orthonormalize(dtype: torch.dtype, degenerate: bool) -> None:
    y = torch.randn(3, 20, 5, dtype=dtype)
    if degenerate:  # a zero matrix and a rank-deficient one: the QR fallback writes into a copy of the result
        y[1] = 0
        y[2, :, 3] = y[2, :, 0]
    _check("orthonormalize", (y,))
    out = OPS.orthonormalize(y)
    assert _same(out, orthonormalize(y))
    torch.testing.assert_close(out.mT @ out, torch.eye(5, dtype=dtype).expand(3, 5, 5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", TOKEN_DTYPES)
def test_compress_update(dtype: torch.dtype) -> None:
    g, x = _tokens(dtype)  # 10 tokens, M = 16, N = 8
    omega = torch.randn(8, 4)
    _check("compress_update", (g, x, omega, 1))
    left, right = OPS.compress_update(g, x, omega, 0)
    assert _same((left, right), compress_update(g, x, omega))
    assert left.shape == (16, 4) and right.shape == (8, 4) and left.dtype == right.dtype == torch.float32
    torch.testing.assert_close(left.T @ left, torch.eye(4), rtol=0, atol=1e-5)
    # L R^T is the gradient projected onto range(A Omega), which a wide Omega (q = N) makes the whole gradient
    assert rel_err(left @ right.T, compress_update_ref(g.float(), x.float(), omega)) < 1e-5
    powered_l, powered_r = compress_update(g, x, omega, 1)
    assert rel_err(powered_l @ powered_r.T, compress_update_ref(g.float(), x.float(), omega, 1)) < 1e-5
    assert rel_err(powered_l @ powered_r.T, left @ right.T) > 1e-3  # another subspace: the power is applied
    full_l, full_r = compress_update(g, x, torch.randn(8, 8))
    assert rel_err(full_l @ full_r.T, g.double().reshape(-1, 16).T @ x.double().reshape(-1, 8)) < 1e-5


def _state(m: int, n: int, keep: int, filled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A running sum of rank ``filled`` held in ``keep`` columns (zeros past ``filled``, as the store starts)."""
    u, s, v = torch.zeros(m, keep), torch.zeros(keep), torch.zeros(n, keep)
    if filled:
        u[:, :filled] = torch.linalg.qr(torch.randn(m, filled)).Q
        v[:, :filled] = torch.linalg.qr(torch.randn(n, filled)).Q
        s[:filled] = torch.linspace(5, 1, filled)
    return u, s, v


@pytest.mark.parametrize("filled", [0, 3, 6], ids=["empty", "partly", "full"])
def test_merge_update(filled: int) -> None:
    u, s, v = _state(20, 12, 6, filled)
    left, right = torch.randn(20, 4), torch.randn(12, 4)
    _check("merge_update", (u, s, v, left, right))
    out = OPS.merge_update(u, s, v, left, right)
    assert _same(out, merge_update(u, s, v, left, right))
    uu, ss, vv = out
    ru, rs, rv = merge_update_ref(u, s, v, left, right)
    torch.testing.assert_close(ss.double(), rs, rtol=1e-5, atol=1e-5)
    # the same best rank-6 approximation (unique: the reference's 6th and 7th singular values differ)
    assert rel_err((uu * ss) @ vv.T, (ru * rs) @ rv.T) < 1e-5
    torch.testing.assert_close(uu.T @ uu, torch.eye(6), rtol=0, atol=1e-5)
    if filled + 4 <= 6:  # the sum has rank <= l: kept exactly
        dense = (u.double() * s.double()) @ v.double().T + left.double() @ right.double().T
        assert rel_err((uu * ss) @ vv.T, dense) < 1e-5


def test_merge_update_marks_a_non_finite_sum_instead_of_raising() -> None:
    u, s, v = _state(20, 12, 6, 3)
    left = torch.randn(20, 4)
    left[2, 1] = float("nan")
    _, ss, _ = merge_update(u, s, v, left, torch.randn(12, 4))
    assert torch.isnan(ss).all()


def test_stream_ops_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="exceeds min"):
        merge_update(*_state(5, 4, 5, 0)[:1], torch.zeros(5), torch.zeros(4, 5), torch.zeros(5, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="shapes do not match"):
        merge_update(*_state(8, 6, 3, 0), torch.zeros(8, 2), torch.zeros(6, 3))
    with pytest.raises(ValueError, match="omega must be float32"):
        compress_update(torch.zeros(3, 8), torch.zeros(3, 6), torch.zeros(5, 2))


# ---- torch.compile: one opaque op per call, the same bits as eager -----------------------------------------


def _compile_cases() -> dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]:
    g, x = torch.randn(5, 16, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    return {
        "accumulate": (lambda acc, g, x: accumulate(acc, g, x), (torch.randn(16, 8), g, x)),
        "sketch_accumulate": (sketch_accumulate, (torch.randn(8, 3), x, g, torch.randn(16, 3))),
        "probe_accumulate": (probe_accumulate, (torch.randn(3, 4), g, x, torch.randn(16, 3), torch.randn(8, 4))),
        "factors_from_sketch": (lambda b, p: factors_from_sketch(b, p, 6),
                                (torch.linalg.qr(torch.randn(2, 30, 12)).Q, torch.randn(2, 50, 12))),
        "batched_rsvd": (lambda a: batched_rsvd(a, 4), (torch.randn(2, 20, 30),)),
        "orthonormalize": (orthonormalize, (torch.randn(2, 20, 5),)),
        "compress_update": (lambda g, x, o: compress_update(g, x, o, 1), (g, x, torch.randn(8, 3))),
        "merge_update": (merge_update, (*_state(16, 8, 4, 2), torch.randn(16, 2), torch.randn(8, 2))),
    }


@pytest.mark.parametrize("op", sorted(REGISTERED))
def test_compiled_call_is_one_registered_op(op: str) -> None:
    fn, args = _compile_cases()[op]
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    eager_args = tuple(a.clone() for a in args)
    torch.manual_seed(3)
    expected = fn(*eager_args)
    torch._dynamo.reset()
    torch.manual_seed(3)
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert [s for s in seen if s.startswith("loraga_fast.")] == [f"loraga_fast.{REGISTERED[op]}"], seen
    assert _same(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(args, eager_args))  # in-place results reach the caller's tensors

"""The accumulate op on random shapes, strides and dtypes (hypothesis; skipped where it is not installed)."""

from __future__ import annotations

import pytest
import torch

from loraga_fast.ops import accumulate
from tests._helpers import BACKENDS, use_backend

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 40), m=st.integers(1, 20), n=st.integers(1, 20), transposed=st.booleans(),
    g_step=st.integers(1, 3), x_step=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_property_random_shapes_and_strides(backend_name: str, t: int, m: int, n: int, transposed: bool, g_step: int, x_step: int,
                                            dtype: torch.dtype) -> None:
    g = torch.randn(t, m * g_step, dtype=dtype)[:, ::g_step]
    x = torch.randn(t, n * x_step, dtype=dtype)[:, ::x_step]
    acc = torch.randn((n, m) if transposed else (m, n))
    expected = acc.double() + ((g.double().t() @ x.double()).t() if transposed else g.double().t() @ x.double())
    with use_backend(backend_name):
        accumulate(acc, g, x, transposed=transposed)
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-5)

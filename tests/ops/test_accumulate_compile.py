"""The accumulate kernel compiles for real GPUs, checked ahead of time without one (ptxas ships with triton)."""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraga_fast.ops.accumulate import _accumulate_kernel, _gpu_configs

_INT_ARGS = ["T", "M", "N", "T_PER_SPLIT", "T_BUCKET", "stride_gt", "stride_gm", "stride_xt", "stride_xn",
             "stride_cm", "stride_cn"]


def _compile(arch: int, dtype: str, config: triton.Config, to_partials: bool) -> object:
    signature = {"G": f"*{dtype}", "X": f"*{dtype}", "C": "*fp32", "P": "*fp32", **{n: "i32" for n in _INT_ARGS}}
    constexprs = {**{k: v for k, v in config.kwargs.items()}, "UPCAST": False, "IEEE": dtype == "fp32",
                  "TO_PARTIALS": to_partials}
    signature.update({k: "constexpr" for k in constexprs})
    names = list(signature)
    src = ASTSource(fn=triton.jit(_accumulate_kernel), signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


@pytest.mark.parametrize("arch,mma", [(90, "wgmma"), (80, "mma.sync")], ids=["hopper", "ampere"])
@pytest.mark.parametrize("to_partials", [False, True], ids=["in-place", "split-T"])
def test_bf16_kernel_compiles_to_tensor_core_code(arch: int, mma: str, to_partials: bool) -> None:
    kernel = _compile(arch, "bf16", _gpu_configs()[0], to_partials)
    assert mma in kernel.asm["ptx"]

"""The accumulate kernel compiles for real GPUs with every config of the table, checked ahead of time without one
(ptxas ships with triton). Built from a JITFunction directly, so this holds with TRITON_INTERPRET=1 set too."""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from loraga_fast.ops._accumulate_triton import (
    KernelConfig,
    _accumulate_kernel,
    default_config,
)

_INT_ARGS = ["T", "M", "N", "T_PER_SPLIT", "stride_gt", "stride_gm", "stride_xt", "stride_xn", "stride_cm", "stride_cn"]
# shared memory per block the GPUs offer (bytes): H100/H200, A100, and the ~100 KiB consumer/workstation parts
SMEM = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024}


def _compile(arch: int, g_dtype: str, x_dtype: str, config: KernelConfig, to_partials: bool) -> object:
    tensor_cores = g_dtype == x_dtype and g_dtype in ("bf16", "fp16")
    signature = {"G": f"*{g_dtype}", "X": f"*{x_dtype}", "C": "*fp32", "P": "*fp32", **{n: "i32" for n in _INT_ARGS}}
    constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "GROUP_M": config.group_m, "UPCAST": not tensor_cores, "IEEE": not tensor_cores,
                  "TO_PARTIALS": to_partials, "T_STATIC": 0}
    signature.update({k: "constexpr" for k in constexprs})
    names = list(signature)
    src = ASTSource(fn=JITFunction(_accumulate_kernel), signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


@pytest.mark.parametrize("arch,mma", [(90, "wgmma"), (80, "mma.sync")], ids=["hopper", "ampere"])
@pytest.mark.parametrize("to_partials", [False, True], ids=["in-place", "split-T"])
def test_bf16_kernel_compiles_to_tensor_core_code(arch: int, mma: str, to_partials: bool) -> None:
    kernel = _compile(arch, "bf16", "bf16", default_config((arch // 10, arch % 10), True, "large"), to_partials)
    assert mma in kernel.asm["ptx"]


@pytest.mark.parametrize("arch", [90, 80, 86])
@pytest.mark.parametrize("dtypes", [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32")],
                         ids=["bf16", "fp16", "fp32", "mixed"])
@pytest.mark.parametrize("shape", ["large", "medium", "small"])
def test_every_table_config_compiles_and_fits_shared_memory(arch: int, dtypes: tuple[str, str], shape: str) -> None:
    tensor_cores = dtypes[0] == dtypes[1] != "fp32"
    config = default_config((arch // 10, arch % 10), tensor_cores, shape)
    kernel = _compile(arch, *dtypes, config, to_partials=False)
    assert kernel.metadata.shared <= SMEM[arch], (config, kernel.metadata.shared)
    if not tensor_cores:  # IEEE fp32: no TF32 tensor-core instruction anywhere
        assert "tf32" not in kernel.asm["ptx"]

"""Accumulate-kernel benchmark: ``C_fp32 += G^T X`` over LLaMA-7B layer shapes.

Compared, in the same process, with the alternatives a user has:

* ``loraga_fast`` -- :func:`loraga_fast.ops.accumulate` (the Triton kernel on CUDA, the torch path on CPU);
* ``autograd`` -- what autograd does for a weight gradient: ``dW = G^T @ X`` in the input dtype (bf16), then an
  add into a gradient buffer of that dtype (PEFT's path; note it accumulates in bf16);
* ``addmm_fp32`` -- ``torch.addmm(C, G^T, X, out_dtype=torch.float32)`` (cuBLAS with fp32 output), where this
  torch build supports it (CUDA only); otherwise reported as unsupported;
* ``torch_ref`` -- :func:`loraga_fast.ops.accumulate_ref` (upcast to fp32, then one ``addmm_``).

Reported per case: median time, TFLOP/s (``2 T M N / t``) and the ratio of ``loraga_fast`` to each alternative.
Shapes are ``(M, N)`` in ``{4096x4096, 11008x4096, 4096x11008}`` with ``T`` in ``{2048, 8192}`` (bf16) on CUDA;
on CPU the ``cpu`` preset uses the same aspect ratios scaled down so a run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loraga_fast.ops import accumulate, accumulate_ref

SHAPES = {
    "llama-7b": [(t, m, n) for t in (2048, 8192) for m, n in ((4096, 4096), (11008, 4096), (4096, 11008))],
    "cpu": [(t, m, n) for t in (512,) for m, n in ((1024, 1024), (2752, 1024), (1024, 2752))],
    "tiny": [(64, 96, 64)],
}
IMPLS = ("loraga_fast", "autograd", "addmm_fp32", "torch_ref")


@dataclass
class KernelResult:
    impl: str
    t: int
    m: int
    n: int
    dtype: str
    device: str
    time_ms: float | None
    tflops: float | None
    note: str = ""


def _make(impl: str, t: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> Callable[[], object] | str:
    """A zero-argument callable doing one accumulation, or a string saying why ``impl`` is unsupported here."""
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(t, m, dtype=dtype, device=device, generator=gen)
    x = torch.randn(t, n, dtype=dtype, device=device, generator=gen)
    c = torch.zeros(m, n, dtype=torch.float32, device=device)
    if impl == "loraga_fast":
        return lambda: accumulate(c, g, x)
    if impl == "torch_ref":
        return lambda: accumulate_ref(c, g, x)
    if impl == "autograd":
        grad = torch.zeros(m, n, dtype=dtype, device=device)
        return lambda: grad.add_(g.t() @ x)
    if impl == "addmm_fp32":
        if device.type != "cuda":
            return "out_dtype addmm is CUDA-only"
        try:
            torch.addmm(c, g.t(), x, out_dtype=torch.float32)
        except (RuntimeError, TypeError) as err:  # older torch: no out_dtype overload
            return f"unsupported by torch {torch.__version__}: {str(err).splitlines()[0][:80]}"
        return lambda: c.copy_(torch.addmm(c, g.t(), x, out_dtype=torch.float32))
    raise ValueError(impl)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(preset: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, repeats: int = 5,
        impls: tuple[str, ...] = IMPLS) -> list[KernelResult]:
    results = []
    for t, m, n in SHAPES[preset]:
        for impl in impls:
            fn = _make(impl, t, m, n, dtype, device)
            if isinstance(fn, str):
                results.append(KernelResult(impl, t, m, n, str(dtype), str(device), None, None, fn))
                continue
            ms = _time_ms(fn, device, repeats)
            results.append(KernelResult(impl, t, m, n, str(dtype), str(device), ms, 2 * t * m * n / (ms * 1e-3) / 1e12))
            del fn
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def table(results: list[KernelResult]) -> str:
    lines = [f"{'T':>6} {'M':>6} {'N':>6} {'impl':<12} {'ms':>9} {'TFLOP/s':>8} {'ours/impl time':>15}  note"]
    by_case: dict[tuple[int, int, int], dict[str, KernelResult]] = {}
    for r in results:
        by_case.setdefault((r.t, r.m, r.n), {})[r.impl] = r
    for (t, m, n), rows in by_case.items():
        ours = rows.get("loraga_fast")
        for impl, r in rows.items():
            ratio = ""
            if ours and ours.time_ms and r.time_ms and impl != "loraga_fast":
                ratio = f"{ours.time_ms / r.time_ms:.2f}"
            ms = f"{r.time_ms:.3f}" if r.time_ms is not None else "n/a"
            tf = f"{r.tflops:.1f}" if r.tflops is not None else "n/a"
            lines.append(f"{t:>6} {m:>6} {n:>6} {impl:<12} {ms:>9} {tf:>8} {ratio:>15}  {r.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default=None,
                        help="shapes (default: llama-7b on CUDA, cpu otherwise)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("llama-7b" if device.type == "cuda" else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    results = run(preset, device, dtype, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"accumulate kernel, {preset}, {args.dtype}, {name}, torch {torch.__version__}")
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"preset": preset, "device": name, "results": [asdict(r) for r in results]}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

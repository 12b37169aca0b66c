"""The ``kernels`` suite: the accumulate kernel ``C_fp32 += G^T X`` at LLaMA-7B layer shapes vs cuBLAS and
autograd's bf16 GEMM.

Per case, in one process,

* ``ours`` -- :func:`loraga_fast.ops.accumulate` (the Triton kernel on CUDA with the library's config table; the
  torch path on CPU, or the Triton interpreter under ``TRITON_INTERPRET=1``);
* ``cublas`` -- ``torch.addmm(C, G^T, X, out_dtype=torch.float32)`` (cuBLAS, fp32 output, bf16 inputs) where the
  torch build has it. A build whose ``addmm(out_dtype=)`` rejects an fp32 ``C`` is timed with
  ``torch.mm(G^T, X, out_dtype=torch.float32)`` instead (same GEMM, no add; the row says so); a build with neither
  (CPU) is reported as unsupported;
* ``autograd`` -- autograd's weight-gradient GEMM, ``G^T @ X`` in bf16 (bf16 output: what peft accumulates).

Reported per case: median time (``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on CPU), achieved
TFLOP/s (``2 T M N / t``), ours/alternative time ratios, the relative Frobenius error of each result against a
float64 ``G^T X``, and whether two runs of ours are bit-identical. Cases (``--preset llama-7b``): ``T`` in {2048,
4096} x ``M x N`` in {4096x4096, 11008x4096, 4096x11008}, plus the transposed (``Conv1D``) layout at T = 4096,
11008x4096 (``C`` is ``N x M``, ``C += X^T G``). ``cpu`` has the same aspect ratios scaled down, ``tiny`` runs in
seconds (also under the interpreter).

Tuning (``loraga-fast bench kernels --tune``) is :mod:`loraga_fast.bench.tuning`.

    loraga-fast bench kernels                             # llama-7b on CUDA, cpu otherwise
    loraga-fast bench kernels --preset tiny
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..ops import accumulate
from ..ops._accumulate_triton import INTERPRETER_CONFIG, config_dict, kernel_config, shape_class
from ..ops._dispatch import LOW_PRECISION, interpreter_enabled, select_backend
from .harness import num, result_path, suite_parser, tflops_text, write_json
from .plots import kernel_names
from .timing import environment, first_line, rel_err, sync, tflops, time_ms
from .workloads import resolve_device

__all__ = ["DTYPES", "IMPLS", "SHAPES", "Case", "KernelResult", "case_summary", "main", "make_call", "run",
           "run_case", "table"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("ours", "cublas", "autograd")


@dataclass(frozen=True)
class Case:
    """``C (M x N) += G^T X`` with ``G (T x M)``, ``X (T x N)``; ``transposed``: ``C (N x M) += X^T G``."""

    t: int
    m: int
    n: int
    transposed: bool = False

    @property
    def label(self) -> str:
        return f"T{self.t} {self.m}x{self.n}" + (" conv1d" if self.transposed else "")

    @property
    def flop(self) -> int:
        return 2 * self.t * self.m * self.n


_LLAMA_MN = ((4096, 4096), (11008, 4096), (4096, 11008))
SHAPES: dict[str, list[Case]] = {
    "llama-7b": [Case(t, m, n) for t in (2048, 4096) for m, n in _LLAMA_MN] + [Case(4096, 11008, 4096, True)],
    "cpu": [Case(512, m, n) for m, n in ((1024, 1024), (2752, 1024), (1024, 2752))] + [Case(512, 2752, 1024, True)],
    "tiny": [Case(64, 96, 64), Case(64, 96, 64, True)],
}

@dataclass
class KernelResult:
    """One implementation on one case."""

    impl: str
    t: int
    m: int
    n: int
    transposed: bool
    dtype: str
    device: str
    time_ms: float | None
    tflops: float | None
    rel_err: float | None = None
    deterministic: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- benchmark


def _operands(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    g = torch.randn(case.t, case.m, dtype=torch.float32, device=device, generator=gen).to(dtype)
    x = torch.randn(case.t, case.n, dtype=torch.float32, device=device, generator=gen).to(dtype)
    return g, x


def _cublas(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[Callable[[], torch.Tensor] | None, str]:
    """The cuBLAS fp32-output GEMM for ``C + A^T B``: ``(callable, note)``, or ``(None, why not)``."""
    try:
        torch.addmm(c, a.t(), b, out_dtype=torch.float32)
        return (lambda: torch.addmm(c, a.t(), b, out_dtype=torch.float32)), ""
    except (RuntimeError, TypeError) as err:  # NotImplementedError is a RuntimeError
        first = first_line(err)
    try:  # e.g. a build whose addmm(out_dtype=) wants C in the input dtype: the same GEMM without the add
        torch.mm(a.t(), b, out_dtype=torch.float32)
        return (lambda: torch.mm(a.t(), b, out_dtype=torch.float32)), f"torch.mm(out_dtype=fp32), no add: addmm said {first}"
    except (RuntimeError, TypeError):
        return None, f"unsupported by torch {torch.__version__} on {c.device.type}: {first}"



def _ours_info(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor, case: Case) -> dict[str, Any]:
    """Which backend and kernel config :func:`accumulate` uses for this case."""
    backend = select_backend("accumulate", acc, g, x)
    info: dict[str, Any] = {"backend": backend}
    if backend == "triton":
        tensor_cores = g.dtype == x.dtype and g.dtype in LOW_PRECISION
        cfg = INTERPRETER_CONFIG if interpreter_enabled() else kernel_config(acc.device, tensor_cores, case.m, case.n)
        info["config"] = config_dict(cfg)
        info["shape_class"] = shape_class(case.m, case.n)
    return info


def make_call(impl: str, case: Case, dtype: torch.dtype, device: torch.device) -> Callable[[], object] | str:
    """A zero-argument callable doing one ``impl`` call on ``case`` (fresh operands), or why ``impl`` is
    unsupported here (the pytest-benchmark suite's entry point)."""
    g, x = _operands(case, dtype, device)
    a, b = (x, g) if case.transposed else (g, x)
    c = torch.zeros((case.n, case.m) if case.transposed else (case.m, case.n), dtype=torch.float32, device=device)
    if impl == "ours":
        return lambda: accumulate(c, g, x, transposed=case.transposed)
    if impl == "cublas":
        fn, note = _cublas(a, b, c)
        return note if fn is None else fn
    if impl == "autograd":
        return lambda: a.t() @ b
    raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")


def run_case(case: Case, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> list[KernelResult]:
    """Time and check every implementation on one case."""
    g, x = _operands(case, dtype, device)
    a, b = (x, g) if case.transposed else (g, x)  # the product is A^T B, of C's shape
    ref = a.double().t() @ b.double()
    shape = (case.n, case.m) if case.transposed else (case.m, case.n)

    def row(impl: str, ms: float | None, **kw: Any) -> KernelResult:
        return KernelResult(impl, case.t, case.m, case.n, case.transposed, str(dtype).replace("torch.", ""),
                            str(device), ms, tflops(case.flop, ms), **kw)

    rows = []
    # ours: correctness and bit-identity on fresh accumulators, then the timing
    runs = []
    for _ in range(2):
        acc = torch.zeros(shape, dtype=torch.float32, device=device)
        accumulate(acc, g, x, transposed=case.transposed)
        runs.append(acc)
    sync(device)
    err, same = rel_err(runs[0], ref), bool(torch.equal(runs[0], runs[1]))
    info = _ours_info(runs[0], g, x, case)
    del runs
    acc = torch.zeros(shape, dtype=torch.float32, device=device)
    ms = time_ms(lambda: accumulate(acc, g, x, transposed=case.transposed), device, repeats)
    rows.append(row("ours", ms, rel_err=err, deterministic=same, extra=info))

    c = torch.zeros(shape, dtype=torch.float32, device=device)
    fn, note = _cublas(a, b, c)
    if fn is None:
        rows.append(row("cublas", None, note=note))
    else:
        err = rel_err(fn(), ref)
        rows.append(row("cublas", time_ms(fn, device, repeats), rel_err=err, note=note))

    def autograd_gemm() -> torch.Tensor:
        return a.t() @ b

    rows.append(row("autograd", time_ms(autograd_gemm, device, repeats), rel_err=rel_err(autograd_gemm(), ref),
                    note=f"{str(dtype).replace('torch.', '')} output"))
    return rows


def case_summary(rows: list[KernelResult]) -> dict[str, Any]:
    """One case's figures in one flat dict (the JSON's ``cases`` and the summary table)."""
    by = {r.impl: r for r in rows}
    ours = by["ours"]
    out: dict[str, Any] = {"t": ours.t, "m": ours.m, "n": ours.n, "transposed": ours.transposed,
                           "label": Case(ours.t, ours.m, ours.n, ours.transposed).label,
                           "deterministic": ours.deterministic, **{k: v for k, v in ours.extra.items()}}
    for impl in IMPLS:
        r = by.get(impl)
        out[f"{impl}_ms"] = r.time_ms if r else None
        out[f"{impl}_tflops"] = r.tflops if r else None
        out[f"{impl}_rel_err"] = r.rel_err if r else None
        if impl != "ours":
            out[f"ours_over_{impl}_time"] = ours.time_ms / r.time_ms if r and r.time_ms and ours.time_ms else None
    return out


def run(preset: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, repeats: int = 5) -> list[KernelResult]:
    results = []
    for case in SHAPES[preset]:
        results += run_case(case, dtype, device, repeats)
        if device.type == "cuda":  # the case's tensors are gone: hand their blocks back before the next shapes
            torch.cuda.empty_cache()
    return results


def table(cases: list[dict[str, Any]], dtype: str = "bf16") -> str:
    """Per case: time and TFLOP/s of each implementation, ours/alternative time, errors vs float64, bit-identity
    (the ``autograd`` columns are named by ``dtype``, as the plot's legend: :func:`~.plots.kernel_names`)."""
    d = kernel_names(dtype)["autograd"]
    head = (f"{'case':<24} {'ours ms':>8} {'TF/s':>6} {'cuBLAS ms':>9} {'TF/s':>6} {d + ' ms':>8} {'TF/s':>6} "
            f"{'ours/cuBLAS':>11} {'ours/' + d:>9} {'err ours':>9} {'err cuBLAS':>10} {'err ' + d:>9} {'same':>5}")
    lines = [head]
    for c in cases:
        lines.append(
            f"{c['label']:<24} {num(c['ours_ms'], '.3f'):>8} {tflops_text(c['ours_tflops']):>6} "
            f"{num(c['cublas_ms'], '.3f'):>9} {tflops_text(c['cublas_tflops']):>6} "
            f"{num(c['autograd_ms'], '.3f'):>8} {tflops_text(c['autograd_tflops']):>6} "
            f"{num(c['ours_over_cublas_time'], '.2f'):>11} {num(c['ours_over_autograd_time'], '.2f'):>9} "
            f"{num(c['ours_rel_err'], '.1e'):>9} {num(c['cublas_rel_err'], '.1e'):>10} "
            f"{num(c['autograd_rel_err'], '.1e'):>9} {('yes' if c['deterministic'] else 'NO'):>5}"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("kernels", __doc__)
    parser.add_argument("--preset", choices=sorted(SHAPES), default=None,
                        help="cases (default: llama-7b on CUDA, cpu otherwise)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement on CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", type=Path, default=result_path(None, "kernels"),
                        help="results file (default %(default)s)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    preset = args.preset or ("llama-7b" if device.type == "cuda" else "cpu")
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    results = run(preset, device, dtype, args.repeats)
    cases = [case_summary([r for r in results if (r.t, r.m, r.n, r.transposed) == (c.t, c.m, c.n, c.transposed)])
             for c in SHAPES[preset]]
    env = environment(device)
    print(f"accumulate C_fp32 += G^T X, preset {preset}, {args.dtype}, {env['device_name']}, torch {torch.__version__}"
          f", triton {env['triton']}; ours = {cases[0].get('backend')}")
    print(table(cases, args.dtype))
    notes = sorted({r.note for r in results if r.impl == "cublas" and r.note})
    for note in notes:
        print(f"cuBLAS: {note}")
    print("times are medians; ours/X < 1: ours is faster; err = relative Frobenius error vs float64 G^T X; "
          "same = two runs of ours bit-identical")
    write_json(args.json, {"preset": preset, "dtype": args.dtype, "device": env["device_name"], "environment": env,
                           "seconds": time.perf_counter() - start, "cases": cases,
                           "results": [asdict(r) for r in results]})
    print(f"wrote {args.json}")
    bad = [c["label"] for c in cases if not c["deterministic"] or not (c["ours_rel_err"] or 0) < 1e-4]
    if bad:
        print(f"FAILED correctness/determinism: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

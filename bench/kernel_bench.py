"""Accumulate-kernel benchmark (``C_fp32 += G^T X`` at LLaMA-7B layer shapes) and the explicit kernel tuner.

Benchmark (the default): per case, in one process,

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

Tuner (``--tune``): times a list of candidate :class:`KernelConfig` per (operand width, shape class) at one
representative shape each (16-bit: a bf16 pair; fp32: a bf16 ``G`` with an fp32 ``X``, the pair that reaches the
IEEE-fp32 kernel in the library's default dispatch), skips candidates that fail to compile or launch (e.g. out of
shared memory) or give a wrong result, and writes the fastest as ``{table_key: config_dict}`` to ``--table``
(merged into an existing file, so one file can hold several GPU models). The library reads it only when
``LORAGA_FAST_KERNEL_TABLE`` names it. On CPU the tuner runs only under ``TRITON_INTERPRET=1`` at tiny shapes (a
smoke test of the tuner itself: interpreter timings say nothing about a GPU).

    python bench/kernel_bench.py                          # llama-7b on CUDA, cpu otherwise
    python bench/kernel_bench.py --preset tiny
    python bench/kernel_bench.py --tune --table bench/results/kernel_table.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a bare tree: make `loraga_fast` and `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from loraga_fast.ops import accumulate  # noqa: E402
from loraga_fast.ops._accumulate_triton import (  # noqa: E402
    INTERPRETER_CONFIG,
    TABLE_ENV,
    KernelConfig,
    accumulate_triton,
    config_dict,
    default_config,
    kernel_config,
    shape_class,
    table_key,
)
from loraga_fast.ops._dispatch import LOW_PRECISION, interpreter_enabled, select_backend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TABLE = RESULTS / "kernel_table.json"
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

# one representative (T, M, N) per shape class for the tuner
TUNE_SHAPES = {"large": (4096, 4096, 4096), "medium": (4096, 1024, 4096), "small": (4096, 512, 1024)}
TUNE_SHAPES_TINY = {"small": (64, 96, 64)}


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


# ------------------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup_ms: int = 25,
            rep_ms: int = 100) -> float:
    """Median milliseconds of one call: ``triton.testing.do_bench`` on CUDA (CUDA events as a fallback), the
    median of ``repeats`` ``perf_counter`` timings after one warm-up call on CPU."""
    if device.type == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except (ImportError, TypeError, AttributeError) as err:  # a triton without do_bench/return_mode
            print(f"[kernel_bench] do_bench unavailable ({err}); timing with CUDA events", file=sys.stderr)
            return _cuda_events_ms(fn, device, repeats=max(repeats, 20))
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cuda_events_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _tflops(flop: int, ms: float | None) -> float | None:
    return flop / (ms * 1e-3) / 1e12 if ms else None


def _rel_err(result: torch.Tensor, ref: torch.Tensor) -> float:
    return ((result.double() - ref).norm() / ref.norm()).item()


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
        first = _first_line(err)
    try:  # e.g. a build whose addmm(out_dtype=) wants C in the input dtype: the same GEMM without the add
        torch.mm(a.t(), b, out_dtype=torch.float32)
        return (lambda: torch.mm(a.t(), b, out_dtype=torch.float32)), f"torch.mm(out_dtype=fp32), no add: addmm said {first}"
    except (RuntimeError, TypeError):
        return None, f"unsupported by torch {torch.__version__} on {c.device.type}: {first}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:100] if text else ''}"


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
                            str(device), ms, _tflops(case.flop, ms), **kw)

    rows = []
    # ours: correctness and bit-identity on fresh accumulators, then the timing
    runs = []
    for _ in range(2):
        acc = torch.zeros(shape, dtype=torch.float32, device=device)
        accumulate(acc, g, x, transposed=case.transposed)
        runs.append(acc)
    _sync(device)
    err, same = _rel_err(runs[0], ref), bool(torch.equal(runs[0], runs[1]))
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
        err = _rel_err(fn(), ref)
        rows.append(row("cublas", time_ms(fn, device, repeats), rel_err=err, note=note))

    def autograd_gemm() -> torch.Tensor:
        return a.t() @ b

    rows.append(row("autograd", time_ms(autograd_gemm, device, repeats), rel_err=_rel_err(autograd_gemm(), ref),
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


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _tf(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def table(cases: list[dict[str, Any]]) -> str:
    """Per case: time and TFLOP/s of each implementation, ours/alternative time, errors vs float64, bit-identity."""
    head = (f"{'case':<24} {'ours ms':>8} {'TF/s':>6} {'cuBLAS ms':>9} {'TF/s':>6} {'bf16 ms':>8} {'TF/s':>6} "
            f"{'ours/cuBLAS':>11} {'ours/bf16':>9} {'err ours':>9} {'err cuBLAS':>10} {'err bf16':>9} {'same':>5}")
    lines = [head]
    for c in cases:
        lines.append(
            f"{c['label']:<24} {_fmt(c['ours_ms'], '.3f'):>8} {_tf(c['ours_tflops']):>6} "
            f"{_fmt(c['cublas_ms'], '.3f'):>9} {_tf(c['cublas_tflops']):>6} "
            f"{_fmt(c['autograd_ms'], '.3f'):>8} {_tf(c['autograd_tflops']):>6} "
            f"{_fmt(c['ours_over_cublas_time'], '.2f'):>11} {_fmt(c['ours_over_autograd_time'], '.2f'):>9} "
            f"{_fmt(c['ours_rel_err'], '.1e'):>9} {_fmt(c['cublas_rel_err'], '.1e'):>10} "
            f"{_fmt(c['autograd_rel_err'], '.1e'):>9} {('yes' if c['deterministic'] else 'NO'):>5}"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    """The GPU's name as :func:`table_key` uses it; ``"interpreter"`` / ``"cpu"`` elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "interpreter" if interpreter_enabled() else "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "device_name": device_name(device),
                           "interpreter": interpreter_enabled()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["capability"] = list(torch.cuda.get_device_capability(device))
        env["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------------------------- tuner


def candidates(device: torch.device, tensor_cores: bool, shape: str) -> list[KernelConfig]:
    """The configs the tuner tries for one (width, shape class): the built-in table's choice for this GPU and
    for the other architectures' classes, plus the standard Triton matmul tiles."""
    if device.type != "cuda":  # interpreter: block sizes only (warps and stages mean nothing there)
        return [INTERPRETER_CONFIG, KernelConfig(16, 32, 16, group_m=4, num_warps=1, num_stages=1),
                KernelConfig(32, 64, 32, group_m=4, num_warps=1, num_stages=1)]
    cap = torch.cuda.get_device_capability(device)
    found = [default_config(cap, tensor_cores, shape)]
    found += [default_config(c, tensor_cores, s) for c in ((9, 0), (8, 6)) for s in ("large", "medium", "small")]
    if tensor_cores:
        found += [KernelConfig(128, 256, 64, 8, 8, 3), KernelConfig(256, 128, 64, 8, 8, 3),
                  KernelConfig(64, 256, 32, 8, 4, 4), KernelConfig(128, 128, 32, 8, 4, 4),
                  KernelConfig(128, 128, 64, 8, 8, 3), KernelConfig(128, 64, 32, 8, 4, 4),
                  KernelConfig(64, 128, 32, 8, 4, 4), KernelConfig(64, 64, 64, 8, 4, 3)]
    else:
        found += [KernelConfig(64, 64, 32, 8, 4, 3), KernelConfig(128, 64, 32, 8, 4, 3),
                  KernelConfig(64, 128, 32, 8, 4, 3), KernelConfig(128, 128, 32, 8, 8, 3),
                  KernelConfig(64, 64, 16, 8, 4, 4), KernelConfig(32, 64, 32, 8, 4, 3)]
    return list(dict.fromkeys(found))  # deduplicated, in order


def tune(device: torch.device, shapes: dict[str, tuple[int, int, int]], repeats: int = 3) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]]]:
    """Time every candidate per (width, shape class); return the table and every measurement."""
    name = device_name(device)
    table_out: dict[str, dict[str, int]] = {}
    report: list[dict[str, Any]] = []
    widths = {"16bit": (torch.bfloat16, torch.bfloat16), "fp32": (torch.bfloat16, torch.float32)}
    for width, (g_dtype, x_dtype) in widths.items():
        tensor_cores = width == "16bit"
        for cls, (t, m, n) in shapes.items():
            assert shape_class(m, n) == cls, (cls, m, n)
            gen = torch.Generator(device=device).manual_seed(0)
            g = torch.randn(t, m, device=device, generator=gen).to(g_dtype)
            x = torch.randn(t, n, device=device, generator=gen).to(x_dtype)
            ref = g.double().t() @ x.double()
            best: tuple[float, KernelConfig] | None = None
            for cfg in candidates(device, tensor_cores, cls):
                entry: dict[str, Any] = {"key": table_key(name, tensor_cores, cls), "t": t, "m": m, "n": n,
                                         "config": config_dict(cfg), "ms": None, "tflops": None, "status": "ok"}
                acc = torch.zeros(m, n, device=device)
                try:
                    accumulate_triton(acc, g, x, config=cfg)  # compile + first launch
                    _sync(device)
                except Exception as err:  # out of shared memory, compile error, ...: not a candidate here
                    entry["status"] = f"skipped: {_first_line(err)}"
                    report.append(entry)
                    print(f"[tune] {entry['key']} {cfg}: {entry['status']}", file=sys.stderr, flush=True)
                    continue
                err_rel = _rel_err(acc, ref)
                if not err_rel < 1e-5:
                    entry["status"] = f"rejected: relative error {err_rel:.1e} vs float64"
                    report.append(entry)
                    continue
                acc.zero_()
                ms = time_ms(lambda cfg=cfg, acc=acc: accumulate_triton(acc, g, x, config=cfg), device, repeats,
                             warmup_ms=10, rep_ms=50)
                entry.update(ms=ms, tflops=_tflops(2 * t * m * n, ms), rel_err=err_rel)
                report.append(entry)
                print(f"[tune] {entry['key']} {_cfg_str(cfg)}: {ms:.3f} ms", file=sys.stderr, flush=True)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best is not None:
                table_out[table_key(name, tensor_cores, cls)] = config_dict(best[1])
    return table_out, report


def _cfg_str(cfg: KernelConfig) -> str:
    return (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} g{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}")


def write_table(path: Path, entries: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Merge ``entries`` into the table at ``path`` (other GPUs' entries are kept) and write it."""
    merged: dict[str, dict[str, int]] = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"[tune] {path} is not JSON: overwriting it", file=sys.stderr)
    merged.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def main_tune(args: argparse.Namespace, device: torch.device) -> int:
    if device.type != "cuda" and not interpreter_enabled():
        print("kernel_bench --tune needs a CUDA GPU (or TRITON_INTERPRET=1, which tunes tiny shapes: a smoke test "
              "of the tuner, not a measurement)", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernel_bench --tune needs triton: pip install triton", file=sys.stderr)
        return 2
    shapes = TUNE_SHAPES if device.type == "cuda" and args.preset != "tiny" else TUNE_SHAPES_TINY
    start = time.perf_counter()
    entries, report = tune(device, shapes, args.repeats)
    print(f"kernel tuning, {device_name(device)}, torch {torch.__version__}, {time.perf_counter() - start:.1f}s")
    print(f"{'key':<48} {'config':<24} {'ms':>8} {'TF/s':>6}  status")
    for e in report:
        cfg = KernelConfig(**e["config"])
        mark = " *" if entries.get(e["key"]) == e["config"] else ""
        print(f"{e['key']:<48} {_cfg_str(cfg):<24} {_fmt(e['ms'], '.3f'):>8} {_tf(e['tflops']):>6}  "
              f"{e['status']}{mark}")
    if not entries:
        print("no candidate ran: no table written", file=sys.stderr)
        return 1
    table_path = args.table.resolve()
    write_table(table_path, entries)
    print(f"* = chosen; wrote {len(entries)} entries to {table_path}")
    print(f"to use them: export {TABLE_ENV}={table_path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment(device), "table": str(table_path),
                                         "entries": entries, "measurements": report}, indent=2))
        print(f"wrote {args.json}")
    return 0


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default=None,
                        help="cases (default: llama-7b on CUDA, cpu otherwise)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement on CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default bench/results/kernels.json; with --tune, written only if given)")
    parser.add_argument("--tune", action="store_true",
                        help="time candidate kernel configs and write the fastest per (width, shape class) to --table")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help=f"with --tune: the table to write "
                        f"(default {DEFAULT_TABLE.relative_to(RESULTS.parents[1])}; merged into an existing one)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    if args.tune:
        return main_tune(args, device)

    preset = args.preset or ("llama-7b" if device.type == "cuda" else "cpu")
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    results = run(preset, device, dtype, args.repeats)
    cases = [case_summary([r for r in results if (r.t, r.m, r.n, r.transposed) == (c.t, c.m, c.n, c.transposed)])
             for c in SHAPES[preset]]
    env = environment(device)
    print(f"accumulate C_fp32 += G^T X, preset {preset}, {args.dtype}, {env['device_name']}, torch {torch.__version__}"
          f", triton {env['triton']}; ours = {cases[0].get('backend')}")
    print(table(cases))
    notes = sorted({r.note for r in results if r.impl == "cublas" and r.note})
    for note in notes:
        print(f"cuBLAS: {note}")
    print("times are medians; ours/X < 1: ours is faster; err = relative Frobenius error vs float64 G^T X; "
          "same = two runs of ours bit-identical")
    path = args.json or RESULTS / "kernels.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"preset": preset, "dtype": args.dtype, "device": env["device_name"],
                                "environment": env, "seconds": time.perf_counter() - start, "cases": cases,
                                "results": [asdict(r) for r in results]}, indent=2))
    print(f"wrote {path}")
    bad = [c["label"] for c in cases if not c["deterministic"] or not (c["ours_rel_err"] or 0) < 1e-4]
    if bad:
        print(f"FAILED correctness/determinism: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

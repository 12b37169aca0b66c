"""The explicit kernel tuner (``loraga-fast bench kernels --tune``): the fastest accumulate-kernel config per
(operand width, shape class) on this GPU, written as a table the library reads only when asked.

Times a list of candidate :class:`~loraga_fast.ops._accumulate_triton.KernelConfig` per (operand width, shape class)
at one representative shape each (16-bit: a bf16 pair; fp32: a bf16 ``G`` with an fp32 ``X``, the pair that reaches
the IEEE-fp32 kernel in the library's default dispatch), skips candidates that fail to compile or launch (e.g. out
of shared memory) or give a wrong result, and writes the fastest as ``{table_key: config_dict}`` to ``--table``
(merged into an existing file, so one file can hold several GPU models). The library reads it only when
``LORAGA_FAST_KERNEL_TABLE`` names it. On CPU the tuner runs only under ``TRITON_INTERPRET=1`` at tiny shapes (a
smoke test of the tuner itself: interpreter timings say nothing about a GPU).

    loraga-fast bench kernels --tune --table bench/results/kernel_table.json
    TRITON_INTERPRET=1 loraga-fast bench kernels --tune --preset tiny      # the smoke test, on a CPU
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..ops._accumulate_triton import (
    INTERPRETER_CONFIG,
    TABLE_ENV,
    KernelConfig,
    accumulate_triton,
    config_dict,
    default_config,
    shape_class,
    table_key,
)
from ..ops._dispatch import interpreter_enabled
from .harness import RESULTS, num, suite_parser, tflops_text, write_json
from .timing import device_name, environment, first_line, rel_err, sync, tflops, time_ms
from .workloads import resolve_device

__all__ = ["candidates", "main", "tune", "write_table"]

DEFAULT_TABLE = RESULTS / "kernel_table.json"
# one representative (T, M, N) per shape class
TUNE_SHAPES = {"large": (4096, 4096, 4096), "medium": (4096, 1024, 4096), "small": (4096, 512, 1024)}
TUNE_SHAPES_TINY = {"small": (64, 96, 64)}


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
                    sync(device)
                except Exception as err:  # out of shared memory, compile error, ...: not a candidate here
                    entry["status"] = f"skipped: {first_line(err)}"
                    report.append(entry)
                    print(f"[tune] {entry['key']} {cfg}: {entry['status']}", file=sys.stderr, flush=True)
                    continue
                err_rel = rel_err(acc, ref)
                if not err_rel < 1e-5:
                    entry["status"] = f"rejected: relative error {err_rel:.1e} vs float64"
                    report.append(entry)
                    continue
                acc.zero_()
                ms = time_ms(lambda cfg=cfg, acc=acc: accumulate_triton(acc, g, x, config=cfg), device, repeats,
                             warmup_ms=10, rep_ms=50)
                entry.update(ms=ms, tflops=tflops(2 * t * m * n, ms), rel_err=err_rel)
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


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("kernels --tune", __doc__)
    parser.add_argument("--preset", choices=["llama-7b", "tiny"], default=None,
                        help="tiny: the interpreter's tiny shapes on a GPU too (default: llama-7b-sized shapes on a "
                             "GPU, tiny ones under the interpreter)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per candidate on CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every measurement here (default: not written)")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE,
                        help=f"the table to write (default {DEFAULT_TABLE}; merged into an existing one)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cuda" and not interpreter_enabled():
        print("kernel tuning needs a CUDA GPU (or TRITON_INTERPRET=1, which tunes tiny shapes: a smoke test "
              "of the tuner, not a measurement)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("kernel tuning needs triton: pip install triton", file=sys.stderr)
        return 2
    shapes = TUNE_SHAPES if device.type == "cuda" and args.preset != "tiny" else TUNE_SHAPES_TINY
    start = time.perf_counter()
    entries, report = tune(device, shapes, args.repeats)
    print(f"kernel tuning, {device_name(device)}, torch {torch.__version__}, {time.perf_counter() - start:.1f}s")
    print(f"{'key':<48} {'config':<24} {'ms':>8} {'TF/s':>6}  status")
    for e in report:
        cfg = KernelConfig(**e["config"])
        mark = " *" if entries.get(e["key"]) == e["config"] else ""
        print(f"{e['key']:<48} {_cfg_str(cfg):<24} {num(e['ms'], '.3f'):>8} {tflops_text(e['tflops']):>6}  "
              f"{e['status']}{mark}")
    if not entries:
        print("no candidate ran: no table written", file=sys.stderr)
        return 1
    table_path = args.table.resolve()
    write_table(table_path, entries)
    if args.json:
        write_json(args.json, {"environment": environment(device), "table": str(table_path), "entries": entries,
                               "measurements": report})
        print(f"wrote {args.json}")
    print(f"* = chosen; wrote {len(entries)} entries to {table_path}")
    print(f"to use them: export {TABLE_ENV}={table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

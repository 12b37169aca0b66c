"""End-to-end benchmark runner: loraga_fast vs peft ``preprocess_loraga``, one fresh process per measurement.

    python bench/run.py                                   # 70m preset, fp32 + bf16, 3 repeats
    python bench/run.py --preset tiny                     # quick smoke run
    python bench/run.py --preset 70m --dtypes bf16 --repeats 5 --json /tmp/out.json

Prints a table (time = median of the timed repeats, extra peak memory = see bench/README.md) with ratio rows
``ours/peft``, and writes every measurement, the configuration and the environment as JSON
(default: bench/results/e2e.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/run.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import REPO_ROOT, measure, time_interleaved  # noqa: E402
from bench.envinfo import environment_info  # noqa: E402
from bench.workloads import (  # noqa: E402
    DTYPES,
    IMPLS,
    PRESETS,
    TARGET_MODULES,
    get_preset,
    param_count,
)

OURS, BASELINE = IMPLS
MIB = 2**20
CONTENDED = 0.1
"""A timing is flagged when other processes used more than this fraction of a core during the timed calls."""
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "e2e.json"


def ratio_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ours/peft`` time and memory ratios for every (preset, dtype) that has both implementations."""
    rows = []
    by_key = {(r["preset"], r["dtype"], r["impl"]): r for r in results}
    for (preset, dtype, impl), ours in by_key.items():
        base = by_key.get((preset, dtype, BASELINE))
        if impl != OURS or base is None:
            continue
        rows.append({
            "preset": preset,
            "dtype": dtype,
            "time_ratio": _ratio(ours["time_s"], base["time_s"]),
            "peak_extra_ratio": _ratio(ours["peak_extra_bytes"], base["peak_extra_bytes"]),
        })
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_table(results: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    """The results as a fixed-width table, each (preset, dtype) followed by its ``ours/peft`` row."""
    header = ("preset", "dtype", "impl", "time (s)", "extra peak (MiB)", "ru_maxrss check (MiB)", "first call (s)")
    lines: list[tuple[str, ...]] = []
    for ratio in ratios or [None]:
        for r in results:
            if ratio is not None and (r["preset"], r["dtype"]) != (ratio["preset"], ratio["dtype"]):
                continue
            mem = r["memory"]
            check = "-"
            if mem.get("maxrss_extra_bytes") is not None:
                check = f"{mem['maxrss_extra_bytes'] / MIB:.1f}" + ("" if mem["maxrss_valid"] else " (n/a)")
            flag = " *" if contended(r) else ""
            lines.append((r["preset"], r["dtype"], r["impl"], _num(r["time_s"], ".3f") + flag,
                          f"{r['peak_extra_bytes'] / MIB:.1f}", check, f"{r['first_call_s']:.3f}"))
        if ratio is not None:
            lines.append((ratio["preset"], ratio["dtype"], f"{OURS}/{BASELINE}", _num(ratio["time_ratio"], ".3f", "x"),
                          _num(ratio["peak_extra_ratio"], ".3f", "x"), "", ""))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def contended(result: dict[str, Any]) -> bool:
    """True when other processes competed for the CPU during the timed calls (see ``CONTENDED``)."""
    times, others = result.get("times_s") or [], result.get("other_cpu_s") or []
    return bool(times) and sum(others) > CONTENDED * sum(times)


def wait_for_idle(max_wait_s: float, busy_percent: float = 5.0, window_s: float = 2.0) -> float:
    """Wait (at most ``max_wait_s``) until the machine's CPU use over ``window_s`` is below ``busy_percent``
    of all cores; return the seconds waited. For shared machines, where other jobs come and go."""
    import psutil

    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s and psutil.cpu_percent(interval=window_s) >= busy_percent:
        pass
    return time.perf_counter() - start


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="70m")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call (default 3)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement, wait up to this long for the CPUs to be idle (default 0)")
    parser.add_argument("--interleave", type=int, default=3, metavar="ROUNDS",
                        help="also time the implementations alternately in one process for ROUNDS rounds and report "
                             "that ratio too, which drifts of a shared machine affect less (0: off; default 3)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process instead of one fresh subprocess each (memory not isolated)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    preset = get_preset(args.preset)
    n_params = param_count(preset)
    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "environment": environment_info(args.device),
        "config": {
            "preset": preset.name,
            **{k: v for k, v in vars(preset).items() if k != "name"},
            "param_count": n_params,
            "target_modules": list(TARGET_MODULES),
            "dtypes": args.dtypes,
            "impls": args.impls,
            "repeats": args.repeats,
            "seed": args.seed,
            "isolated": not args.in_process,
            "interleave_rounds": args.interleave,
            "wait_idle_s": args.wait_idle,
        },
        "results": results,
        "failed": failed,
        "ratios": [],
        "interleaved_times_s": {},
    }

    def save(ratios: list[dict[str, Any]] | None = None) -> None:
        """Write the report (after every measurement: a run stopped by a timeout keeps what it measured)."""
        report["ratios"] = ratio_rows(results) if ratios is None else ratios
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    for dtype in args.dtypes:
        for impl in args.impls:
            if args.wait_idle > 0:
                waited = wait_for_idle(args.wait_idle)
                if waited > 3:
                    print(f"[bench] waited {waited:.0f}s for idle CPUs", file=sys.stderr, flush=True)
            print(f"[bench] {preset.name} {dtype} {impl} ...", end=" ", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                result = measure(impl, dtype, preset.name, args.repeats, args.device, args.seed,
                                 isolated=not args.in_process)
            except Exception as err:  # one failing implementation must not cost the other's figures
                print(f"FAILED after {time.perf_counter() - start:.1f}s: {err}", file=sys.stderr, flush=True)
                failed.append({"impl": impl, "dtype": dtype, "error": str(err)[-4000:]})
                save()
                continue
            print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
            results.append(result)
            save()
    if not results:
        print("every measurement failed", file=sys.stderr)
        return 1
    ratios = ratio_rows(results)
    interleaved: dict[str, dict[str, list[float]]] = {}
    if args.interleave > 0 and len(args.impls) > 1:
        for dtype in args.dtypes:
            print(f"[bench] {preset.name} {dtype} interleaved x{args.interleave} ...", end=" ", file=sys.stderr, flush=True)
            start = time.perf_counter()
            interleaved[dtype] = time_interleaved(dtype, preset.name, args.interleave, args.device, args.seed,
                                                  tuple(args.impls))
            print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        for row in ratios:
            times = interleaved.get(row["dtype"])
            if times and BASELINE in times and OURS in times:
                row["time_ratio_interleaved"] = statistics.median(times[OURS]) / statistics.median(times[BASELINE])

    print(f"preset {preset.name}: LlamaForCausalLM, {n_params:,} parameters, {preset.num_batches} batches of "
          f"{preset.batch_size}x{preset.seq_len} tokens, targets {','.join(TARGET_MODULES)}; device "
          f"{results[0]['device']}, {results[0]['torch_threads']} torch threads; time = median of {args.repeats}")
    print(format_table(results, ratios))
    for dtype, times in interleaved.items():
        medians = "  ".join(f"{impl} {statistics.median(t):.3f}s" for impl, t in times.items())
        ratio = next((r.get("time_ratio_interleaved") for r in ratios if r["dtype"] == dtype), None)
        print(f"interleaved in one process, {dtype}, median of {args.interleave}: {medians}"
              + (f"  -> ours/peft {ratio:.3f}x" if ratio is not None else ""))
    if any(contended(r) for r in results):
        print(f"* other processes used more than {CONTENDED:.0%} of a core during these timed calls "
              "(other_cpu_s in the JSON): the times are unreliable, rerun on an idle machine")

    report["interleaved_times_s"] = interleaved
    save(ratios)  # with the interleaved ratios
    print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

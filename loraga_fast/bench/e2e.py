"""The ``e2e`` suite: loraga_fast vs peft ``preprocess_loraga`` end to end, one fresh process per measurement.

    loraga-fast bench e2e                                 # 70m preset (llama-7b on a GPU), fp32 + bf16, 3 repeats
    loraga-fast bench e2e --preset tiny                   # quick smoke run
    loraga-fast bench e2e --preset 70m --dtypes bf16 --repeats 5 --json /tmp/out.json

Prints a table (time = median of the timed repeats, extra peak memory = see bench/README.md) with ratio rows
``ours/peft``, and writes every measurement, the configuration and the environment as JSON
(default: bench/results/e2e.json). Times and time ratios that other processes disturbed are marked (`` *``
contended, `` ~`` noisy; the rules are in loraga_fast/bench/timing_flags.py) and every time ratio in the JSON
carries its flags. The measurement itself is :mod:`loraga_fast.bench.measure`.
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .envinfo import environment_info
from .harness import RESULTS, finish, nothing_measured, num, ratio, suite_parser, write_json
from .measure import CallResult, interleaved_calls, measure
from .timing_flags import (
    CONTENDED,
    SPREAD,
    footnotes,
    is_contended,
    is_noisy,
    marks,
    ratio_flags,
)
from .workloads import (
    DTYPES,
    IMPLS,
    PRESETS,
    TARGET_MODULES,
    get_preset,
    param_count,
)

OURS, BASELINE = IMPLS
MIB = 2**20
__all__ = ["CONTENDED", "add_interleaved", "contended", "format_interleaved", "format_table", "interleaved_sides",
           "main", "noisy", "ratio_rows", "table_footnotes", "wait_for_idle"]
DEFAULT_JSON = RESULTS / "e2e.json"


def ratio_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ours/peft`` time and memory ratios for every (preset, dtype) that has both implementations, the time
    ratio with its flags (``time_contended``, ``time_spread``, ``time_noisy``: see
    :mod:`loraga_fast.bench.timing_flags`)."""
    rows = []
    by_key = {(r["preset"], r["dtype"], r["impl"]): r for r in results}
    for (preset, dtype, impl), ours in by_key.items():
        base = by_key.get((preset, dtype, BASELINE))
        if impl != OURS or base is None:
            continue
        rows.append({
            "preset": preset,
            "dtype": dtype,
            "time_ratio": ratio(ours["time_s"], base["time_s"]),
            **ratio_flags("time", ours, base),
            "peak_extra_ratio": ratio(ours["peak_extra_bytes"], base["peak_extra_bytes"]),
        })
    return rows


def interleaved_sides(calls: dict[str, list[CallResult]]) -> dict[str, dict[str, list[float]]]:
    """:func:`loraga_fast.bench.measure.interleaved_calls`' result as plain lists per implementation: ``times_s`` and
    ``other_cpu_s`` (the shape :func:`add_interleaved` and the JSON take)."""
    return {impl: {"times_s": [c.time_s for c in runs], "other_cpu_s": [c.other_cpu_s for c in runs]}
            for impl, runs in calls.items()}


def add_interleaved(ratios: list[dict[str, Any]], interleaved: dict[str, dict[str, dict[str, list[float]]]]) -> None:
    """Add ``time_ratio_interleaved`` (median over median) and its flags (``time_interleaved_contended``,
    ``_spread``, ``_noisy``) to each ratio row whose dtype was interleaved with both implementations.

    Args:
        ratios: :func:`ratio_rows`' rows, changed in place.
        interleaved: per dtype, per implementation, ``{"times_s": [...], "other_cpu_s": [...]}``
            (:func:`interleaved_sides`).
    """
    for row in ratios:
        sides = interleaved.get(row["dtype"]) or {}
        ours, base = sides.get(OURS), sides.get(BASELINE)
        if ours and base and ours["times_s"] and base["times_s"]:
            row["time_ratio_interleaved"] = statistics.median(ours["times_s"]) / statistics.median(base["times_s"])
            row.update(ratio_flags("time_interleaved", ours, base))


def format_table(results: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    """The results as a fixed-width table, each (preset, dtype) followed by its ``ours/peft`` row."""
    header = ("preset", "dtype", "impl", "time (s)", "extra peak (MiB)", "ru_maxrss check (MiB)", "first call (s)")
    lines: list[tuple[str, ...]] = []
    for row in ratios or [None]:
        for r in results:
            if row is not None and (r["preset"], r["dtype"]) != (row["preset"], row["dtype"]):
                continue
            mem = r["memory"]
            check = "-"
            if mem.get("maxrss_extra_bytes") is not None:
                check = f"{mem['maxrss_extra_bytes'] / MIB:.1f}" + ("" if mem["maxrss_valid"] else " (n/a)")
            flag = marks(contended(r), noisy(r))
            lines.append((r["preset"], r["dtype"], r["impl"], num(r["time_s"], ".3f") + flag,
                          f"{r['peak_extra_bytes'] / MIB:.1f}", check, f"{r['first_call_s']:.3f}"))
        if row is not None:
            flag = marks(bool(row.get("time_contended")), bool(row.get("time_noisy")))
            lines.append((row["preset"], row["dtype"], f"{OURS}/{BASELINE}",
                          num(row["time_ratio"], ".3f", "x") + flag,
                          num(row["peak_extra_ratio"], ".3f", "x"), "", ""))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def format_interleaved(interleaved: dict[str, dict[str, dict[str, list[float]]]], ratios: list[dict[str, Any]],
                       rounds: int) -> list[str]:
    """One line per interleaved dtype: each implementation's median (marked when flagged) and the ratio."""
    lines = []
    for dtype, sides in interleaved.items():
        medians = "  ".join(f"{impl} {statistics.median(side['times_s']):.3f}s{marks(contended(side), noisy(side))}"
                            for impl, side in sides.items() if side["times_s"])
        row = next((r for r in ratios if r["dtype"] == dtype and r.get("time_ratio_interleaved") is not None), None)
        text = ""
        if row is not None:
            flag = marks(bool(row.get("time_interleaved_contended")), bool(row.get("time_interleaved_noisy")))
            text = f"  -> ours/peft {row['time_ratio_interleaved']:.3f}x{flag}"
        lines.append(f"interleaved in one process, {dtype}, median of {rounds}: {medians}{text}")
    return lines


def table_footnotes(results: list[dict[str, Any]], interleaved: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    """The footnotes for the marks the table and the interleaved lines used (none when nothing is flagged)."""
    sides = [*results, *(side for per_impl in interleaved.values() for side in per_impl.values())]
    return footnotes(any(contended(s) for s in sides), any(noisy(s) for s in sides))


def contended(result: dict[str, Any]) -> bool:
    """True when other processes competed for the CPU during the timed calls (``times_s``, ``other_cpu_s``; see
    :data:`loraga_fast.bench.timing_flags.CONTENDED`)."""
    return is_contended(result.get("times_s"), result.get("other_cpu_s"))


def noisy(result: dict[str, Any]) -> bool:
    """True when the timed calls (``times_s``) spread by more than :data:`loraga_fast.bench.timing_flags.SPREAD`."""
    return is_noisy(result.get("times_s"))


def wait_for_idle(max_wait_s: float, busy_percent: float = 5.0, window_s: float = 2.0) -> float:
    """Wait (at most ``max_wait_s``) until the machine's CPU use over ``window_s`` is below ``busy_percent``
    of all cores; return the seconds waited. For shared machines, where other jobs come and go."""
    import psutil

    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s and psutil.cpu_percent(interval=window_s) >= busy_percent:
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("e2e", __doc__)
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
        "timing_flags": {"contended_other_cpu_fraction": CONTENDED, "noisy_spread": SPREAD,
                         "rules": "loraga_fast/bench/timing_flags.py"},
        "results": results,
        "failed": failed,
        "ratios": [],
        "interleaved_times_s": {},
        "interleaved_other_cpu_s": {},
    }

    def save(ratios: list[dict[str, Any]] | None = None) -> None:
        """Write the report (after every measurement: a run stopped by a timeout keeps what it measured)."""
        report["ratios"] = ratio_rows(results) if ratios is None else ratios
        write_json(args.json, report)

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
        return nothing_measured("e2e")
    ratios = ratio_rows(results)
    interleaved: dict[str, dict[str, dict[str, list[float]]]] = {}
    if args.interleave > 0 and len(args.impls) > 1:
        for dtype in args.dtypes:
            print(f"[bench] {preset.name} {dtype} interleaved x{args.interleave} ...", end=" ", file=sys.stderr, flush=True)
            start = time.perf_counter()
            interleaved[dtype] = interleaved_sides(interleaved_calls(dtype, preset.name, args.interleave, args.device,
                                                                     args.seed, tuple(args.impls)))
            print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        add_interleaved(ratios, interleaved)

    print(f"preset {preset.name}: LlamaForCausalLM, {n_params:,} parameters, {preset.num_batches} batches of "
          f"{preset.batch_size}x{preset.seq_len} tokens, targets {','.join(TARGET_MODULES)}; device "
          f"{results[0]['device']}, {results[0]['torch_threads']} torch threads; time = median of {args.repeats}")
    print(format_table(results, ratios))
    for line in [*format_interleaved(interleaved, ratios, args.interleave), *table_footnotes(results, interleaved)]:
        print(line)

    report["interleaved_times_s"] = {d: {i: s["times_s"] for i, s in v.items()} for d, v in interleaved.items()}
    report["interleaved_other_cpu_s"] = {d: {i: s["other_cpu_s"] for i, s in v.items()} for d, v in interleaved.items()}
    save(ratios)  # with the interleaved ratios
    return finish(args.json, failed)


if __name__ == "__main__":
    sys.exit(main())

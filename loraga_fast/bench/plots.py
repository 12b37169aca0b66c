"""PNG charts of the benchmark results (``loraga-fast bench --plot``, which runs
``python -m loraga_fast.bench.plots DIR``); needs matplotlib (``pip install loraga_fast[plot]``).

* ``e2e.png`` / ``init.png`` -- ``ours / peft`` ratios (time, interleaved time, extra peak memory): log scale
  symmetric around the line at 1 (bars grow up from it when ours is slower or uses more, down when faster or
  less), the value on every bar, and *hatched* bars for time ratios that the runner flagged as unreliable
  (``<name>_contended`` / ``<name>_noisy`` in e2e.json, ``contended`` rows in init.json; the rules are in
  :mod:`loraga_fast.bench.timing_flags`).
* ``kernels.png`` -- achieved TFLOP/s of each accumulate implementation per case (higher is better), the
  transposed (``Conv1D``) layout a case of its own.

The ``*_figure`` functions build the figures (tests inspect their axes); :func:`plot_results` saves them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["RATIO_LABEL", "TFLOPS_LABEL", "UNRELIABLE_LABEL", "Series", "bar_chart", "e2e_figure", "init_figure",
           "kernels_figure", "main", "plot_results", "ratio_limits"]

RATIO_LABEL = "ours / peft, lower is better"
TFLOPS_LABEL = "TFLOP/s, higher is better"
UNRELIABLE_LABEL = "hatched: unreliable timing (other processes busy, or repeats spread out)"
HATCH = "//"


@dataclass
class Series:
    """One bar per label: ``values`` (None: no bar) and, per bar, whether it is flagged unreliable."""

    name: str
    values: list[float | None]
    flagged: list[bool] = field(default_factory=list)

    def flag(self, i: int) -> bool:
        """Whether bar ``i`` is flagged."""
        return i < len(self.flagged) and self.flagged[i]


def plot_results(results: Path) -> list[Path]:
    """One chart per results file found in ``results`` (e2e.json, init.json, kernels.json) that has something
    to show, written beside it as e2e.png, init.png, kernels.png; returns the paths written."""
    plt = _pyplot()
    written = []
    for stem, build in (("e2e", e2e_figure), ("init", init_figure), ("kernels", kernels_figure)):
        source = results / f"{stem}.json"
        if not source.is_file():
            continue
        fig = build(json.loads(source.read_text()))
        if fig is None:
            continue
        path = results / f"{stem}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m loraga_fast.bench.plots DIR``: the charts of the results in ``DIR``, one line per file written;
    exit status 2 with one line when matplotlib is missing."""
    parser = argparse.ArgumentParser(prog="python -m loraga_fast.bench.plots",
                                     description="Write e2e.png, init.png, kernels.png beside their JSON results.")
    parser.add_argument("folder", type=Path, help="the folder holding e2e.json, init.json, kernels.json")
    try:
        written = plot_results(parser.parse_args(argv).folder)
    except UsageError as err:
        print(f"loraga-fast: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def e2e_figure(data: dict[str, Any]) -> Any:
    """The ``ours / peft`` chart of the e2e suite's JSON (its ``ratios``), or None when it has no ratio."""
    ratios = data.get("ratios") or []
    if not ratios:
        return None
    series = [_ratio_series("time", "time", ratios)]
    if any(r.get("time_ratio_interleaved") is not None for r in ratios):
        series.append(_ratio_series("time (interleaved)", "time_interleaved", ratios))
    series.append(Series("extra peak memory", [r.get("peak_extra_ratio") for r in ratios]))
    return bar_chart([f"{r['preset']} {r['dtype']}" for r in ratios], series, "end to end: loraga_fast / peft",
                     ratio=True)


def init_figure(data: dict[str, Any]) -> Any:
    """The ``ours / peft`` chart of the init suite's JSON (its ``rows``, paired by dtype and rank), or None
    when no pair is complete. A time ratio is flagged when either row is ``contended``."""
    pairs: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in data.get("rows") or []:
        pairs.setdefault((row["dtype"], row["r"]), {})[row["impl"]] = row
    keys = [k for k, v in pairs.items() if "loraga_fast" in v and "peft" in v]
    if not keys:
        return None
    ours, peft = [pairs[k]["loraga_fast"] for k in keys], [pairs[k]["peft"] for k in keys]
    time = Series("time", [o["time_s"] / p["time_s"] if p["time_s"] else None for o, p in zip(ours, peft)],
                  [bool(o.get("contended") or p.get("contended")) for o, p in zip(ours, peft)])
    memory = Series("extra peak memory",
                    [o["peak_extra_bytes"] / max(p["peak_extra_bytes"], 1) for o, p in zip(ours, peft)])
    return bar_chart([f"{d} r={r}" for d, r in keys], [time, memory], "initialization: loraga_fast / peft",
                     ratio=True)


def kernels_figure(data: dict[str, Any]) -> Any:
    """The TFLOP/s chart of the kernels suite's JSON (its ``results``), or None when nothing was timed.
    Cases are keyed by ``(t, m, n, transposed)``: the transposed layout is a bar group of its own."""
    rows = [r for r in data.get("results") or [] if r.get("tflops") is not None]
    if not rows:
        return None
    impls = sorted({r["impl"] for r in rows})
    cases = sorted({(r["t"], r["m"], r["n"], bool(r.get("transposed"))) for r in rows})
    by = {(r["impl"], r["t"], r["m"], r["n"], bool(r.get("transposed"))): r["tflops"] for r in rows}
    labels = [f"T{t} {m}x{n}" + (" conv1d" if transposed else "") for t, m, n, transposed in cases]
    names = kernel_names(str(data.get("dtype") or "bf16"))
    return bar_chart(labels, [Series(names.get(impl, impl), [by.get((impl, *c)) for c in cases]) for impl in impls],
                     "accumulate C_fp32 += G^T X", ratio=False)


def kernel_names(dtype: str) -> dict[str, str]:
    """The kernels suite's implementations as its table heads name them (``autograd`` is the GEMM in the inputs'
    dtype with an output in that dtype, what peft accumulates)."""
    return {"ours": "ours", "cublas": "cuBLAS", "autograd": dtype}


def ratio_limits(values: list[float]) -> tuple[float, float]:
    """Y limits of a log-scale ratio chart, symmetric around 1 (``lo == 1 / hi``): at least 0.5 to 2, and wide
    enough for every value with 20% room."""
    hi = max([2.0] + [1.2 * v for v in values if v > 0] + [1.2 / v for v in values if v > 0])
    return 1 / hi, hi


def bar_chart(labels: list[str], series: list[Series], title: str, ratio: bool) -> Any:
    """A grouped bar chart: one group per label, one bar per series, each bar's value printed on it.

    ``ratio=True``: ``ours / peft`` values on a log scale symmetric around 1 (:func:`ratio_limits`), bars drawn
    from 1 to the value, a line at 1, y label :data:`RATIO_LABEL`, flagged bars hatched and a legend entry
    saying so. ``ratio=False``: bars from 0, y label :data:`TFLOPS_LABEL`. Returns the figure.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) * len(series)), 4.5))
    width = 0.8 / max(len(series), 1)
    base = 1.0 if ratio else 0.0
    shown = [v for s in series for v in s.values if v is not None]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles: list[Any] = []  # plain patches: a legend built from the bars would copy a hatch from a flagged one
    any_flagged = False
    for i, s in enumerate(series):
        color = colors[i % len(colors)]
        handles.append(Patch(facecolor=color, edgecolor="black", linewidth=0.5, label=s.name))
        idx = [j for j, v in enumerate(s.values) if v is not None and (v > 0 or not ratio)]
        values = [float(s.values[j]) for j in idx]  # type: ignore[arg-type]
        bars = ax.bar([j + i * width for j in idx], [v - base for v in values], width, bottom=base, label=s.name,
                      color=color, edgecolor="black", linewidth=0.5)
        for bar, j in zip(bars, idx):
            if s.flag(j):
                bar.set_hatch(HATCH)
                any_flagged = True
        ax.bar_label(bars, labels=[f"{v:.2f}x" if ratio else f"{v:.3g}" for v in values], fontsize=8, padding=2)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels, rotation=20)
    if ratio:
        ax.set_yscale("log")
        lo, hi = ratio_limits(shown)
        ax.set_ylim(lo, hi)
        ticks = [m * 10.0**e for e in range(-4, 5) for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])  # 0.5x, 1x, 2x... rather than powers of ten
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(RATIO_LABEL)
    else:
        ax.set_ylim(0, 1.15 * max(shown, default=1.0))
        ax.set_ylabel(TFLOPS_LABEL)
    if any_flagged:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=HATCH, label=UNRELIABLE_LABEL))
    ax.legend(handles=handles, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _ratio_series(name: str, key: str, ratios: list[dict[str, Any]]) -> Series:
    """The time ratio ``<key>_ratio`` of every row, flagged where ``<key>_contended`` or ``<key>_noisy``."""
    ratio_key = "time_ratio_interleaved" if key == "time_interleaved" else f"{key}_ratio"
    return Series(name, [r.get(ratio_key) for r in ratios],
                  [bool(r.get(f"{key}_contended") or r.get(f"{key}_noisy")) for r in ratios])


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from err
    return plt


if __name__ == "__main__":
    sys.exit(main())

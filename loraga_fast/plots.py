"""PNG charts of the benchmark results (``loraga-fast bench --plot``); needs matplotlib (``pip install
loraga_fast[plot]``)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError

__all__ = ["plot_results"]


def plot_results(results: Path) -> list[Path]:
    """One chart per results file found in ``results`` (e2e.json, init.json, kernels.json); returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from err
    written = []
    e2e = results / "e2e.json"
    if e2e.is_file():
        ratios = json.loads(e2e.read_text()).get("ratios", [])
        if ratios:
            labels = [f"{r['preset']} {r['dtype']}" for r in ratios]
            series = {"time": [r.get("time_ratio") for r in ratios]}
            if any("time_ratio_interleaved" in r for r in ratios):
                series["time (interleaved)"] = [r.get("time_ratio_interleaved") for r in ratios]
            series["extra peak memory"] = [r.get("peak_extra_ratio") for r in ratios]
            written.append(_bars(plt, results / "e2e.png", "end to end: loraga_fast / peft", labels, series))
    init = results / "init.json"
    if init.is_file():
        rows = json.loads(init.read_text())["rows"]
        pairs: dict[tuple[str, int], dict[str, dict]] = {}
        for row in rows:
            pairs.setdefault((row["dtype"], row["r"]), {})[row["impl"]] = row
        keys = [k for k, v in pairs.items() if len(v) == 2]
        if keys:
            written.append(_bars(plt, results / "init.png", "initialization: loraga_fast / peft",
                                 [f"{d} r={r}" for d, r in keys],
                                 {"time": [pairs[k]["loraga_fast"]["time_s"] / pairs[k]["peft"]["time_s"] for k in keys],
                                  "extra peak memory": [pairs[k]["loraga_fast"]["peak_extra_bytes"] / max(pairs[k]["peft"]["peak_extra_bytes"], 1) for k in keys]}))
    kernels = results / "kernels.json"
    if kernels.is_file():
        rows = [r for r in json.loads(kernels.read_text())["results"] if r["tflops"] is not None]
        impls = sorted({r["impl"] for r in rows})
        cases = sorted({(r["t"], r["m"], r["n"]) for r in rows})
        by = {(r["impl"], r["t"], r["m"], r["n"]): r["tflops"] for r in rows}
        written.append(_bars(plt, results / "kernels.png", "accumulate: TFLOP/s", [f"T{t} {m}x{n}" for t, m, n in cases],
                             {impl: [by.get((impl, *c)) for c in cases] for impl in impls}))
    return written


def _bars(plt, path: Path, title: str, labels: list[str], series: dict[str, list]) -> Path:  # type: ignore[no-untyped-def]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(series)), 4))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels, rotation=20)
    if "/" in title:
        ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

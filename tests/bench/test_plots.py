"""Benchmark charts (loraga_fast.bench.plots) and the timing flags the suites attach to their ratios."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from loraga_fast.bench import e2e  # noqa: E402
from loraga_fast.bench import plots  # noqa: E402
from loraga_fast.bench.measure import CallResult  # noqa: E402
from loraga_fast.bench.timing_flags import (  # noqa: E402
    footnotes,
    is_contended,
    is_noisy,
    marks,
    ratio_flags,
    spread,
)

# the defect behind these flags: a 12.9x interleaved ratio whose peft side took 8.0 / 91.1 / 128.6 s
NOISY_TIMES = [8.0, 91.1, 128.6]


def _result(impl: str, times: list[float], other: list[float] | None = None, dtype: str = "fp32") -> dict[str, Any]:
    """A fake loraga_fast.bench.measure.measure result with what ratio_rows and format_table read."""
    return {"impl": impl, "dtype": dtype, "preset": "tiny", "time_s": sorted(times)[len(times) // 2],
            "times_s": times, "other_cpu_s": other or [0.0] * len(times), "peak_extra_bytes": 2**20,
            "first_call_s": 1.0, "memory": {"maxrss_extra_bytes": None}}


def _bars_by_label(ax: Any) -> dict[str, list[Any]]:
    """The bars of each legend entry (series name), in x order."""
    return {c.get_label(): list(c) for c in ax.containers}


# ------------------------------------------------------------------------------------------- timing rules


def test_contention_and_spread_rules() -> None:
    assert not is_contended([1.0, 1.0], [0.05, 0.1])  # 7.5% of a core on average: fine
    assert is_contended([1.0, 1.0], [0.0, 0.3])  # 15% on average, though one call was clean
    assert not is_contended([], [])
    assert spread(NOISY_TIMES) == pytest.approx(128.6 / 8.0)
    assert spread([2.0]) is None and not is_noisy([2.0])  # one call: no spread to judge
    assert not is_noisy([1.0, 1.4, 1.2]) and is_noisy([1.0, 1.6])
    assert marks(True) == " *" and marks(False, True) == " ~" and marks(True, True) == " * ~" and marks(False) == ""
    assert footnotes(False, False) == []
    assert [line[0] for line in footnotes(True, True)[:2]] == ["*", "~"]


def test_ratio_flags_take_either_side() -> None:
    clean, busy = {"times_s": [1.0, 1.1], "other_cpu_s": [0.0, 0.0]}, {"times_s": [1.0, 1.1], "other_cpu_s": [0.5, 0.5]}
    noisy = {"times_s": NOISY_TIMES, "other_cpu_s": [0.0] * 3}
    assert ratio_flags("time", clean, clean) == {"time_contended": False, "time_spread": pytest.approx(1.1),
                                                 "time_noisy": False}
    assert ratio_flags("time", clean, busy)["time_contended"] and ratio_flags("time", busy, clean)["time_contended"]
    flags = ratio_flags("x", clean, noisy)
    assert flags["x_noisy"] and not flags["x_contended"] and flags["x_spread"] == pytest.approx(128.6 / 8.0)


# ------------------------------------------------------------------------------------------------ the e2e suite


def test_e2e_ratio_rows_carry_time_flags() -> None:
    results = [_result("loraga_fast", [1.0, 1.0, 1.0]), _result("peft", [2.0, 2.1, 2.0], [0.0, 0.9, 0.0]),
               _result("loraga_fast", [1.0, 1.0, 1.0], dtype="bf16"), _result("peft", NOISY_TIMES, dtype="bf16")]
    fp32, bf16 = e2e.ratio_rows(results)
    assert fp32["time_ratio"] == pytest.approx(0.5) and fp32["time_contended"] and not fp32["time_noisy"]
    assert bf16["time_noisy"] and not bf16["time_contended"] and bf16["time_spread"] == pytest.approx(128.6 / 8.0)
    table = e2e.format_table(results, [fp32, bf16])
    assert "0.500x *" in table and f"{1.0 / 91.1:.3f}x ~" in table
    assert "91.100 ~" in table and "2.000 *" in table  # the flagged sides themselves
    assert len(e2e.table_footnotes(results, {})) == 3  # contended, noisy, what to do


def test_e2e_interleaved_ratio_is_flagged() -> None:
    results = [_result("loraga_fast", [1.0] * 3), _result("peft", [1.0] * 3)]
    (row,) = e2e.ratio_rows(results)
    calls = {"loraga_fast": [CallResult(t, t, 0.0) for t in (10.0, 10.5, 10.2)],
             "peft": [CallResult(t, t, 0.0) for t in (0.8, 0.9, 0.85)]}
    interleaved = {"fp32": e2e.interleaved_sides(calls)}
    interleaved["fp32"]["peft"]["times_s"] = [0.8, 9.1, 12.8]  # the defect's spread, scaled
    e2e.add_interleaved([row], interleaved)
    assert row["time_ratio_interleaved"] == pytest.approx(10.2 / 9.1)
    assert row["time_interleaved_noisy"] and not row["time_interleaved_contended"]
    assert not row["time_noisy"]  # the main ratio keeps its own flags
    interleaved["fp32"]["loraga_fast"]["other_cpu_s"] = [0.0, 5.0, 0.0]
    e2e.add_interleaved([row], interleaved)
    assert row["time_interleaved_contended"]
    (line,) = e2e.format_interleaved(interleaved, [row], rounds=3)
    assert line.endswith(f"ours/peft {10.2 / 9.1:.3f}x * ~") and "loraga_fast 10.200s *" in line
    notes = e2e.table_footnotes(results, interleaved)
    assert notes[0].startswith("* ") and notes[1].startswith("~ ")


def test_e2e_interleaved_needs_both_impls() -> None:
    (row,) = e2e.ratio_rows([_result("loraga_fast", [1.0]), _result("peft", [1.0])])
    e2e.add_interleaved([row], {"fp32": {"loraga_fast": {"times_s": [1.0], "other_cpu_s": [0.0]}}})
    assert "time_ratio_interleaved" not in row and "time_interleaved_contended" not in row


# ------------------------------------------------------------------------------------------------ the charts


def test_e2e_chart_log_scale_labels_values_and_hatches() -> None:
    fig = plots.e2e_figure({"ratios": [
        {"preset": "70m", "dtype": "fp32", "time_ratio": 0.9, "time_contended": False, "time_noisy": False,
         "time_ratio_interleaved": 12.9, "time_interleaved_contended": False, "time_interleaved_noisy": True,
         "peak_extra_ratio": 0.25},
        {"preset": "70m", "dtype": "bf16", "time_ratio": 1.17, "time_contended": True, "time_noisy": False,
         "time_ratio_interleaved": 1.1, "peak_extra_ratio": 0.8}]})
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert ax.get_ylabel() == "ours / peft, lower is better"
    lo, hi = ax.get_ylim()
    assert hi >= 12.9 * 1.2 and lo * hi == pytest.approx(1.0)  # symmetric around 1, room for the largest bar
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())  # the line at 1
    texts = {t.get_text() for t in ax.texts}
    assert {"0.90x", "1.17x", "12.90x", "1.10x", "0.25x", "0.80x"} <= texts
    bars = _bars_by_label(ax)
    assert [b.get_hatch() for b in bars["time"]] == [None, plots.HATCH]
    assert [b.get_hatch() for b in bars["time (interleaved)"]] == [plots.HATCH, None]
    assert [b.get_hatch() for b in bars["extra peak memory"]] == [None, None]
    # bars grow from 1: down for a ratio below 1, up for one above
    time_bars = bars["time"]
    assert time_bars[0].get_y() == pytest.approx(1.0) and time_bars[0].get_height() == pytest.approx(-0.1)
    assert time_bars[1].get_height() == pytest.approx(0.17)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert plots.UNRELIABLE_LABEL in legend and "time (interleaved)" in legend
    hatches = {t.get_text(): h.get_hatch() for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    assert hatches == {"time": None, "time (interleaved)": None, "extra peak memory": None,
                       plots.UNRELIABLE_LABEL: plots.HATCH}  # only the explanation is hatched in the legend


def test_small_ratios_keep_the_default_range_and_no_flag_legend() -> None:
    fig = plots.e2e_figure({"ratios": [{"preset": "tiny", "dtype": "fp32", "time_ratio": 0.95,
                                        "peak_extra_ratio": 1.05}]})
    (ax,) = fig.axes
    assert ax.get_ylim() == pytest.approx((0.5, 2.0))
    assert plots.UNRELIABLE_LABEL not in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "time (interleaved)" not in _bars_by_label(ax)


def test_ratio_limits() -> None:
    assert plots.ratio_limits([]) == pytest.approx((0.5, 2.0))
    assert plots.ratio_limits([0.1]) == pytest.approx((1 / 12, 12))  # a small ratio widens both ends
    lo, hi = plots.ratio_limits([0.9, 12.9])
    assert math.isclose(hi, 12.9 * 1.2) and math.isclose(lo, 1 / hi)


def test_init_chart_flags_contended_pairs() -> None:
    rows = [{"impl": impl, "dtype": dtype, "r": 8, "time_s": t, "peak_extra_bytes": 100, "contended": busy}
            for dtype, busy_side in (("fp32", None), ("bf16", "peft"))
            for impl, t in (("loraga_fast", 1.0), ("peft", 4.0))
            for busy in [impl == busy_side]]
    (ax,) = plots.init_figure({"rows": rows}).axes
    assert ax.get_yscale() == "log" and ax.get_ylabel() == plots.RATIO_LABEL
    assert [b.get_hatch() for b in _bars_by_label(ax)["time"]] == [None, plots.HATCH]
    assert "0.25x" in {t.get_text() for t in ax.texts}
    assert plots.init_figure({"rows": rows[:1]}) is None  # no complete pair


def test_kernels_chart_keeps_the_transposed_case() -> None:
    results = [{"impl": impl, "t": 64, "m": 96, "n": 64, "transposed": transposed, "tflops": tf}
               for impl, transposed, tf in (("ours", False, 1.5), ("ours", True, 0.75), ("cublas", False, 2.0),
                                            ("cublas", True, None), ("autograd", False, 0.5))]
    (ax,) = plots.kernels_figure({"dtype": "fp16", "results": results}).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["T64 96x64", "T64 96x64 conv1d"]
    assert ax.get_ylabel() == "TFLOP/s, higher is better" and ax.get_yscale() == "linear"
    assert [b.get_height() for b in _bars_by_label(ax)["ours"]] == [1.5, 0.75]  # not overwritten by the other
    assert len(_bars_by_label(ax)["cuBLAS"]) == 1  # no bar where nothing was timed
    # the legend names the implementations as the table's heads do (it said "autograd" where the table says bf16)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fp16", "cuBLAS", "ours"]
    assert {"1.5", "0.75", "2"} <= {t.get_text() for t in ax.texts}


def test_plot_results_writes_pngs(tmp_path: Path) -> None:
    (tmp_path / "e2e.json").write_text(json.dumps({"ratios": [
        {"preset": "70m", "dtype": "fp32", "time_ratio": 12.9, "time_contended": True, "peak_extra_ratio": 0.8}]}))
    (tmp_path / "kernels.json").write_text(json.dumps({"results": [{"impl": "ours", "t": 1, "m": 1, "n": 1,
                                                                    "tflops": None}]}))
    written = plots.plot_results(tmp_path)
    assert [p.name for p in written] == ["e2e.png"]  # kernels.json timed nothing: no empty chart
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

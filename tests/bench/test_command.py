"""``loraga-fast bench``: which suite module it runs in a fresh process and with which arguments (the suites
themselves are stubbed: these tests are about argument passing, not models), its refusals, and its charts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import loraga_fast.command.bench as bench_command
from loraga_fast.command.main import main


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The command lines ``loraga-fast bench`` runs, none of them run; every optional package counts as
    installed, so the tests do not depend on what this machine has (SmolLM2, bitsandbytes, matplotlib)."""
    ran: list[list[str]] = []
    monkeypatch.setattr(bench_command.subprocess, "run",
                        lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(bench_command, "missing_packages", lambda *args: [])
    return ran


def _module(cmd: list[str]) -> str:
    assert cmd[:2] == [sys.executable, "-m"], cmd  # a module of the package, never a file path
    return cmd[2]


@pytest.mark.parametrize(("suite", "given", "expected"), [
    ("lowmem", ["--preset", "llama-7b-cpu"], ["--preset", "llama-7b-cpu", "--json", "{out}/lowmem.json"]),
    ("lowmem", ["--preset", "llama-13b-nf4-cpu"], ["--preset", "llama-13b-nf4-cpu", "--json", "{out}/lowmem.json"]),
    ("accuracy", [], ["--json", "{out}/accuracy.json"]),
    ("onepass", [], ["--json", "{out}/onepass.json"]),
    ("e2e", ["--preset", "tiny"], ["--preset", "tiny", "--json", "{out}/e2e.json"]),
    ("init", ["--preset", "tiny"], ["--preset", "tiny-groups", "--json", "{out}/init.json"]),
    ("kernels", ["--preset", "70m"], ["--preset", "cpu", "--json", "{out}/kernels.json"]),
    ("sketch_memory", [], ["--json", "{out}/sketch_memory.json"]),
    ("qlora", [], ["--json", "{out}/qlora.json"]),
    ("convergence", [], ["--out", "{out}"]),
    ("stopping", [], ["--json", "{out}/stopping.json"]),
    ("task", [], ["--json", "{out}/task.json"]),
    ("distributed", [], ["--preset", "70m", "--json", "{out}/distributed.json"]),
])
def test_bench_suites_run_their_modules(suite: str, given: list[str], expected: list[str], tmp_path: Path,
                                        calls: list[list[str]]) -> None:
    assert main(["bench", suite, *given, "--out", str(tmp_path)]) == 0
    (cmd,) = calls
    assert _module(cmd) == f"loraga_fast.bench.{suite}"
    assert cmd[3:] == [arg.format(out=tmp_path) for arg in expected]


def test_suite_options_pass_through_in_order(tmp_path: Path, calls: list[list[str]]) -> None:
    assert main(["bench", "e2e", "--preset", "tiny", "--dtypes", "bf16", "--out", str(tmp_path), "--repeats", "1",
                 "--", "--preset", "llama-7b-4l"]) == 0
    (cmd,) = calls
    # the command's own options are mapped; the rest follow in order (after --: untouched, so a suite preset the
    # command does not know wins, as the last --preset)
    assert cmd[3:] == ["--preset", "tiny", "--json", str(tmp_path / "e2e.json"), "--dtypes", "bf16", "--repeats", "1",
                       "--preset", "llama-7b-4l"]


def test_all_runs_kernels_init_e2e(tmp_path: Path, calls: list[list[str]]) -> None:
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    assert [_module(c) for c in calls] == [f"loraga_fast.bench.{s}" for s in ("kernels", "init", "e2e")]
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path), "all", "--repeats", "1"]) == 2  # whose?


def test_kernels_tune_runs_the_tuner(tmp_path: Path, calls: list[list[str]]) -> None:
    table = tmp_path / "table.json"
    assert main(["bench", "kernels", "--tune", "--table", str(table), "--out", str(tmp_path)]) == 0
    (cmd,) = calls
    assert _module(cmd) == "loraga_fast.bench.tuning"
    assert cmd[3:] == ["--json", str(tmp_path / "kernel_tune.json"), "--table", str(table)]
    assert main(["bench", "e2e", "--tune"]) == 2  # --tune is for the kernels suite only
    assert main(["bench", "kernels", "--table", str(table)]) == 2  # --table goes with --tune


def test_plot_runs_the_charts_after_the_suite(tmp_path: Path, calls: list[list[str]]) -> None:
    assert main(["bench", "e2e", "--preset", "tiny", "--plot", "--out", str(tmp_path)]) == 0
    assert [_module(c) for c in calls] == ["loraga_fast.bench.e2e", "loraga_fast.bench.plots"]
    assert calls[1][3:] == [str(tmp_path)]


def test_suite_help_is_the_suites_own(calls: list[list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "lowmem", "--help"]) == 0
    (cmd,) = calls
    assert _module(cmd) == "loraga_fast.bench.lowmem" and cmd[3:] == ["--help"]
    assert "give the suite's own --preset or --json after --" in capsys.readouterr().out


def test_a_failing_suite_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_command.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 3))
    assert main(["bench", "kernels", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "loraga-fast: error: bench kernels failed (exit 3): " in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["e2e", "--preset", "llama-7b-cpu"], "bench lowmem --preset llama-7b-cpu"),
    (["accuracy", "--preset", "tiny"], "--preset does not apply to bench accuracy"),
    (["distributed", "--preset", "llama-7b-cpu"], "is for the low-memory suite"),
    (["e2e", "--preset", "llama-13b-nf4-cpu"], "bench lowmem --preset llama-13b-nf4-cpu"),
])
def test_refusals_are_one_line(args: list[str], message: str, calls: list[list[str]],
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err and calls == []


def test_bench_7b_preset_needs_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the preset runs")
    assert main(["bench", "--preset", "llama-7b"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("bitsandbytes", "matplotlib")
                        else real(name, *a))
    assert ("bench qlora", "bitsandbytes") in bench_command.missing_packages("qlora", None, False)
    assert bench_command.missing_packages("lowmem", "llama-13b-nf4-cpu", False) == \
        [("--preset llama-13b-nf4-cpu", "bitsandbytes")]
    assert bench_command.missing_packages("e2e", "tiny", True) == [("--plot", "matplotlib")]
    assert main(["bench", "e2e", "--preset", "tiny", "--plot"]) == 2  # before the suite runs, not after
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_plots_from_result_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "e2e.json").write_text(json.dumps({"ratios": [
        {"preset": "70m", "dtype": "fp32", "time_ratio": 0.9, "peak_extra_ratio": 0.8}]}))
    (tmp_path / "init.json").write_text(json.dumps({"rows": [
        {"impl": impl, "dtype": "bf16", "r": 8, "time_s": t, "peak_extra_bytes": 100}
        for impl, t in (("loraga_fast", 1.0), ("peft", 2.0))]}))
    (tmp_path / "kernels.json").write_text(json.dumps({"results": [
        {"impl": "loraga_fast", "t": 64, "m": 8, "n": 8, "tflops": 1.0},
        {"impl": "autograd", "t": 64, "m": 8, "n": 8, "tflops": None}]}))
    proc = subprocess.run([sys.executable, "-m", "loraga_fast.bench.plots", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = [tmp_path / f"{stem}.png" for stem in ("e2e", "init", "kernels")]
    assert proc.stdout.splitlines() == [f"wrote {p}" for p in written]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_command_never_imports_the_suites() -> None:
    from tests.test_package import import_edges

    edges: dict[str, Any] = import_edges()
    assert not [m for m, targets in edges.items() if m.startswith("loraga_fast.command")
                and any(t.startswith("loraga_fast.bench") for t in targets)]

"""The device check cannot rot: ``bash bench/gpu.sh --dry-run`` runs every step on the CPU and writes its one JSON;
the explicit kernel tuner writes a table the library reads; no bench/ or tests/ file shadows an installed package."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from loraga_fast.ops._accumulate_triton import (
    TABLE_ENV,
    KernelConfig,
    kernel_config,
    table_key,
)

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["versions", "tests", "kernels", "e2e", "init", "lowmem", "sketch_memory"]
CLEARED = ("TRITON_INTERPRET", "LORAGA_FAST_BACKEND", TABLE_ENV)

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("gpu_dry_run")
    # gpu.sh's own dry-run deadline is 900 s (a busy 2-core machine can take minutes): it, not this, decides
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=960, env=_env(OUT=str(out), PYTHON=sys.executable))
    report = json.loads((out / "gpu.json").read_text()) if (out / "gpu.json").is_file() else {}
    return proc, report


def test_dry_run_every_step_succeeds(dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    proc, report = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert report["mode"] == "dry-run" and report["all_ok"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    for s in report["steps"]:
        assert s["status"] == "ok" and s["exit_code"] == 0, s
        assert 0 < s["seconds"] <= s["timeout_s"], s
    assert "all steps succeeded" in proc.stdout


def test_dry_run_json_has_versions_and_figures(dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _, report = dry_run
    versions = report["versions"]
    for name in ("python", "torch", "triton", "numpy", "transformers", "peft"):
        assert versions[name], name
    assert versions["torch"] == torch.__version__
    assert report["device"]["cuda"] is False  # CUDA_VISIBLE_DEVICES="" in a dry run
    figures = report["figures"]

    tests = figures["tests"]  # the cuda-marked tests, collected and skipped on the CPU
    assert tests["skipped"] > 0 and tests["failures"] == 0 and tests["errors"] == 0

    kernels = figures["kernels"]
    assert kernels["preset"] == "tiny" and len(kernels["cases"]) == 2
    assert {c["label"] for c in kernels["cases"]} == {"T64 96x64", "T64 96x64 conv1d"}
    for case in kernels["cases"]:
        assert case["backend"] == "triton"  # the kernel through the interpreter
        assert case["ours_rel_err"] < 1e-6 < case["autograd_rel_err"]  # fp32 accumulation vs a bf16 result
        assert case["deterministic"] is True
        assert case["ours_ms"] > 0 and case["autograd_ms"] > 0 and case["ours_over_autograd_time"] > 0
        assert case["cublas_ms"] is None  # addmm(out_dtype=) is CUDA-only: reported as unsupported
    assert kernels["cublas_notes"] and "unsupported" in kernels["cublas_notes"][0]

    for step in ("e2e", "init"):
        fig = figures[step]
        assert set(fig["impls"]) == {"loraga_fast", "peft"}, step
        assert all(v["time_s"] > 0 and v["peak_extra_bytes"] is not None for v in fig["impls"].values()), step
        assert fig["time_ratio"] > 0 and fig["peak_extra_ratio"] > 0, step
    assert figures["e2e"]["impls"]["loraga_fast"]["num_grads"] == 14  # 2 layers x 7 projections

    lowmem = figures["lowmem"]
    assert set(lowmem["impls"]) == {"floor", "lowmem1", "lowmem"} and not lowmem["failed"]
    assert lowmem["passes"] >= 2 and lowmem["lowmem_per_pass_x_floor"] > 0 and lowmem["onepass_x_floor"] > 0
    assert [f["r"] for f in lowmem["onepass_flops"]] == [8, 16] and lowmem["onepass_flops"][0]["overhead"] > 0
    store = figures["sketch_memory"]  # live RSS and glibc's defaults, on the CPU of a dry run
    assert [r["measure"] for r in store["rows"]] == ["live", "glibc default"] and store["all_meet_bar"]
    assert all(r["blocks"] == 2 and r["peak_extra_bytes"] >= r["sketch_bytes"] > 0 for r in store["rows"])


def test_tuner_writes_a_table_the_library_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "kernel_table.json"
    other_gpu = {table_key("Some GPU", True, "large"): {"block_m": 64, "block_n": 64, "block_k": 32, "group_m": 8,
                                                         "num_warps": 4, "num_stages": 3}}
    table.write_text(json.dumps(other_gpu))  # an existing table: its other entries are kept
    proc = subprocess.run([sys.executable, "-m", "loraga_fast", "bench", "kernels", "--tune", "--preset", "tiny",
                           "--table", str(table), "--out", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env=_env(TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"export {TABLE_ENV}={table}" in proc.stdout
    written = json.loads(table.read_text())
    tuned = {table_key("interpreter", True, "small"), table_key("interpreter", False, "small")}
    assert set(written) == tuned | set(other_gpu)
    for key, entry in written.items():
        assert KernelConfig(**entry)  # every value is a complete config
    report = json.loads((tmp_path / "kernel_tune.json").read_text())
    assert report["entries"] == {k: written[k] for k in tuned}
    assert all(m["status"] == "ok" for m in report["measurements"])

    # the library reads it for a CUDA device of that name (kernel_config reads the table only for CUDA devices)
    monkeypatch.setenv(TABLE_ENV, str(table))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "interpreter")
    assert kernel_config(torch.device("cuda"), True, 96, 64) == KernelConfig(**written[table_key("interpreter", True, "small")])
    assert kernel_config(torch.device("cuda"), False, 96, 64) == KernelConfig(**written[table_key("interpreter", False, "small")])


def test_tuner_refuses_a_cpu_without_the_interpreter(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "loraga_fast", "bench", "kernels", "--tune", "--out", str(tmp_path),
                           "--table", str(tmp_path / "t.json"), "--device", "cpu"], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "t.json").exists()


def test_no_bench_or_test_file_shadows_an_installed_package() -> None:
    """A script run as ``python bench/x.py`` (or pytest's rootdir insertion) puts its folder first on sys.path: a
    bench/kernels.py once made bitsandbytes' ``import kernels`` load our benchmark. No module name under bench/ or
    tests/ may be an installed top-level package's (the suites are modules of loraga_fast.bench, run with -m, whose
    folder is never on sys.path)."""
    installed = {m.name for m in pkgutil.iter_modules()
                 if not str(getattr(m.module_finder, "path", "")).startswith(str(ROOT))}
    installed |= set(sys.stdlib_module_names)
    ours = {p.stem if p.suffix == ".py" else p.name: p for folder in ("bench", "tests")
            for p in (ROOT / folder).rglob("*")
            if (p.suffix == ".py" or p.is_dir()) and not {"__pycache__", "results"} & set(p.relative_to(ROOT).parts)}
    clashes = {name: str(p.relative_to(ROOT)) for name, p in ours.items() if name in installed and name != "__init__"}
    assert not clashes, clashes
    assert not (ROOT / "bench" / "kernels.py").exists()

"""``loraga-fast bench`` works from an installed wheel, not only from a source checkout: build the wheel, install it
(non-editable, dependencies not reinstalled) into a folder of its own, and run the smallest preset of the e2e suite
from outside the repository with only that folder on the path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _offline_build() -> bool:
    """Whether this environment can build the wheel itself (setuptools >= 69 with bdist_wheel built in, or the wheel
    package); otherwise pip builds in an isolated environment, fetching the build requirements."""
    try:
        major, minor = (int(x) for x in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    try:
        has_wheel = (major, minor) >= (70, 1) or bool(metadata.version("wheel"))
    except metadata.PackageNotFoundError:
        has_wheel = False
    return major >= 69 and has_wheel


def _run(cmd: list[str], timeout: int, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_bench_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the shared tree
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "loraga_fast", src / "loraga_fast", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    isolation = ["--no-build-isolation"] if _offline_build() else []
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(wheels), str(src)], 600)
    (wheel,) = wheels.glob("loraga_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"loraga_fast/bench/e2e.py", "loraga_fast/bench/harness.py", "loraga_fast/bench/plots.py"} <= set(names)
    assert not [n for n in names if n.startswith(("bench/", "tests/"))]

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
          str(wheel)], 300)
    elsewhere = tmp_path / "elsewhere"  # no source tree on the path: the installed copy or nothing
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    found = _run([sys.executable, "-c", "import loraga_fast; print(loraga_fast.__file__)"], 120, cwd=elsewhere,
                 env=env).stdout.strip()
    assert Path(found).is_relative_to(site), found  # not the editable install of this checkout

    out = elsewhere / "results"
    proc = _run([sys.executable, "-m", "loraga_fast", "bench", "e2e", "--preset", "tiny", "--out", str(out),
                 "--dtypes", "fp32", "--repeats", "1", "--interleave", "0"], 600, cwd=elsewhere, env=env)
    assert "== loraga-fast bench e2e: python -m loraga_fast.bench.e2e --preset tiny" in proc.stdout
    assert "loraga_fast/peft" in proc.stdout  # the ratio row of the table
    report = json.loads((out / "e2e.json").read_text())
    assert Path(report["command"][1]).is_relative_to(site)  # the suite that ran is the installed one
    assert report["config"]["preset"] == "tiny" and report["failed"] == []
    assert {r["impl"] for r in report["results"]} == {"loraga_fast", "peft"}
    assert all(r["isolated"] and r["num_grads"] == 14 for r in report["results"])  # 2 layers x 7 projections
    (ratio,) = report["ratios"]
    assert ratio["time_ratio"] > 0 and ratio["peak_extra_ratio"] > 0

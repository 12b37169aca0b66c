"""The one way a suite measures in a fresh process, and the small helpers every suite's JSON and tables share.

:func:`in_fresh_process` runs ``fn(**kwargs)`` in a new Python interpreter and returns its JSON result:

    python -m loraga_fast.bench.harness MODULE FUNCTION KWARGS_JSON OUT_JSON

imports ``MODULE`` (the module that defines ``fn``: a suite run as ``python -m loraga_fast.bench.<suite>`` is
``__main__`` here and is named by its spec), calls ``FUNCTION(**KWARGS)`` and writes its return value to
``OUT_JSON``. Memory readings on a CPU are only meaningful on a process's first call (freed memory that the
allocator keeps hides later growth), so every suite that reports peak memory takes each measurement this way.
The child imports the same ``loraga_fast`` as its parent (its folder is put first on ``PYTHONPATH``), from a
source tree or an installed wheel alike.

Only the standard library at module level: ``gpu_summary`` imports the formatting helpers without torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "WorkerFailed", "bytes_text", "finish", "in_fresh_process", "nothing_measured", "num", "ratio",
           "result_path", "suite_parser", "tflops_text", "write_json"]

RESULTS = Path("bench") / "results"
"""Where the suites write their JSON unless told otherwise (relative to the working directory)."""


class WorkerFailed(RuntimeError):
    """A fresh-process measurement that exited non-zero or wrote no result: its exit code and the end of its
    stderr, which the suites record in their JSON (``failed``) and print."""

    def __init__(self, command: list[str], exit_code: int, stderr: str):
        self.command, self.exit_code, self.stderr_tail = command, exit_code, stderr[-3000:]
        super().__init__(f"benchmark worker failed (exit {exit_code}): {' '.join(command)}\n"
                         f"--- stderr (tail) ---\n{self.stderr_tail}")

    def record(self, **where: Any) -> dict[str, Any]:
        """What the suites' JSON keeps of a failure: ``where`` (impl, dtype, ...), exit code and stderr tail."""
        return {**where, "exit_code": self.exit_code, "stderr_tail": self.stderr_tail}


def _module_name(fn: Callable[..., Any]) -> str:
    module = fn.__module__
    if module == "__main__":  # a suite run as python -m loraga_fast.bench.<suite>: its spec has the real name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise RuntimeError("run the suite as a module (python -m loraga_fast.bench.<suite>), not as a file")
        module = spec.name
    return module


def in_fresh_process(fn: Callable[..., Any], /, *, env: Mapping[str, str] | None = None,
                     timeout_s: float | None = None, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` in a fresh Python process; its (JSON) result.

    Args:
        fn: a module-level function of an importable module, returning something JSON can hold.
        env: variables added to this process's environment for the child.
        timeout_s: kill the child after this long (``subprocess.TimeoutExpired``).
        kwargs: ``fn``'s arguments, JSON-serializable (names of presets and devices, numbers).

    Raises:
        WorkerFailed: the child exited non-zero or wrote no result.
    """
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding this loraga_fast
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child_env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="loraga_bench_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", __name__, _module_name(fn), fn.__qualname__, json.dumps(kwargs), str(out)]
        proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.is_file():
            raise WorkerFailed(cmd, proc.returncode, proc.stderr)
        return json.loads(out.read_text())


def _worker(argv: list[str]) -> None:
    module, name, kwargs, out = argv
    result = getattr(importlib.import_module(module), name)(**json.loads(kwargs))
    Path(out).write_text(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------------------ results and tables


def suite_parser(suite: str, doc: str | None) -> argparse.ArgumentParser:
    """A suite's argument parser: named as the command runs it (``loraga-fast bench <suite>``), its module
    docstring as the description, kept as written."""
    return argparse.ArgumentParser(prog=f"loraga-fast bench {suite}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def nothing_measured(suite: str) -> int:
    """Say that every measurement of ``suite`` failed (each printed its error); the exit status, 1."""
    print(f"{suite} benchmark: every measurement failed", file=sys.stderr)
    return 1


def finish(path: str | Path, failed: object) -> int:
    """Say where the results are; the exit status: 1 when something ``failed`` (a non-empty record), else 0."""
    print(f"results written to {path}")
    return 1 if failed else 0


def result_path(path: str | Path | None, suite: str) -> Path:
    """``path``, or ``bench/results/<suite>.json`` when None."""
    return Path(path) if path is not None else RESULTS / f"{suite}.json"


def write_json(path: str | Path, data: Any, indent: int = 2) -> None:
    """Write ``data`` as JSON, creating the folder (the suites rewrite it after every measurement, so a run stopped
    by a timeout keeps what it measured)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


def num(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``; ``-`` for None."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def tflops_text(value: float | None) -> str:
    """TFLOP/s: whole numbers on a GPU, three significant digits for the CPU's small values."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def bytes_text(b: int | None) -> str:
    """Bytes as GiB from 1 GiB up, else MiB."""
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.1f} MiB"


if __name__ == "__main__":
    _worker(sys.argv[1:])

"""The one fresh-process runner of the suites (loraga_fast.bench.harness) and its result helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import loraga_fast
from loraga_fast.bench.harness import WorkerFailed, in_fresh_process, num, ratio, result_path, write_json


def test_a_function_runs_in_a_fresh_process_with_its_arguments() -> None:
    assert in_fresh_process(ratio, a=3.0, b=2.0) == 1.5
    # the child's environment: this one plus env, and the folder of the loraga_fast that runs here first on its path
    assert in_fresh_process(os.getenv, env={"LORAGA_BENCH_PROBE": "7"}, key="LORAGA_BENCH_PROBE") == "7"
    first = in_fresh_process(os.getenv, key="PYTHONPATH").split(os.pathsep)[0]
    assert Path(first) == Path(loraga_fast.__file__).resolve().parents[1]
    assert in_fresh_process(os.getpid) != os.getpid()


def test_a_failing_worker_raises_with_its_exit_code_and_stderr() -> None:
    with pytest.raises(WorkerFailed) as info:
        in_fresh_process(ratio, a=1.0)  # b missing: a TypeError in the child
    err = info.value
    assert err.exit_code == 1 and "TypeError" in err.stderr_tail and "missing 1 required" in err.stderr_tail
    assert err.record(impl="x") == {"impl": "x", "exit_code": 1, "stderr_tail": err.stderr_tail}


def test_result_helpers(tmp_path: Path) -> None:
    assert result_path(None, "e2e") == Path("bench/results/e2e.json")
    assert result_path(tmp_path / "x.json", "e2e") == tmp_path / "x.json"
    write_json(tmp_path / "deep" / "r.json", {"a": 1})
    assert json.loads((tmp_path / "deep" / "r.json").read_text()) == {"a": 1}
    assert ratio(1.0, 0.0) is None and ratio(None, 2.0) is None and ratio(1.0, 4.0) == 0.25
    assert num(None, ".2f") == "-" and num(1.234, ".2f", "x") == "1.23x"

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


def test_error_notes_are_never_cut_mid_word() -> None:
    """The kernels table's cuBLAS note read "... This could be because the o" (100 characters, cut mid-word)."""
    import torch

    from loraga_fast.bench.timing import first_line

    try:
        torch.addmm(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.bfloat16),
                     out_dtype=torch.float32)
    except (RuntimeError, TypeError) as err:
        real = first_line(err)
        assert real.endswith((".", "...")) and len(real) < 200, real
    long = RuntimeError("Could not run 'aten::addmm.dtype' with arguments from the 'CPU' backend. " + "x " * 80)
    assert first_line(long) == "RuntimeError: Could not run 'aten::addmm.dtype' with arguments from the 'CPU' backend."
    words = RuntimeError("word " * 60)
    text = first_line(words)
    assert text.endswith("word ...") and len(text) <= len("RuntimeError: ") + 124
    assert first_line(ValueError("short\nsecond line")) == "ValueError: short"


def test_the_peft_baseline_runs_without_torchs_backward_hook_warning() -> None:
    """e2e printed torch's full-backward-hook warning on every peft run (peft's hooks, not the benchmark's)."""
    import warnings

    import torch

    from loraga_fast.bench.workloads import get_impl
    from tests._helpers import LLAMA_TARGETS, attached, lora_ga_config, tiny_llama

    model = tiny_llama()
    batch = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_impl("peft")(model, lora_ga_config(), lambda: model(input_ids=batch, labels=batch).loss.backward())
    assert not [w for w in caught if "backward hook" in str(w.message)], [str(w.message) for w in caught]
    assert len(attached(model)) == len(LLAMA_TARGETS) * 2  # peft did its job: every target has its gradient

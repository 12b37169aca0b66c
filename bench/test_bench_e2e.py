"""pytest-benchmark suite: ``preprocess_loraga`` of loraga_fast vs peft, end to end (see loraga_fast/bench/measure.py).

    python -m pytest bench -q --benchmark-enable                        # tiny preset (quick)
    LORAGA_BENCH_PRESET=70m python -m pytest bench -q --benchmark-enable # the ~70M-parameter model

Environment:
    LORAGA_BENCH_PRESET   preset name from loraga_fast.bench.workloads.PRESETS (default "tiny").
    LORAGA_BENCH_ROUNDS   timed rounds per test (default 3), after one warm-up call.
    LORAGA_BENCH_ISOLATED "1": take the peak memory in ``extra_info`` from a fresh subprocess
                          (loraga_fast.bench.measure.measure) instead of this process (default "0").

Times are pytest-benchmark's statistics over the rounds; nothing asserts on them. ``extra_info`` carries the
extra peak memory of the warm-up call (``peak_extra_bytes``) and how it was measured. In-process on CPU the
reading depends on what earlier tests left in the allocator, so use LORAGA_BENCH_ISOLATED=1 or ``loraga-fast bench
e2e`` for memory numbers worth comparing.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import pytest

from loraga_fast.bench.measure import PreprocessCase, measure
from loraga_fast.bench.workloads import DTYPES, IMPLS, get_preset

PRESET = get_preset(os.environ.get("LORAGA_BENCH_PRESET", "tiny"))
ROUNDS = int(os.environ.get("LORAGA_BENCH_ROUNDS", "3"))
ISOLATED = os.environ.get("LORAGA_BENCH_ISOLATED", "0") == "1"

# peft's preprocess_loraga registers full backward hooks on modules whose inputs do not require grad
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_preprocess_loraga(benchmark: Any, impl: str, dtype: str) -> None:
    case = PreprocessCase.build(impl, dtype, PRESET)
    case.warmup()
    first = case.timed_call(measure_memory=True)  # the warm-up call, not counted in the timings
    assert first.memory is not None

    if ISOLATED:
        isolated = measure(impl, dtype, PRESET.name, repeats=0, device=case.device)
        memory, memory_isolated = isolated["memory"], True
    else:
        memory, memory_isolated = {**asdict(first.memory), "call": "first"}, False

    benchmark.group = f"preprocess_loraga {PRESET.name} {dtype} {case.device.type}"
    benchmark.extra_info.update({
        "preset": PRESET.name,
        "impl": impl,
        "dtype": dtype,
        "device": str(case.device),
        "peak_extra_bytes": memory["peak_extra_bytes"],
        "peak_extra_mib": round(memory["peak_extra_bytes"] / 2**20, 3),
        "memory": memory,
        "memory_isolated": memory_isolated,
        "first_call_s": first.time_s,
    })
    benchmark.pedantic(case, setup=case.reset, rounds=ROUNDS, iterations=1, warmup_rounds=0)

    # the benchmark is only meaningful if the call did its job: a mean gradient on every target
    grads = case.attached_grads()
    assert sorted(grads) == sorted(case.target_names)
    assert all(g.shape == m.weight.shape for name, g in grads.items()
               for m in [case.model.get_submodule(name)])

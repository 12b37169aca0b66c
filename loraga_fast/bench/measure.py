"""One end-to-end measurement: ``loraga_fast.preprocess_loraga`` or ``peft.preprocess_loraga`` on a workload.

Both implementations run on the same seeded, randomly initialized LLaMA model (``transformers.LlamaConfig`` +
``LlamaForCausalLM``) with the same batches and the same ``LoraConfig`` (all seven projection types targeted),
built by :mod:`loraga_fast.bench.workloads`. This module is the measurement: the ``e2e`` suite
(:mod:`loraga_fast.bench.e2e`: table + JSON) and ``bench/test_bench_e2e.py`` (pytest-benchmark) only call into it.

What is measured for one ``(impl, dtype, preset)``:

* **time** -- wall time of one ``preprocess_loraga(model, lora_config, train_step)`` call (``train_step`` runs
  forward + backward over all batches), with ``torch.cuda.synchronize()`` around it on CUDA. The first call of
  the implementation in a process is a warm-up and is not counted; ``time_s`` is the median of the following
  ``repeats`` calls, each after :meth:`PreprocessCase.reset` (gradient attributes and ``.grad`` cleared).
* **extra peak memory** -- how far memory rose above its level just before the call, at its highest during the
  call (the attached ``_peft_loraga_grad`` tensors, which both implementations leave behind, are included), read
  by :class:`loraga_fast.bench.memprobe.MemoryProbe`.

  - CPU: process RSS, sampled by a background thread (psutil, every ~1 ms) and at both ends of the call, minus
    the RSS just before the call (after ``gc.collect()``). Cross-checked with ``getrusage(RUSAGE_SELF).ru_maxrss``,
    the process's RSS high-water mark, which is only meaningful when it rose during the call
    (``maxrss_valid``). Measured on the *first* call in a fresh process (:func:`measure` with
    ``isolated=True``), after a warm-up that does not run the implementation (a no-grad forward pass), because
    freed memory that the allocator keeps makes RSS growth on later calls an underestimate.
  - CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
    ``memory_allocated()`` before the call. Exact and cheap, so it is read on every call; the reported value is
    the largest over the timed repeats (the first call can include one-time allocations such as Triton compilation).
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .harness import in_fresh_process
from .memprobe import MemoryProbe, MemoryReading
from .timing_flags import Stopwatch
from .workloads import (
    GRAD_ATTR,
    IMPLS,
    PRESETS,
    TARGET_MODULES,
    PreprocessFn,
    Preset,
    build_model,
    clear_loraga_state,
    get_impl,
    get_preset,
    make_batches,
    make_lora_config,
    make_train_step,
    resolve_device,
)

__all__ = [
    "CallResult",
    "PreprocessCase",
    "interleaved_calls",
    "measure",
    "measure_in_process",
]


# ------------------------------------------------------------------------------------------------ one case


@dataclass
class CallResult:
    """One preprocess call.

    Attributes:
        time_s: wall time.
        cpu_s: CPU time of this process during the call, all threads (about ``time_s x threads`` when the
            threads are busy).
        other_cpu_s: CPU time the rest of the machine used during the call (system-wide busy time, hypervisor
            steal included, minus ``cpu_s``). Far from 0 means other work competed for the cores and the timing
            is unreliable.
        memory: the extra peak memory, when it was measured.
    """

    time_s: float
    cpu_s: float
    other_cpu_s: float
    memory: MemoryReading | None = None


@dataclass(eq=False)
class PreprocessCase:
    """One implementation on one preset and dtype: the model, batches, config and ``train_step``, built once.

    Calling the case runs the implementation's ``preprocess_loraga`` once (synchronized on CUDA); call
    :meth:`reset` between calls.
    """

    impl: str
    dtype: str
    preset: Preset
    device: torch.device
    seed: int = 0
    model: nn.Module = field(init=False, repr=False)
    batches: list[torch.Tensor] = field(init=False, repr=False)
    lora_config: Any = field(init=False, repr=False)
    train_step: Callable[[], None] = field(init=False, repr=False)
    preprocess: PreprocessFn = field(init=False, repr=False)

    @classmethod
    def build(cls, impl: str, dtype: str, preset: str | Preset, device: str | torch.device = "auto",
              seed: int = 0) -> PreprocessCase:
        """Import the implementation and build everything the call needs."""
        return cls(impl=impl, dtype=dtype, preset=get_preset(preset), device=resolve_device(device), seed=seed)

    def __post_init__(self) -> None:
        self.preprocess = get_impl(self.impl)  # imported here, so no import happens inside a measured call
        self.model = build_model(self.preset, self.dtype, self.device, self.seed)
        self.batches = make_batches(self.preset, self.device, self.seed)
        self.lora_config = make_lora_config(self.preset)
        self.train_step = make_train_step(self.model, self.batches)

    @property
    def target_names(self) -> list[str]:
        """Names of the modules LoRA-GA targets (every projection of every layer)."""
        return [name for name, module in self.model.named_modules()
                if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES]

    def warmup(self) -> None:
        """Warm the kernels up without running the implementation: one no-grad forward pass over a batch."""
        with torch.no_grad():
            self.model(input_ids=self.batches[0], labels=self.batches[0])
        self._synchronize()
        self.reset()

    def reset(self) -> None:
        """Clear what the previous call left (gradient attributes, ``.grad``) and collect garbage."""
        clear_loraga_state(self.model)
        gc.collect()

    def __call__(self) -> None:
        self.preprocess(self.model, self.lora_config, self.train_step)
        self._synchronize()

    def timed_call(self, measure_memory: bool) -> CallResult:
        """:meth:`reset`, then one call, timed and (when asked) with its extra peak memory measured."""
        self.reset()
        self._synchronize()
        probe = MemoryProbe(self.device) if measure_memory else None
        with probe if probe is not None else nullcontext(), Stopwatch() as watch:
            self()
        return CallResult(time_s=watch.time_s, cpu_s=watch.cpu_s, other_cpu_s=watch.other_cpu_s,
                          memory=probe.reading if probe is not None else None)

    def attached_grads(self) -> dict[str, torch.Tensor]:
        """The ``_peft_loraga_grad`` tensors the last call attached, by module name."""
        return {name: getattr(module, GRAD_ATTR) for name, module in self.model.named_modules()
                if hasattr(module, GRAD_ATTR)}

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------------------------- measurement


def interleaved_calls(dtype: str, preset: str | Preset, rounds: int = 3, device: str | torch.device = "auto",
                      seed: int = 0, impls: tuple[str, ...] = IMPLS) -> dict[str, list[CallResult]]:
    """Every implementation called in one process, alternating implementations (ABBA order) for ``rounds``
    rounds after one untimed call each, so the slow drifts of a shared machine hit all of them alike.

    Returns:
        Per implementation, its ``rounds`` timed calls in order: wall time and the CPU time of this process and
        of the rest of the machine (``other_cpu_s``, for the contention flag of
        :mod:`loraga_fast.bench.timing_flags`), as :func:`measure` records them. Memory is not measured here
        (see :func:`measure` for isolated memory).
    """
    cases = {impl: PreprocessCase.build(impl, dtype, preset, device, seed) for impl in impls}
    for case in cases.values():
        case.warmup()
        case.timed_call(measure_memory=False)
    calls: dict[str, list[CallResult]] = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in (impls if r % 2 == 0 else tuple(reversed(impls))):
            calls[impl].append(cases[impl].timed_call(measure_memory=False))
    for case in cases.values():
        case.reset()
    return calls


def measure_in_process(impl: str, dtype: str, preset: str | Preset, repeats: int = 3,
                       device: str | torch.device = "auto", seed: int = 0) -> dict[str, Any]:
    """Measure one ``(impl, dtype, preset)`` in the current process.

    Builds the case, warms the kernels up without the implementation, makes a first (warm-up) call, then
    ``repeats`` timed calls. On CPU the memory reading is the first call's (see the module docstring), so this
    is only isolated when the process is fresh: prefer :func:`measure`.

    Returns:
        A JSON-serializable dict; ``time_s`` (median of the repeats, None when ``repeats == 0``) and
        ``peak_extra_bytes`` are the headline numbers.
    """
    case = PreprocessCase.build(impl, dtype, preset, device, seed)
    on_cuda = case.device.type == "cuda"
    case.warmup()
    first = case.timed_call(measure_memory=True)
    runs = [case.timed_call(measure_memory=on_cuda) for _ in range(repeats)]

    if on_cuda and runs:
        memory = max((r.memory for r in runs if r.memory is not None), key=lambda m: m.peak_extra_bytes)
        memory_call = "max over repeats"
    else:
        assert first.memory is not None
        memory = first.memory
        memory_call = "first"

    grads = case.attached_grads()
    grad_norm = torch.stack([g.float().norm() for g in grads.values()]).norm().item() if grads else None
    times = [r.time_s for r in runs]
    return {
        "impl": impl,
        "dtype": dtype,
        "preset": case.preset.name,
        "device": str(case.device),
        "repeats": repeats,
        "time_s": statistics.median(times) if times else None,
        "time_min_s": min(times) if times else None,
        "times_s": times,
        "cpu_times_s": [r.cpu_s for r in runs],
        "first_call_s": first.time_s,
        "peak_extra_bytes": memory.peak_extra_bytes,
        "memory": {**asdict(memory), "call": memory_call},
        "num_targets": len(case.target_names),
        "num_grads": len(grads),
        "grad_dtype": str(next(iter(grads.values())).dtype) if grads else None,
        "grad_global_norm": grad_norm,
        "torch_threads": torch.get_num_threads(),
        "other_cpu_s": [r.other_cpu_s for r in runs],
    }


def measure(impl: str, dtype: str, preset: str | Preset, repeats: int = 3, device: str | torch.device = "auto",
            seed: int = 0, isolated: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
    """Measure one ``(impl, dtype, preset)``; see :func:`measure_in_process` for the returned dict.

    With ``isolated=True`` (the default) the measurement runs in a fresh Python process
    (:func:`loraga_fast.bench.harness.in_fresh_process`), so the memory reading of one measurement is not affected
    by any other.

    Raises:
        loraga_fast.bench.harness.WorkerFailed: the fresh process failed.
    """
    if not isolated:
        return measure_in_process(impl, dtype, preset, repeats, device, seed)
    preset_name = get_preset(preset).name
    if PRESETS.get(preset_name) != get_preset(preset):
        raise ValueError("isolated measurements take a registered preset (the subprocess looks it up by name)")
    result: dict[str, Any] = in_fresh_process(measure_in_process, timeout_s=timeout_s, impl=impl, dtype=dtype,
                                              preset=preset_name, repeats=repeats, device=str(device), seed=seed)
    result["isolated"] = True
    return result

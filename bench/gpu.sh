#!/usr/bin/env bash
# One command for a GPU run (about 7 minutes on an H200, estimated; never run yet): the tests without the
# interpreter, then the kernel, end-to-end (70m and LLaMA-7B), initialization (70m and 7B-shaped groups) and
# low-memory mode (70m, bf16) benchmarks. A failing test is reported but does not stop the benchmarks. Results go to $OUT (default bench/results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python -m pytest -q tests 2>&1 | tee "$OUT/tests.log" || echo "SOME TESTS FAILED: see $OUT/tests.log"
python bench/kernels.py --preset llama-7b --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
python bench/run.py --preset 70m --repeats 3 --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
python bench/run.py --preset llama-7b --dtypes bf16 --repeats 1 --json "$OUT/e2e_7b.json" 2>&1 | tee "$OUT/e2e_7b.log"
python bench/init_bench.py --preset 70m --json "$OUT/init_70m.json" 2>&1 | tee "$OUT/init_70m.log"
python bench/init_bench.py --preset 7b-groups --dtypes bf16 --ranks 8 64 --json "$OUT/init_7b.json" 2>&1 | tee "$OUT/init_7b.log"
python bench/lowmem.py --preset 70m --dtype bf16 --out "$OUT/lowmem.json" 2>&1 | tee "$OUT/lowmem.log"

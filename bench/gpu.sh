#!/usr/bin/env bash
# The device check: one command for a GPU machine, from a bare copy of the tree (nothing installed, no network).
#
#   bash bench/gpu.sh [--dry-run] [--tune]        results in $OUT (default bench/results/gpu)
#
# Steps, each in its own process with its own timeout; a failing or timed-out step is recorded and the next one
# runs. All steps together stop at a deadline of GPU_SH_BUDGET_S seconds (default 460: 8 minutes on an H200,
# Triton compilation included, less the summary). Every benchmark step is `loraga-fast bench SUITE` (run as
# `python -m loraga_fast bench`), writing $OUT/SUITE.json:
#   versions  python, torch, triton, numpy, transformers, peft (and pytest, psutil), GPU name     timeout  30 s
#   tests     the GPU-only tests: pytest -m cuda on the files that carry the marker (never the CPU suite)  150 s
#   kernels   bench kernels --preset llama-7b: the 7 LLaMA-7B accumulate cases vs cuBLAS and autograd's
#             bf16 GEMM, TFLOP/s, error vs float64, bit-identity                                          60 s
#   e2e       bench e2e --preset llama-7b --repeats 1 --interleave 0: LLaMA-7B (random weights, 32
#             layers, bf16, 8 batches of 4 x 512 tokens) estimation, ours vs peft, time, peak memory      110 s
#   init      bench init --preset llama-7b --dtypes bf16 --ranks 8 (7b-groups): init time ours vs peft   60 s
#   lowmem    bench lowmem -- --preset llama-7b-4l --dtype bf16 --impls floor lowmem1 lowmem exact: low-
#             memory mode's time (one pass, three) vs the fwd+bwd floor (7B widths, 4 blocks, 2048 tokens
#             per backward: the one-pass FLOP table's case)                                               80 s
#   sketch_memory  bench sketch_memory --blocks 4 32: low-memory mode's store alone on 4 and 32 LLaMA-7B
#             blocks, max_memory_allocated vs the sketch bytes and the documented workspace               40 s
#   [tune]    with --tune only, after the rest: bench kernels --tune --table $OUT/kernel_table.json     150 s
#   summary   python -m loraga_fast.bench.gpu_summary: $OUT/gpu.json (versions, device, per-step status/exit
#             code/seconds, the key figures of every step's own JSON) and a short table
# --dry-run runs the same steps on the CPU (CUDA_VISIBLE_DEVICES="") with tiny presets in a minute or two (twice
# the timeouts): the cuda-marked tests skip, the kernel step runs the Triton kernel through the interpreter. CI runs it
# (tests/bench/test_bench_gpu_sh.py), so this script cannot rot unseen.
# Exit status: 0 when every step succeeded, 1 otherwise. Each step's output is in $OUT/<step>.log.
set -u -o pipefail  # deliberately no -e: every step runs whatever the previous one did

DRY=0
TUNE=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --tune) TUNE=1 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $arg (use --dry-run, --tune)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/bench/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # a relative $OUT is relative to the caller's directory
cd "$ROOT" || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "$PY" ]; then echo "gpu.sh: no python or python3 on PATH (or set PYTHON)" >&2; exit 2; fi

# the bare tree is the package: no install, no network, the compiled kernels and the default kernel table
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/loraga-fast-triton-cache}
unset TRITON_INTERPRET LORAGA_FAST_BACKEND LORAGA_FAST_KERNEL_TABLE
BUDGET=${GPU_SH_BUDGET_S:-460}
SCALE=1
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    # a dry run's steps are mostly Python start-up (imports): a busy 2-core CI machine must not time them out
    SCALE=2
    BUDGET=${GPU_SH_BUDGET_S:-900}
fi
if [ "$TUNE" = 1 ]; then BUDGET=$((BUDGET + 150)); fi

STEPS="$OUT/steps.tsv"
printf 'step\texit_code\tseconds\ttimeout_s\tstatus\n' > "$STEPS"
rm -f "$OUT"/{gpu.json,tests.xml,kernels.json,e2e.json,init.json,lowmem.json,sketch_memory.json,kernel_table.json,kernel_tune.json}
T_START=$(date +%s)
HAVE_TIMEOUT=1
command -v timeout > /dev/null || HAVE_TIMEOUT=0

# step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, print the log's tail, record one line in steps.tsv
step() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local left=$((BUDGET - ($(date +%s) - T_START)))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo "== [$name] (timeout ${limit}s) $*"
    if [ "$limit" -lt 5 ]; then
        echo "   skipped: the ${BUDGET}s budget is spent"
        printf '%s\t\t0\t%s\tskipped\n' "$name" "$limit" >> "$STEPS"
        return
    fi
    local t0 t1 rc status
    t0=$(date +%s.%N)
    if [ "$HAVE_TIMEOUT" = 1 ]; then
        timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    else
        "$@" > "$OUT/$name.log" 2>&1
    fi
    rc=$?
    t1=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    local lines=25
    [ "$status" = ok ] || lines=60
    tail -n "$lines" "$OUT/$name.log" | sed 's/^/   /'
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "   -> $status (exit $rc, ${secs}s)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$status" >> "$STEPS"
}

if [ "$DRY" = 1 ]; then
    echo "gpu.sh --dry-run: the device check's steps on the CPU with tiny presets; results in $OUT"
else
    echo "gpu.sh: the device check; results in $OUT; budget ${BUDGET}s"
fi
command -v nvidia-smi > /dev/null && [ "$DRY" = 0 ] \
    && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'

step versions 30 "$PY" -m loraga_fast.bench.gpu_summary versions "$OUT"

# the cuda-marked test files only: collecting the whole suite would import modules whose optional test
# dependencies (hypothesis, ...) the GPU image may lack, and one collection error stops the session
mapfile -t CUDA_TESTS < <(grep -rlE --include='*.py' 'mark\.cuda\b' tests | sort)
if [ "${#CUDA_TESTS[@]}" -eq 0 ]; then
    echo "== [tests] no test file under tests/ carries the cuda marker"
    printf 'tests\t5\t0\t0\tfailed\n' >> "$STEPS"
else
    # -o addopts=: the repo's addopts name pytest-benchmark's --benchmark-disable, absent from a bare image
    step tests 150 "$PY" -m pytest -q -rfEs -p no:cacheprovider -o addopts= -m cuda \
        --junitxml "$OUT/tests.xml" "${CUDA_TESTS[@]}"
fi

BENCH=("$PY" -m loraga_fast bench)
if [ "$DRY" = 1 ]; then
    step kernels 60 env TRITON_INTERPRET=1 "${BENCH[@]}" kernels --preset tiny --out "$OUT"
    step e2e 110 "${BENCH[@]}" e2e --preset tiny --out "$OUT" --dtypes bf16 --repeats 1 --interleave 0
    step init 60 "${BENCH[@]}" init --preset tiny --out "$OUT" --dtypes bf16 --ranks 8
    # (exact mode's code path is lowmem's with mode="exact", and the e2e step runs it: two workers suffice here)
    step lowmem 60 "${BENCH[@]}" lowmem --preset tiny --out "$OUT" --dtype bf16 --impls floor lowmem1 lowmem
    step sketch_memory 60 "${BENCH[@]}" sketch_memory --out "$OUT" --blocks 2 --tokens 16
    if [ "$TUNE" = 1 ]; then
        step tune 150 env TRITON_INTERPRET=1 "${BENCH[@]}" kernels --tune --preset tiny --out "$OUT" \
            --table "$OUT/kernel_table.json"
    fi
else
    step kernels 60 "${BENCH[@]}" kernels --preset llama-7b --out "$OUT"
    step e2e 110 "${BENCH[@]}" e2e --preset llama-7b --out "$OUT" --repeats 1 --interleave 0
    step init 60 "${BENCH[@]}" init --preset llama-7b --out "$OUT" --dtypes bf16 --ranks 8
    step lowmem 80 "${BENCH[@]}" lowmem --out "$OUT" -- --preset llama-7b-4l --dtype bf16 \
        --impls floor lowmem1 lowmem exact
    step sketch_memory 40 "${BENCH[@]}" sketch_memory --out "$OUT" --blocks 4 32
    if [ "$TUNE" = 1 ]; then
        step tune 150 "${BENCH[@]}" kernels --tune --out "$OUT" --table "$OUT/kernel_table.json"
    fi
fi

echo "== [summary]"
MODE=gpu
[ "$DRY" = 1 ] && MODE=dry-run
"$PY" -m loraga_fast.bench.gpu_summary summary "$OUT" --mode "$MODE" --budget "$BUDGET" \
    --elapsed "$(($(date +%s) - T_START))"

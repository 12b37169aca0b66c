"""Subprocess entry point of :func:`bench.e2e.measure`: one measurement in a fresh process, result as JSON.

    python -m bench._worker --impl loraga_fast --dtype fp32 --preset tiny --repeats 3 --out result.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.e2e import measure_in_process
from bench.workloads import DTYPES, IMPLS, PRESETS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--dtype", choices=list(DTYPES), required=True)
    parser.add_argument("--preset", choices=list(PRESETS), required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="where to write the result (JSON)")
    args = parser.parse_args(argv)
    result = measure_in_process(args.impl, args.dtype, args.preset, args.repeats, args.device, args.seed)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

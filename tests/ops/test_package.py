"""``loraga_fast.ops`` as a package: it exports what ``__all__`` and its docstring's map promise, and importing it
is cheap (no CUDA, nothing from the layers above it, no peft or transformers) and works without triton."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import loraga_fast.ops as ops
from loraga_fast.ops._dispatch import registered_ops


def test_exports_everything_all_lists() -> None:
    namespace: dict[str, object] = {}
    exec("from loraga_fast.ops import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(ops.__all__)
    assert len(ops.__all__) == len(set(ops.__all__))
    for name in ops.__all__:
        assert callable(getattr(ops, name)), name


def test_every_op_and_reference_is_exported_and_on_the_map() -> None:
    doc = inspect.getdoc(ops) or ""
    for op in registered_ops():
        assert op in ops.__all__ and f"\n    {op} " in doc, op
    refs = {"accumulate_ref", "sketch_accumulate_ref", "factors_from_sketch_ref", "rsvd_ref"}
    plain = {"sharded_rsvd", "orthonormalize_sharded", "gather_rows"}
    assert refs | plain | {"accumulate_triton"} <= set(ops.__all__)
    for name in refs | plain:
        assert name in doc, name
    for name in ops.__all__:  # each export is defined in one of the op files, never re-implemented here
        assert getattr(ops, name).__module__.startswith("loraga_fast.ops."), name


_PROBE = """
import json, sys
if sys.argv[1] == "no-triton":
    sys.modules["triton"] = None  # import triton -> ImportError
import torch
import loraga_fast  # the package's own __init__ is not the ops' business
before = set(sys.modules)
import loraga_fast.ops as ops
missing = [n for n in ops.__all__ if not hasattr(ops, n)]
upper = sorted(m for m in set(sys.modules) - before
               if m.split(".")[0] in ("peft", "transformers", "loraga_fast") and not m.startswith("loraga_fast.ops"))
print(json.dumps({"missing": missing, "cuda": torch.cuda.is_initialized(), "upper": upper,
                  "ops": sorted(torch.ops.loraga_fast)}))
"""


def _import_in_fresh_process(mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_touches_no_cuda_and_no_layer_above() -> None:
    result = _import_in_fresh_process("triton")
    assert result == {"missing": [], "cuda": False, "upper": [], "ops": sorted(
        ["accumulate_", "sketch_accumulate_", "probe_accumulate_", "factors_from_sketch", "batched_rsvd",
         "orthonormalize", "compress_update", "merge_update"])}


def test_import_works_without_triton() -> None:
    result = _import_in_fresh_process("no-triton")
    assert result["missing"] == [] and result["cuda"] is False and len(result["ops"]) == 8  # type: ignore[arg-type]

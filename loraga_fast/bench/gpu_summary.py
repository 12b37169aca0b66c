"""The two ends of ``bash bench/gpu.sh``: the versions it prints first, and the one JSON + table it ends with.

    python -m loraga_fast.bench.gpu_summary versions OUT   # print python/torch/triton/numpy/transformers/peft
                                                           # versions and the GPU, write OUT/versions.json
    python -m loraga_fast.bench.gpu_summary summary OUT    # read OUT/steps.tsv and every step's own JSON, write
                                                           # OUT/gpu.json, print a short table; exit 1 unless every
                                                           # step succeeded

Only the standard library at module level (:mod:`loraga_fast.bench.harness` is standard library too): ``versions``
must report a missing torch rather than fail on it, and ``summary`` must work whatever the steps left behind (a step
that failed or timed out may have written nothing, or a partial JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .harness import bytes_text, num, tflops_text

PACKAGES = ("torch", "triton", "numpy", "transformers", "peft", "pytest", "psutil")
STEP_FILES = {"tests": "tests.xml", "kernels": "kernels.json", "e2e": "e2e.json", "init": "init.json",
              "lowmem": "lowmem.json", "sketch_memory": "sketch_memory.json", "tune": "kernel_tune.json"}
GIB = 2**30


# ---------------------------------------------------------------------------------------------------- versions


def package_version(name: str) -> str | None:
    """The installed version of ``name`` (its distribution metadata, else its ``__version__``), or None."""
    from importlib import import_module, metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:
        return str(getattr(import_module(name), "__version__", "unknown version"))
    except Exception:  # not installed, or broken: either way not usable
        return None


def device_info() -> dict[str, Any]:
    """The GPU torch sees (name, capability, SMs, memory), or why there is none."""
    try:
        import torch
    except Exception as err:
        return {"cuda": False, "name": None, "note": f"torch does not import: {err}"}
    info: dict[str, Any] = {"cuda": torch.cuda.is_available(), "cuda_runtime": torch.version.cuda}
    if not info["cuda"]:
        info.update(name=None, note="no CUDA device visible")
        return info
    try:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                    device_count=torch.cuda.device_count())
    except Exception as err:  # a broken driver: say so, do not stop the check
        info.update(name=None, note=f"CUDA device query failed: {err}")
    return info


def versions(out: Path) -> int:
    found = {"python": platform.python_version()}
    found.update({name: package_version(name) for name in PACKAGES})
    dev = device_info()
    print(f"python       {found['python']} ({sys.executable})")
    for name in PACKAGES:
        print(f"{name:<12} {found[name] or 'not installed'}")
    if dev.get("name"):
        mem = dev.get("memory_bytes", 0) / GIB
        cap = dev.get("capability") or [0, 0]
        print(f"GPU          {dev['name']} (sm_{cap[0]}{cap[1]}, {dev.get('sm_count')} SMs, {mem:.1f} GiB; "
              f"CUDA {dev.get('cuda_runtime')}; {dev.get('device_count')} device(s))")
    else:
        print(f"GPU          none: {dev.get('note')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.json").write_text(json.dumps({"versions": found, "device": dev}, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------- figures


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def tests_figures(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed_tests": failed[:20]}


def kernels_figures(path: Path) -> dict[str, Any]:
    data = _load(path)
    cases = data.get("cases", [])
    keys = ("label", "ours_ms", "ours_tflops", "cublas_ms", "cublas_tflops", "autograd_ms", "autograd_tflops",
            "ours_over_cublas_time", "ours_over_autograd_time", "ours_rel_err", "cublas_rel_err", "autograd_rel_err",
            "deterministic", "backend", "config")
    rows = [{k: c.get(k) for k in keys} for c in cases]

    def values(key: str) -> list[float]:
        return [c[key] for c in cases if isinstance(c.get(key), (int, float))]

    return {
        "preset": data.get("preset"), "device": data.get("device"), "cases": rows,
        "max_ours_tflops": max(values("ours_tflops"), default=None),
        "ours_over_cublas_time_range": _range(values("ours_over_cublas_time")),
        "ours_over_autograd_time_range": _range(values("ours_over_autograd_time")),
        "max_ours_rel_err": max(values("ours_rel_err"), default=None),
        "max_cublas_rel_err": max(values("cublas_rel_err"), default=None),
        "all_deterministic": bool(cases) and all(c.get("deterministic") for c in cases),
        "cublas_notes": sorted({r["note"] for r in data.get("results", []) if r.get("impl") == "cublas" and r.get("note")}),
    }


def _range(vals: list[float]) -> list[float] | None:
    return [min(vals), max(vals)] if vals else None


def e2e_figures(path: Path) -> dict[str, Any]:
    data = _load(path)
    impls = {r["impl"]: {"time_s": r.get("time_s"), "first_call_s": r.get("first_call_s"),
                         "peak_extra_bytes": r.get("peak_extra_bytes"), "num_grads": r.get("num_grads"),
                         "grad_global_norm": r.get("grad_global_norm")} for r in data.get("results", [])}
    ratio = (data.get("ratios") or [{}])[0]
    return {"preset": data.get("config", {}).get("preset"), "impls": impls, "time_ratio": ratio.get("time_ratio"),
            "peak_extra_ratio": ratio.get("peak_extra_ratio")}


def init_figures(path: Path) -> dict[str, Any]:
    data = _load(path)
    impls = {r["impl"]: {"time_s": r.get("time_s"), "finish_s": r.get("finish_s"),
                         "peak_extra_bytes": r.get("peak_extra_bytes"), "layers": r.get("layers")}
             for r in data.get("rows", [])}
    out: dict[str, Any] = {"preset": data.get("preset"), "impls": impls,
                           "failed": [f.get("impl") for f in data.get("failed", [])]}
    ours, peft = impls.get("loraga_fast"), impls.get("peft")
    if ours and peft and peft["time_s"]:
        out["time_ratio"] = ours["time_s"] / peft["time_s"]
        out["peak_extra_ratio"] = ours["peak_extra_bytes"] / max(peft["peak_extra_bytes"], 1)
    return out


def lowmem_figures(path: Path) -> dict[str, Any]:
    data = _load(path)
    runs = data.get("runs", {})
    return {"preset": data.get("preset"), "passes": data.get("passes"),
            "impls": {k: {"time_s": v.get("time_s"), "per_pass_x_floor": v.get("per_pass_x_floor"),
                          "peak_extra_bytes": v.get("peak_extra_bytes")} for k, v in runs.items()},
            "lowmem_per_pass_x_floor": runs.get("lowmem", {}).get("per_pass_x_floor"),
            "onepass_x_floor": runs.get("lowmem1", {}).get("x_floor"),
            "onepass_flops": [{k: f.get(k) for k in ("r", "tokens", "overhead", "three_pass_x_floor")}
                              for f in data.get("onepass_flops", [])],
            "failed": sorted(data.get("failed", {})), "refused": data.get("refused", {})}


def sketch_memory_figures(path: Path) -> dict[str, Any]:
    rows = _load(path)
    keep = ("blocks", "measure", "sketch_bytes", "workspace_bytes", "estimate_bytes", "peak_extra_bytes",
            "peak_over_sketch", "meets_bar")
    rows = [{k: row.get(k) for k in keep} for row in rows]
    return {"rows": rows, "all_meet_bar": all(r["meets_bar"] for r in rows if r["measure"] != "glibc default")}


def tune_figures(path: Path) -> dict[str, Any]:
    data = _load(path)
    return {"table": data.get("table"), "entries": data.get("entries"),
            "candidates_skipped": sum(1 for m in data.get("measurements", []) if m.get("status") != "ok")}


FIGURES = {"tests": tests_figures, "kernels": kernels_figures, "e2e": e2e_figures, "init": init_figures,
           "lowmem": lowmem_figures, "sketch_memory": sketch_memory_figures, "tune": tune_figures}


# ----------------------------------------------------------------------------------------------------- summary


def read_steps(path: Path) -> list[dict[str, Any]]:
    steps = []
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines()[1:]:
        if not line.strip():
            continue
        name, code, secs, limit, status = (line.split("\t") + [""] * 5)[:5]
        steps.append({"name": name, "status": status, "exit_code": int(code) if code.strip() else None,
                      "seconds": float(secs or 0), "timeout_s": int(limit or 0)})
    return steps


def headline(name: str, fig: dict[str, Any]) -> str:
    """One line of key figures for a step."""
    if "error" in fig:
        return fig["error"]
    if name == "versions":
        return ""
    if name == "tests":
        return (f"{fig['passed']} passed, {fig['failures']} failed, {fig['errors']} errors, {fig['skipped']} skipped"
                + (f"; first failure {fig['failed_tests'][0]}" if fig["failed_tests"] else ""))
    if name == "kernels":
        rc, ra = fig["ours_over_cublas_time_range"], fig["ours_over_autograd_time_range"]
        return (f"{len(fig['cases'])} cases; ours/cuBLAS time {_span(rc)}; ours/bf16 GEMM {_span(ra)}; "
                f"ours max {tflops_text(fig['max_ours_tflops'])} TFLOP/s; err <= {num(fig['max_ours_rel_err'], '.1e')}; "
                f"bit-identical: {'all' if fig['all_deterministic'] else 'NO'}")
    if name in ("e2e", "init"):
        key = "loraga_fast"
        o, p = fig["impls"].get(key, {}), fig["impls"].get("peft", {})
        return (f"time ours {num(o.get('time_s'), '.3f', 's')} / peft {num(p.get('time_s'), '.3f', 's')} "
                f"({num(fig.get('time_ratio'), '.2f', 'x')}); extra peak ours {bytes_text(o.get('peak_extra_bytes'))} / peft "
                f"{bytes_text(p.get('peak_extra_bytes'))} ({num(fig.get('peak_extra_ratio'), '.2f', 'x')})")
    if name == "lowmem":
        imp = fig["impls"]
        return (f"floor {num(imp.get('floor', {}).get('time_s'), '.3f', 's')}; lowmem "
                f"{num(imp.get('lowmem', {}).get('time_s'), '.3f', 's')} over {fig.get('passes')} passes = "
                f"{num(fig.get('lowmem_per_pass_x_floor'), '.2f', 'x')} floor per pass"
                + (f"; one pass {num(fig.get('onepass_x_floor'), '.2f', 'x')} floor" if "lowmem1" in imp else "")
                + (f"; exact {num(imp['exact'].get('per_pass_x_floor'), '.2f', 'x')} floor" if "exact" in imp else "")
                + (f"; failed: {', '.join(fig['failed'])}" if fig.get("failed") else ""))
    if name == "sketch_memory":
        return "; ".join(f"{r['blocks']} blocks ({r['measure']}): peak {bytes_text(r['peak_extra_bytes'])} = "
                         f"{num(r['peak_over_sketch'], '.2f', 'x')} sketches" for r in fig["rows"]) + (
            "" if fig["all_meet_bar"] else "; OVER 1.3 x sketches + workspace")
    if name == "tune":
        return f"{len(fig.get('entries') or {})} table entries -> {fig.get('table')}"
    return ""


def _span(r: list[float] | None) -> str:
    return "-" if not r else f"{r[0]:.2f}-{r[1]:.2f}x"


def summary(out: Path, mode: str, budget: int | None, elapsed: int | None) -> int:
    steps = read_steps(out / "steps.tsv")
    figures: dict[str, Any] = {}
    for s in steps:
        fname = STEP_FILES.get(s["name"])
        if fname is None:
            continue
        path = out / fname
        if s["status"] == "skipped":
            figures[s["name"]] = {"error": "not run: the time budget was spent"}
            continue
        if not path.is_file():
            figures[s["name"]] = {"error": f"no {fname} (see {s['name']}.log)"}
            continue
        try:
            figures[s["name"]] = FIGURES[s["name"]](path)
        except Exception as err:  # a partial or malformed file: report it, keep summarizing
            figures[s["name"]] = {"error": f"unreadable {fname}: {type(err).__name__}: {err}"}
    ver = _load(out / "versions.json") if (out / "versions.json").is_file() else {}
    all_ok = bool(steps) and all(s["status"] == "ok" for s in steps)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "versions": ver.get("versions", {}),
        "device": ver.get("device", {}),
        "budget_s": budget,
        "elapsed_s": elapsed,
        "all_ok": all_ok,
        "steps": [{**s, "log": f"{s['name']}.log"} for s in steps],
        "figures": figures,
    }
    (out / "gpu.json").write_text(json.dumps(report, indent=2))

    dev = report["device"].get("name") or "no GPU"
    v = report["versions"]
    print(f"device check ({mode}) on {dev}: torch {v.get('torch')}, triton {v.get('triton')}, "
          f"transformers {v.get('transformers')}, peft {v.get('peft')}, numpy {v.get('numpy')}; "
          f"{elapsed}s of a {budget}s budget")
    print(f"{'step':<9} {'status':<8} {'exit':>4} {'seconds':>8} {'limit':>6}  key figures")
    for s in steps:
        fig = figures.get(s["name"])
        line = headline(s["name"], fig) if fig else ""
        code = "" if s["exit_code"] is None else str(s["exit_code"])
        print(f"{s['name']:<9} {s['status']:<8} {code:>4} {s['seconds']:>8.1f} {s['timeout_s']:>6}  {line}")
    kern = figures.get("kernels", {})
    if kern.get("cases"):
        print("\naccumulate kernel per case (ms / TFLOP/s; ours/X < 1: ours faster; err vs float64):")
        print(f"{'case':<24} {'ours':>15} {'cuBLAS fp32-out':>17} {'bf16 GEMM':>15} {'/cuBLAS':>8} {'/bf16':>6} "
              f"{'err ours':>9} {'same':>5}")
        for c in kern["cases"]:
            def pair(impl: str) -> str:
                return f"{num(c[f'{impl}_ms'], '.3f')}/{tflops_text(c[f'{impl}_tflops'])}"

            print(f"{c['label']:<24} {pair('ours'):>15} {pair('cublas'):>17} {pair('autograd'):>15} "
                  f"{num(c['ours_over_cublas_time'], '.2f'):>8} {num(c['ours_over_autograd_time'], '.2f'):>6} "
                  f"{num(c['ours_rel_err'], '.1e'):>9} {('yes' if c['deterministic'] else 'NO'):>5}")
        for note in kern.get("cublas_notes", []):
            print(f"cuBLAS: {note}")
    print(f"\n{'all steps succeeded' if all_ok else 'SOME STEPS DID NOT SUCCEED'}; wrote {out / 'gpu.json'}")
    return 0 if all_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraga_fast.bench.gpu_summary",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["versions", "summary"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", default="gpu")
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--elapsed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.what == "versions":
        return versions(args.out)
    return summary(args.out, args.mode, args.budget, args.elapsed)


if __name__ == "__main__":
    sys.exit(main())

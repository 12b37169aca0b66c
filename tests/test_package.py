"""The package's shape: one-way layering without import cycles (lazy imports included), the public names, the 0.1
module paths kept for one release, and every cross-reference the docstrings and READMEs make."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import loraga_fast

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "loraga_fast"
# each may import only those before it
LAYERS = ["ops", "layers", "distributed", "stores", "core", "api", "integrations", "command", "bench"]


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def import_edges(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """``{module: package modules it imports}``, at any depth of the file (function-level imports count)."""
    modules = modules or _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            edges[m].update(n for n in names if n in modules and n not in (m, "loraga_fast"))
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[str]:
    found, done, stack = [], set(), []

    def visit(u: str) -> None:
        if u in stack:
            found.append(" -> ".join([*stack[stack.index(u):], u]))
            return
        if u in done:
            return
        done.add(u)
        stack.append(u)
        for v in sorted(edges[u]):
            visit(v)
        stack.pop()

    for m in sorted(edges):
        visit(m)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def test_no_import_cycle_and_imports_point_down() -> None:
    edges = import_edges()
    assert _cycles(edges) == []
    upward = [f"{m} -> {e}" for m, targets in edges.items() for e in targets
              if _layer(m) and _layer(e) and LAYERS.index(_layer(e)) > LAYERS.index(_layer(m))]  # type: ignore[arg-type]
    assert upward == []


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    # the checker itself, on a made-up graph: the test above must be able to fail
    assert _cycles({"a": {"b"}, "b": {"a"}}) == ["a -> b -> a"]
    assert _layer("loraga_fast.stores.exact") == "stores" and _layer("loraga_fast.errors") is None


def test_library_never_imports_the_command_or_the_bench() -> None:
    edges = import_edges()
    library = [m for m in edges if _layer(m) not in (None, "command", "bench")]
    assert [m for m in library if any(_layer(e) in ("command", "bench") for e in edges[m])] == []


def test_public_names_import() -> None:
    for name in loraga_fast.__all__:
        assert getattr(loraga_fast, name) is not None, name


@pytest.mark.parametrize("old", sorted(importlib.import_module("loraga_fast._moved").MOVED))
def test_old_module_paths_still_import_with_a_deprecation_warning(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=re.escape(old) + " moved to") as record:
        __import__(old)  # an import statement's own call: the warning must point at this line, not at importlib
    assert [w.filename for w in record if old in str(w.message)] == [__file__]
    module = sys.modules[old]
    homes = importlib.import_module("loraga_fast._moved").MOVED[old]
    for home in homes:  # every public name of every new home is reachable through the old path
        for name in getattr(importlib.import_module(home), "__all__", ()):
            assert getattr(module, name) is getattr(importlib.import_module(home), name), f"{old}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        getattr(module, "not_a_name")


def test_names_users_imported_from_old_paths() -> None:
    # what the 0.1 README told users to write
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from loraga_fast.inputs import quantize_model
        from loraga_fast.peft_compat import preprocess_loraga
        from loraga_fast.runs import load_initialized
    assert quantize_model is loraga_fast.quantize_model and preprocess_loraga is loraga_fast.preprocess_loraga
    assert load_initialized is loraga_fast.load_initialized
    assert importlib.import_module("loraga_fast.api.preprocess").__spec__.name == "loraga_fast.api.preprocess"


def test_import_needs_no_gpu_and_stays_light() -> None:
    code = ("import sys, loraga_fast; heavy = [m for m in ('torch', 'peft', 'transformers', 'triton') if m in sys.modules];"
            " print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------- cross-references

_ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|exc):`~?(loraga_fast(?:\.\w+)+)`")


def _resolve(dotted: str) -> bool:
    """True when ``dotted`` is a module, or an attribute path inside one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _references() -> list[tuple[str, str]]:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    return [(str(p.relative_to(ROOT)), m) for p in files for m in _ROLE.findall(p.read_text())]


def test_docstring_cross_references_resolve() -> None:
    refs = _references()
    assert len(refs) > 50  # the pattern finds them at all
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # an old path (loraga_fast.store, ...) is stale
        broken = []
        for where, ref in refs:
            try:
                ok = _resolve(ref)
            except DeprecationWarning:
                ok = False
            if not ok:
                broken.append(f"{where}: {ref}")
    assert broken == []


def test_resolver_rejects_stale_names() -> None:
    assert _resolve("loraga_fast.stores.exact.AccumulatorStore")
    assert not _resolve("loraga_fast.stores.exact.NoSuchThing")


_PATH = re.compile(r"(?<![\w/.-])((?:loraga_fast|bench|tests|docs|csrc|\.ci)/[\w./-]*\w)")


@pytest.mark.parametrize("doc", ["README.md", "bench/README.md", "CONTRIBUTING.md", "csrc/README.md",
                                 *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_paths_named_in_docs_exist(doc: str) -> None:
    path = ROOT / doc
    if not path.is_file():
        pytest.fail(f"{doc} is missing")
    text = path.read_text()
    named = {m.rstrip(".") for m in _PATH.findall(text)}
    missing = sorted(p for p in named if not (ROOT / p.split("::")[0]).exists() and "*" not in p
                     and not p.startswith("bench/results"))
    assert missing == []

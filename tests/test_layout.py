"""The package's structure: stage folders, no import cycles, one stated responsibility per module.

The import graph is read from the source (``ast``), function-local imports included, so a
cycle hidden inside a function is still a cycle. Imports under ``if TYPE_CHECKING:`` are
type hints only and are left out.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dsdeploy"
STAGES = ("models", "conversion", "recover", "data", "export", "runtime", "pipeline", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py")) if "templates" not in p.parts}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(name: str) -> set[str]:
    """The dsdeploy modules ``name`` imports (top-level or inside functions; not type-checking-only)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("dsdeploy"):
                found.add(t)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_library_never_imports_the_cli():
    offenders = {m: sorted(d for d in deps if d.startswith("dsdeploy.cli"))
                 for m, deps in GRAPH.items() if not m.startswith("dsdeploy.cli") and m != "dsdeploy.__main__"}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_package_is_laid_out_by_pipeline_stage():
    folders = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert folders == sorted(STAGES)
    loose = sorted(p.stem for p in PKG.glob("*.py"))
    assert loose == ["__init__", "__main__", "api", "errors", "fsutil", "outputs", "progress", "ranges", "tables",
                     "version"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_states_its_one_responsibility(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
    assert doc and doc.strip().splitlines()[0].strip(), f"{name} has no docstring stating its responsibility"
    assert len(MODULES[name].read_text(encoding="utf-8").splitlines()) <= 450, f"{name} is too long: split it"


def test_every_error_class_lives_in_errors_py():
    """A user-facing error class defined anywhere but dsdeploy/errors.py is one the CLI and the docs may miss."""
    errors = {n.name for n in ast.walk(ast.parse((PKG / "errors.py").read_text(encoding="utf-8")))
              if isinstance(n, ast.ClassDef)}
    assert "DsdeployError" in errors
    elsewhere = sorted(f"{name}.{node.name}" for name, path in MODULES.items() if name != "dsdeploy.errors"
                       for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                       if isinstance(node, ast.ClassDef)
                       and ({ast.unparse(b).rpartition(".")[2] for b in node.bases} & errors
                            or node.name.endswith("Error")))
    assert elsewhere == []


def test_no_comment_names_who_wrote_the_code():
    offenders = [f"{p.relative_to(PKG.parent)}:{i}" for p in [*PKG.rglob("*.py"), *(PKG.parent / "tests").glob("*.py")]
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if any(f"engineer {c}" in line.lower() for c in "abcdef")]
    assert offenders == []


def test_the_cli_help_does_not_import_torch():
    """The reason the CLI modules and the ONNX-only bench path import torch-using modules inside functions:
    `import dsdeploy`, every command's registration (what `--help` loads) and `runtime.bench` stay torch-free."""
    code = ("import sys, dsdeploy; from dsdeploy.cli import load_commands; load_commands(); "
            "import dsdeploy.runtime.bench; print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PKG.parent, env={**os.environ, "PYTHONPATH": str(PKG.parent)}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

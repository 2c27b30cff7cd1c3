"""The layout's rules, read off the source with `ast` (nothing is imported or run):

- imports run one way:  rope → regimes → ode_attention → training → data/, spectral/ → train_* → analysis/
  (a module imports only modules of a lower layer, or modules of its own package);
- no function-local import of a project module anywhere (tests included);
- nothing refers to a file outside the repository (the design and notes live in docs/).
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# layer of each top-level project name; data/ and spectral/ share a layer but do not import each other
LAYER = {"rope": 0, "regimes": 1, "ode_attention": 2, "training": 3, "data": 4, "spectral": 4,
         "train_lm": 5, "train_vit": 5, "train_tied": 5, "analysis": 6}
PACKAGES = ("data", "spectral", "analysis")


def _sources() -> list[Path]:
    skip = {"cache", "runs", "out", "results", ".git"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _project_imports(tree: ast.AST, module: str):
    """(imported module name, line, inside a function?) for every import of a project module."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:                          # relative import: resolve against the package
                    base = ".".join(module.split(".")[:-child.level] + ([base] if base else []))
                # `from data import text` imports the module data.text; `from rope import f`, rope
                names = [f"{base}.{a.name}" for a in child.names] if base in PACKAGES else [base]
            for name in names:
                if name.split(".")[0] in LAYER:
                    out.append((name, child.lineno, in_function))
            visit(child, local)

    visit(tree, False)
    return out


@functools.cache
def _all_imports() -> tuple:
    rows = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        module = _module(path)
        for name, line, local in _project_imports(tree, module):
            rows.append((path.relative_to(ROOT), module, name, line, local))
    return tuple(rows)


def test_the_layout_exists():
    for f in ("rope.py", "regimes.py", "ode_attention.py", "training.py", "train_lm.py", "train_vit.py",
              "data/__init__.py", "spectral/__init__.py", "analysis/__init__.py", "docs/conventions.md"):
        assert (ROOT / f).exists(), f


def test_imports_run_one_way():
    bad = []
    for rel, module, name, line, _ in _all_imports():
        if rel.parts[0] == "tests":
            continue                                     # tests may import any layer
        top, imported_top = module.split(".")[0], name.split(".")[0]
        if top not in LAYER:
            bad.append(f"{rel}: {module} is not a place of the layout")
            continue
        if top == imported_top and top in PACKAGES:
            if name != module:                           # within a package: fine (not itself)
                continue
        if not LAYER[imported_top] < LAYER[top]:
            bad.append(f"{rel}:{line} ({module} imports {name})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_function_local_project_imports():
    bad = [f"{rel}:{line} ({name})" for rel, _, name, line, local in _all_imports() if local]
    assert not bad, "project modules imported inside a function:\n" + "\n".join(bad)


@pytest.mark.parametrize("pattern", [r"DESIGN\.md", r"CONTRACT\.md", r"\.\./shared", r"(?<!docs/dynamics\.md )"
                                     r"(?<!docs/spectral\.md )\bnotes §"])
def test_nothing_refers_outside_the_repository(pattern):
    files = _sources() + [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    rx = re.compile(pattern)
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line)]
    assert not hits, f"{pattern!r} found (the repository must be readable on its own):\n" + "\n".join(hits)


def test_the_checker_sees_a_violation():
    """The parser really finds a function-local and a backwards import (so the tests above can fail)."""
    src = "import training\n\ndef f():\n    import analysis.bench\n"
    rows = _project_imports(ast.parse(src), "regimes")
    assert rows == [("training", 1, False), ("analysis.bench", 4, True)]

"""The layer contract (.importlinter) is enforced, not described: the test command runs
`lint-imports` before pytest, and here a circle planted in a copy of the tree breaks it."""

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
needs_lint = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra)")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)})


@needs_lint
@pytest.mark.parametrize("planted, broken", [
    # a sibling circle inside one package: checkpoint already imports plan
    ("pretrain/run/plan.py", "No circles among the modules of one package BROKEN"),
    # a layer importing one above it: the model reaching for the run plan
    ("pretrain/model/rotary.py", "The model knows nothing of storage, Ray or MLflow BROKEN"),
])
def test_a_planted_import_breaks_the_contract(tmp_path, planted, broken):
    for pkg in ("popscale", "pretrain", "data_service"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    assert lint(tmp_path).returncode == 0, "the tree as it is must keep every contract"
    line = ("from pretrain.run import checkpoint  # planted\n" if planted.endswith("plan.py")
            else "from pretrain.run import plan  # planted\n")
    (tmp_path / planted).write_text((tmp_path / planted).read_text() + line)
    out = lint(tmp_path)
    assert out.returncode != 0 and broken in out.stdout, out.stdout[-2000:]


def _function_imports(path: Path) -> Iterator[int]:
    """The line of every import inside a function body of one module."""
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node.lineno


def test_imports_inside_functions_say_why_they_are_deferred():
    """An import inside a function hides a dependency from a reader and from import-linter's
    layers; it is allowed only to keep a heavy package out of start-up, and says so."""
    bare = []
    for pkg in ("popscale", "pretrain", "data_service"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            lines = path.read_text().splitlines()
            for no in _function_imports(path):
                i = no - 1
                while i > 0 and lines[i - 1].lstrip().startswith(("from ", "import ")):
                    i -= 1  # the comment stands above a block of imports
                said = "# deferred" in lines[no - 1] or (i > 0 and "# deferred" in lines[i - 1])
                if not said:
                    bare.append(f"{path.relative_to(ROOT)}:{no}")
    assert not bare, f"imports inside functions without a '# deferred: why' comment: {sorted(set(bare))}"

"""README, the runbooks and docs/ name only files that exist: a rename that forgets the prose
fails here, not in a newcomer's terminal."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = "popscale|pretrain|data_service|bench|tests|scripts|configs|cluster|runbooks|docs|models|\\.ci"
# paths that are not meant to exist here: placeholders for a user's own files, and history
NOT_HERE = {"configs/sweeps/NAME.yaml", "configs/my_run.yaml", "models/reaching-v7", "tests/training.py"}
PATH = re.compile(rf"(?<![\w./-])((?:{TOP})/[\w./-]*\w)")


def named_paths(text: str) -> set[str]:
    """Repository paths in `text`: a top-level folder, then a file or folder name."""
    return {m.rstrip(".") for m in PATH.findall(text)}


def test_docs_name_only_paths_that_exist():
    docs = [ROOT / "README.md", *sorted((ROOT / "runbooks").glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]
    missing = {f"{d.relative_to(ROOT)}: {p}" for d in docs for p in named_paths(d.read_text())
               if not (ROOT / p).exists() and p not in NOT_HERE}
    assert not missing, "\n".join(sorted(missing))


def test_the_path_pattern_finds_paths_and_not_words():
    found = named_paths("see `pretrain/run/plan.py`, docs/architecture.md. and a/pretrain/x and runs/demo")
    assert found == {"pretrain/run/plan.py", "docs/architecture.md"}

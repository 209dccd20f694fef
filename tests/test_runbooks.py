"""The runbooks' commands are real: every `popscale` command in a runbook's bash blocks parses with
the CLI (and the command a `popscale submit` carries), its `--set` overrides load with the run or
sweep config loader, the local cluster's `ray start` flags are the ones tests/test_jobs.py starts
its head with, and each runbook names tests that exist. The commands themselves are run by the
tests each runbook lists under "Tested by"."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNBOOKS = sorted((ROOT / "runbooks").glob("*.md"))
REQUIRED = {"cluster", "storage", "models", "failures", "sweep", "pretrain", "corpus"}


def commands(md: Path) -> list[list[str]]:
    """Each shell command in the file's ```bash blocks, as argv (env assignments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", md.read_text(), re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"<[^>]+>", "X", line)  # placeholders like <run name>
            for part in line.split("&&"):
                argv = shlex.split(part)
                while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                    argv.pop(0)
                if argv:
                    out.append(argv)
    return out


def test_every_required_runbook_exists():
    assert REQUIRED <= {p.stem for p in RUNBOOKS}


@pytest.mark.parametrize("md", RUNBOOKS, ids=lambda p: p.stem)
def test_popscale_commands_parse_and_their_overrides_load(md):
    from popscale.cli import build_parser
    from pretrain.run.config import load_config
    from pretrain.scaling.plan import load_sweep

    argvs = [a for a in commands(md) if a[0] == "popscale"]
    assert argvs, f"{md.name} shows no popscale command"
    for argv in argvs:
        inner = argv[argv.index("--") + 1:] if argv[1:2] == ["submit"] and "--" in argv else None
        for cmd in ([argv[1:]] + ([inner[1:]] if inner and inner[0] == "popscale" else [])):
            try:
                a = build_parser().parse_args(cmd)
            except SystemExit:
                pytest.fail(f"{md.name}: `popscale {' '.join(cmd)}` does not parse")
            if a.command in ("pretrain", "sweep") and getattr(a, "set", None):
                config = a.config if (ROOT / a.config).exists() else None
                if a.command == "pretrain":
                    load_config(ROOT / config if config else None, a.set)
                elif config:
                    load_sweep(ROOT / config, a.set)


def test_the_local_cluster_flags_are_the_tested_ones():
    tested = (ROOT / "tests" / "test_jobs.py").read_text()
    starts = [a for a in commands(ROOT / "runbooks" / "cluster.md") if a[:3] == ["ray", "start", "--head"]]
    assert starts
    for flag in (f for f in starts[0] if f.startswith("--")):
        assert f'"{flag}"' in tested or f'"{flag[2:]}' in tested, f"{flag} is not what tests/test_jobs.py starts"


@pytest.mark.parametrize("md", RUNBOOKS, ids=lambda p: p.stem)
def test_each_runbook_names_tests_that_exist(md):
    text = md.read_text()
    if md.stem not in REQUIRED - {"pretrain"}:  # pretrain.md predates the section; its tests are named inline
        return
    assert "## Tested by" in text, f"{md.name} has no 'Tested by' section"
    named = re.findall(r"tests/(test_\w+\.py)", text.split("## Tested by", 1)[1])
    assert named, f"{md.name}: 'Tested by' names no test file"
    for f in named:
        assert (ROOT / "tests" / f).exists(), f"{md.name} names tests/{f}, which does not exist"

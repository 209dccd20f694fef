"""The `popscale` command's errors: a bad config key, override, config file or preset is a usage
error (exit status 2), a missing or unreadable corpus an input error (1); each is one line
`error: ...` naming the key or the file, then the RESULT line, and never a traceback (unless
`--debug`). A synthetic corpus is made only when asked for, and says so."""

from __future__ import annotations

import pytest
from conftest import REPO, result_line, run_cli

from popscale.cli import main

DEMO = str(REPO / "configs" / "demo.yaml")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return line


@pytest.mark.parametrize("argv,code,names", [
    (["pretrain", "--set", "train.stepz=5"], 2, "train.stepz"),
    (["pretrain", "--set", "trainsteps"], 2, "trainsteps"),
    (["pretrain", "--config", "nowhere/missing.yaml"], 2, "nowhere/missing.yaml"),
    (["pretrain", "--set", "model=poyo-9M"], 2, "poyo-9M"),
    (["pretrain", "--set", "model_overrides.dimm=3"], 2, "model_overrides.dimm"),
    (["pretrain", "--no-such-flag"], 2, "--no-such-flag"),
    (["ingest", "x.nwb", "--corpus", "c", "--meta", "nowhere/meta.yaml"], 2, "nowhere/meta.yaml"),
])
def test_usage_errors(capsys, argv, code, names):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert names in error_line(err)
    assert out.strip().splitlines()[-1].startswith("RESULT error=")
    assert "Traceback" not in err + out


def test_a_bad_key_in_a_config_file_names_the_file_and_the_key(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  stepz: 5\n")
    code, out, err = run(capsys, "pretrain", "--config", str(cfg))
    assert code == 2 and str(cfg) in error_line(err) and "train.stepz" in error_line(err)
    assert result_line(out) == {"error": "ConfigError"}


def test_a_corpus_named_on_the_command_line_must_exist(capsys, tmp_path):
    """With the demo config (which can make a synthetic corpus), a mistyped data.corpus is an
    error, and nothing is made there."""
    missing = tmp_path / "corpus-typo"
    code, out, err = run(capsys, "pretrain", "--config", DEMO, "--set", f"data.corpus={missing}")
    assert code == 1 and str(missing) in error_line(err) and "data.synth" in error_line(err)
    assert result_line(out) == {"error": "CorpusError"} and not missing.exists()


@pytest.mark.parametrize("make", ["file", "empty dir"])
def test_an_unreadable_corpus_is_an_input_error(capsys, tmp_path, make):
    bad = tmp_path / "bad"
    bad.write_text("not a corpus") if make == "file" else bad.mkdir()
    for argv in (["pretrain", "--set", f"data.corpus={bad}"], ["inspect", str(bad)]):
        code, out, err = run(capsys, *argv)
        assert code == 1 and str(bad) in error_line(err), argv
        assert out.strip().splitlines()[-1].startswith("RESULT error=")
    code, out, err = run(capsys, "verify", str(tmp_path / "nothing"))
    assert code == 1 and str(tmp_path / "nothing") in error_line(err)


def test_no_traceback_in_a_real_process_unless_debug():
    p = run_cli("pretrain", "--set", "train.stepz=5")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert result_line(p.stdout) == {"error": "ConfigError"}
    p = run_cli("--debug", "pretrain", "--set", "train.stepz=5")
    assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError" in p.stderr


def test_making_a_synthetic_corpus_is_announced(tmp_path):
    from pretrain.run.config import load_config
    from pretrain.run.launch import ensure_corpus

    said: list[str] = []
    root = tmp_path / "synthetic"
    cfg = load_config(None, [f"data.corpus={root}", "data.synth.sessions=1", "data.synth.subjects=1",
                             "data.synth.minutes=0.3", "data.synth.min_units=5", "data.synth.max_units=8"])
    ensure_corpus(cfg, said.append)
    assert said == [f"making a synthetic corpus at {root}: 1 sessions of 1 subjects, ~0.3 min each (seed 0)"]
    ensure_corpus(cfg, said.append)  # there now: nothing made, nothing said
    assert len(said) == 1 and (root / "manifest.json").exists()

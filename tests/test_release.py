"""The shipped checkpoint's path (issue 27): an export registered with no run behind it, then used
by name and alias as a registered model is."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO
from test_tracking_faults import tiny_export

from popscale.cli import main
from pretrain.tracking.mlflow_runs import store_client
from pretrain.tracking.registry import locate


def result_line(out: str) -> dict[str, str]:
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def test_an_export_registers_without_a_run_and_loads_by_alias(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    export = tiny_export(tmp_path / "shipped")
    assert main(["register", str(export), "--name", "poyo-test", "--alias", "released", "--tracking-uri", uri]) == 0
    res = result_line(capsys.readouterr().out)
    assert res["model_uri"] == "models:/poyo-test/1"
    run = store_client(uri).get_run(res["mlflow_run_id"])
    assert run.data.tags["popscale_command"] == "register" and run.info.status == "FINISHED"
    ref, path = locate("poyo-test@released", uri, tmp_path / "cache")
    assert ref.version == "1"
    assert json.loads((path / "config.json").read_text()) == json.loads((export / "config.json").read_text())


RELEASED = REPO / "models" / "poyo-real-1"


def evaluation_set() -> list[str]:
    """The fixed evaluation set, where it is defined (scripts/release_pretrain.py writes it into each card)."""
    spec = importlib.util.spec_from_file_location("release_pretrain", REPO / "scripts" / "release_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.EVALUATION)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "models").iterdir() if p.is_dir()))
def test_every_shipped_checkpoint_is_small_and_never_saw_the_evaluation_set(name):
    """Each export under models/ is whole (what --model reads), within 25 MB, and its vocabulary holds
    no session of the fixed evaluation set, which its card names."""
    d, held_out = REPO / "models" / name, evaluation_set()
    assert len(held_out) == 5
    card, vocab = (d / "MODEL_CARD.md").read_text(), json.loads((d / "vocab.json").read_text())
    assert (d / "model.safetensors").stat().st_size <= 25e6 and (d / "config.json").exists() and (d / "plan.json").exists()
    assert all(s in card for s in held_out) and not set(held_out) & set(vocab["sessions"])


def test_the_shipped_checkpoint_finetunes_on_a_session_it_never_saw(tmp_path, capsys, real_dir, monkeypatch):
    """README's user path on the released model: register it (no run of its own), then finetune it
    by name and alias on s1_data (a monkey it was not pretrained on), a few steps."""
    card = (RELEASED / "MODEL_CARD.md").read_text()
    assert "s1_data" in card and (RELEASED / "model.safetensors").stat().st_size <= 25e6
    assert "s1_data" not in json.loads((RELEASED / "vocab.json").read_text())["sessions"]
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["ingest", str(real_dir / "s1_data.mat"), "--corpus", "mine", "--meta",
                 str(REPO / "configs" / "real_recordings.yaml")]) == 0
    assert main(["register", str(RELEASED), "--name", "poyo-real", "--alias", "released", "--tracking-uri", uri]) == 0
    capsys.readouterr()
    assert main(["finetune", "--model", "poyo-real@released", "--corpus", "mine", "--session", "s1_data",
                 "--labels", "10%", "--steps", "3", "--eval-every", "3", "--tracking-uri", uri, "--no-progress"]) == 0
    res = result_line(capsys.readouterr().out)
    # the alias resolved to the version it pointed at (the lineage names a version, not a moving alias)
    assert res["source"] == "models:/poyo-real/1" and float(res["test_r2"]) == float(res["test_r2"])  # not NaN

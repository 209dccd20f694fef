"""A tiny scaling sweep end to end with the real stack (embedded Ray, Ray Train + DeepSpeed on
CPU, MLflow on sqlite): 2 model shapes x 2 data sizes make a parent run and four child runs
with their axes and held-out figures; a second invocation runs nothing; the fit reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray.train")
pytest.importorskip("mlflow")

from data_service.errors import ConfigError  # noqa: E402
from pretrain.scaling.plan import load_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sweeps" / "tiny.yaml"


def sweep_cfg(tmp: Path, *extra: str):
    return load_sweep(TINY, [f"storage={tmp / 'sweeps'}",
                             f"overrides={json.dumps(_overrides(tmp))}", *extra])


def _overrides(tmp: Path) -> list[str]:
    import yaml

    base = yaml.safe_load(TINY.read_text())["overrides"]
    return [o if not o.startswith("data.corpus=") else f"data.corpus={tmp / 'corpus'}" for o in base]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    import ray

    from pretrain.scaling.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = sweep_cfg(tmp)
    first = run_sweep(cfg, uri, notify=lambda m: None, show_progress=False)
    second = run_sweep(sweep_cfg(tmp), uri, notify=lambda m: None, show_progress=False)
    yield tmp, uri, first, second
    ray.shutdown()


def test_parent_and_child_runs_carry_axes_and_figures(swept):
    from mlflow import MlflowClient

    tmp, uri, first, _ = swept
    assert (first.points, first.ran, first.skipped) == (4, 4, 0)
    c = MlflowClient(uri)
    parent = c.get_run(first.parent_run_id)
    assert parent.data.tags["popscale.kind"] == "sweep"
    kids = c.search_runs([parent.info.experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{first.parent_run_id}'")
    points = [r for r in kids if r.data.tags.get("popscale.kind") == "sweep-point"]
    assert len(points) == 4
    shapes = {}
    for r in points:
        t, m = r.data.tags, r.data.metrics
        for k in ("N", "D", "flops_per_sample", "hours", "subjects", "n_sessions", "distinct_tokens",
                  "axis.model", "axis.sessions"):
            assert k in t, k
        assert m["heldout_loss"] > 0 and "eval_r2" in m
        assert r.info.status == "FINISHED"
        shapes.setdefault(t["axis.model"], set()).add(float(t["N"]))
        assert float(t["n_sessions"]) == float(t["axis.sessions"])
    # N is the model's, whatever the data
    assert all(len(v) == 1 for v in shapes.values()) and len({next(iter(v)) for v in shapes.values()}) == 2
    # the evaluation session is trained on by no point
    held = parent.data.tags["eval_sessions"].split(",")
    for r in points:
        sessions = json.loads((first.directory / "points" / f"{r.data.tags['point']}.json").read_text())["sessions"]
        assert not set(held) & set(sessions)
    # every point's adaptation is a run nested under it
    evals = [r for r in kids if r.data.tags.get("popscale.kind") == "sweep-eval"]
    assert len(evals) == 0  # nested one level further down: under the point, not the parent
    nested = c.search_runs([parent.info.experiment_id], filter_string="tags.`popscale.kind` = 'sweep-eval'")
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {r.info.run_id for r in points}


def test_a_second_invocation_runs_nothing(swept):
    _, _, first, second = swept
    assert (second.ran, second.skipped) == (0, 4)
    assert second.parent_run_id == first.parent_run_id


def test_a_changed_sweep_under_the_same_name_is_refused(swept):
    from pretrain.scaling.sweep import run_sweep

    tmp, uri, _, _ = swept
    with pytest.raises(ConfigError, match="another configuration"):
        run_sweep(sweep_cfg(tmp, "budget.steps=5"), uri, notify=lambda m: None, show_progress=False)


def test_scaling_fit_reads_the_sweep_back_and_warns(swept):
    from pretrain.scaling.report import scaling_fit

    tmp, uri, first, _ = swept
    rep, md, parent = scaling_fit("tiny", uri, str(tmp / "sweeps"), resamples=5)
    assert parent == first.parent_run_id
    text = md.read_text()
    assert "poorly determined" in text  # 4 points, 2 x 2
    assert (md.parent / "loss_vs_N.png").exists() and (md.parent / "loss_vs_D.png").exists()
    from mlflow import MlflowClient

    names = {a.path for a in MlflowClient(uri).list_artifacts(parent, "scaling_fit")}
    assert "scaling_fit/scaling_fit.md" in names


@pytest.mark.parametrize("extra, message", [
    (["grid.model=[poyo-nope]"], "not a preset"),
    (["grid.sessions=[2, 40]"], "asks for 40 sessions"),
    (["grid.speed=[1]"], "axis 'speed'"),
    (["grid.subset=[m1]"], "subset 'm1' is not defined"),
    (["budget.kind=equal-compute"], "needs budget.flops"),
])
def test_bad_sweep_files_get_one_clear_error(tmp_path, extra, message):
    from data_service.reader import open_corpus
    from pretrain.run.launch import ensure_corpus
    from pretrain.scaling.plan import expand

    with pytest.raises(ConfigError, match=message):
        cfg = sweep_cfg(tmp_path, *extra)
        base = cfg.base_run()
        ensure_corpus(base, lambda m: None)
        expand(cfg, open_corpus(base.data.corpus))

"""The run plan: what it resolves, that it round-trips (JSON, a checkpoint directory, Ray's
serialisation), and that it guards the data it was made on."""

from __future__ import annotations

import numpy as np
import pytest

from data_service import intervals as iv
from data_service.errors import ConfigError, CorpusError
from data_service.reader import open_corpus
from data_service.service import build_batch
from data_service.synth import SynthConfig, synth_corpus
from data_service.window_index import WindowIndex
from pretrain.run.config import load_config
from pretrain.run.plan import PlanMismatch, RunPlan, build_plan
from pretrain.tokens.tokenizer import DEFAULT_BEHAVIOURS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan") / "corpus"
    synth_corpus(SynthConfig(sessions=3, subjects=2, minutes=1.0, min_units=20, max_units=40, seed=5), root)
    return root


def config(corpus, *overrides):
    return load_config(None, [f"data.corpus={corpus}", "train.warm_start.method=ridge", *overrides])


def test_plan_resolves_the_run_on_its_corpus(corpus):
    plan = build_plan(config(corpus, "data.window_s=2.0", "train.eval_sessions=2"))
    c = open_corpus(corpus)
    assert plan.sessions == c.session_ids == plan.session_vocab
    assert plan.unit_vocab == [u for s in c.session_ids for u in c.session(s).unit_ids.tolist()]
    assert plan.valid_sessions == c.session_ids[:2]
    g = plan.tokenizer.geometry  # the window is the data's, the latent grid the model's: defined once each
    assert (g.window_s, g.latent_step, g.latents_per_step, g.n_latents) == (2.0, 0.125, 16, 256)
    assert plan.index.window_s == 2.0 and plan.index.sessions == plan.sessions
    assert plan.index_fingerprint == WindowIndex(c, plan.index).fingerprint
    readouts = [(r.name, r.dims, r.behaviours) for r in plan.tokenizer.readouts]
    assert readouts == [("velocity", 2, DEFAULT_BEHAVIOURS["velocity"])] and "cursor_vel" in readouts[0][2]
    assert plan.tokenizer.target_scale == {}  # nothing fixed: every session's own train-split statistics
    for sid in plan.sessions:
        r = c.session(sid)
        t, v = r.behaviour("hand_vel")
        inside = v[iv.contains(iv.normalize(r.intervals["train"]), t)].astype(np.float64)
        st = plan.tokenizer.target_stats[sid]["hand_vel"]
        assert np.allclose(st.mean, inside.mean(0)) and np.isclose(st.std, np.sqrt((inside.std(0) ** 2).mean()))
    assert plan.warm_start.shape == (len(plan.unit_vocab), 2) and plan.warm_start.dtype == np.float32


def test_plan_round_trips_through_json_a_directory_and_ray(corpus, tmp_path):
    import ray.cloudpickle

    plan = build_plan(config(corpus))
    assert RunPlan.from_dict(plan.to_dict()) == plan
    plan.save(tmp_path)
    back = RunPlan.load(tmp_path)
    assert back == plan and np.array_equal(back.warm_start, plan.warm_start, equal_nan=True)
    assert back.run == plan.run and back.model == plan.model and back.tokenizer == plan.tokenizer
    assert ray.cloudpickle.loads(ray.cloudpickle.dumps(plan)) == plan  # how Ray ships it to workers
    other = build_plan(config(corpus, "data.seed=3"))
    assert other != plan and other.index_fingerprint != plan.index_fingerprint


def test_batches_need_no_model(corpus):
    """The service spec's tokenizer works on the plan's frozen vocabularies alone."""
    plan = build_plan(config(corpus, "data.global_batch=4", "train.warm_start.method=none"))
    served = build_batch(plan.service_spec(), 0, 0, 1)
    b = served.data
    assert b.size == 4 and served.positions.tolist() == [0, 1, 2, 3]
    assert 0 <= b.unit_index.min() and b.unit_index.max() < len(plan.unit_vocab)
    assert set(b.output_session.tolist()) <= set(range(len(plan.session_vocab)))


def test_a_resumed_plan_keeps_its_sessions_and_warm_start_and_refuses_other_data(corpus, monkeypatch):
    plan = build_plan(config(corpus))
    import pretrain.run.warm_start

    monkeypatch.setattr(pretrain.run.warm_start, "unit_directions", lambda *a, **k: pytest.fail("recomputed"))
    again = build_plan(config(corpus, "train.steps=900"), previous=plan)  # more steps: same data, allowed
    assert again.sessions == plan.sessions and again.warm_start is plan.warm_start
    with pytest.raises(PlanMismatch, match="changed since it started"):
        build_plan(config(corpus, "data.seed=7"), previous=plan)
    with pytest.raises(PlanMismatch, match="its tokens would change"):
        build_plan(config(corpus, "data.target_scale.hand_vel=20"), previous=plan)
    assert again.tokenizer.target_stats is plan.tokenizer.target_stats  # reused, not recomputed


def test_the_data_service_refuses_a_corpus_changed_since_the_plan(corpus):
    spec = build_plan(config(corpus, "train.warm_start.method=none")).service_spec()
    spec.index_fingerprint = "0123456789abcdef"  # as if planned on other data
    with pytest.raises(CorpusError, match="changed since the run was planned"):
        build_batch(spec, 0, 0, 1)


def test_bad_geometry_and_readouts_are_config_errors(corpus):
    with pytest.raises(ConfigError, match="whole number of latent steps"):
        build_plan(config(corpus, "data.window_s=0.3"))
    with pytest.raises(ConfigError, match=r"readouts \['position'\] are not readouts of the model"):
        build_plan(config(corpus, "data.readouts.position=[hand_pos]"))
    with pytest.raises(CorpusError, match="no session has a behaviour the readouts decode"):
        build_plan(config(corpus, "data.readouts.velocity=[finger_vel]"))

"""Targets in every session's own units, learned on a common scale: per-session train-split
statistics, carried by the plan, undone on the way out; degenerate behaviours refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import simple_session

from data_service import intervals as iv
from data_service.errors import CorpusError
from data_service.reader import open_corpus
from data_service.session import TimeSeries
from data_service.splits import make_splits
from data_service.store import CorpusStore
from pretrain.decoding.evaluate import predict_session
from pretrain.run.build import build_model
from pretrain.run.config import load_config
from pretrain.run.plan import build_plan
from pretrain.tokens.targets import behaviour_stats

TINY = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 1, "self_heads": 2, "latents_per_step": 4}


def corpus_with(root, factor: float = 1.0, unit: str = "cm/s", constant: bool = False):
    """Two sessions with hand velocity; `factor` rescales the first one's values (cm/s -> m/s: 0.01)."""
    sessions = [simple_session("a", duration=90.0, n_units=12, seed=1), simple_session("b", duration=90.0, n_units=9, seed=2)]
    for s in sessions:
        s.domain[:] = [[0.0, 90.0]]
        make_splits(s)
    v = sessions[0].behaviour["hand_vel"]
    values = v.values * factor
    if constant:
        values[:, 1] = 3.0
    sessions[0].behaviour["hand_vel"] = TimeSeries(v.timestamps, values.astype(np.float32), v.columns, unit=unit,
                                                   sampling_rate=v.sampling_rate)
    with CorpusStore(root) as st:
        for s in sessions:
            st.add(s)
    return root


def plan_for(root, *overrides):
    cfg = load_config(None, [f"data.corpus={root}", *overrides])
    cfg.model_overrides = dict(TINY)
    return build_plan(cfg)


def test_the_same_session_in_m_per_s_and_cm_per_s_learns_the_same_and_predicts_in_its_units(tmp_path):
    cm = plan_for(corpus_with(tmp_path / "cm"))
    m = plan_for(corpus_with(tmp_path / "m", factor=0.01, unit="m/s"))
    a_cm, a_m = cm.tokenizer.target_stats["a"]["hand_vel"], m.tokenizer.target_stats["a"]["hand_vel"]
    assert a_m.std * 100 == pytest.approx(a_cm.std, rel=1e-5)  # each in its own units
    assert cm.tokenizer.target_stats["b"] == m.tokenizer.target_stats["b"]
    c_cm, c_m = open_corpus(tmp_path / "cm"), open_corpus(tmp_path / "m")
    r_cm, r_m = c_cm.session("a"), c_m.session("a")
    tok_cm, tok_m = cm.make_tokenizer(), m.make_tokenizer()
    b_cm = tok_cm.pack([(r_cm.read_window(10.0, 11.0), r_cm, None)])
    b_m = tok_m.pack([(r_m.read_window(10.0, 11.0), r_m, None)])
    np.testing.assert_allclose(b_m.target, b_cm.target, rtol=1e-4, atol=1e-5)  # the model sees the same targets
    assert 0.3 < np.abs(b_m.target).max() < 2.0  # on a common scale (the raw m/s values are ~0.01)
    # one scale for all columns: the velocity keeps its direction; and the numbers undo exactly
    raw = r_m.read_window(10.0, 11.0).behaviour["hand_vel"].values.astype(np.float64)
    st = m.tokenizer.target_stats["a"]["hand_vel"]
    np.testing.assert_allclose(b_m.target, (raw - st.mean) / (st.std / m.tokenizer.target_rms), rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    model = build_model(cm)
    pred_cm = predict_session(model, tok_cm, r_cm)
    pred_m = predict_session(model, tok_m, r_m)
    np.testing.assert_allclose(pred_m.prediction * 100, pred_cm.prediction, rtol=1e-3, atol=1e-4)  # session units
    np.testing.assert_allclose(pred_m.target * 100, pred_cm.target, rtol=1e-5)
    assert pred_m.r2 == pytest.approx(pred_cm.r2, abs=1e-4)


def test_a_scale_fixed_in_the_config_wins(tmp_path):
    root = corpus_with(tmp_path / "c")
    plan = plan_for(root, "data.target_scale.hand_vel=20.0")
    assert plan.tokenizer.target_stats == {}
    r = open_corpus(root).session("a")
    w = r.read_window(5.0, 6.0)
    b = plan.make_tokenizer().pack([(w, r, None)])
    assert np.array_equal(b.target, (w.behaviour["hand_vel"].values.astype(np.float64) / 20.0).astype(np.float32))


def test_statistics_come_from_the_train_split_only(tmp_path):
    root = corpus_with(tmp_path / "c")
    r = open_corpus(root).session("a")
    t, v = r.behaviour("hand_vel")
    train = iv.normalize(r.intervals["train"])
    st = plan_for(root).tokenizer.target_stats["a"]["hand_vel"]
    inside = v[iv.contains(train, t)].astype(np.float64)
    assert np.allclose(st.mean, inside.mean(0)) and np.isclose(st.std, np.sqrt((inside.std(0) ** 2).mean()))
    assert not np.allclose(st.mean, v.astype(np.float64).mean(0), atol=1e-9)  # not the whole session's


def test_degenerate_behaviours_are_refused_by_session_and_behaviour(tmp_path):
    root = corpus_with(tmp_path / "c", constant=True)
    with pytest.raises(CorpusError, match=r"session a, field behaviour/hand_vel\] column\(s\) \[1\] are constant"):
        plan_for(root)
    t = np.arange(100) / 10.0
    with pytest.raises(CorpusError, match="too few finite samples"):
        behaviour_stats(t, np.full((100, 2), np.nan), np.array([[0.0, 10.0]]), session="s", behaviour="x")
    with pytest.raises(CorpusError, match="too few finite samples"):
        behaviour_stats(t, np.ones((100, 2)), np.array([[20.0, 30.0]]), session="s", behaviour="x")  # none in train

"""The model trains: it overfits one session, and learns a decodable signal across session sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import packed as pack
from conftest import window_batch

from data_service.reader import open_corpus
from data_service.synth import SynthConfig, synth_corpus
from data_service.window_index import IndexConfig, WindowIndex
from pretrain.model.batch import PackedBatch
from pretrain.model.config import ModelConfig
from pretrain.model.loss import weighted_mse
from pretrain.model.poyo import POYO
from pretrain.run.optim import OptimConfig, build_optimizer
from pretrain.tokens.tokenizer import Tokenizer, TokenizerConfig

NO_DROPOUT = dict(ffn_dropout=0.0, lin_dropout=0.0, atn_dropout=0.0)


def sgd_step(model, opt, b) -> float:
    """One optimisation step on batch b (a bare loop: the real one is pretrain/run/loop.py's); the loss."""
    loss, _ = weighted_mse(model(b), b, model.readout_names)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_overfits_one_synthetic_session_in_200_steps(tmp_path):
    torch.manual_seed(0)
    synth_corpus(SynthConfig(sessions=1, minutes=1.0, seed=3), tmp_path / "c")
    c = open_corpus(tmp_path / "c")
    (sid,) = c.session_ids
    cfg = ModelConfig(dim=64, depth=2, latents_per_step=8, **NO_DROPOUT)
    m = POYO(cfg, c.session(sid).unit_ids, [sid])
    tok = Tokenizer(TokenizerConfig.build(cfg, target_scale={"hand_vel": 20.0}), m.unit_emb, m.session_emb)
    r = c.session(sid)
    b = tok.pack([(r.read_window(w.t_start, w.t_start + 1.0), r, None)
                  for w in WindowIndex(c, IndexConfig(window_s=1.0)).windows(0, 8)]).to("cpu")
    opt = build_optimizer(m, OptimConfig(lr=2e-3))
    losses = [sgd_step(m, opt, b) for _ in range(200)]
    assert np.mean(losses[-10:]) <= 0.1 * np.mean(losses[:5]), (losses[:5], losses[-10:])


def population_sample(rng, session: int, sizes, weights, offsets) -> PackedBatch:
    """A window of Poisson spikes from `sizes[session]` units; the target at time t is a fixed
    random linear readout of each unit's spikes in [t - 250 ms, t) (different per session)."""
    n_units = sizes[session]
    counts = rng.poisson(rng.uniform(3, 20, n_units))
    u = np.repeat(np.arange(n_units), counts)
    t = rng.random(len(u))
    o = np.argsort(t)
    u, t = u[o], t[o]
    out_t = np.arange(0.01, 1.0, 0.02)
    y = np.array([weights[session][u[(t < x) & (t >= x - 0.25)]].sum() for x in out_t]) / np.sqrt(n_units)
    g = u + offsets[session]
    everyone = np.arange(n_units) + offsets[session]
    return window_batch(
        unit_index=np.concatenate([g, everyone, everyone]),
        input_time=np.concatenate([t, np.zeros(n_units), np.ones(n_units)]),
        token_type=np.concatenate([np.zeros(len(u)), np.ones(n_units), 2 * np.ones(n_units)]),
        latent_index=np.tile(np.arange(4), 8), latent_time=np.repeat((np.arange(8) + 0.5) / 8, 4),
        output_time=out_t, target=np.stack([y, -y], axis=1), weight=np.ones(len(out_t)), session_index=session)


def test_learns_a_decodable_signal_from_packed_batches_of_different_session_sizes():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sizes = [15, 40, 90]
    offsets = np.cumsum([0] + sizes)
    weights = [rng.normal(0, 1, n) for n in sizes]
    cfg = ModelConfig(dim=32, depth=1, dim_head=16, cross_heads=2, self_heads=2, latents_per_step=4, **NO_DROPOUT)
    m = POYO(cfg, [f"u{i}" for i in range(offsets[-1])], ["small", "medium", "large"])
    opt = build_optimizer(m, OptimConfig(lr=3e-3))
    for _ in range(500):  # every batch mixes sessions of 15, 40 and 90 units
        sgd_step(m, opt, pack([population_sample(rng, int(rng.integers(3)), sizes, weights, offsets) for _ in range(16)]))
    m.eval()
    with torch.no_grad():
        b = pack([population_sample(rng, k % 3, sizes, weights, offsets) for k in range(60)])
        p, y = m(b)["velocity"], b.target
    r2 = lambda p, y: float((1 - ((y - p) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)).mean())  # noqa: E731
    assert r2(p, y) > 0.6
    for k in range(3):
        sel = b.output_session == k
        assert r2(p[sel], y[sel]) > 0.4, (k, r2(p[sel], y[sel]))


@pytest.mark.parametrize("algo,lr", [("adamw", 3e-3), ("lamb", 1e-2)])
def test_both_optimizers_train_the_whole_model(algo, lr):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    sizes, offsets = [20], np.array([0, 20])
    weights = [rng.normal(0, 1, 20)]
    cfg = ModelConfig(dim=32, depth=1, dim_head=16, cross_heads=2, self_heads=2, latents_per_step=4, **NO_DROPOUT)
    m = POYO(cfg, [f"u{i}" for i in range(20)], ["s"])
    opt = build_optimizer(m, OptimConfig(algo=algo, lr=lr))
    b = pack([population_sample(rng, 0, sizes, weights, offsets) for _ in range(8)])
    losses = [sgd_step(m, opt, b) for _ in range(100)]
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5]), (algo, losses[:5], losses[-5:])

"""The linear warm start of unit embeddings: it recovers what units encode, from the train split only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_service.reader import open_corpus
from data_service.synth import SynthConfig, synth_corpus
from pretrain.model.config import preset
from pretrain.model.poyo import POYO
from pretrain.run.warm_start import WarmStartConfig, apply_warm_start, unit_directions
from pretrain.tokens.tokenizer import TokenizerConfig

TOKENS = TokenizerConfig.build(preset("poyo-1.3M"), behaviours={"velocity": ["hand_vel"]}, target_scale={"hand_vel": 20.0})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws") / "c"
    synth_corpus(SynthConfig(sessions=2, subjects=2, minutes=3.0, seed=4), root)
    return open_corpus(root)


def test_directions_match_the_units_preferred_directions(corpus):
    table = unit_directions(corpus, corpus.session_ids, TOKENS, WarmStartConfig("ridge"))
    offset = 0
    for sid in corpus.session_ids:
        r = corpus.session(sid)
        gt = r.ground_truth["params"]  # columns: base, pref_dir, vel_depth, ...
        w = table[offset:offset + len(r.unit_ids)]
        offset += len(r.unit_ids)
        assert np.isclose(np.abs(w).max(), 0.5)  # scaled per session
        tuned = gt[:, 2] > 0.3
        pd = np.stack([np.cos(gt[tuned, 1]), np.sin(gt[tuned, 1])], axis=1)
        cos = (pd * w[tuned]).sum(1) / np.linalg.norm(w[tuned], axis=1)
        assert np.median(cos) > 0.8, (sid, np.median(cos))
    assert offset == len(table)


def test_only_the_train_split_is_used(corpus, monkeypatch):
    """Scrambling behaviour outside the train intervals changes nothing."""
    cfg = WarmStartConfig("ridge")
    sid = corpus.session_ids[0]
    before = unit_directions(corpus, [sid], TOKENS, cfg)
    r = corpus.session(sid)
    real = type(r).behaviour

    def scrambled(self, name):
        t, v = real(self, name)
        train = self.intervals["train"]
        k = np.searchsorted(train[:, 0], t, side="right") - 1
        inside = (k >= 0) & (t < train[np.maximum(k, 0), 1])
        v = v.copy()
        v[~inside] = np.random.default_rng(0).normal(size=v[~inside].shape) * 100
        return t, v

    monkeypatch.setattr(type(r), "behaviour", scrambled)
    after = unit_directions(corpus, [sid], TOKENS, cfg)
    assert np.allclose(before, after, atol=1e-6)


def test_apply_writes_the_first_coordinates_and_skips_undecodable_sessions(corpus):
    ids = corpus.session_ids
    units = [u for s in ids for u in corpus.session(s).unit_ids]
    m = POYO(preset("poyo-1.3M"), units, ids)
    table = unit_directions(corpus, ids, TOKENS, WarmStartConfig("ridge"))
    n0 = len(corpus.session(ids[0]).unit_ids)
    table[:n0] = np.nan  # as for a session without a decodable behaviour
    old = m.unit_emb.weight.detach().clone()
    apply_warm_start(m, table)
    new = m.unit_emb.weight.detach()
    assert torch.equal(new[:n0], old[:n0])
    assert torch.allclose(new[n0:, :2], torch.from_numpy(table[n0:]))
    assert torch.equal(new[:, 2:], old[:, 2:])
    with pytest.raises(ValueError, match="does not fit"):
        apply_warm_start(m, table[:-1])
    with pytest.raises(ValueError, match="none or ridge"):
        WarmStartConfig("pca")

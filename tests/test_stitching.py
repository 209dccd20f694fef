"""Stitched evaluation (decode.py, evaluate.py): windows overlap by half, every sample of the split
is predicted and scored, and each interior sample is the mean of exactly two windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_service import intervals as iv
from data_service.reader import open_corpus
from data_service.synth import SynthConfig, synth_corpus
from pretrain.decoding.evaluate import predict_session
from pretrain.decoding.stitch import decode_session, window_starts
from pretrain.model.config import ModelConfig
from pretrain.model.poyo import POYO
from pretrain.tokens.tokenizer import Tokenizer, TokenizerConfig


def test_window_starts_cover_every_interval_with_half_overlap():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = np.sort(rng.uniform(0, 500, 6))
        rows = iv.normalize(np.stack([a[::2], a[::2] + rng.uniform(0.2, 40, 3)], 1))
        starts = window_starts(rows, 1.0, (0.0, 600.0))
        for lo, hi in rows:
            t = np.linspace(lo, hi, 400, endpoint=False)
            cover = ((t[:, None] >= starts[None]) & (t[:, None] < starts[None] + 1.0)).sum(1)
            assert cover.min() >= 1
            if hi - lo >= 3.0:  # away from the ends a sample lies in exactly two windows
                inner = (t >= lo + 0.5) & (t < hi - 1.5)
                assert np.all(cover[inner] == 2)
        steps = np.diff(starts)
        assert np.all(steps > 0) and np.median(steps) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("stitch") / "c"
    synth_corpus(SynthConfig(sessions=1, subjects=1, minutes=2.0, min_units=10, max_units=12, seed=5), root)
    c = open_corpus(root)
    sid = c.session_ids[0]
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, depth=1, dim_head=8, cross_heads=1, self_heads=2, latents_per_step=2)
    model = POYO(cfg, list(c.session(sid).unit_ids), [sid])
    tok = Tokenizer(TokenizerConfig.build(cfg, window_s=1.0), model.unit_emb, model.session_emb)
    return c.session(sid), model, tok


def test_every_test_sample_is_scored_once_stitched(session):
    reader, model, tok = session
    rows = iv.normalize(reader.intervals["test"])
    res = predict_session(model, tok, reader, "test")
    t, _ = reader.behaviour(res.behaviour)
    scored_in = iv.intersect(rows, reader.intervals.get("eval", rows))
    want = np.asarray(t)[iv.contains(scored_in, np.asarray(t))]
    assert np.array_equal(np.sort(res.times), np.sort(want))  # every sample of test x eval, and only those
    assert np.isfinite(res.prediction).all() and np.isfinite(res.r2)
    d = next(iter(decode_session(model, tok, reader, rows).values()))
    inside = iv.contains(rows, d.times)
    assert (d.windows[inside] >= 1).all()
    # interior samples of long test intervals: the mean of two windows
    long = rows[rows[:, 1] - rows[:, 0] >= 3.0]
    interior = iv.contains(np.stack([long[:, 0] + 0.5, long[:, 1] - 1.5], 1), d.times) if len(long) else inside & False
    assert interior.sum() > 100 and (d.windows[interior] == 2).all()

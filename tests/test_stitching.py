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


def test_causal_prediction_sees_no_spike_at_or_after_its_tick(session):
    from pretrain.decoding.causal import CausalDecoder, causal_decode_session

    reader, model, tok = session
    dec = CausalDecoder(model, tok, reader)
    t, u = reader.spikes()
    ticks = np.array([10.0, 10.05, 37.3, 60.0])
    base = causal_decode_session(dec, ticks)
    name = next(iter(base))
    assert base[name].shape[0] == 4 and np.isfinite(base[name]).all()
    for i, tick in enumerate(ticks):
        # everything at or after the tick removed, or a burst added at and after it: the same prediction
        before = t < tick
        cut = causal_decode_session(dec, ticks[i:i + 1], spikes=(t[before], u[before]))
        burst_t = np.concatenate([t, np.full(50, tick), tick + np.linspace(0, 0.5, 50)])
        burst_u = np.concatenate([u, np.zeros(100, np.int64)])
        o = np.argsort(burst_t, kind="stable")
        burst = causal_decode_session(dec, ticks[i:i + 1], spikes=(burst_t[o], burst_u[o]))
        np.testing.assert_allclose(cut[name][0], base[name][i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(burst[name][0], base[name][i], rtol=1e-5, atol=1e-6)
    # the same burst just before the tick does change it: the test can fail
    early_t = np.concatenate([t, np.full(100, ticks[0] - 0.01)])
    o = np.argsort(early_t, kind="stable")
    early = causal_decode_session(dec, ticks[:1], spikes=(early_t[o], np.concatenate([u, np.zeros(100, np.int64)])[o]))
    assert not np.allclose(early[name][0], base[name][0])


def test_causal_decode_predicts_at_the_stitched_times_and_writes_them(session, tmp_path):
    from pretrain.decoding.causal import CausalDecoder, causal_decode, causal_decode_session
    from pretrain.decoding.stitch import write_csv

    reader, model, tok = session
    rows = iv.normalize(reader.intervals["test"])
    d = causal_decode(model, tok, reader, rows)
    stitched = decode_session(model, tok, reader, rows)
    for name, c in d.items():
        s = stitched[name]
        assert np.array_equal(c.times, s.times) and np.array_equal(c.windows > 0, iv.contains(rows, c.times))
        assert np.isfinite(c.values[c.windows > 0]).all() and np.isnan(c.values[c.windows == 0]).all()
        at = c.times[c.windows > 0][:7]
        again = causal_decode_session(CausalDecoder(model, tok, reader), at)[name]
        np.testing.assert_allclose(c.values[c.windows > 0][:7], again, rtol=1e-5, atol=1e-6)  # batching changes nothing
    lines = write_csv(d, tmp_path / "causal.csv").read_text().splitlines()
    assert len(lines) == 1 + sum(int((c.windows > 0).sum()) for c in d.values())


def test_causal_validation_thins_the_ticks_and_scores_the_same_predictions(session):
    """A causal readout's validation (evaluate.CAUSAL_VALID_HZ) predicts every k-th sample only, and
    those predictions are the ones every-sample decoding makes there."""
    from pretrain.decoding.causal import causal_decode, thin

    t = np.arange(0, 2, 0.01)
    assert thin(t, 20.0).nonzero()[0].tolist() == list(range(0, 200, 5)) and thin(t, None).all()
    assert thin(t, 1000.0).all() and thin(t[:1], 20.0).all()
    reader, model, tok = session
    rows = iv.normalize(reader.intervals["test"])
    full, thinned = causal_decode(model, tok, reader, rows), causal_decode(model, tok, reader, rows, max_hz=20.0)
    for name, f in full.items():
        th = thinned[name]
        on = th.windows > 0
        n = int((f.windows > 0).sum())
        k = int(np.ceil(1 / (20.0 * float(np.median(np.diff(f.times[f.windows > 0])))) - 1e-9))
        assert k > 1 and on.sum() == -(-n // k) and (f.windows[on] > 0).all()
        np.testing.assert_allclose(th.values[on], f.values[on], rtol=1e-5, atol=1e-6)

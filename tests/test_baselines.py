"""The per-session baselines (pretrain/decoding/baselines.py): they learn a decodable session, use only the
labelled part of the train split, and choose their settings on valid."""

from __future__ import annotations

import numpy as np
import pytest

from data_service.reader import open_corpus
from data_service.synth import SynthConfig, synth_corpus
from pretrain.decoding.baselines import gru, lagged_counts, ridge, run_baseline
from pretrain.tokens.labels import LabelBudget


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "c"
    synth_corpus(SynthConfig(sessions=1, subjects=1, minutes=4.0, min_units=40, max_units=50, seed=3), root)
    c = open_corpus(root)
    return c.session(c.session_ids[0])


def test_lagged_counts_count_each_bin():
    spikes = [np.array([0.01, 0.06, 0.07, 0.12, 0.16]), np.array([])]
    x = lagged_counts(spikes, np.array([0.1]), 0.05, 2)  # bins [0,.05) [.05,.1) [.1,.15)
    assert x.shape == (1, 2, 3)
    assert np.allclose(x[0, 0] ** 2, [1, 2, 1]) and np.all(x[0, 1] == 0)
    x = lagged_counts(spikes, np.array([0.1]), 0.05, 2, after=1)  # and [.15,.2): the non-causal variant
    assert np.allclose(x[0, 0] ** 2, [1, 2, 1, 1])


def test_a_sample_on_a_bin_edge_reads_its_own_bin():
    """Binned recordings put behaviour samples on bin edges (t0 + i * bin) and spikes inside the bins;
    float rounding must not move a sample's bin one early (the GRU's old binning did for a quarter to
    a half of the samples on 0.2 s bins)."""
    from data_service.ingest.common import counts_to_spikes

    rng = np.random.default_rng(0)
    for bin_s, t0 in ((0.2, 1234.567), (0.05, 0.1), (1 / 30, 17.3)):
        counts = rng.poisson(1.5, size=(3000, 4))
        starts = t0 + np.arange(3000) * bin_s
        times, units = counts_to_spikes(counts, starts, bin_s, seed=1)
        spikes = [times[units == u] for u in range(4)]
        x = lagged_counts(spikes, starts, bin_s, history=3, after=1)
        assert np.array_equal(np.round(x[:, :, 3] ** 2), counts)  # the current bin is the sample's own
        assert np.array_equal(np.round(x[5:, :, 2] ** 2), counts[4:-1])  # the one before it
        assert np.array_equal(np.round(x[:-1, :, 4] ** 2), counts[1:])  # the one after it


class _ScrambledTest:
    """A session whose test-split behaviour is shuffled: anything chosen on valid must not change."""

    def __init__(self, reader) -> None:
        from data_service import intervals as iv

        self._r, self._b = reader, {}
        for name in reader.behaviour_names:
            t, v = reader.behaviour(name)
            test = np.flatnonzero(iv.contains(iv.normalize(reader.intervals["test"]), np.asarray(t)))
            v = np.array(v, copy=True)
            v[test] = v[np.random.default_rng(0).permutation(test)]
            self._b[name] = (t, v)

    def behaviour(self, name):
        return self._b[name]

    def __getattr__(self, name):
        return getattr(self._r, name)


@pytest.mark.parametrize("method", ["ridge", "gru"])
def test_baselines_choose_on_valid_only(reader, method):
    kw = dict(hiddens=(16,), histories_s=(0.2,), max_epochs=3) if method == "gru" else dict(histories_s=(0.1, 0.25))
    fn = ridge if method == "ridge" else gru
    a = fn(reader, LabelBudget.parse("100%"), **kw)
    b = fn(_ScrambledTest(reader), LabelBudget.parse("100%"), **kw)
    assert a.params == b.params and a.valid_r2 == b.valid_r2  # the same choice, by the same figure
    assert b.test_r2 < min(0.0, a.test_r2 - 0.2)  # while test, scrambled, scores far worse
    assert a.test_ci[0] < a.test_r2 < a.test_ci[1]


@pytest.mark.parametrize("method", ["ridge", "gru"])
def test_baselines_decode_and_respect_the_budget(reader, method):
    kw = dict(hiddens=(32,), histories_s=(0.35,), max_epochs=5) if method == "gru" else dict(histories_s=(0.1, 0.25))
    full = run_baseline(method, reader, LabelBudget.parse("100%"), **kw)
    assert full.test_r2 > 0.3 and np.isfinite(full.valid_r2) and full.params
    nc = run_baseline(method, reader, LabelBudget.parse("100%"), causal=False, **kw)  # with 0.3 s after each sample
    assert not nc.causal and nc.params["after_s"] > 0 and nc.test_r2 > 0.3
    few = run_baseline(method, reader, LabelBudget.parse("10%"), **kw)
    assert few.labelled_s < 0.2 * full.labelled_s
    if method == "ridge":
        assert few.test_r2 < full.test_r2  # fewer labels, a worse filter

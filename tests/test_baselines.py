"""The per-session baselines (pretrain/baselines.py): they learn a decodable session, use only the
labelled part of the train split, and choose their settings on valid."""

from __future__ import annotations

import numpy as np
import pytest

from data_service.reader import open_corpus
from data_service.synth import SynthConfig, synth_corpus
from pretrain.baselines import lagged_counts, run_baseline
from pretrain.labels import LabelBudget


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "c"
    synth_corpus(SynthConfig(sessions=1, subjects=1, minutes=4.0, min_units=40, max_units=50, seed=3), root)
    c = open_corpus(root)
    return c.session(c.session_ids[0])


def test_lagged_counts_count_each_bin():
    spikes = [np.array([0.01, 0.06, 0.07, 0.12]), np.array([])]
    x = lagged_counts(spikes, np.array([0.1]), 0.05, 2)  # bins [0,.05) [.05,.1) [.1,.15)
    assert x.shape == (1, 6)
    assert np.allclose(x[0, :3] ** 2, [1, 2, 1]) and np.all(x[0, 3:] == 0)


@pytest.mark.parametrize("method", ["ridge", "gru"])
def test_baselines_decode_and_respect_the_budget(reader, method):
    full = run_baseline(method, reader, LabelBudget.parse("100%"))
    assert full.test_r2 > 0.3 and np.isfinite(full.valid_r2) and full.params
    few = run_baseline(method, reader, LabelBudget.parse("10%"))
    assert few.labelled_s < 0.2 * full.labelled_s
    if method == "ridge":
        assert few.test_r2 < full.test_r2  # fewer labels, a worse filter

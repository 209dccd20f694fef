import numpy as np
import pytest

from pretrain.adapt import improves
from pretrain.metrics import bootstrap_r2, r2_score, sample_groups


def test_r2_matches_sklearns_definition_including_constant_targets():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.normal(size=(200, 3))
    p = y + rng.normal(scale=0.5, size=y.shape)
    assert r2_score(y, p) == pytest.approx(sk.r2_score(y, p), abs=1e-12)
    y[:, 2] = 4.0  # a constant dimension (a velocity row that is all zeros, say)
    assert r2_score(y, p) == pytest.approx(sk.r2_score(y, p), abs=1e-12)
    assert r2_score(y, p) > -10  # it used to be about -5e14
    p[:, 2] = 4.0  # predicted exactly: that dimension scores 1
    assert r2_score(y, p) == pytest.approx(sk.r2_score(y, p), abs=1e-12)
    assert r2_score(y[:, :1], y[:, :1]) == 1.0


def test_bootstrap_interval_covers_the_figure_and_resamples_groups_not_samples():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(40), 50)  # 40 trials of 50 samples
    y = rng.normal(size=(2000, 2)) + rng.normal(size=(40, 2))[groups]  # trial-level structure
    p = y + rng.normal(scale=0.7, size=y.shape) + rng.normal(scale=0.5, size=(40, 2))[groups]  # trial-level errors
    r2 = r2_score(y, p)
    lo, hi = bootstrap_r2(y, p, groups, n_boot=2000)
    assert lo < r2 < hi and hi - lo < 0.5
    # treating every sample as independent gives a narrower (over-confident) interval
    lo1, hi1 = bootstrap_r2(y, p, np.arange(2000), n_boot=2000)
    assert (hi1 - lo1) < 0.7 * (hi - lo)
    assert np.isnan(bootstrap_r2(y, p, np.zeros(2000, dtype=np.int64))[0])  # one group: no interval


def test_bootstrap_agrees_with_a_direct_resampling():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(12), 7)
    y = rng.normal(size=(84, 2))
    p = y + rng.normal(size=y.shape)
    lo, hi = bootstrap_r2(y, p, groups, n_boot=4000, seed=3)
    direct = []
    for _ in range(4000):
        pick = rng.integers(0, 12, 12)
        idx = np.concatenate([np.flatnonzero(groups == g) for g in pick])
        direct.append(r2_score(y[idx], p[idx]))
    assert lo == pytest.approx(np.quantile(direct, 0.025), abs=0.06)
    assert hi == pytest.approx(np.quantile(direct, 0.975), abs=0.06)


def test_sample_groups_by_trial_else_by_block():
    rows = np.array([[0.0, 30.0], [50.0, 55.0]])
    t = np.array([1.0, 9.9, 10.0, 29.0, 51.0, 60.0])
    g = sample_groups(t, rows, block_s=10.0)
    assert g[0] == g[1] != g[2] != g[3] and len({g[3], g[4], g[5]}) == 3  # 60 s is outside: its own group
    trials = np.array([[0.0, 5.0], [5.0, 20.0], [25.0, 30.0]])
    g = sample_groups(t, rows, trials)
    assert g[0] != g[1] and g[1] == g[2] and g[3] != g[1] and g[4] != g[3]  # 51 s: in no trial, a block


def test_a_nan_validation_never_replaces_a_finite_best():
    assert improves(0.3, -np.inf) and improves(float("nan"), -np.inf)  # nothing seen yet: keep the latest
    assert improves(0.5, 0.3) and not improves(0.2, 0.3)
    assert not improves(float("nan"), 0.3)  # a diverged model must not become "the best"
    assert improves(float("nan"), float("nan"))  # no validation data at all: the latest weights

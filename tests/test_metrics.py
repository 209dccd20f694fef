import numpy as np
import pytest

from pretrain.decoding.metrics import bootstrap_r2, r2_score, sample_groups
from pretrain.finetune.select import improves


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
    direct = []  # whole trials drawn with replacement; R2 about the scored samples' mean
    for _ in range(4000):
        pick = rng.integers(0, 12, 12)
        idx = np.concatenate([np.flatnonzero(groups == g) for g in pick])
        direct.append(np.mean(1 - ((y[idx] - p[idx]) ** 2).sum(0) / ((y[idx] - y.mean(0)) ** 2).sum(0)))
    assert lo == pytest.approx(np.quantile(direct, 0.025), abs=0.06)
    assert hi == pytest.approx(np.quantile(direct, 0.975), abs=0.06)


def _trials(rng, n, signal, offset=0.0):
    """n trials of 20 samples, trial-level structure in target and error; the model is fixed."""
    g = np.repeat(np.arange(n), 20)
    y = rng.normal(size=(20 * n, 2)) + rng.normal(size=(n, 2))[g]
    p = offset + signal * y + 0.5 * rng.normal(size=y.shape) + 0.3 * rng.normal(size=(n, 2))[g]
    return y, p, g


def test_bootstrap_interval_holds_its_estimate_and_covers_the_true_r2():
    # a near-constant prediction at the targets' mean on 16 trials (an adaptation that has barely
    # moved): recomputing each replicate's mean put the whole interval below the estimate
    rng = np.random.default_rng(4)
    y, _, g = _trials(rng, 16, 0.0)
    p = y.mean(0) + 0.01 * (y - y.mean(0)) + 0.01 * rng.normal(size=y.shape)
    lo, hi = bootstrap_r2(y, p, g)
    assert lo < r2_score(y, p) < hi
    # coverage of the population R2 by the interval over 40 trials, for a weak and a good decoder
    for signal, offset in ((0.1, 0.2), (0.9, 0.3)):
        y, p, g = _trials(rng, 20_000, signal, offset)
        true = r2_score(y, p)
        hits = [lo <= true <= hi for lo, hi in (bootstrap_r2(*_trials(rng, 40, signal, offset)) for _ in range(200))]
        assert 0.88 <= np.mean(hits) <= 0.99, (signal, np.mean(hits))


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

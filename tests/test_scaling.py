"""The scaling-law fit: it recovers a known law, its 90 % intervals cover the truth about 90 % of
the time over replicates, and it says plainly when a grid cannot determine the law. (The larger
coverage check, more replicates and resamples, is `bench/scaling_coverage.py`.)"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from pretrain.scaling.fit import Law, bootstrap, diagnose, fit_law, fit_sweep

TRUE = Law(E=0.2, A=30.0, B=200.0, alpha=0.35, beta=0.3)


def grid(k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    n, d = np.meshgrid(np.geomspace(1e5, 1e7, k), np.geomspace(1e6, 1e9, k))
    return n.ravel(), d.ravel()


def test_fit_recovers_an_exact_law():
    n, d = grid(5)
    fit = fit_law(n, d, TRUE(n, d))
    for k, v in TRUE.values().items():
        assert getattr(fit, k) == pytest.approx(v, rel=2e-3), k


def test_intervals_cover_the_truth_about_as_often_as_they_say():
    n, d = grid(4)
    rng = np.random.default_rng(0)
    replicates, hits = 20, {"alpha": 0, "beta": 0}
    for r in range(replicates):
        loss = TRUE(n, d) * np.exp(rng.normal(0, 0.02, n.size))
        fit = fit_law(n, d, loss)
        boot = bootstrap(n, d, loss, fit, resamples=30, seed=r, extra_starts=0)
        for k in hits:
            lo, hi = boot.interval(k, 0.9)
            hits[k] += lo <= getattr(TRUE, k) <= hi
    # a 90 % interval: the count of hits is Binomial(20, 0.9); refuse what it gives with p < 0.005
    lo, hi = binom.ppf(0.0025, replicates, 0.9), binom.ppf(0.9975, replicates, 0.9)
    for k, h in hits.items():
        assert lo <= h <= hi, f"{k}: {h}/{replicates} intervals covered the truth"


def test_a_degenerate_grid_is_called_so():
    n = np.full(6, 1e6)
    d = np.geomspace(1e6, 1e8, 6)
    rep = fit_sweep(n, d, TRUE(n, d), ["a"] * 6, ["m"] * 6, resamples=5)
    assert rep.law is None
    assert any("degenerate grid" in w for w in rep.warnings)
    # the per-axis law in D is still fitted: loss falls with D
    assert rep.per_axis["D"][0]["exponent"] > 0


def test_few_points_and_flat_axes_warn():
    n, d = grid(2)
    rng = np.random.default_rng(3)
    loss = (0.5 + 200.0 / d ** 0.3) * np.exp(rng.normal(0, 0.05, n.size))  # loss does not depend on N
    rep = fit_sweep(n, d, loss, ["x"] * 4, ["y"] * 4, resamples=5)
    text = " ".join(rep.warnings)
    assert "poorly determined" in text
    flat = Law(E=0.5, A=1.0, B=200.0, alpha=2.9, beta=0.3)  # an N term of ~1e-16: no effect of model size
    assert any("no effect of model size" in w for w in diagnose(*grid(4), flat, {}))
    assert diagnose(*grid(4), TRUE, {"alpha": (0.3, 0.4), "beta": (0.25, 0.35), "E": (0.1, 0.3), "A": (10, 50),
                                     "B": (100, 300)}) == []

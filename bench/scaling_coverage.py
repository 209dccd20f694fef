"""Do the scaling fit's 90 % bootstrap intervals cover the truth 90 % of the time?

Losses are drawn from a known law, L = 0.2 + 30 / N^0.35 + 200 / D^0.3, times log-normal noise
(sd 0.02 in log L), on a 4 x 4 grid of N (1e5..1e7) and D (1e6..1e9), as a small sweep would
give; each replicate is fitted (pretrain/scaling/fit.py, Huber on log L, L-BFGS-B from a grid of
starts) and bootstrapped. The figure is the share of replicates whose 90 % interval holds the
true exponent; the baseline is the nominal 0.9.

    python bench/scaling_coverage.py [--quick] [--replicates 100] [--resamples 200]

--quick: 20 replicates x 40 resamples (about a minute on 2 cores); the default 100 x 200 takes
about 25 minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pretrain.scaling.fit import Law, bootstrap, fit_law  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="--quick: ~1 minute; default ~25 min")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replicates", type=int)
    ap.add_argument("--resamples", type=int)
    ap.add_argument("--noise", type=float, default=0.02)
    a = ap.parse_args()
    reps = a.replicates or (20 if a.quick else 100)
    res = a.resamples or (40 if a.quick else 200)
    true = Law(E=0.2, A=30.0, B=200.0, alpha=0.35, beta=0.3)
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e5, 1e7, 4), np.geomspace(1e6, 1e9, 4)))
    rng = np.random.default_rng(0)
    hits = {k: 0 for k in ("E", "alpha", "beta")}
    width = {k: [] for k in hits}
    est = {k: [] for k in hits}
    t0 = time.time()
    for r in range(reps):
        loss = true(n, d) * np.exp(rng.normal(0, a.noise, n.size))
        fit = fit_law(n, d, loss)
        boot = bootstrap(n, d, loss, fit, res, seed=r, extra_starts=0 if a.quick else 1)
        for k in hits:
            lo, hi = boot.interval(k)
            hits[k] += lo <= getattr(true, k) <= hi
            width[k].append(hi - lo)
            est[k].append(getattr(fit, k))
        print(f"replicate {r + 1}/{reps}: alpha {fit.alpha:.3f} beta {fit.beta:.3f} ({time.time() - t0:.0f} s)",
              flush=True)
    print(f"\n{reps} replicates x {res} resamples, noise sd {a.noise} in log L, 16 points")
    print("| parameter | true | mean estimate | sd of estimates | mean 90 % width | coverage |")
    print("|---|---|---|---|---|---|")
    for k in hits:
        print(f"| {k} | {getattr(true, k)} | {np.mean(est[k]):.3f} | {np.std(est[k]):.3f} | "
              f"{np.mean(width[k]):.3f} | {hits[k] / reps:.2f} |")
    cov = min(hits["alpha"], hits["beta"]) / reps
    print(f"RESULT name=ci90_coverage_min_alpha_beta baseline=nominal_0.9 ratio={cov / 0.9:.3f}")


if __name__ == "__main__":
    main()

"""The scores every arm of a comparison is judged by, and their uncertainty.

- `r2_score`: the coefficient of determination per output dimension, averaged uniformly over
  dimensions, as scikit-learn defines it: a dimension whose target is constant scores 1 when it
  is predicted exactly and 0 otherwise (dividing by a zero variance would give about -5e14, and
  one such session would swamp a mean over sessions).
- `sample_groups`: the units a bootstrap resamples: the trial holding each scored sample when the
  session has trials, else blocks of time (`block_s`) inside each held-out interval. Samples of
  one trial or block are correlated; resampling them one by one would make intervals too narrow.
- `bootstrap_r2`: a percentile interval for R² over those groups.
"""

from __future__ import annotations

import numpy as np


def r2_per_dim(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    p = np.asarray(p, dtype=np.float64).reshape(len(p), -1)
    ss_res = ((y - p) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    constant = ss_tot == 0
    out = np.empty(y.shape[1])
    out[~constant] = 1.0 - ss_res[~constant] / ss_tot[~constant]
    out[constant] = np.where(ss_res[constant] == 0, 1.0, 0.0)
    return out


def r2_score(y: np.ndarray, p: np.ndarray) -> float:
    """R² averaged uniformly over output dimensions (sklearn's `r2_score` with its defaults);
    NaN for no samples."""
    if len(y) == 0:
        return float("nan")
    return float(np.mean(r2_per_dim(y, p)))


def sample_groups(times: np.ndarray, rows: np.ndarray, trials: np.ndarray | None = None,
                  block_s: float = 10.0) -> np.ndarray:
    """int64 group (0..G-1) of every sample at `times`: the trial holding it (trials: (n, 2)
    [start, end) intervals, used when there are at least 3), else the block of `block_s` seconds
    of the held-out interval (`rows`) holding it; a sample in neither is a group of its own."""
    times = np.asarray(times, dtype=np.float64)
    keys = np.zeros((len(times), 3), dtype=np.int64)  # (kind, index, block)
    keys[:, 0] = 2
    keys[:, 1] = np.arange(len(times))

    def locate(iv: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        iv = np.asarray(iv, dtype=np.float64).reshape(-1, 2)
        order = np.argsort(iv[:, 0], kind="stable")
        k = np.searchsorted(iv[order, 0], t, side="right") - 1
        kk = np.clip(k, 0, None)
        inside = (k >= 0) & (t < iv[order, 1][kk]) if len(iv) else np.zeros(len(t), bool)
        return (order[kk] if len(iv) else kk), inside

    free = np.ones(len(times), bool)
    if trials is not None and len(trials) >= 3:
        k, inside = locate(trials, times)
        keys[inside] = np.stack([np.zeros(inside.sum(), np.int64), k[inside], np.zeros(inside.sum(), np.int64)], 1)
        free &= ~inside
    r = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
    j, inside = locate(r, times)
    inside &= free
    if inside.any():
        block = np.floor((times[inside] - r[j[inside], 0]) / block_s).astype(np.int64)
        keys[inside] = np.stack([np.ones(inside.sum(), np.int64), j[inside], block], 1)
    _, dense = np.unique(keys, axis=0, return_inverse=True)
    return dense.reshape(-1).astype(np.int64)


def bootstrap_r2(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile interval of R² when whole groups are resampled with replacement.
    Each replicate's R² is computed from per-group sums, so a replicate costs O(groups)."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    p = np.asarray(p, dtype=np.float64).reshape(len(p), -1)
    g = np.asarray(groups)
    n_groups = int(g.max()) + 1 if len(g) else 0
    if n_groups < 2:
        return float("nan"), float("nan")
    # per group: count, sum y, sum y^2, sum of squared error (per dim)
    cnt = np.bincount(g, minlength=n_groups).astype(np.float64)
    sy = np.stack([np.bincount(g, y[:, d], n_groups) for d in range(y.shape[1])], 1)
    syy = np.stack([np.bincount(g, y[:, d] ** 2, n_groups) for d in range(y.shape[1])], 1)
    sse = np.stack([np.bincount(g, (y[:, d] - p[:, d]) ** 2, n_groups) for d in range(y.shape[1])], 1)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(np.float64)  # draws per group
    n = w @ cnt
    ss_tot = w @ syy - (w @ sy) ** 2 / n[:, None]
    ss_res = w @ sse
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 1e-12 * np.maximum(w @ syy, 1e-300), 1.0 - ss_res / ss_tot,
                      np.where(ss_res == 0, 1.0, 0.0))
    stats = r2.mean(1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))

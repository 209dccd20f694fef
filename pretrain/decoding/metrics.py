"""The scores every arm of a comparison is judged by, and their uncertainty.

- `r2_score`: the coefficient of determination per output dimension, averaged uniformly over
  dimensions, as scikit-learn defines it: a dimension whose target is constant scores 1 when it
  is predicted exactly and 0 otherwise (dividing by a zero variance would give about -5e14, and
  one such session would swamp a mean over sessions).
- `sample_groups`: the units a bootstrap resamples: the trial holding each scored sample when the
  session has trials, else blocks of time (`block_s`) inside each held-out interval. Samples of
  one trial or block are correlated; resampling them one by one would make intervals too narrow.
- `bootstrap_r2`, `bootstrap_accuracy`: a percentile interval over those groups (`group_bootstrap`).
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


def group_bootstrap(sums: np.ndarray, statistic, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile interval of `statistic` when whole groups are resampled with
    replacement. `sums` holds each group's additive statistics, shape (groups, k); `statistic`
    maps their totals (..., k) to the figure (...), so a replicate costs O(groups). NaN with
    fewer than two groups."""
    sums = np.asarray(sums, dtype=np.float64)
    n = len(sums)
    if n < 2:
        return float("nan"), float("nan")
    w = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    stats = statistic(w @ sums)
    alpha = (1.0 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def _r2_from_sums(tot: np.ndarray) -> np.ndarray:
    """R² (mean over dims) from totals laid out as [sum (y - mean y)² (D), sum (y - p)² (D)]."""
    d = tot.shape[-1] // 2
    ss_tot, sse = tot[..., :d], tot[..., d:]
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - sse / ss_tot, np.where(sse == 0, 1.0, 0.0))
    return r2.mean(-1)


def bootstrap_r2(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """(low, high) interval of R² over resampled groups (trials or blocks).

    A replicate is R² as a ratio of two group sums, squared error over squared deviation from the
    scored samples' mean, that mean held at its full-sample value. Re-centring every replicate
    on its own mean (R² recomputed from scratch) shrinks its variance by about 1/groups, which
    biases replicates low: with a near-constant prediction on 16 trials the percentile interval
    lay wholly below its own estimate (0.012 [-0.12, 0.01]), and in simulation it covered the
    true R² 57-59 % of the time at 6 groups, 81-83 % at 12 (this: 70-83 %, 84-90 % at 16, 90-94 %
    at 40; BCa did no better). Few groups still under-cover: read an interval over under ~15
    trials or blocks as optimistic."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    p = np.asarray(p, dtype=np.float64).reshape(len(p), -1)
    g = np.asarray(groups)
    n_groups = int(g.max()) + 1 if len(g) else 0
    if n_groups < 2:
        return float("nan"), float("nan")
    cols = [*((y - y.mean(0)) ** 2).T, *((y - p) ** 2).T]
    sums = np.stack([np.bincount(g, c, n_groups) for c in cols], 1)
    return group_bootstrap(sums, _r2_from_sums, n_boot, seed, level)


def bootstrap_accuracy(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """(low, high) interval of the fraction of samples whose class `p` equals `y`, over groups."""
    g = np.asarray(groups)
    n_groups = int(g.max()) + 1 if len(g) else 0
    if n_groups < 2:
        return float("nan"), float("nan")
    hit = (np.asarray(p).reshape(len(p), -1)[:, 0] == np.asarray(y).reshape(len(y), -1)[:, 0]).astype(np.float64)
    sums = np.stack([np.bincount(g, minlength=n_groups).astype(np.float64), np.bincount(g, hit, n_groups)], 1)
    return group_bootstrap(sums, lambda t: t[..., 1] / t[..., 0], n_boot, seed, level)

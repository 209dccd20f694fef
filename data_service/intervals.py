"""Set operations on half-open time intervals stored as (n, 2) float64 arrays of [start, end).

Splits, validation and the reader's interval masks all need the same few operations; keeping
them here (vectorised where it matters) means there is one definition of "inside".
"""

from __future__ import annotations

import numpy as np

EMPTY = np.zeros((0, 2), dtype=np.float64)


def as_intervals(iv) -> np.ndarray:
    a = np.asarray(iv, dtype=np.float64)
    if a.size == 0:
        return EMPTY.copy()
    return a.reshape(-1, 2)


def normalize(iv) -> np.ndarray:
    """Sorted, with overlapping or touching intervals merged and empty ones dropped."""
    a = as_intervals(iv)
    if len(a) <= 1 or ((a[1:, 0] > a[:-1, 1]).all() and (a[:, 1] > a[:, 0]).all()):
        return a if len(a) and a[0, 1] > a[0, 0] else EMPTY.copy()  # already normalized: the common case
    a = a[a[:, 1] > a[:, 0]]
    if len(a) == 0:
        return EMPTY.copy()
    a = a[np.argsort(a[:, 0], kind="stable")]
    ends = np.maximum.accumulate(a[:, 1])
    # a new run starts where an interval begins after every earlier one has ended
    new_run = np.ones(len(a), dtype=bool)
    new_run[1:] = a[1:, 0] > ends[:-1]
    run_id = np.cumsum(new_run) - 1
    starts = a[new_run, 0]
    run_ends = np.zeros(len(starts))
    np.maximum.at(run_ends, run_id, ends)
    return np.stack([starts, run_ends], axis=1)


def union(*sets) -> np.ndarray:
    parts = [as_intervals(s) for s in sets]
    return normalize(np.concatenate(parts)) if parts else EMPTY.copy()


def intersect(a, b) -> np.ndarray:
    a, b = normalize(a), normalize(b)
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i, 0], b[j, 0]), min(a[i, 1], b[j, 1])
        if hi > lo:
            out.append((lo, hi))
        if a[i, 1] < b[j, 1]:
            i += 1
        else:
            j += 1
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def subtract(a, b) -> np.ndarray:
    """Parts of `a` not covered by `b`."""
    a, b = normalize(a), normalize(b)
    out = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j, 1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k, 0] < e:
            if b[k, 0] > cur:
                out.append((cur, b[k, 0]))
            cur = max(cur, b[k, 1])
            if cur >= e:
                break
            k += 1
        if cur < e:
            out.append((cur, e))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def dilate(iv, by: float) -> np.ndarray:
    a = as_intervals(iv).copy()
    a[:, 0] -= by
    a[:, 1] += by
    return normalize(a)


def total(iv) -> float:
    a = as_intervals(iv)
    return float(np.sum(a[:, 1] - a[:, 0])) if len(a) else 0.0


def contains(iv, t: np.ndarray) -> np.ndarray:
    """Boolean mask of which times fall inside a normalized interval set."""
    a = as_intervals(iv)
    t = np.asarray(t)
    if len(a) == 0:
        return np.zeros(t.shape, dtype=bool)
    k = np.searchsorted(a[:, 0], t, side="right") - 1
    kc = np.maximum(k, 0)
    return (k >= 0) & (t < a[kc, 1])


def is_normalized(iv) -> bool:
    a = as_intervals(iv)
    if len(a) == 0:
        return True
    return bool(np.all(a[:, 1] > a[:, 0]) and np.all(a[1:, 0] > a[:-1, 1]))


def inside_mask(rows, domain, tol: float = 1e-9) -> np.ndarray:
    """Which intervals of `rows` lie entirely within one interval of the normalized `domain`."""
    r, d = as_intervals(rows), as_intervals(domain)
    if len(r) == 0 or len(d) == 0:
        return np.zeros(len(r), dtype=bool)
    k = np.searchsorted(d[:, 0], r[:, 0] + tol, side="right") - 1
    kc = np.maximum(k, 0)
    return (k >= 0) & (r[:, 1] <= d[kc, 1] + tol)

"""Train/valid/test domains for sessions whose source has none.

Held-out data are runs of whole trials (when the session has at least three) or blocks of time,
drawn with a seed derived from (seed, session id) so every re-ingest gives the same split. The
train domain keeps `gap_s` away from every held-out interval, so no training window can include
held-out time. Valid/test blocks are drawn only where behaviour was recorded, since a held-out
stretch without labels cannot be scored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from . import intervals as iv
from .errors import InvalidSession
from .session import SPLITS, SessionData


@dataclass
class SplitConfig:
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    gap_s: float = 1.0  # >= the model's window length
    block_s: float | None = None  # time-block length; default: 1/30 of the labelled time, 5..60 s
    seed: int = 0
    # score only inside this interval set of the source (e.g. a task epoch, leaving out rests in a
    # sleep box where position means nothing); held-out data are drawn inside it
    eval_intervals: str | None = None
    # held-out data are whole trials only when the trials cover at least this share of where they
    # could be drawn; otherwise (a few short trials in a long recording) blocks of time
    min_trial_coverage: float = 0.5

FROZEN_S = 3.0  # a behaviour whose every column repeats exactly for this long was not being tracked
MAX_CLASSES = 64  # ... unless it takes this few distinct values: then it is a class label, constant by design


def session_seed(seed: int, session_id: str) -> int:
    h = hashlib.sha256(f"{seed}:{session_id}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def label_support(s: SessionData, max_gap_factor: float = 10.0) -> np.ndarray:
    """Where behaviour was tracked: each behaviour's samples, split where a gap exceeds
    `max_gap_factor` median sample intervals and where the values freeze (`frozen_runs`); the
    whole domain when there is no behaviour."""
    series = [(ts.timestamps, ts.values) for ts in s.behaviour.values()]
    return sampled_support([t for t, _ in series], s.domain, max_gap_factor, values=[v for _, v in series])


def frozen_runs(t: np.ndarray, v: np.ndarray, min_s: float = FROZEN_S) -> np.ndarray:
    """[start, end) stretches of at least `min_s` seconds over which every column of `v` repeats its
    value exactly: a tracker that lost the animal (a sleep box out of the camera's view) holds the
    last value; a real animal at rest still jitters by a pixel or a millimetre."""
    t = np.asarray(t, dtype=np.float64)
    v = np.asarray(v).reshape(len(t), -1)
    if len(t) < 3 or len(np.unique(v[: 100_000], axis=0)) <= MAX_CLASSES:
        return iv.EMPTY.copy()  # a label that is meant to hold still (a target id, a trial condition)
    same = np.all(v[1:] == v[:-1], axis=1)  # sample i+1 repeats sample i
    edges = np.diff(np.concatenate([[0], same.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # runs of repeats, in pair indices
    step = float(np.median(np.diff(t)))  # the last repeated sample holds for one more sample interval
    rows = np.stack([t[starts], t[ends] + step], axis=1) if len(starts) else iv.EMPTY.copy()
    return rows[rows[:, 1] - rows[:, 0] >= min_s] if len(rows) else rows


def sampled_support(timestamps, domain, max_gap_factor: float = 10.0, values=None) -> np.ndarray:
    """The union, within `domain`, of where each timestamp series was sampled (split where a gap
    exceeds `max_gap_factor` median sample intervals; with `values`, less its frozen stretches);
    the whole domain when there are none."""
    parts = []
    for i, t in enumerate(timestamps):
        t = np.asarray(t)
        if len(t) < 2:
            continue
        dt = np.diff(t)
        step = float(np.median(dt)) if len(dt) else 0.0
        breaks = np.flatnonzero(dt > max(step * max_gap_factor, 1e-9))
        starts = np.concatenate([[t[0]], t[breaks + 1]])
        ends = np.concatenate([t[breaks] + step, [t[-1] + step]])
        rows = np.stack([starts, ends], axis=1)
        if values is not None:
            frozen = frozen_runs(t, values[i])
            if len(frozen):
                rows = iv.subtract(iv.normalize(rows), frozen)
        parts.append(rows)
    support = iv.union(*parts) if parts else iv.as_intervals(domain)
    return iv.intersect(support, domain)


def _counts(n: int, fractions) -> tuple[int, int]:
    """Numbers of valid and test items out of n, at least one each when n >= 3."""
    f_train, f_valid, f_test = fractions
    total = f_train + f_valid + f_test
    n_valid = int(round(n * f_valid / total))
    n_test = int(round(n * f_test / total))
    if n >= 3:
        n_valid, n_test = max(n_valid, 1 if f_valid > 0 else 0), max(n_test, 1 if f_test > 0 else 0)
    return n_valid, min(n_test, n - n_valid)


def _blocks(region: np.ndarray, block_s: float) -> np.ndarray:
    """Cut every interval of a region into consecutive blocks of about `block_s`."""
    out = []
    for s, e in region:
        n = max(1, int(round((e - s) / block_s)))
        edges = np.linspace(s, e, n + 1)
        out.append(np.stack([edges[:-1], edges[1:]], axis=1))
    return np.concatenate(out) if out else iv.EMPTY.copy()


def make_splits(s: SessionData, cfg: SplitConfig | None = None) -> None:
    """Fill s.intervals['train'/'valid'/'test'] (and 'eval') in place if the source lacks them.

    Held-out units are runs of consecutive trials of about `block_s` seconds (or blocks of time
    when there are fewer than three trials), drawn by count: 10 % / 20 % of the runs by default."""
    cfg = cfg or SplitConfig()
    have = [k for k in SPLITS if k in s.intervals and len(s.intervals[k])]
    support = label_support(s)
    if cfg.eval_intervals is not None:
        if cfg.eval_intervals not in s.intervals or not len(s.intervals[cfg.eval_intervals]):
            raise InvalidSession(f"eval_intervals: the session has no interval set {cfg.eval_intervals!r} (it has "
                                 f"{sorted(s.intervals)})", session=s.session_id, field=f"intervals/{cfg.eval_intervals}")
        support = iv.intersect(support, iv.normalize(s.intervals[cfg.eval_intervals]))
    if "eval" not in s.intervals:
        s.intervals["eval"] = support
    if len(have) == 3:
        s.split_info = {"method": "source"}
        return
    rng = np.random.default_rng(session_seed(cfg.seed, s.session_id))
    info = {"seed": cfg.seed, "gap_s": cfg.gap_s, "fractions": list(cfg.fractions)}

    trials = iv.as_intervals(s.intervals.get("trials", iv.EMPTY))
    trials = trials[np.argsort(trials[:, 0], kind="stable")] if len(trials) else trials
    if have:  # the source gave some splits (e.g. train and test): carve only what is missing, from
        # its train split if it has one, and never from (or next to) a held-out split it gave
        pool_domain = iv.normalize(s.intervals["train"]) if "train" in have else support
        given = [iv.normalize(s.intervals[k]) for k in ("valid", "test") if k in have]
        if given:
            pool_domain = iv.subtract(pool_domain, iv.dilate(iv.union(*given), cfg.gap_s))
    else:
        pool_domain = support
    pool_trials = trials[iv.inside_mask(trials, pool_domain)]

    block = cfg.block_s or float(np.clip(iv.total(pool_domain) / 30.0, 5.0, 60.0))
    info["block_s"] = block
    covered = iv.total(iv.intersect(iv.normalize(pool_trials), pool_domain)) if len(pool_trials) else 0.0
    if len(pool_trials) >= 3 and covered >= cfg.min_trial_coverage * iv.total(pool_domain):
        # contiguous runs of whole trials, about `block` seconds each: held-out data stay whole
        # trials, and the train gap is paid at run edges rather than around every trial
        run = np.floor((pool_trials[:, 0] - pool_trials[0, 0]) / block).astype(np.int64)
        groups = [pool_trials[run == r] for r in np.unique(run)]
        if len(groups) < 3:
            groups = [pool_trials[i:i + 1] for i in range(len(pool_trials))]
        units, info["method"] = groups, "trials"
    else:
        units, info["method"] = [b[None] for b in _blocks(pool_domain, block)], "time_blocks"
    missing = [k for k in ("valid", "test") if k not in have]
    fr = list(cfg.fractions)
    if "test" in have:
        fr[2] = 0.0
    if "valid" in have:
        fr[1] = 0.0
    n_valid, n_test = _counts(len(units), fr)
    order = rng.permutation(len(units))
    picked = {"valid": np.concatenate([units[i] for i in np.sort(order[:n_valid])] or [iv.EMPTY]),
              "test": np.concatenate([units[i] for i in np.sort(order[n_valid:n_valid + n_test])] or [iv.EMPTY])}
    for k in missing:
        s.intervals[k] = iv.intersect(picked[k], support) if info["method"] == "time_blocks" else iv.normalize(picked[k])
    held_out = iv.union(s.intervals["valid"], s.intervals["test"])
    base_train = iv.normalize(s.intervals["train"]) if "train" in have else iv.as_intervals(s.domain)
    s.intervals["train"] = iv.subtract(base_train, iv.dilate(held_out, cfg.gap_s))
    if have:
        info["method"] = f"source+{info['method']}"
    s.split_info = info

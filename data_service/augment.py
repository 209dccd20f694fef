"""Training-time augmentation of one window: unit dropout (which of a session's units a window
keeps), time scaling (a window's data stretched or squeezed) and, for a causal readout, the output
queries kept to the window's end. Every draw is a pure function
of (seed, stream position), counter-based, so any window's augmentation is computable on its
own, in any process, and a resumed run replays it exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .reader import SeriesWindow, SessionReader, Window
from .rng import uniform


@dataclass
class AugmentConfig:
    unit_dropout: bool = True
    # number of units kept ~ triangular(min, mode, max), capped at the session's units (reference values)
    min_units: int = 30
    mode_units: int = 100
    max_units: int = 300
    # e.g. (0.9, 1.1): a window holds window_s x factor seconds of data squeezed into window_s (spike
    # and behaviour times divided by the factor, per-second behaviours such as velocity multiplied)
    time_scaling: tuple[float, float] | None = None
    # a causal readout (finetune --causal): only the behaviour samples in the last query_tail_s seconds
    # of a window are learned, so the model learns to predict at a window's end from the spikes before
    # it, which is all a live decoder has (pretrain/decoding/causal.py); None: every sample is a query
    query_tail_s: float | None = None

    def __post_init__(self) -> None:
        if self.query_tail_s is not None and not self.query_tail_s > 0:
            raise ValueError(f"augment.query_tail_s must be > 0 seconds (or null: every sample), got {self.query_tail_s}")


_STREAMS = {"units": 1, "time": 2}


_POSITION_MULT = 0xD1B54A32D192ED03


def _stream_key(seed: int, position: int, what: str) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position * _POSITION_MULT + _STREAMS[what] * 0x632BE59BD9B4E019) % (1 << 64)


def _uniforms(seed: int, position: int, what: str, n: int) -> np.ndarray:
    """n deterministic U[0, 1) draws for one window: counter-based (a hash of seed, position,
    stream and index), so any window's augmentation is computable on its own and costs no
    generator set-up (~10 us instead of ~45 us per window)."""
    return uniform(_stream_key(seed, position, what), np.arange(n, dtype=np.uint64))


def _uniforms_flat(seed: int, positions: Sequence[int], what: str, counts: np.ndarray) -> np.ndarray:
    """`_uniforms` for many windows in one vectorised hash, concatenated (the same numbers: each
    draw is mix(index + key), computed here for every window's indices at once)."""
    # _stream_key for every position at once: uint64 arithmetic wraps modulo 2^64 as its % does
    keys = (np.asarray(positions, dtype=np.int64).astype(np.uint64) * np.uint64(_POSITION_MULT)
            + np.uint64(_stream_key(seed, 0, what)))
    starts = np.cumsum(counts) - counts
    local = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)).astype(np.uint64)
    return uniform(0, local + np.repeat(keys, counts))


def keep_units(n_units: int, cfg: AugmentConfig, u: np.ndarray) -> np.ndarray | None:
    """Unit dropout: how many units survive is triangular(min, mode, max), capped at n_units;
    which ones is a uniformly random subset (the k smallest of `u[1:]`). `u`: n_units + 1
    uniforms. Returns a boolean mask over the session's units, or None when all are kept."""
    if not cfg.unit_dropout or n_units <= cfg.min_units:
        return None
    a, b = float(cfg.min_units), float(min(cfg.max_units, n_units))
    c = min(max(float(cfg.mode_units), a), b)
    if b > a:  # inverse CDF of the triangular distribution
        f = (c - a) / (b - a)
        x = a + np.sqrt(u[0] * (b - a) * (c - a)) if u[0] < f else b - np.sqrt((1 - u[0]) * (b - a) * (b - c))
        k = int(round(x))
    else:
        k = int(b)
    k = min(max(k, cfg.min_units), n_units)
    if k >= n_units:
        return None
    mask = np.zeros(n_units, dtype=bool)
    mask[np.argpartition(u[1:n_units + 1], k - 1)[:k]] = True
    return mask


def read_scaled(r: SessionReader, t_start: float, window_s: float, cfg: AugmentConfig, seed: int, position: int,
                behaviours: list[str], intervals: list[str]) -> Window:
    """The window at `t_start` holding the named behaviours and interval sets, stretched in time
    when time scaling is on: window_s x factor seconds of data, its times divided to fit window_s."""
    if not cfg.time_scaling:
        w = r.read_window(t_start, t_start + window_s, behaviours=behaviours, intervals=intervals)
        return tail_queries(w, window_s, cfg.query_tail_s)
    lo, hi = cfg.time_scaling
    s = float(lo + (hi - lo) * _uniforms(seed, position, "time", 1)[0])
    w = r.read_window(t_start, t_start + window_s * s, behaviours=behaviours, intervals=intervals)
    w = Window(w.session_id, w.t_start, w.t_start + window_s, w.spike_times / s, w.spike_units,
               {k: SeriesWindow(v.timestamps / s, v.values * rate_factor(r.attrs["behaviour"][k].get("unit", ""), s))
                for k, v in w.behaviour.items()},
               {k: v / s for k, v in w.intervals.items()})
    return tail_queries(w, window_s, cfg.query_tail_s)


def tail_queries(w: Window, window_s: float, tail_s: float | None) -> Window:
    """The window with only its behaviour samples at or after `window_s - tail_s` (relative time):
    the queries a causal readout learns from. Spikes are untouched: the whole window is context."""
    if tail_s is None:
        return w
    start = window_s - tail_s
    beh = {}
    for k, v in w.behaviour.items():
        keep = v.timestamps >= start
        beh[k] = v if keep.all() else SeriesWindow(v.timestamps[keep], v.values[keep])
    return Window(w.session_id, w.t_start, w.t_end, w.spike_times, w.spike_units, beh, w.intervals)


def rate_factor(unit: str, s: float) -> float:
    """How a behaviour's values change when s seconds of it are squeezed into one: a rate per
    second (cm/s, deg/s) is s times larger, per second squared s^2 times, anything else unchanged."""
    u = unit.replace(" ", "").lower()
    if u.endswith(("/s^2", "/s2", "/s**2")):
        return s * s
    return s if u.endswith("/s") else 1.0


def unit_masks(cfg: AugmentConfig, seed: int, positions: Sequence[int], n_units: Sequence[int]
               ) -> list[np.ndarray | None]:
    """Unit dropout for a batch of windows at stream `positions` of sessions with `n_units` units:
    each window's `keep_units` mask (the same masks), made for the whole batch at once: one hash
    for every draw, the kept counts by array arithmetic, and the k smallest draws of every window
    by one sort of all of them (per window, a partition was ~12 us of a cold window's ~140)."""
    if not len(positions):
        return []
    counts = np.asarray(n_units, dtype=np.int64)
    if not cfg.unit_dropout:
        return [None] * len(counts)
    u = _uniforms_flat(seed, positions, "units", counts + 1)
    starts = np.cumsum(counts + 1) - (counts + 1)
    k = _kept_counts(cfg, counts, u[starts])
    drop = (counts > cfg.min_units) & (k < counts)  # windows that lose units
    if not drop.any():
        return [None] * len(counts)
    w = np.flatnonzero(drop)
    lens = counts[w]
    seg = np.repeat(np.arange(len(w)), lens)
    local = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)  # unit index in its window
    draws = u[np.repeat(starts[w] + 1, lens) + local]
    # by window, then by draw: each window's smallest draws first. A draw is a 53-bit integer over
    # 2^53 (rng.uniform), so (window << 53) | draw is an exact uint64 key (one argsort, ~8x cheaper
    # than np.lexsort) while windows number fewer than 2^11
    if len(w) < 1 << 11:
        order = np.argsort((seg.astype(np.uint64) << np.uint64(53)) | (draws * float(1 << 53)).astype(np.uint64))
    else:
        order = np.lexsort((draws, seg))
    flat = np.zeros(len(draws), dtype=bool)
    flat[order[local < np.repeat(k[w], lens)]] = True  # order keeps windows contiguous: `local` is the rank
    out: list[np.ndarray | None] = [None] * len(counts)
    a = 0
    for i, b in zip(w.tolist(), np.cumsum(lens).tolist()):  # slices: np.split costs ~2 us a piece
        out[i], a = flat[a:b], b
    return out


def _kept_counts(cfg: AugmentConfig, n_units: np.ndarray, u0: np.ndarray) -> np.ndarray:
    """`keep_units`' count of kept units for many windows (inverse CDF of triangular(min, mode,
    max) with max capped at each window's units), in the same float64 operations."""
    a = float(cfg.min_units)
    b = np.minimum(float(cfg.max_units), n_units.astype(np.float64))
    c = np.minimum(np.maximum(float(cfg.mode_units), a), b)
    with np.errstate(invalid="ignore", divide="ignore"):  # b == a: no spread, the count is b
        f = (c - a) / (b - a)
        x = np.where(u0 < f, a + np.sqrt(u0 * (b - a) * (c - a)), b - np.sqrt((1 - u0) * (b - a) * (b - c)))
    k = np.where(b > a, np.rint(x), b).astype(np.int64)
    return np.minimum(np.maximum(k, cfg.min_units), n_units)

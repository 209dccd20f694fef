"""Synthetic neurons: per-subject pools tuned to shared low-dimensional movement dynamics.

log rate_i(t) = base_i + drift_i(t) + gain_session
              + depth_i * <[cos pd_i, sin pd_i], v(t + lag)>    (velocity, the strongest drive)
              + w_pos_i . p(t + lag) + w_speed_i * |v(t + lag)| + w_rot_i . r(t + lag)
              + w_lat_i . z(t)                                   (shared fluctuations unrelated to movement)
Covariates are scaled to unit size, so weights are in log-rate units. Baseline rates are
log-normal (median 6 Hz, clipped to 1-50 Hz); a fifth of units are untuned. Spikes are drawn
per 10 ms bin (Poisson), placed uniformly inside it, then thinned by a 2 ms dead time and a
relative refractory recovery (4 ms), so no inter-spike interval is shorter than 2 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARAM_COLUMNS = ["base_log_rate", "pref_dir", "vel_depth", "w_pos_x", "w_pos_y", "w_speed", "rot_amp",
                 "rot_phase", "drift_sigma"]
DEAD_TIME_S = 0.002
RELATIVE_REFRACTORY_S = 0.004
MAX_RATE_HZ = 300.0


@dataclass
class UnitParams:
    """One row per neuron; latent weights kept separately (their number is configurable)."""

    table: np.ndarray  # (n, len(PARAM_COLUMNS))
    latent: np.ndarray  # (n, k)


def draw_units(n: int, n_latent: int, untuned_fraction: float, rng: np.random.Generator) -> UnitParams:
    base = np.clip(rng.normal(np.log(6.0), 0.75, n), np.log(1.0), np.log(50.0))
    pd = rng.uniform(0, 2 * np.pi, n)
    depth = rng.lognormal(np.log(0.45), 0.45, n)
    w_pos = rng.normal(0, 0.12, (n, 2))
    w_speed = rng.normal(0.1, 0.15, n)
    rot_amp = rng.lognormal(np.log(0.2), 0.5, n)
    rot_phase = rng.uniform(0, 2 * np.pi, n)
    drift = rng.uniform(0.05, 0.25, n)
    untuned = rng.random(n) < untuned_fraction
    depth[untuned] = 0.0
    w_pos[untuned] = 0.0
    w_speed[untuned] = 0.0
    rot_amp[untuned] = 0.0
    table = np.column_stack([base, pd, depth, w_pos, w_speed, rot_amp, rot_phase, drift])
    latent = rng.normal(0, 0.25, (n, n_latent))
    return UnitParams(table.astype(np.float64), latent.astype(np.float64))


def ou(n_steps: int, k: int, dt: float, tau: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """k independent unit-variance Ornstein-Uhlenbeck processes (n_steps x k)."""
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float64), (k,))
    a = np.exp(-dt / tau)
    noise = rng.normal(0, 1, (n_steps, k)) * np.sqrt(1 - a**2)
    out = np.empty((n_steps, k))
    x = rng.normal(0, 1, k)
    # a first-order recursion; scipy.signal.lfilter vectorises it per column
    # deferred: importing scipy only when used keeps start-up light
    from scipy.signal import lfilter

    for j in range(k):
        y = lfilter([1.0], [1.0, -a[j]], noise[:, j], zi=[a[j] * x[j]])[0]
        out[:, j] = y
    return out


def log_rates(p: UnitParams, cov: dict[str, np.ndarray], drift: np.ndarray, gain: float) -> np.ndarray:
    """(n_steps, n_units) log firing rates from covariates already shifted by the lag."""
    tb = p.table
    pd, depth = tb[:, 1], tb[:, 2]
    lr = tb[None, :, 0] + drift * tb[None, :, 8] + gain
    lr = lr + cov["vel"] @ np.stack([np.cos(pd) * depth, np.sin(pd) * depth])
    lr = lr + cov["pos"] @ tb[:, 3:5].T
    lr = lr + cov["speed"][:, None] * tb[None, :, 5]
    rot_w = np.stack([np.cos(tb[:, 7]), np.sin(tb[:, 7])]) * tb[:, 6]
    lr = lr + cov["rot"] @ rot_w
    lr = lr + cov["latent"] @ p.latent.T
    return lr


def spikes_from_rates(rates: np.ndarray, t0: float, dt: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Spike times (unsorted across units) and unit indices from (n_steps, n_units) rates in Hz."""
    lam = np.minimum(rates, MAX_RATE_HZ) * dt
    counts = rng.poisson(lam)
    step_idx, unit_idx = np.nonzero(counts)
    reps = counts[step_idx, unit_idx]
    steps = np.repeat(step_idx, reps)
    units = np.repeat(unit_idx, reps)
    times = t0 + (steps + rng.random(len(steps))) * dt
    return times, units


def refractory(times: np.ndarray, units: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mask of spikes kept after the dead time and relative refractory recovery, per unit."""
    order = np.lexsort((times, units))
    t, u = times[order], units[order]
    isi = np.full(len(t), np.inf)
    same = u[1:] == u[:-1]
    isi[1:][same] = np.diff(t)[same]
    p_keep = np.where(isi < DEAD_TIME_S, 0.0, 1.0 - np.exp(-(isi - DEAD_TIME_S) / RELATIVE_REFRACTORY_S))
    keep_sorted = rng.random(len(t)) < p_keep
    keep = np.empty(len(t), dtype=bool)
    keep[order] = keep_sorted
    return keep

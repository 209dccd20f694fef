"""Fitting L(N, D) = E + A / N^alpha + B / D^beta to a sweep, with bootstrap intervals.

The method is Chinchilla's approach 3, with the repairs of the Epoch AI replication: the Huber
loss (delta 1e-3) of log L, minimised by L-BFGS-B to convergence (an analytic gradient, tight
tolerances) from a grid of starts, in a parametrisation where every term is positive
(E = exp(e), A = exp(a), B = exp(b)); uncertainty by bootstrap over points (a refit per resample),
reported as percentile intervals; and a plain warning when the law is poorly determined (too few
points for five parameters, one axis not varied, intervals spanning zero or reaching a bound).

    fit = fit_law(N, D, L)               # point estimate
    boot = bootstrap(N, D, L, fit, 1000) # intervals: boot.interval("alpha")
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

PARAMS = ("E", "A", "B", "alpha", "beta")
DELTA = 1e-3
EXP_BOUNDS = (0.0, 3.0)  # alpha, beta


@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")

    def __call__(self, n, d) -> np.ndarray:
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    def values(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in PARAMS}

    def optimal(self, budget: float, flops_per_token, n_range: tuple[float, float]) -> tuple[float, float, float]:
        """(N, D, L) minimising L(N, D) for a training budget of `budget` FLOPs, where D = budget /
        flops_per_token(N) (PerceiverIO's cost per token is not 6N: it is measured per point)."""
        n = np.geomspace(*n_range, 2000)
        d = budget / flops_per_token(n)
        loss = self(n, d)
        i = int(np.argmin(loss))
        return float(n[i]), float(d[i]), float(loss[i])


def _huber(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    small = a <= DELTA
    return np.where(small, 0.5 * r * r, DELTA * (a - 0.5 * DELTA)), np.where(small, r, DELTA * np.sign(r))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, w: np.ndarray):
    e, a, b, alpha, beta = theta
    terms = np.stack([np.full_like(log_n, e), a - alpha * log_n, b - beta * log_d])
    top = terms.max(0)
    ex = np.exp(terms - top)
    s = ex.sum(0)
    pred = top + np.log(s)
    h, psi = _huber(pred - log_l)
    p = ex / s  # d pred / d term
    psi = psi * w
    grad = np.array([(psi * p[0]).sum(), (psi * p[1]).sum(), (psi * p[2]).sum(),
                     -(psi * p[1] * log_n).sum(), -(psi * p[2] * log_d).sum()])
    return float((h * w).sum()), grad


def _bounds() -> list[tuple[float | None, float | None]]:
    return [(None, None), (None, None), (None, None), EXP_BOUNDS, EXP_BOUNDS]


def _starts(log_l: np.ndarray) -> list[np.ndarray]:
    lo = float(log_l.min())
    return [np.array(s, float) for s in itertools.product(
        (lo - 2.0, lo - 0.5, lo), (0.0, 5.0, 10.0, 20.0), (0.0, 5.0, 10.0, 20.0), (0.1, 0.5, 1.0), (0.1, 0.5, 1.0))]


def _minimise(x0: np.ndarray, args) -> tuple[np.ndarray, float]:
    r = minimize(_objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=_bounds(),
                 options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
    return r.x, float(r.fun)


def fit_law(n, d, loss, starts: list[np.ndarray] | None = None, keep: int = 8,
            weights: np.ndarray | None = None) -> Law:
    """The best of L-BFGS-B runs from the `keep` best starts of a grid (or from `starts`)."""
    log_n, log_d, log_l = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(np.asarray(loss, float))
    w = np.ones_like(log_l) if weights is None else np.asarray(weights, float)
    args = (log_n, log_d, log_l, w)
    if starts is None:
        grid = _starts(log_l)
        scores = [_objective(s, *args)[0] for s in grid]
        starts = [grid[i] for i in np.argsort(scores)[:keep]]
    best_x, best_f = None, np.inf
    for x0 in starts:
        x, f = _minimise(x0, args)
        if f < best_f:
            best_x, best_f = x, f
    e, a, b, alpha, beta = best_x
    return Law(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta), best_f)


def _theta(law: Law) -> np.ndarray:
    return np.array([np.log(law.E), np.log(law.A), np.log(law.B), law.alpha, law.beta])


@dataclass
class Bootstrap:
    samples: dict[str, np.ndarray]  # parameter -> refits over resamples

    def interval(self, name: str, level: float = 0.9) -> tuple[float, float]:
        q = (1 - level) / 2
        v = self.samples[name]
        return float(np.quantile(v, q)), float(np.quantile(v, 1 - q))


def bootstrap(n, d, loss, law: Law, resamples: int = 1000, seed: int = 0, extra_starts: int = 2) -> Bootstrap:
    """Refits on resampled points (with replacement, as multiplicities: the same optimiser and
    loss), each from the full fit and from `extra_starts` of the grid's best starts."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    rng = np.random.default_rng(seed)
    log_l = np.log(loss)
    grid = _starts(log_l)
    args_full = (np.log(n), np.log(d), log_l, np.ones_like(log_l))
    alt = [grid[i] for i in np.argsort([_objective(s, *args_full)[0] for s in grid])[:extra_starts]]
    out = {k: [] for k in PARAMS}
    for _ in range(resamples):
        w = np.bincount(rng.integers(0, len(n), len(n)), minlength=len(n)).astype(float)
        fit = fit_law(n, d, loss, starts=[_theta(law), *alt], weights=w)
        for k, v in fit.values().items():
            out[k].append(v)
    return Bootstrap({k: np.array(v) for k, v in out.items()})


def power_law(x, y) -> tuple[float, float, float]:
    """(exponent s, prefactor k, standard error of s) of y ~ k x^-s by least squares in log-log."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        return float("nan"), float("nan"), float("nan")
    A = np.stack([np.ones_like(lx), lx], 1)
    coef, res, *_ = np.linalg.lstsq(A, ly, rcond=None)
    dof = len(lx) - 2
    se = float("nan")
    if dof > 0:
        s2 = float(((ly - A @ coef) ** 2).sum()) / dof
        se = float(np.sqrt(s2 / ((lx - lx.mean()) ** 2).sum()))
    return float(-coef[1]), float(np.exp(coef[0])), se


@dataclass
class FitReport:
    law: Law | None
    intervals: dict[str, tuple[float, float]]
    warnings: list[str] = field(default_factory=list)
    per_axis: dict[str, list[dict]] = field(default_factory=dict)  # "N" / "D" -> [{group, exponent, se, points}]


def diagnose(n, d, law: Law | None, intervals: dict[str, tuple[float, float]]) -> list[str]:
    """Plain reasons the fitted law should not be trusted (empty: none found)."""
    out = []
    n_points, distinct_n, distinct_d = len(n), len(set(np.round(np.log(n), 6))), len(set(np.round(np.log(d), 6)))
    if distinct_n < 2 or distinct_d < 2:
        out.append(f"degenerate grid: {distinct_n} distinct N and {distinct_d} distinct D; the joint law needs at "
                   "least 2 of each (3+ to say anything): only the per-axis fits below mean something")
    if n_points < 10:
        out.append(f"{n_points} points for 5 parameters: the law is poorly determined; read it as a demonstration "
                   "of the pipeline, not as a measurement")
    if law is not None:
        for k in ("alpha", "beta"):
            lo, hi = intervals.get(k, (np.nan, np.nan))
            if lo <= 0.01:
                out.append(f"the 90 % interval of {k} reaches 0 ({lo:.3f} .. {hi:.3f}): the data do not show "
                           f"that loss falls with {'N' if k == 'alpha' else 'D'}")
            if hi >= EXP_BOUNDS[1] - 1e-3 or getattr(law, k) >= EXP_BOUNDS[1] - 1e-3:
                out.append(f"{k} reaches the fit's bound {EXP_BOUNDS[1]}: that term is not identified")
        for k in ("E", "A", "B"):
            lo, hi = intervals.get(k, (np.nan, np.nan))
            if hi > 100 * max(lo, 1e-300):
                out.append(f"the 90 % interval of {k} spans more than 100x ({lo:.3g} .. {hi:.3g})")
        # a term that changes the predicted loss by under 1 % across the swept points says nothing
        # about its axis, whatever its exponent (it can sit anywhere without changing the fit)
        n_arr, d_arr = np.asarray(n, float), np.asarray(d, float)
        floor = float(np.min(law(n_arr, d_arr)))
        for axis, term in (("N", law.A / n_arr ** law.alpha), ("D", law.B / d_arr ** law.beta)):
            if floor > 0 and float(term.max() - term.min()) < 0.01 * floor:
                out.append(f"the fitted {axis} term moves the loss by under 1 % across the swept {axis}: "
                           f"the data show no effect of {'model size' if axis == 'N' else 'data size'} in this "
                           "range, so its exponent means nothing")
    return out


def fit_sweep(n, d, loss, groups_n: list[str], groups_d: list[str], resamples: int = 1000, seed: int = 0) -> FitReport:
    """The joint law with intervals (unless the grid is degenerate) and the per-axis power laws:
    loss vs N within each data group, loss vs D within each model."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    distinct = len(set(np.round(np.log(n), 6))) >= 2 and len(set(np.round(np.log(d), 6))) >= 2
    law, intervals = None, {}
    if distinct and len(n) >= 5:
        law = fit_law(n, d, loss)
        boot = bootstrap(n, d, loss, law, resamples, seed)
        intervals = {k: boot.interval(k) for k in PARAMS}
    per_axis: dict[str, list[dict]] = {"N": [], "D": []}
    for axis, x, groups in (("N", n, groups_n), ("D", d, groups_d)):
        for g in dict.fromkeys(groups):
            sel = np.array([h == g for h in groups])
            s, k, se = power_law(x[sel], loss[sel])
            per_axis[axis].append({"group": g, "exponent": s, "prefactor": k, "se": se, "points": int(sel.sum())})
    return FitReport(law, intervals, diagnose(n, d, law, intervals), per_axis)

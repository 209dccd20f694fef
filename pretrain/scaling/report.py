"""`popscale scaling-fit --sweep ID`: the sweep's points from MLflow, the fitted law with its
intervals, the per-axis power laws, plots and a markdown summary, logged to the parent run.

The points are read from the tracking store (the child runs of the sweep's parent run), not from
local files, so a team fits a sweep that ran on a cluster from any machine that reaches the server.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_service.errors import ConfigError

from ..tracking.config import TrackingConfig
from ..tracking.mlflow_runs import tracking_uri as default_uri
from ..tracking.tracked_run import TrackedRun
from .fit import PARAMS, FitReport, fit_sweep, power_law


@dataclass
class SweepPoint:
    key: str
    N: float
    D: float
    loss: float
    eval_r2: float
    axes: dict[str, str]
    figures: dict[str, float]


def resolve_sweep(sweep: str, storage: str = "runs/sweeps") -> tuple[str, str | None]:
    """(parent run id, tracking URI if known) of a sweep name, a sweep directory or a parent run id."""
    for d in (Path(sweep), Path(storage) / sweep):
        if (d / "state.json").exists():
            s = json.loads((d / "state.json").read_text())
            return s["parent_run_id"], s["tracking_uri"]
    if len(sweep) == 32 and all(c in "0123456789abcdef" for c in sweep):
        return sweep, None
    raise ConfigError(f"--sweep {sweep!r}: not a sweep name under {storage}, a sweep directory, or an MLflow run id")


def load_points(tracking_uri: str, parent: str) -> tuple[list[SweepPoint], str]:
    """The finished points of a sweep (child runs with a held-out loss) and the parent's experiment id."""
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri)
    try:
        run = c.get_run(parent)
    except Exception:  # noqa: BLE001 - MLflow raises its own types
        raise ConfigError(f"no MLflow run {parent} in {tracking_uri}") from None
    children = c.search_runs([run.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`popscale.kind` = 'sweep-point'",
                             max_results=5000)
    out = []
    for r in children:
        m, t = r.data.metrics, r.data.tags
        if "heldout_loss" not in m or not math.isfinite(m["heldout_loss"]):
            continue
        figures = {k: float(v) for k, v in t.items() if _is_number(v) and not k.startswith("axis.")}
        out.append(SweepPoint(t.get("point", r.info.run_id), float(t["N"]), float(t["D"]), float(m["heldout_loss"]),
                              float(m.get("eval_r2", float("nan"))),
                              {k[5:]: v for k, v in t.items() if k.startswith("axis.")}, figures))
    return sorted(out, key=lambda p: p.key), run.info.experiment_id


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _group(p: SweepPoint, drop: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(p.axes.items()) if k not in drop) or "all"


def plots(points: list[SweepPoint], rep: FitReport, out: Path) -> list[Path]:
    # deferred: importing matplotlib only when used keeps start-up light
    import matplotlib

    matplotlib.use("Agg")
    # deferred: importing matplotlib only when used keeps start-up light
    import matplotlib.pyplot as plt

    files = []
    n = np.array([p.N for p in points])
    d = np.array([p.D for p in points])
    loss = np.array([p.loss for p in points])
    for axis, x, drop, other in (("N", n, ("model", "seed"), d), ("D", d, tuple(k for k in points[0].axes
                                                                              if k != "model"), n)):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        groups = [_group(p, drop) for p in points]
        for g in dict.fromkeys(groups):
            sel = np.array([h == g for h in groups])
            o = np.argsort(x[sel])
            ax.plot(x[sel][o], loss[sel][o], "o", label=g)
            if rep.law is not None:
                grid = np.geomspace(x[sel].min() / 1.5, x[sel].max() * 1.5, 100)
                fixed = np.full_like(grid, np.exp(np.log(other[sel]).mean()))
                ax.plot(grid, rep.law(grid, fixed) if axis == "N" else rep.law(fixed, grid), "-",
                        color=ax.lines[-1].get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (parameters without vocabularies)" if axis == "N" else "D (spike tokens seen)")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"loss vs {axis}" + (" (lines: fitted law)" if rep.law is not None else ""))
        ax.legend(fontsize=6)
        fig.tight_layout()
        f = out / f"loss_vs_{axis}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    if rep.law is not None:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        pred = rep.law(n, d)
        ax.plot(pred, np.log(loss) - np.log(pred), "o")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("fitted loss")
        ax.set_ylabel("log(observed) - log(fitted)")
        ax.set_title("residuals of the fitted law")
        fig.tight_layout()
        f = out / "residuals.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files


def flops_per_token(points: list[SweepPoint]):
    """Training FLOPs per spike token as a power of N, fitted over the points (PerceiverIO's cost is
    not 6N: it depends on latents and queries as well)."""
    n = np.array([p.N for p in points])
    f = np.array([p.figures["flops_per_sample"] / max(p.figures["spikes_per_window"], 1e-9) for p in points])
    s, k, _ = power_law(n, f)
    if not np.isfinite(s):
        c = float(np.mean(f))
        return lambda x: np.full_like(np.asarray(x, float), c)
    return lambda x: k * np.asarray(x, float) ** (-s)


def summary(name: str, points: list[SweepPoint], rep: FitReport, budget: float | None) -> str:
    lines = [f"# Scaling fit: sweep {name}", "",
             f"{len(points)} points; N from {min(p.N for p in points):.3g} to {max(p.N for p in points):.3g}, "
             f"D from {min(p.D for p in points):.3g} to {max(p.D for p in points):.3g} spike tokens seen.", ""]
    if rep.warnings:
        lines += ["**Warning: this fit is poorly determined.**", ""] + [f"- {w}" for w in rep.warnings] + [""]
    if rep.law is not None:
        law = rep.law
        lines += [f"L(N, D) = {law.E:.4g} + {law.A:.4g} / N^{law.alpha:.3f} + {law.B:.4g} / D^{law.beta:.3f}", "",
                  "| parameter | estimate | 90 % bootstrap interval |", "|---|---|---|"]
        for k in PARAMS:
            lo, hi = rep.intervals[k]
            lines.append(f"| {k} | {getattr(law, k):.4g} | {lo:.4g} .. {hi:.4g} |")
        lines.append("")
        if budget:
            fpt = flops_per_token(points)
            lo, hi = min(p.N for p in points), max(p.N for p in points)
            n_opt, d_opt, l_opt = law.optimal(budget, fpt, (lo / 10, hi * 10))
            where = "inside" if lo <= n_opt <= hi else "OUTSIDE (an extrapolation)"
            lines += [f"Compute-optimal allocation for {budget:.3g} training FLOPs (FLOPs per token from the points' "
                      f"model counter, as a power of N): N = {n_opt:.3g}, D = {d_opt:.3g} spike tokens, predicted "
                      f"loss {l_opt:.4g}; that N is {where} the swept range.", ""]
    for axis, what in (("N", "loss vs N within each data setting"), ("D", "loss vs D within each model")):
        rows = rep.per_axis.get(axis, [])
        if rows:
            lines += [f"Per-axis power laws ({what}: loss ~ k {axis}^-s):", "",
                      "| group | points | s | s.e. |", "|---|---|---|---|"]
            lines += [f"| {r['group']} | {r['points']} | {r['exponent']:.3f} | {r['se']:.3f} |" for r in rows] + [""]
    subsets = sorted({p.axes.get("subset", "all") for p in points})
    if len(subsets) > 1 or any(math.isfinite(p.eval_r2) for p in points):
        lines += ["Held-out figures by point (eval R2: test R2 on the evaluation sessions after the same unit-id "
                  "adaptation):", "", "| point | subset | sessions | hours | N | D | held-out loss | eval R2 |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in points:
            lines.append(f"| {p.key} | {p.axes.get('subset', 'all')} | {p.figures.get('n_sessions', float('nan')):.0f} | "
                         f"{p.figures.get('hours', float('nan')):.2f} | {p.N:.3g} | {p.D:.3g} | {p.loss:.4f} | "
                         f"{p.eval_r2:.3f} |")
        if len(subsets) > 1:
            lines += ["", "| subset | mean eval R2 | mean held-out loss | points |", "|---|---|---|---|"]
            for s in subsets:
                ps = [p for p in points if p.axes.get("subset", "all") == s]
                lines.append(f"| {s} | {np.nanmean([p.eval_r2 for p in ps]):.3f} | "
                             f"{np.mean([p.loss for p in ps]):.4f} | {len(ps)} |")
        lines.append("")
    return "\n".join(lines)


def scaling_fit(sweep: str, tracking_uri: str | None, storage: str = "runs/sweeps", resamples: int = 1000,
                budget: float | None = None, out: str | None = None) -> tuple[FitReport, Path, str]:
    """Fit the sweep, write summary + plots to `out` (default: the sweep's directory, else
    runs/scaling-fit/<parent>) and log them to the parent run. Returns (report, summary path, parent)."""
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow import MlflowClient

    parent, known_uri = resolve_sweep(sweep, storage)
    uri = tracking_uri or known_uri
    if uri is None:
        uri = default_uri(TrackingConfig())
    points, _ = load_points(uri, parent)
    if len(points) < 2:
        raise ConfigError(f"sweep {sweep}: {len(points)} finished point(s) with a held-out loss; a fit needs several")
    c = MlflowClient(uri)
    name = c.get_run(parent).data.tags.get("sweep", sweep)
    rep = fit_sweep([p.N for p in points], [p.D for p in points], [p.loss for p in points],
                    [_group(p, ("model", "seed")) for p in points], [f"model={p.axes.get('model', '?')}" for p in points],
                    resamples=resamples)
    if out:
        where = Path(out)
    elif (Path(storage) / name / "state.json").exists():
        where = Path(storage) / name / "fit"
    else:
        where = Path("runs") / "scaling-fit" / parent / "fit"
    where.mkdir(parents=True, exist_ok=True)
    budget = budget or max(p.figures.get("compute", 0.0) for p in points) or None
    text = summary(name, points, rep, budget)
    md = where / "scaling_fit.md"
    md.write_text(text)
    files = plots(points, rep, where)
    payload = {"law": rep.law.values() if rep.law else None, "intervals": rep.intervals, "warnings": rep.warnings,
               "per_axis": rep.per_axis, "points": [p.__dict__ for p in points]}
    (where / "scaling_fit.json").write_text(json.dumps(payload, indent=1, default=float))
    # the fit joins the sweep's parent run (with the server gone since the points were read: kept in `where`)
    tracked = TrackedRun.attach(TrackingConfig(uri=uri), where, parent, "scaling-fit")
    for f in [md, where / "scaling_fit.json", *files]:
        tracked.artifact(f, "scaling_fit")
    if rep.law is not None:
        tracked.log({f"fit.{k}": float(v) for k, v in rep.law.values().items()}, 0)
    return rep, md, parent


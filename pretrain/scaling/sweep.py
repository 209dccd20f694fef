"""`popscale sweep`: a scaling sweep, every point a `popscale pretrain` run, on the Ray cluster.

How points run, and why: each point is one plain Ray task that is the driver of that point's
pretraining (`launch.pretrain`: the same plan, Ray Train workers, DeepSpeed loop and checkpoints
as `popscale pretrain`), then measures the point's two held-out figures in the same task. At
most `max_concurrent` tasks are in flight (`ray.wait`). Not Ray Tune: a sweep needs no search
algorithm and must not have an early-stopping scheduler (stopping the points that look worst
early biases the fit), Tune's own experiment state would duplicate the bookkeeping below, and a
task that drives a Ray Train run is the pattern Ray Train documents for running several.

Bookkeeping, so that re-running the same command skips finished points and resumes the others:
`<storage>/<name>/state.json` holds the sweep's fingerprint and its MLflow parent run; a point
is finished when `points/<key>.json` exists (written last, atomically); a point whose pretraining
started resumes from its last checkpoint (its run name is fixed: `<sweep>-<key>`); a point whose
pretraining finished but whose figures did not skips straight to them.

Each point is an MLflow child run (tag `mlflow.parentRunId`) tagged with its axes and figures
(N, FLOPs per sample, D, sessions, hours, subjects, seed) and two held-out metrics:
- `heldout_loss`: the loop's loss on the valid split of its own training sessions (heldout.py;
  what `popscale scaling-fit` fits);
- `eval_r2`: test R2 on the sessions no point trains on, after the same `unit-id` adaptation for
  every point (`eval` in the sweep file; what a lab cares about).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from data_service.errors import ConfigError
from data_service.reader import open_corpus
from data_service.remote import join, redact, resolve

from ..finetune.config import FinetuneConfig
from ..finetune.finetune import finetune
from ..run.heldout import heldout_loss
from ..run.launch import ensure_corpus, init_ray, pretrain
from ..run.plan import RunPlan
from ..run.progress import progress_bar
from ..tracking.config import TrackingConfig
from ..tracking.export import load_exported
from ..tracking.mlflow_runs import tracking_uri as resolve_uri
from ..tracking.tracked_run import TrackedRun
from .plan import Point, SweepConfig, expand, with_storage


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    points: int
    ran: int  # points run (or resumed) by this invocation
    skipped: int  # points already finished
    directory: Path
    seconds: float


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _parent_run(cfg: SweepConfig, sweep_dir: Path, tracking_uri: str, points: list[Point], held: list[str]) -> str:
    """The sweep's MLflow parent run: made once, found again by state.json. Its points are its
    child runs, so a sweep starts only with the server there (a point's own run may go offline)."""
    state_file = sweep_dir / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state["fingerprint"] != cfg.fingerprint():
            raise ConfigError(f"sweep {cfg.name!r} at {sweep_dir} was started with another configuration "
                              f"(fingerprint {state['fingerprint']}, now {cfg.fingerprint()}); give the changed "
                              "sweep a new name, or delete that directory to start it again")
        if state["tracking_uri"] != tracking_uri:
            raise ConfigError(f"sweep {cfg.name!r} logs to {state['tracking_uri']}, not {tracking_uri}")
        return state["parent_run_id"]
    flat = {"budget.kind": cfg.budget.kind, "budget.steps": cfg.budget.steps, "budget.flops": cfg.budget.flops,
            "base": cfg.base, "overrides": " ".join(cfg.overrides), "grid": json.dumps(cfg.grid),
            "max_concurrent": cfg.max_concurrent, "eval.labels": cfg.eval.labels, "eval.steps": cfg.eval.steps}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    run = TrackedRun.start(TrackingConfig(uri=tracking_uri, experiment=cfg.experiment), sweep_dir, cfg.name, flat,
                           "sweep", tags={"popscale.kind": "sweep", "sweep": cfg.name,
                                          "sweep_fingerprint": cfg.fingerprint(), "eval_sessions": ",".join(held),
                                          "points": str(len(points))})
    if run.run_id is None:
        raise ConfigError(f"sweep {cfg.name!r}: MLflow at {redact(tracking_uri)} is unreachable, and a sweep's "
                          "points are child runs of its parent run: start the sweep once the server is back")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_json(sweep_dir / "sweep.json", {"config": asdict(cfg), "eval_sessions": held})
    _write_json(state_file, {"fingerprint": cfg.fingerprint(), "parent_run_id": run.run_id,
                             "tracking_uri": tracking_uri, "name": cfg.name})
    return run.run_id


def run_point(point: Point, cfg: SweepConfig, held: list[str], sweep_dir: str, parent_run_id: str,
              tracking_uri: str) -> dict:
    """One point: pretrain (or resume), then its held-out loss and adaptation figure. Runs in a Ray
    task (or in the caller). A failure's whole traceback goes to the point's log."""
    try:
        return _run_point(point, cfg, held, sweep_dir, parent_run_id, tracking_uri)
    except BaseException:
        with (Path(sweep_dir) / "logs" / f"{point.key}.log").open("a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} FAILED\n{traceback.format_exc()}")
        raise


def _run_point(point: Point, cfg: SweepConfig, held: list[str], sweep_dir: str, parent_run_id: str,
               tracking_uri: str) -> dict:

    root = Path(sweep_dir)
    log = (root / "logs" / f"{point.key}.log").open("a")

    def note(msg: str) -> None:
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log.flush()

    run = with_storage(point.run, root)
    run.tracking.uri, run.tracking.experiment = tracking_uri, cfg.experiment
    staged = root / "points" / f"{point.key}.pretrained.json"
    t0 = time.time()
    if staged.exists():
        pre = json.loads(staged.read_text())
    else:
        res = pretrain(run, name=f"{cfg.name}-{point.key}", show_progress=False, notify=note, register_model=False,
                       tags={"mlflow.parentRunId": parent_run_id, "popscale.kind": "sweep-point",
                             "sweep": cfg.name, "point": point.key, **point.tags})
        pre = {"run_name": res.name, "child_run_id": res.mlflow_run_id, "export": res.model_uri,
               "valid_r2": res.valid_r2, "pretrain_seconds": res.seconds}
        _write_json(staged, pre)
    run_id, export = pre["child_run_id"], Path(pre["export"])
    model, _ = load_exported(export)
    plan = RunPlan.load(export)
    loss, windows = heldout_loss(model, plan)
    note(f"held-out loss {loss:.4f} over {windows} windows of the valid split")
    metrics = {"heldout_loss": loss, "heldout_windows": float(windows), "valid_r2_final": pre["valid_r2"]}
    if held:
        ft = finetune(FinetuneConfig(model=str(export), corpus=run.data.corpus, sessions=list(held), mode="unit-id",
                                     labels=cfg.eval.labels, steps=cfg.eval.steps, batch=cfg.eval.batch,
                                     seed=cfg.seed, tracking_uri=tracking_uri, experiment=cfg.experiment,
                                     out=str(root / "eval"), name=point.key,
                                     tags={"mlflow.parentRunId": run_id, "popscale.kind": "sweep-eval",
                                           "sweep": cfg.name, "point": point.key}),
                      notify=note, show_progress=False)
        metrics.update({"eval_r2": ft.test_r2, "eval_valid_r2": ft.valid_r2,
                        **{f"eval_r2.{s}": v["test"] for s, v in ft.per_session.items()}})
        note(f"unit-id on {', '.join(held)}: test R2 {ft.test_r2:.4f}")

    # the point's figures join its pretraining run (sent, or kept in its run directory)
    tracked = TrackedRun.attach(TrackingConfig(uri=tracking_uri, experiment=cfg.experiment),
                                join(resolve(run.cluster.storage_path), pre["run_name"]), run_id, "sweep", notify=note)
    tracked.log(metrics, int(point.figures["steps"]))
    tracked.finish()
    out = {"key": point.key, "axes": point.axes, "sessions": point.sessions, "figures": point.figures,
           "metrics": metrics, "child_run_id": run_id, "seconds": time.time() - t0 + pre.get("pretrain_seconds", 0)}
    _write_json(root / "points" / f"{point.key}.json", out)
    log.close()
    return out


def run_sweep(cfg: SweepConfig, tracking_uri: str | None = None, notify: Callable[[str], None] = print,
              show_progress: bool = True, only: list[str] | None = None) -> SweepResult:
    """Run every unfinished point of the sweep (or those in `only`), `max_concurrent` at a time."""
    # deferred: importing ray only when used keeps start-up light
    import ray

    t0 = time.time()
    base = cfg.base_run()
    base.data.corpus = resolve(base.data.corpus)
    ensure_corpus(base, notify)
    uri = tracking_uri or resolve_uri(TrackingConfig(uri=base.tracking.uri))
    cfg = replace(cfg, overrides=[*cfg.overrides, f"data.corpus={base.data.corpus}"])  # workers run elsewhere
    corpus = open_corpus(base.data.corpus)
    points, held = expand(cfg, corpus)
    unknown = sorted(set(only or []) - {p.key for p in points})
    if unknown:  # before the parent run or any directory is made
        raise ConfigError(f"--point {unknown[0]}: not a point of sweep {cfg.name!r} (its points: "
                          f"{', '.join(p.key for p in points)})")
    sweep_dir = (Path(cfg.storage) / cfg.name).resolve()
    parent = _parent_run(cfg, sweep_dir, uri, points, held)
    for sub in ("points", "logs", "runs", "eval"):
        (sweep_dir / sub).mkdir(parents=True, exist_ok=True)
    wanted = [p for p in points if only is None or p.key in only]
    todo = [p for p in wanted if not (sweep_dir / "points" / f"{p.key}.json").exists()]
    skipped = len(wanted) - len(todo)
    notify(f"sweep {cfg.name}: {len(points)} points ({skipped} finished, {len(todo)} to run, "
           f"{cfg.max_concurrent} at a time); parent MLflow run {parent} in {uri}; "
           f"evaluation sessions {', '.join(held) or 'none'}; logs in {sweep_dir / 'logs'}")
    if todo:
        init_ray(base)
        task = ray.remote(num_cpus=0, max_retries=0)(run_point)
        with progress_bar("sweep", len(todo), remaining=False, show=show_progress) as bar:
            pending, inflight, failures = list(todo), {}, []
            while pending or inflight:
                while pending and len(inflight) < cfg.max_concurrent:
                    p = pending.pop(0)
                    inflight[task.remote(p, cfg, held, str(sweep_dir), parent, uri)] = p
                    bar.update(info=f"running {', '.join(q.key for q in inflight.values())}")
                done, _ = ray.wait(list(inflight), num_returns=1)
                p = inflight.pop(done[0])
                try:
                    r = ray.get(done[0])
                    m = r["metrics"]
                    notify(f"  {p.key}: held-out loss {m['heldout_loss']:.4f}"
                           + (f", eval R2 {m['eval_r2']:.3f}" if "eval_r2" in m else "")
                           + f" ({r['seconds']:.0f} s)")
                except Exception as e:  # noqa: BLE001 - one failed point does not stop the others
                    failures.append((p.key, e))
                    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                    notify(f"  {p.key}: FAILED ({lines[-1][:300]}); see {sweep_dir / 'logs' / p.key}.log;"
                           " run the sweep again to resume it")
                bar.advance()
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(todo)} sweep points failed ({', '.join(k for k, _ in failures)});"
                               " the same command resumes them") from failures[0][1]
    return SweepResult(cfg.name, parent, uri, len(points), len(todo), skipped, sweep_dir, time.time() - t0)

"""`popscale pretrain`: the driver. Makes the corpus if needed (saying so), builds the run plan,
starts (or joins) Ray, opens the MLflow run, runs the Ray Train job with a live progress bar,
then exports the final weights (safetensors + config + vocabularies) and registers them in
MLflow under an alias.

A run is named `<config name>-<timestamp>`; its directory (`cluster.storage_path/<name>`) holds
Ray's checkpoints, the plan and the MLflow run id, so `resume=<that name>` continues it from
its last checkpoint with the same plan, in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_service.errors import CorpusError, find_corpus_error
from data_service.remote import exists, is_url, join, listdir, pyarrow_filesystem, read_text, resolve, storage_arg
from data_service.synth import synth_corpus

from ..model.flops import forward_flops, parameters
from ..tracking.export import model_card, provenance
from ..tracking.mlflow_runs import tracking_uri
from ..tracking.offline import RUN_FILE
from ..tracking.tracked_run import TrackedRun
from .config import RunConfig
from .export import export_checkpoint
from .hooks import FaultAndRecord, LoopHooks
from .plan import PlanMismatch, RunPlan, build_plan
from .progress import progress_bar
from .train import WorkerArgs, ray_worker


@dataclass
class PretrainResult:
    name: str
    valid_r2: float
    steps: int
    model_uri: str
    model_version: str
    mlflow_run_id: str
    tracking_uri: str
    seconds: float
    checkpoint: str
    registration: str = "none"  # registered | pending (the server was away: `popscale register` does it) | none
    tracking: str = "ok"  # ok | pending (kept in the run directory for `popscale tracking-sync`)


def ensure_corpus(run: RunConfig, notify: Callable[[str], None] = print) -> None:
    """Make the configured synthetic corpus if there is no corpus at `data.corpus` (saying so)."""
    if is_url(run.data.corpus):
        if not exists(join(run.data.corpus, "manifest.json")):
            raise CorpusError("no corpus at this URL (put one there with `popscale push LOCAL URL`)",
                              file=run.data.corpus)
        return
    root = Path(run.data.corpus)
    if (root / "manifest.json").exists():
        return
    if run.data.synth is None:
        raise CorpusError("no corpus here, and no `data.synth` config to make a synthetic one "
                          "(--set data.synth.sessions=N makes one)", file=str(root))
    s = run.data.synth
    notify(f"making a synthetic corpus at {root}: {s.sessions} sessions of {s.subjects} subjects, "
           f"~{s.minutes:g} min each (seed {s.seed})")
    synth_corpus(s, root, workers=os.cpu_count() or 1)


def unfinished_runs(storage: str, config_name: str) -> list[str]:
    """Runs of this config under `storage` that started and have no exported model yet (newest last)."""
    try:
        names = listdir(storage)
    except (OSError, ValueError):
        return []
    out = []
    for n in names:
        if (n.startswith(f"{config_name}-") and exists(join(storage, n, RUN_FILE))
                and not exists(join(storage, n, "export", "model.safetensors"))):
            out.append(n)
    return out[-3:]


# The GCS keeps the events of the last 100,000 tasks and 100,000 dead actors by default; the data
# service runs a task per batch and an actor per dataset, so a long run's GCS grew by ~13 MB/min
# (bench/soak.py). popscale reads neither (no dashboard), so it keeps a few thousand.
GCS_BOUNDS = {"task_events_max_num_task_in_gcs": 5000, "maximum_gcs_destroyed_actor_cached_count": 500}


@contextmanager
def single_host_mode():
    """Ray's single-machine mode (ray_constants.ENABLE_RAY_CLUSTER off, its macOS/Windows default)
    while a node starts or a driver joins: only then does a loopback `_node_ip_address` stay
    127.0.0.1 instead of becoming the host's address."""
    # deferred: importing ray only when used keeps start-up light
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def init_ray(run: RunConfig) -> None:
    # deferred: importing ray only when used keeps start-up light
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if not run.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    os.environ.update(env)
    if run.cluster.address:
        # A cluster on this machine's loopback (local_cluster.py, `ray start --node-ip-address 127.0.0.1`):
        # this driver joins it at 127.0.0.1 too, or Ray turns that (and the address) into the host's.
        local = run.cluster.address.split("://")[-1].startswith("127.0.0.1:")
        with single_host_mode() if local else nullcontext():
            ray.init(address=run.cluster.address, runtime_env={"env_vars": env}, log_to_driver=True,
                     **({"_node_ip_address": "127.0.0.1"} if local else {}))
        return
    # Logical CPUs above the physical count: training workers take one CPU each and Ray Data's
    # actors must still be schedulable, or Ray waits forever (the 2-core hang).
    cpus = run.cluster.local_cpus or max(4, 2 * (os.cpu_count() or 1))
    # Every socket of the embedded Ray binds loopback (runbooks/security.md): Ray's servers (GCS,
    # raylet, workers, agents) listen on 127.0.0.1 only when the node's IP is 127.0.0.1, which
    # single-host mode keeps. Ray's token authentication stays on (its default for a new local
    # cluster; RAY_AUTH_MODE is respected).
    with single_host_mode():
        # Worker logs stay in Ray's session directory unless asked for: the progress bar is the display.
        ray.init(num_cpus=cpus, include_dashboard=False, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": env}, object_store_memory=1 << 30, _system_config=GCS_BOUNDS,
                 log_to_driver=bool(os.environ.get("POPSCALE_RAY_LOGS")), configure_logging=True,
                 logging_level="WARNING")
    # the token Ray generated for it is written world-readable (umask 022): other users of the host
    # could reach the loopback ports with it
    token = Path.home() / ".ray" / "auth_token"
    try:
        if token.is_file() and token.stat().st_mode & 0o077:
            token.chmod(0o600)
    except OSError:
        pass


def pin_data_singletons() -> None:
    """Ray Data (2.60) creates one AutoscalingCoordinator per cluster, a detached actor that restarts
    forever, pinned to the node of the first process that runs a dataset: a training worker's. Were
    that node lost, the actor could never come back and every later dataset that asks it would
    wait for good. Made here first, it lives on the driver's node. (The other half of surviving a
    node loss is data.actor_cpus = 0: the coordinator's CPU split, pretrain/run/config.py.)"""
    try:
        # deferred: Ray Data's private module, loaded only when a run starts
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray: nothing to pin, or pinned elsewhere
        return
    get_or_create_autoscaling_coordinator()


def _progress_actor():
    """The driver's mailbox for rank 0's metrics and a data error, on the driver's own node: placed
    anywhere it could sit on a worker's node, and when that node is lost the run, though restarted
    and finished, would fail asking it whether data stopped it (bench/faults.py's node drill)."""
    # deferred: importing ray only when used keeps start-up light
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    @ray.remote(num_cpus=0, scheduling_strategy=here)
    class Progress:
        """Rank 0's latest metrics for the progress bar, and the data error that stopped the run."""

        def __init__(self) -> None:
            self.step, self.metrics, self.error = 0, {}, None

        def update(self, step: int, metrics: dict) -> None:
            self.step, self.metrics = step, dict(metrics)

        def get(self) -> tuple[int, dict]:
            return self.step, self.metrics

        def stop(self, error: Exception) -> None:
            self.error = error

        def stopped(self) -> Exception | None:
            return self.error

    return Progress.remote()


SLOW = 1.5  # a worker whose own time a step (data wait + forward) is this many times the median holds the others up
# no new step for this long (and for 3x the last gap between updates) and the line counts it: validation or a
# checkpoint, workers restarting after a loss, an elastic run waiting for Ray to reserve it slots (up to 180 s
# after a killed driver: runbooks/cluster.md), a stuck worker
STALL_S = 30.0


class StallClock:
    """How long the progress line has shown the same step, counted only past 3x the last gap between
    two updates (rank 0 reports every train.log_every steps: slow steps are not a stall)."""

    def __init__(self, now: float) -> None:
        self.step, self.since, self.gap = None, now, 0.0

    def idle(self, step: int | None, now: float) -> float:
        """Seconds without a new step as of `now` (0 while within the usual gap); `step` None: nothing
        reported yet (start-up, counted from the clock's start)."""
        if step is not None and step != self.step:
            self.gap = now - self.since if self.step is not None else 0.0
            self.step, self.since = step, now
        idle = now - self.since
        return idle if idle >= 3 * self.gap else 0.0


def progress_info(m: dict[str, float], idle_s: float = 0.0) -> str:
    """The live figures of the progress line, from rank 0's latest metrics; a worker that holds
    the others up is named (loop.Meter: its own time a step against the median worker's), and
    `idle_s` seconds without a new step are counted once they reach STALL_S."""
    stalled = idle_s >= STALL_S
    if "train_loss" not in m:
        return f"starting workers, {idle_s:.0f} s" if stalled else "starting workers"
    info = f"loss {m['train_loss']:.3f}"
    if "samples_per_s" in m:
        info += f"  {m['samples_per_s']:.1f} samples/s"
    if "valid_r2" in m:
        info += f"  valid R2 {m['valid_r2']:.3f}"
    top, mid = m.get("own_s_max", 0.0), m.get("own_s_median", 0.0)
    if top > SLOW * mid and top - mid > 0.01:
        waited = m.get("slowest_data_wait_s", 0.0)
        info += f"  slow: rank {int(m['slowest_rank'])} {top:.2f} s/step (median {mid:.2f}; {waited:.2f} of it waiting for data)"
    if stalled:
        info += f"  no new step for {idle_s:.0f} s"
    return info


def _fit_with_progress(trainer, progress, total: int, show: bool):
    # deferred: importing ray only when used keeps start-up light
    import ray
    out: dict = {}

    def fit() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver thread below
            out["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    clock = StallClock(time.monotonic())
    with progress_bar("pretraining", total, info="starting workers", show=show) as bar:
        while thread.is_alive():
            thread.join(timeout=2.0)
            try:
                step, m = ray.get(progress.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            bar.update(completed=step, info=progress_info(m, clock.idle(step if m else None, time.monotonic())))
    if "error" in out:
        raise out["error"]
    return out["result"]


def _run_directory(run: RunConfig, storage: str, name: str | None, resume: str | None,
                   notify: Callable[[str], None]) -> tuple[str, str, dict, RunPlan | None]:
    """The run's name and directory; for a run that continues, its RUN_FILE and plan."""
    if name and not resume and exists(join(storage, name, RUN_FILE)):
        resume = name  # a named run that started before: continue it
    if not resume and not name:
        for other in unfinished_runs(storage, run.name):
            notify(f"note: run {other} of this config did not finish; this starts a new run "
                   f"(`--resume {other}` continues that one)")
    name = resume or name or f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = join(storage, name)
    if not resume:
        return name, run_dir, {}, None
    if not exists(join(run_dir, RUN_FILE)):
        raise FileNotFoundError(f"no run {resume!r} under {storage} to resume")
    return name, run_dir, json.loads(read_text(join(run_dir, RUN_FILE))), RunPlan.load(run_dir)


def _tracked(run: RunConfig, plan: RunPlan, name: str, run_dir: str, meta: dict, tags: dict[str, str] | None,
             notify: Callable[[str], None]) -> TrackedRun:
    """A new run's MLflow run (with the server away: kept in run_dir, pretrain/tracking/offline.py),
    or the one an earlier attempt started, after sending what it kept."""
    if meta:
        return TrackedRun.resumed(run.tracking, run_dir, meta, "pretrain", notify=notify)
    tags = {"corpus": run.data.corpus, "corpus_fingerprint": plan.corpus_fingerprint, "ray_run": name,
            "n_sessions": str(len(plan.sessions)), "n_units": str(len(plan.unit_vocab)),
            "n_params": str(parameters(plan.model)),
            "train_gflops_per_sample_2k_spikes":
                f"{3 * forward_flops(plan.model, 2000, 100, plan.tokenizer.geometry.n_latents) / 1e9:.2f}",
            **(tags or {})}
    plan.save(run_dir)  # before RUN_FILE: a run directory with RUN_FILE is one that resumes
    return TrackedRun.start(run.tracking, run_dir, run.name, run.to_dict(), "pretrain", tags=tags,
                            resume=f"popscale pretrain --resume {name}", notify=notify)


def workers(run: RunConfig) -> int | tuple[int, int]:
    """Ray Train's worker count: fixed, or (min, max) for an elastic run (cluster.min_workers), which
    Ray restarts from its newest checkpoint with as many workers as the cluster then has room for."""
    c = run.cluster
    return (c.min_workers, c.num_workers) if c.min_workers else c.num_workers


def _worker_text(run: RunConfig) -> str:
    """The start line's worker count: an elastic run names the fewest it goes on with."""
    c = run.cluster
    return (f"{c.min_workers}-{c.num_workers} workers (elastic)" if c.min_workers
            else f"{c.num_workers} worker(s)")


def _trainer(run: RunConfig, args: WorkerArgs, name: str, storage: str):
    """Ray Train's trainer for the run: one worker per `cluster.num_workers`, checkpoints in storage."""
    # deferred: importing ray only when used keeps start-up light
    import ray.train
    from ray.train.torch import TorchTrainer

    # deferred: rendezvous imports Ray Train's torch backend
    from .rendezvous import HostLocalTorchConfig

    return TorchTrainer(
        ray_worker, train_loop_config={"args": args},
        torch_config=HostLocalTorchConfig(backend="nccl" if run.cluster.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers(run), use_gpu=run.cluster.use_gpu,
                                               resources_per_worker={"CPU": run.cluster.cpus_per_worker,
                                                                     **run.cluster.worker_resources}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_arg(storage),
                                       storage_filesystem=pyarrow_filesystem(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=run.train.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))


def _fit(trainer, progress, run: RunConfig, name: str, show_progress: bool):
    """Train; a failure names the data that stopped it, or says how to resume."""
    # deferred: importing ray only when used keeps start-up light
    import ray

    try:
        result = _fit_with_progress(trainer, progress, run.train.stop_at or run.train.steps, show_progress)
        # workers stopped by unreadable data return at once (loop.DataStop): no restart would help
        error = result.error or ray.get(progress.stopped.remote())
    except Exception as e:  # noqa: BLE001 - Ray Train raises worker errors from fit()
        error = e
    if error:
        bad_data = find_corpus_error(error)
        if bad_data is not None:  # say which file, session and field, not Ray's wrapping of it
            raise RuntimeError(f"pretraining run {name} stopped by its data: {bad_data} "
                               f"(after fixing it, --resume {name} continues the run)") from error
        raise RuntimeError(f"pretraining run {name} failed (resume it with --resume {name}): {error}") from error
    return result


def _export(result, run: RunConfig, plan: RunPlan, name: str, run_dir: str, run_id: str | None,
            alias: str | None) -> tuple[Path, dict]:
    """The final weights exported beside the checkpoints (with checkpoints on object storage, in
    runs/exports) with their model card, and what their registration says of them."""
    metrics = result.metrics or {}
    with result.checkpoint.as_directory() as d:
        prov = provenance({"mlflow_run_id": run_id, "ray_run": name,
                           "corpus_fingerprint": plan.corpus_fingerprint, "corpus": run.data.corpus})
        export_dir = Path("runs/exports").resolve() / name if is_url(run_dir) else Path(run_dir)
        export = export_checkpoint(d, export_dir / "export", prov)
    valid_r2 = float(metrics.get("valid_r2", float("nan")))
    model_card(export, title=f"{run.tracking.registered_model}: pretrained {plan.run.model}",
               data=f"Pretrained ({metrics.get('step', '?')} steps) on {len(plan.sessions)} sessions of "
                    f"{run.data.corpus}.", metrics={"valid_r2": valid_r2})
    return export, {"model_name": run.tracking.registered_model, "alias": alias,
                    "tags": {"kind": "pretrained", "git_commit": prov["git_commit"],
                             "corpus_fingerprint": plan.corpus_fingerprint, "valid_r2": f"{valid_r2:.4f}",
                             "ray_run": name}}


def pretrain(run: RunConfig, *, resume: str | None = None, show_progress: bool = True,
             hooks: LoopHooks | None = None, notify: Callable[[str], None] = print,
             alias: str | None = None, name: str | None = None, register_model: bool = True,
             tags: dict[str, str] | None = None) -> PretrainResult:
    """Plan the run, train it on Ray Train workers, export and register the final weights as a new
    version; `alias` (default: the config's `tracking.alias`, none) is moved to it only when given.
    `hooks` default to the test hooks of the environment (hooks.FaultAndRecord.from_env).
    `name` fixes the run's name (a sweep point's): a run of that name with a checkpoint is resumed.
    `register_model=False` exports without registering; `tags` go on the MLflow run (a sweep's
    child runs carry `mlflow.parentRunId` and their axes)."""
    t0 = time.time()
    # Workers run in their own directories: every path they see must be absolute.
    # (a corpus or storage_path may be a URL on shared storage: data_service/remote.py)
    run.data.corpus = resolve(run.data.corpus)
    run.tracking.uri = tracking_uri(run.tracking)
    storage = resolve(run.cluster.storage_path)
    name, run_dir, meta, previous = _run_directory(run, storage, name, resume, notify)
    ensure_corpus(run, notify)
    try:
        plan = build_plan(run, previous=previous, progress=show_progress)
    except PlanMismatch as e:
        raise PlanMismatch(f"cannot resume {name}: {e}") from None
    notify(f"run {name}: {'resuming, ' if meta else ''}{len(plan.sessions)} sessions, {len(plan.unit_vocab)} units, "
           f"{plan.run.model} on {_worker_text(run)}; checkpoints in {run_dir} "
           f"(if it stops, the same command with --resume {name} continues it)")
    init_ray(run)
    pin_data_singletons()
    tracked = _tracked(run, plan, name, run_dir, meta, tags, notify)
    progress = _progress_actor()
    hooks = hooks if hooks is not None else FaultAndRecord.from_env() or LoopHooks()
    args = WorkerArgs(plan, tracked.run_id, progress, hooks, run_dir, plan.index_intervals())
    result = _fit(_trainer(run, args, name, storage), progress, run, name, show_progress)
    metrics = result.metrics or {}
    stopped_early = run.train.stop_at is not None and run.train.stop_at < run.train.steps
    export, registration = (None, {}) if stopped_early else _export(result, run, plan, name, run_dir,
                                                                     tracked.run_id, alias or run.tracking.alias)
    # Register, and set the run FINISHED when it is complete (a stopped one stays RUNNING until
    # resumed). With the server away registration is tried for about a minute, then it and the
    # run's end are left to the one command printed (offline.finish); the export stays.
    fin = tracked.finish(terminate=not stopped_early, export=export if register_model else None, **registration)
    model_uri = fin.model_uri or (str(export) if export is not None else "")
    return PretrainResult(name=name, valid_r2=float(metrics.get("valid_r2", float("nan"))),
                          steps=int(metrics.get("step", 0)), model_uri=model_uri, model_version=fin.version,
                          mlflow_run_id=fin.run_id or "", tracking_uri=tracked.uri, seconds=time.time() - t0,
                          checkpoint=result.checkpoint.path, registration=fin.registration, tracking=fin.tracking)

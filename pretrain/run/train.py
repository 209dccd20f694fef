"""Running the loop: on Ray Train workers (`ray_worker`, what `popscale pretrain` launches) or in
this process (`train_in_process`: one worker, no Ray; tests, and small jobs such as adapting to
one session). Both build the same parts from the plan and run the same `loop.run_loop`.

Each worker builds the plan's model (same vocabularies, same seed, warm start applied), wraps it
in DeepSpeed and consumes its share of every global batch from the data service; every
`checkpoint_every` steps the DeepSpeed state, the data position and the plan are saved.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from data_service.actors import ActorBatches
from data_service.service import LocalBatches, RayBatches, ServiceSpec

from ..decoding.evaluate import Evaluator
from ..tracking.mlflow_runs import MLflowSink
from .checkpoint import DirCheckpointer, RayCheckpointer
from .config import DataConfig
from .engine import build_engine, placement
from .hooks import LoopHooks
from .loop import DataStop, Dist, TrainStep, run_loop
from .plan import RunPlan
from .sinks import MemorySink, MetricsSink, NullSink, ProgressSink, Sinks


@dataclass
class WorkerArgs:
    """What the driver hands every Ray Train worker."""

    plan: RunPlan
    mlflow_run_id: str | None = None  # rank 0 logs into this run
    progress: Any = None  # the driver's progress actor (rank 0 updates it)
    hooks: LoopHooks = field(default_factory=LoopHooks)
    run_dir: str | None = None  # the Ray run directory (checkpoints land there; see checkpoint.py)
    # the training index's intervals, read once by the driver (RunPlan.index_intervals): no worker and
    # no data actor opens every session of the corpus to make its index (None: each reads them itself)
    split_intervals: dict | None = None


class Parts(NamedTuple):
    """What both runners build from the plan; they differ only in data source, checkpointer and sink."""

    dist: Dist
    engine: Any
    step: TrainStep
    spec: ServiceSpec
    evaluator: Evaluator


def _parts(plan: RunPlan, rank: int, world: int, local_rank: int = 0, split_intervals: dict | None = None) -> Parts:
    where = placement(plan, rank, world, local_rank)
    dist = Dist(rank, world, where.device)
    engine, scheduler = build_engine(plan, where)
    spec = plan.service_spec()
    if split_intervals is not None:
        spec = replace(spec, split_intervals=split_intervals)
    kinds = [r.kind for r in plan.tokenizer.readouts]
    return Parts(dist, engine, TrainStep(engine, scheduler, dist, plan.run.train.seed, kinds, where.autocast), spec,
                 Evaluator(spec.tokenizer, plan.corpus, plan.valid_sessions, dist, causal=plan.causal))


def data_loader(d: DataConfig, spec: ServiceSpec, rank: int, world: int) -> LocalBatches | RayBatches | ActorBatches:
    """The batches of one worker as `data.loader` says (each serves the same sequence)."""
    if d.loader == "local":
        return LocalBatches(spec, rank, world)
    kw = dict(actors=d.data_actors, cpus_per_actor=d.actor_cpus, prefetch=d.prefetch, block_batches=d.block_batches,
              buffer_mb=d.buffer_mb, resources=d.actor_resources or None)
    return (RayBatches if d.loader == "ray-data" else ActorBatches)(spec, rank, world, **kw)


def ray_worker(config: dict) -> None:
    """TorchTrainer's per-worker function; `config = {"args": WorkerArgs}`."""
    # deferred: importing ray only when used keeps start-up light
    import ray.train

    args: WorkerArgs = config["args"]
    plan, ctx = args.plan, ray.train.get_context()
    p = _parts(plan, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), args.split_intervals)
    dist = p.dist
    sink: MetricsSink = NullSink()
    if dist.rank == 0:
        # with the server away its metrics are kept (and journaled in the run directory) until it is back;
        # with no run id (the server was away at the start) they go to the journal only: pretrain/tracking/offline.py
        run_dir = args.run_dir
        sink = Sinks(MLflowSink(plan.run.tracking, args.mlflow_run_id, buffer=True, run_dir=run_dir)
                     if args.mlflow_run_id or run_dir else None,
                     ProgressSink(args.progress) if args.progress is not None else None)
    batches = data_loader(plan.run.data, p.spec, dist.rank, dist.world)
    try:
        run_loop(plan, p.step, batches, p.evaluator, RayCheckpointer(p.engine, plan, dist.rank, dist.world, args.run_dir),
                 sink, dist, args.hooks)
    except DataStop as e:
        if args.progress is None:
            raise  # no driver to tell: Ray Train's failure policy decides
        # Every worker returns: the run ends without a restart, and the driver raises the error (launch._fit).
        if dist.rank == 0:
            ray.get(args.progress.stop.remote(e))
        return


@dataclass
class InProcessResult:
    metrics: dict[str, float]
    checkpoint: Path  # the last checkpoint directory
    model: Any  # the trained torch module (in this process)
    evaluator: Any = None  # what validated it (the wrapped one when `wrap_evaluator` was given)


@contextmanager
def _single_process_group():
    """A one-rank gloo group in this process (DeepSpeed needs torch.distributed). It is made once
    and kept for the life of the process: DeepSpeed caches the groups it derives from it."""
    env = {"DS_ACCELERATOR": "cuda" if torch.cuda.is_available() else "cpu",
           "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}  # what DeepSpeed looks for
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: os.environ.get(k) or v for k, v in env.items()})
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("train_in_process runs one worker; this process is already in a larger process group")
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train_in_process(plan: RunPlan, checkpoint_dir: str | Path, sink: MetricsSink | None = None,
                     hooks: LoopHooks | None = None, wrap_evaluator: Callable | None = None) -> InProcessResult:
    """The loop in this process with the in-process data service: one worker, no Ray. Resumes
    from the newest checkpoint in `checkpoint_dir` if there is one. `wrap_evaluator(evaluator)`
    may stand in front of the validation (adaptation's model selection does)."""
    with _single_process_group():
        p = _parts(plan, 0, 1)
        ckpt = DirCheckpointer(checkpoint_dir, p.engine, plan)
        evaluator = wrap_evaluator(p.evaluator) if wrap_evaluator else p.evaluator
        metrics = run_loop(plan, p.step, LocalBatches(p.spec, 0, 1), evaluator, ckpt, sink or MemorySink(), p.dist,
                           hooks)
        return InProcessResult(metrics, ckpt.checkpoints()[-1], p.engine.module, evaluator)

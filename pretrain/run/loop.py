"""The training loop, and the parts it is made of. Pretraining, adaptation and sweep points run
this one loop with another plan and other parts:

- `TrainStep`: one optimisation step (forward, backward, optimizer step) over a step's micro-batches;
- an evaluator (`evaluate.Evaluator`): validation, logged to the sink;
- a checkpointer (`checkpoint.RayCheckpointer` / `DirCheckpointer`): save and restore;
- a metrics sink (`sinks.py`): MLflow, the progress bar, memory;
- hooks (`hooks.py`): test instrumentation, nothing by default.

The loop knows nothing of Ray, MLflow or where batches come from (any object with
`iterate(start, stop)` yielding `ServedBatch`es: the Ray Data service or the in-process one).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data_service.errors import CorpusError, find_corpus_error

from ..model.batch import PackedBatch
from ..model.loss import weighted_mse
from ..model.numerics import flushed
from .hooks import LoopHooks
from .plan import RunPlan
from .sinks import MetricsSink


@dataclass
class Dist:
    """This worker's place among `world` and the two collectives the loop needs."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def all_sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if self.world == 1:
            return [obj]

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


class DataStop(CorpusError):
    """Unreadable data on some worker stopped the run. Every worker raises it at the same step, so
    none is left waiting in a collective, and the runner ends the run rather than restarting its
    workers: a restart would read the same bytes again (issue 28, runbooks/failures.md)."""

    @classmethod
    def of(cls, cause: CorpusError) -> "DataStop":
        return cls(cause.message, file=cause.file, session=cause.session, field=cause.field)


def take(stream, n: int, dist: Dist) -> list:
    """The step's `n` served batches; `DataStop` on every rank when any rank's data was unreadable
    (one scalar collective a step, only with more than one worker). Other errors pass as they are:
    a crash is what Ray Train's restarts are for."""
    served, err = [], None
    try:
        served = [next(stream) for _ in range(n)]
    except Exception as e:  # noqa: BLE001 - only a located data error is handled here
        err = find_corpus_error(e)
        if err is None:
            raise
    if dist.world > 1:
        (bad,) = dist.all_sum(float(err is not None))
        if bad:
            first = next(x for x in dist.gather(err) if x is not None)
            raise DataStop.of(first) from err
    elif err is not None:
        raise DataStop.of(err) from err
    return served


@dataclass
class StepStats:
    loss_x_weight: float  # this worker's loss summed with its loss weights
    weight: float
    spike_tokens: int
    forward_s: float = 0.0  # this worker's forward passes: its own compute, no collective in it


class TrainStep:
    """One optimisation step of a DeepSpeed engine over a step's micro-batches.

    The loss of each micro-batch is normalised by the loss weight of the whole global micro-batch
    (summed over workers), so the gradient does not depend on the number of workers; DeepSpeed
    averages gradients over workers and steps the optimizer at the accumulation boundary.
    Dropout masks are a function of (seed, step, rank), so a resumed run draws what an
    uninterrupted one would have (DeepSpeed checkpoints do not hold RNG state). With `autocast` (a
    dtype: train.precision=bf16-mixed) the forward and loss run under torch.autocast; the weights,
    gradients and optimizer state stay fp32."""

    def __init__(self, engine, scheduler, dist: Dist, seed: int, kinds: list[str] | None = None,
                 autocast: torch.dtype | None = None) -> None:
        self.engine, self.scheduler, self.dist, self.seed = engine, scheduler, dist, seed
        self.kinds = kinds  # per readout (tokenizer.Readout.kind); None: all continuous
        self.autocast = autocast

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def __call__(self, step: int, batches: list[PackedBatch]) -> StepStats:
        d = self.dist
        torch.manual_seed(self.seed * 1_000_003 + step * 1_009 + d.rank)
        self.engine.train()
        with flushed(d.device.type == "cpu"):  # forward, backward and optimizer step (model/numerics.py)
            return self._step(batches)

    def _step(self, batches: list[PackedBatch]) -> StepStats:
        d = self.dist
        stats = StepStats(0.0, 0.0, 0)
        for b in batches:
            b = b.to(d.device)
            (wsum,) = d.all_sum(float(b.weight.sum()))
            t = time.perf_counter()
            with torch.autocast(d.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
                loss, _ = weighted_mse(self.engine(b), b, self.model.readout_names, self.kinds)
            stats.forward_s += time.perf_counter() - t
            local_w = float(b.weight.sum())
            self.engine.backward(loss * (local_w / max(wsum, 1e-12)) * d.world)
            self.engine.step()
            stats.loss_x_weight += float(loss.detach()) * local_w
            stats.weight += local_w
            stats.spike_tokens += int((b.token_type == 0).sum())
        return stats


class Meter:
    """Train loss and throughput since the last read, over all workers; time spent evaluating or
    checkpointing (`paused`) is not training time.

    And which worker holds the others up. In synchronous data parallelism every worker's step
    lasts as long as the slowest one's (the others wait in the gradient all-reduce), so step time
    cannot tell; what each worker spends on its own is its wait for data plus its forward passes
    (no collective in either). In seconds a step: `own_s_max` (of `slowest_rank`, with its
    `slowest_data_wait_s`: data or compute) against `own_s_median`; `data_wait_s`, the mean."""

    def __init__(self, dist: Dist, samples_per_step: int) -> None:
        self.dist, self.samples_per_step = dist, samples_per_step
        self._reset()

    def _reset(self) -> None:
        self.loss = self.weight = self.tokens = self.wait = self.forward = 0.0
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, s: StepStats, wait_s: float = 0.0) -> None:
        self.loss += s.loss_x_weight
        self.weight += s.weight
        self.tokens += s.spike_tokens
        self.wait += wait_s
        self.forward += s.forward_s
        self.steps += 1

    def read(self, lr: float) -> dict[str, float]:
        d, n = self.dist, max(self.steps, 1)
        slots = [0.0] * (2 * d.world)  # one own-time and one data-wait slot a worker: the sum hands each all
        slots[d.rank], slots[d.world + d.rank] = (self.wait + self.forward) / n, self.wait / n
        loss, weight, tokens, *slots = d.all_sum(self.loss, self.weight, self.tokens, *slots)
        own, wait = slots[:d.world], slots[d.world:]
        dt = time.perf_counter() - self.t0
        slowest = max(range(d.world), key=own.__getitem__)
        out = {"train_loss": loss / max(weight, 1e-12), "lr": lr,
               "samples_per_s": self.steps * self.samples_per_step / dt, "spike_tokens_per_s": tokens / dt,
               "data_wait_s": float(np.mean(wait)), "own_s_max": own[slowest], "own_s_median": float(np.median(own)),
               "slowest_rank": float(slowest), "slowest_data_wait_s": wait[slowest],
               "workers": float(d.world)}  # an elastic run's resizes show
        self._reset()
        return out

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t


def due(done: int, every: int, last: int) -> bool:
    return done % every == 0 or done == last


def run_loop(plan: RunPlan, step: TrainStep, batches, evaluator, checkpointer, sink: MetricsSink, dist: Dist,
             hooks: LoopHooks | None = None) -> dict[str, float]:
    """Train from the checkpointer's last step to the plan's `train.stop_at or train.steps`;
    returns the latest metrics (those reported with the last checkpoint)."""
    train, hooks = plan.run.train, hooks or LoopHooks()
    accum, stop = train.grad_accum, train.stop_at or train.steps
    start = checkpointer.restore()
    stream = batches.iterate(start * accum, stop * accum)
    meter, latest = Meter(dist, accum * plan.run.data.global_batch), {}
    skipped = 0
    for s in range(start, stop):
        hooks.before_step(dist.rank, s, checkpointer.last_step)
        t = time.perf_counter()
        served = take(stream, accum, dist)
        wait_s = time.perf_counter() - t
        hooks.on_batches(dist.rank, s, served)
        for b in served:  # data.skip_bad_windows: the windows the service dropped, one line each
            for w in b.skipped:
                print(f"popscale: step {s} rank {dist.rank}: skipped unreadable window {w}", file=sys.stderr, flush=True)
                skipped += 1
        meter.add(step(s, [b.data for b in served]), wait_s)
        done = s + 1
        if due(done, train.log_every, stop):
            latest.update(m := meter.read(step.lr))
            if skipped:
                m["windows_skipped"] = latest["windows_skipped"] = float(skipped)
            sink.log(m, done)
        with meter.paused():
            if due(done, train.eval_every, stop):
                latest.update(evaluator(step.model, done, sink))
            if due(done, train.checkpoint_every, stop):
                checkpointer.save(done, latest)
    return latest

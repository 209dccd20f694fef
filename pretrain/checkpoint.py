"""Checkpoints: the DeepSpeed state (weights, optimizer, scheduler) + the data position + the
plan, saved together so that a run resumes exactly and a checkpoint exports with nothing else.

    <checkpoint>/popscale_state.json   step, DeepSpeed tag, batches/samples consumed, index fingerprint
    <checkpoint>/plan.json             the run plan (plan.py)
    <checkpoint>/step0000300/...       DeepSpeed's files (one shard per rank)

Two checkpointers share that format: `RayCheckpointer` hands each checkpoint to Ray Train
(`ray.train.report`; Ray's FailureConfig restarts a failed worker group from the last one), and
`DirCheckpointer` keeps them in a local directory (in-process runs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .plan import RunPlan

STATE_FILE = "popscale_state.json"


class DataChanged(RuntimeError):
    pass


def save_state(directory: str | Path, engine, plan: RunPlan, step: int, rank: int) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 writes the state and the plan."""
    tag = f"step{step:07d}"
    engine.save_checkpoint(str(directory), tag=tag)
    if rank == 0:
        accum, batch = plan.run.train.grad_accum, plan.run.data.global_batch
        (Path(directory) / STATE_FILE).write_text(json.dumps({
            "step": step, "tag": tag, "batches_consumed": step * accum, "samples_consumed": step * accum * batch,
            "index_fingerprint": plan.index_fingerprint}))
        plan.save(directory)


def read_state(directory: str | Path) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def restore_state(directory: str | Path, engine, plan: RunPlan) -> int:
    """Load a checkpoint into the engine; returns its step. A checkpoint taken on other data is refused."""
    state = read_state(directory)
    if state["index_fingerprint"] != plan.index_fingerprint:
        raise DataChanged(f"checkpoint {directory} was taken on data with index fingerprint "
                          f"{state['index_fingerprint']}, this run's is {plan.index_fingerprint}: corpus or data "
                          "config changed, refusing to resume")
    engine.load_checkpoint(str(directory), tag=state["tag"])
    return int(state["step"])


class RayCheckpointer:
    def __init__(self, engine, plan: RunPlan, rank: int, world: int) -> None:
        self.engine, self.plan, self.rank, self.world = engine, plan, rank, world
        self.last_step = 0

    def restore(self) -> int:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.last_step = restore_state(d, self.engine, self.plan)
        return self.last_step

    def save(self, step: int, metrics: dict) -> None:
        import ray.train
        import torch.distributed as dist

        with tempfile.TemporaryDirectory() as tmp:
            save_state(tmp, self.engine, self.plan, step, self.rank)
            if self.world > 1:
                dist.barrier()
            ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.last_step = step


class DirCheckpointer:
    """Checkpoints as `<root>/step<N>/` (one process), each moved in only when complete; the
    newest `keep` are kept."""

    def __init__(self, root: str | Path, engine, plan: RunPlan, keep: int = 2) -> None:
        self.root, self.engine, self.plan, self.keep = Path(root), engine, plan, keep
        self.root.mkdir(parents=True, exist_ok=True)
        self.last_step = 0

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step*") if (p / STATE_FILE).exists())

    def restore(self) -> int:
        done = self.checkpoints()
        if done:
            self.last_step = restore_state(done[-1], self.engine, self.plan)
        return self.last_step

    def save(self, step: int, metrics: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        save_state(tmp, self.engine, self.plan, step, 0)
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "step": step}))
        final = self.root / f"step{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old)
        self.last_step = step

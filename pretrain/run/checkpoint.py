"""Checkpoints: the DeepSpeed state (weights, optimizer, scheduler) + the data position + the
plan, saved together so that a run resumes exactly and a checkpoint exports with nothing else.

    <checkpoint>/popscale_state.json   step, DeepSpeed tag, batches/samples consumed, index fingerprint, world
    <checkpoint>/plan.json             the run plan (plan.py)
    <checkpoint>/step0000300/...       DeepSpeed's files (one shard per rank)

Two checkpointers share that format: `RayCheckpointer` hands each checkpoint to Ray Train
(`ray.train.report`; Ray's FailureConfig restarts a failed worker group from the last one), and
`DirCheckpointer` keeps them in a local directory (in-process runs).

Ray Train learns of a reported checkpoint only when its controller next polls the workers (every
~2 s), so a crash just after a report would restart from the checkpoint before. `report` itself
has already uploaded the files (synchronously, into `<run>/step<N>`), so each rank marks its part
complete once its upload returns (`<run>/step<N>/.complete-rank<r>`), and a restart resumes from
the newest checkpoint that every rank completed, whether or not Ray registered it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from data_service.remote import join, listdir, pyarrow_filesystem, read_text, storage_arg, write_text

from .plan import RunPlan

STATE_FILE = "popscale_state.json"
_STEP_DIR = re.compile(r"step(\d{7})$")


def step_dir_name(step: int) -> str:
    return f"step{step:07d}"


class DataChanged(RuntimeError):
    pass


def save_state(directory: str | Path, engine, plan: RunPlan, step: int, rank: int, world: int = 1) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 writes the state (with the number of workers that
    saved it: an elastic run may resume with another) and the plan."""
    tag = f"step{step:07d}"
    engine.save_checkpoint(str(directory), tag=tag)
    if rank == 0:
        accum, batch = plan.run.train.grad_accum, plan.run.data.global_batch
        (Path(directory) / STATE_FILE).write_text(json.dumps({
            "step": step, "tag": tag, "batches_consumed": step * accum, "samples_consumed": step * accum * batch,
            "index_fingerprint": plan.index_fingerprint, "world": world}))
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


def completed_checkpoints(run_dir: str, world: int) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint under a Ray run directory that all the ranks that saved it
    finished uploading, oldest first (local paths or URLs: data_service/remote.py). The state names
    how many ranks saved it; a state from before it did, `world` (this run's number)."""
    out = []
    for n in listdir(run_dir):
        m = _STEP_DIR.match(n)
        if not m:
            continue
        d = join(run_dir, n)
        files = set(listdir(d))
        if STATE_FILE not in files:
            continue
        saved_by = int(json.loads(read_text(join(d, STATE_FILE))).get("world", world))
        if all(f".complete-rank{r}" in files for r in range(saved_by)):
            out.append((int(m.group(1)), d))
    return sorted(out)


class RayCheckpointer:
    """`run_dir`: the Ray run directory (local or a URL), where reported checkpoints land."""

    def __init__(self, engine, plan: RunPlan, rank: int, world: int, run_dir: str | None = None) -> None:
        self.engine, self.plan, self.rank, self.world, self.run_dir = engine, plan, rank, world, run_dir
        self.last_step = 0

    def _newest(self):
        """The checkpoint to resume from: Ray's latest registered one, or a newer one every rank
        completed that Ray had not registered yet (a crash within its polling interval). Rank 0
        decides, so every rank loads the same one."""
        # deferred: importing ray only when used keeps start-up light
        import ray.train

        ckpt = ray.train.get_checkpoint()
        choice = None
        if self.rank == 0 and self.run_dir:
            done = completed_checkpoints(self.run_dir, self.world)
            if done:
                registered = -1
                if ckpt is not None:
                    m = _STEP_DIR.search(ckpt.path.rstrip("/"))
                    registered = int(m.group(1)) if m else -1
                if done[-1][0] > registered:
                    choice = done[-1][1]
                    print(f"popscale: resuming from {choice} (step {done[-1][0]}): reported before the failure, "
                          f"not yet registered by Ray (its latest: step {max(registered, 0)})", flush=True)
        if self.world > 1:
            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        if choice is None:
            return ckpt

        return ray.train.Checkpoint(path=storage_arg(choice), filesystem=pyarrow_filesystem(choice))

    def restore(self) -> int:
        ckpt = self._newest()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.last_step = restore_state(d, self.engine, self.plan)
        return self.last_step

    def save(self, step: int, metrics: dict) -> None:
        # deferred: importing ray only when used keeps start-up light
        import ray.train

        name = step_dir_name(step)
        with tempfile.TemporaryDirectory() as tmp:
            save_state(tmp, self.engine, self.plan, step, self.rank, self.world)
            if self.world > 1:
                dist.barrier()
            ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)  # returns once this rank's files are uploaded
        if self.run_dir:
            write_text(join(self.run_dir, name, f".complete-rank{self.rank}"), str(step))
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

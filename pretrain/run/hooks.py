"""Instrumentation the loop calls at two points, for tests and fault drills: before each step,
and with each step's batches. `LoopHooks` does nothing; `FaultAndRecord` kills workers at
chosen steps and records the stream position of every window consumed. Hooks travel to Ray
workers with the plan, so they must be picklable."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class LoopHooks:
    def before_step(self, rank: int, step: int, last_checkpoint: int) -> None:
        pass

    def on_batches(self, rank: int, step: int, served: list) -> None:
        """`served`: the step's `data_service.service.ServedBatch`es, one per micro-batch."""


@dataclass
class FaultAndRecord(LoopHooks):
    # "<rank>:<step>:<marker file>[,<rank>:<step>:<marker>...]": SIGKILL that worker before that step,
    # once per marker (several faults in one run need FailureConfig.max_failures at least as many)
    fault: str | None = None
    record_windows: str | None = None  # a directory: rank<r>.jsonl gets {pid, step, positions} per step
    # "<rank>:<step>:<marker>[,...]": before that step the worker writes its Ray node id into the marker
    # and holds there until whoever watches the marker kills it: its node (local_cluster.LocalCluster.kill)
    # or the driver; once per marker
    hold: str | None = None
    hold_s: float = 300.0  # a held worker still alive after this long fails its step (nobody killed it)

    def faults(self) -> list[tuple[int, int, str]]:
        return _specs(self.fault)

    def holds(self) -> list[tuple[int, int, str]]:
        return _specs(self.hold)

    def before_step(self, rank: int, step: int, last_checkpoint: int) -> None:
        if self.record_windows:  # steps-rank<r>.jsonl: every step a worker process began (restarts show as new pids)
            with open(Path(self.record_windows) / f"steps-rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": step, "node": _node_id()}) + "\n")
        for r, s, marker in self.faults():
            if r == rank and s == step and not os.path.exists(marker):
                # no waiting for Ray to register the last checkpoint: a restart resumes from it anyway
                # (checkpoint.RayCheckpointer), which is what a kill right after a report checks
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        for r, s, marker in self.holds():
            if r == rank and s == step and not os.path.exists(marker):
                Path(marker + ".tmp").write_text(_node_id() or "")
                os.replace(marker + ".tmp", marker)  # whole, for the watcher
                deadline = time.monotonic() + self.hold_s
                while time.monotonic() < deadline:  # its node or its driver dies under this worker
                    time.sleep(0.1)
                raise RuntimeError(f"fault drill: nobody killed rank {rank} within {self.hold_s:.0f} s of its hold")

    def on_batches(self, rank: int, step: int, served: list) -> None:
        if self.record_windows:
            positions = [int(p) for b in served for p in b.positions]
            with open(Path(self.record_windows) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": step, "positions": positions}) + "\n")

    @classmethod
    def from_env(cls) -> "FaultAndRecord | None":
        """POPSCALE_TRAIN_FAULT="<rank>:<step>:<marker>[,...]", POPSCALE_TRAIN_HOLD (the same form),
        POPSCALE_RECORD_WINDOWS=<dir> (runbooks/pretrain.md)."""
        env = os.environ.get
        fault, hold, record = env("POPSCALE_TRAIN_FAULT"), env("POPSCALE_TRAIN_HOLD"), env("POPSCALE_RECORD_WINDOWS")
        return cls(fault=fault, record_windows=record, hold=hold) if fault or record or hold else None


def _specs(text: str | None) -> list[tuple[int, int, str]]:
    """(rank, step, marker) triples of "<rank>:<step>:<marker>[,...]"."""
    out = []
    for spec in filter(None, (text or "").split(",")):
        r, s, marker = spec.split(":", 2)
        out.append((int(r), int(s), marker))
    return out


def _node_id() -> str | None:
    """This process's Ray node, when it is a Ray worker (a process that never imported Ray is not)."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None

"""Instrumentation the loop calls at two points, for tests and fault drills: before each step,
and with each step's batches. `LoopHooks` does nothing; `FaultAndRecord` kills workers at
chosen steps and records the stream position of every window consumed. Hooks travel to Ray
workers with the plan, so they must be picklable."""

from __future__ import annotations

import json
import os
import signal
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

    def faults(self) -> list[tuple[int, int, str]]:
        out = []
        for spec in filter(None, (self.fault or "").split(",")):
            r, s, marker = spec.split(":", 2)
            out.append((int(r), int(s), marker))
        return out

    def before_step(self, rank: int, step: int, last_checkpoint: int) -> None:
        if self.record_windows:  # steps-rank<r>.jsonl: every step a worker process began (restarts show as new pids)
            with open(Path(self.record_windows) / f"steps-rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": step}) + "\n")
        for r, s, marker in self.faults():
            if r == rank and s == step and not os.path.exists(marker):
                # no waiting for Ray to register the last checkpoint: a restart resumes from it anyway
                # (checkpoint.RayCheckpointer), which is what a kill right after a report checks
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    def on_batches(self, rank: int, step: int, served: list) -> None:
        if self.record_windows:
            positions = [int(p) for b in served for p in b.positions]
            with open(Path(self.record_windows) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": step, "positions": positions}) + "\n")

    @classmethod
    def from_env(cls) -> "FaultAndRecord | None":
        """POPSCALE_TRAIN_FAULT="<rank>:<step>:<marker>[,...]", POPSCALE_RECORD_WINDOWS=<dir> (runbooks/pretrain.md)."""
        fault, record = os.environ.get("POPSCALE_TRAIN_FAULT"), os.environ.get("POPSCALE_RECORD_WINDOWS")
        return cls(fault=fault, record_windows=record) if fault or record else None

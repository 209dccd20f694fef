"""Instrumentation the loop calls at two points, for tests and fault drills: before each step,
and with each step's batches. `LoopHooks` does nothing; `FaultAndRecord` kills a worker once at
a chosen step and records the stream position of every window consumed. Hooks travel to Ray
workers with the plan, so they must be picklable."""

from __future__ import annotations

import json
import os
import signal
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
    fault: str | None = None  # "<rank>:<step>:<marker file>": SIGKILL that worker once, before that step
    record_windows: str | None = None  # a directory: rank<r>.jsonl gets {pid, step, positions} per step
    run_dir: str | None = None  # the Ray run directory, to wait for the last checkpoint's registration

    def before_step(self, rank: int, step: int, last_checkpoint: int) -> None:
        if not self.fault:
            return
        r, s, marker = self.fault.split(":", 2)
        if int(r) == rank and int(s) == step and not os.path.exists(marker):
            await_registered_checkpoint(self.run_dir, last_checkpoint)
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def on_batches(self, rank: int, step: int, served: list) -> None:
        if self.record_windows:
            positions = [int(p) for b in served for p in b.positions]
            with open(Path(self.record_windows) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": step, "positions": positions}) + "\n")

    @classmethod
    def from_env(cls) -> "FaultAndRecord | None":
        """POPSCALE_TRAIN_FAULT="<rank>:<step>:<marker>", POPSCALE_RECORD_WINDOWS=<dir> (runbooks/pretrain.md)."""
        fault, record = os.environ.get("POPSCALE_TRAIN_FAULT"), os.environ.get("POPSCALE_RECORD_WINDOWS")
        return cls(fault=fault, record_windows=record) if fault or record else None


def await_registered_checkpoint(run_dir: str | None, step: int, timeout_s: float = 120.0) -> None:
    """Ray Train learns of a reported checkpoint when its controller next polls the workers
    (every 2 s); a crash before that loses it. The fault hook waits until the controller has
    recorded the last checkpoint, so a test knows which step the restart must resume from."""
    if not run_dir or step == 0:
        return
    from data_service.remote import join, read_text

    snapshot = join(run_dir, "checkpoint_manager_snapshot.json")  # local or on shared storage
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            latest = json.loads(read_text(snapshot)).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("step") == step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"Ray Train did not register the step-{step} checkpoint in {timeout_s:.0f} s")

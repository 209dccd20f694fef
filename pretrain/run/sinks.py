"""Where the loop's metrics go: a `MetricsSink` takes numbers at a step and files (plots).

The loop calls one sink; which ones stand behind it is the caller's choice: MLflow
(`tracking.MLflowSink`) and the driver's progress bar on rank 0 of a Ray job, nothing on the
other ranks, a `MemorySink` in tests and in-process runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class MetricsSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def artifact(self, path: str, folder: str) -> None:
        """A file to keep (the file may be deleted after the call returns)."""
        ...


class NullSink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def artifact(self, path: str, folder: str) -> None:
        pass


class MemorySink:
    """Records everything in memory: `history` [(step, metrics)], `artifacts` [(folder, file name)]."""

    def __init__(self) -> None:
        self.history: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[tuple[str, str]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.history.append((step, dict(metrics)))

    def artifact(self, path: str, folder: str) -> None:
        self.artifacts.append((folder, Path(path).name))

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s, m[name]) for s, m in self.history if name in m]


class ProgressSink:
    """Keeps the driver's progress actor (see launch.py) up to date with the latest of every metric."""

    def __init__(self, actor) -> None:
        self.actor, self.latest = actor, {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.latest.update(metrics)
        self.actor.update.remote(step, dict(self.latest))

    def artifact(self, path: str, folder: str) -> None:
        pass


class Sinks:
    """Several sinks as one."""

    def __init__(self, *sinks: MetricsSink) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def log(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def artifact(self, path: str, folder: str) -> None:
        for s in self.sinks:
            s.artifact(path, folder)

"""MLflow: one run per training job, metrics in batches, plots as artifacts.

The tracking store is, in order: the config's `tracking.uri`, $MLFLOW_TRACKING_URI, or a
local sqlite file `runs/mlflow.db` (artifacts next to it in `runs/mlartifacts`, not in a
`./mlruns` that depends on the working directory). The driver creates the run and logs the
config; training rank 0 appends metrics to the same run (by id), so a restarted worker group
keeps writing into it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .run_config import RunConfig, TrackingConfig

LOCAL_DB = "runs/mlflow.db"
LOCAL_ARTIFACTS = "runs/mlartifacts"


def tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(LOCAL_DB).resolve()}"


def store_client(uri: str):
    """A client for the store at `uri`, whose registry is that store too. MLflow otherwise takes the
    registry from $MLFLOW_REGISTRY_URI, which its own set_registry_uri sets for the whole process,
    so one command could list models in one store and download them from another."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client(cfg: TrackingConfig):
    return store_client(tracking_uri(cfg))


def experiment_id(cfg: TrackingConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = cfg.artifact_location
    uri = tracking_uri(cfg)
    if location is None and uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside its database
        location = (Path(uri[len("sqlite:///"):]).parent / Path(LOCAL_ARTIFACTS).name).resolve().as_uri()
    return c.create_experiment(cfg.experiment, artifact_location=location)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def start_run(cfg: RunConfig, tags: dict[str, str]) -> str:
    """Create the run, log the whole config as params; returns the run id."""
    from mlflow.entities import Param, RunTag

    c = client(cfg.tracking)
    run = c.create_run(experiment_id(cfg.tracking), run_name=cfg.name, tags=tags)
    params = [Param(k, v) for k, v in flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i:i + 100])
    c.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", f"popscale pretrain {cfg.name}")])
    return run.info.run_id


class MLflowSink:
    """A metrics sink (sinks.py) writing into an existing run: each `log` is one `log_batch` call
    (MLflow slows down with many single-metric calls)."""

    def __init__(self, cfg: TrackingConfig, run_id: str) -> None:
        self.client, self.run_id = client(cfg), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def artifact(self, path: str, folder: str) -> None:
        self.client.log_artifact(self.run_id, path, folder)

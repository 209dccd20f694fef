"""Where a run is tracked: the MLflow store, experiment, registered model and alias. Part of
every run config (pretrain.run.config) and read by every MLflow call."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a local sqlite store under runs/
    experiment: str = "popscale-pretrain"
    registered_model: str = "popscale-poyo"
    # moved to each new version only when set (`popscale pretrain --alias` does too); "latest" is MLflow's
    alias: str | None = None
    # where a new experiment keeps its artifacts (models, plots): e.g. s3://bucket/mlflow, so every node and
    # the registry's users reach them (endpoint: $MLFLOW_S3_ENDPOINT_URL or $AWS_ENDPOINT_URL). None: the
    # store's default (beside a local sqlite store: runs/mlartifacts). An existing experiment keeps its own.
    artifact_location: str | None = None

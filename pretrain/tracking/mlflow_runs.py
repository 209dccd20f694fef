"""MLflow: one run per training job, metrics in batches, plots as artifacts.

The tracking store is, in order: the config's `tracking.uri`, $MLFLOW_TRACKING_URI, or a
local sqlite file `runs/mlflow.db` (artifacts next to it in `runs/mlartifacts`, not in a
`./mlruns` that depends on the working directory). The driver creates the run and logs the
config; training rank 0 appends metrics to the same run (by id), so a restarted worker group
keeps writing into it.

An unreachable server never stops training (pretrain/tracking/offline.py): popscale's own MLflow
calls give up in seconds (`http_defaults`), a run that could not be created at the start is kept
locally, and `MLflowSink(..., buffer=True)` keeps what it could not send and sends it when the
server is back.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from data_service.remote import redact

from .config import TrackingConfig
from .journal import Journal

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
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow.tracking import MlflowClient

    http_defaults()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow's own defaults retry a refused connection for about five minutes (7 retries, backoff
# factor 2, 120 s timeout); popscale's calls give up in seconds and keep what they could not send.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def http_defaults() -> None:
    """Short HTTP retries and timeout for this process's MLflow calls, where the user set none."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def unreachable(uri: str, timeout: float = 3.0) -> str | None:
    """Why an http(s) tracking server cannot be reached (a TCP connect, `timeout` seconds at most),
    or None: it answers, or the store is not a server (sqlite, file), or a proxy stands between."""
    u = urlparse(uri)
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    if u.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(u.hostname):
        return None  # only the proxy could say
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return str(e.strerror or e).lower()  # as `reason` says it: "connection refused"
    return None


def transient(e: BaseException) -> bool:
    """An error a later attempt may not meet: no connection, a timeout, a 5xx or 429 answer. MLflow
    refusing the request itself (a bad parameter, a missing run: 4xx) is not."""
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.get_http_status_code() >= 500 or e.get_http_status_code() == 429
    return isinstance(e, (OSError, TimeoutError)) or type(e).__module__.startswith(("requests", "urllib3"))


def reason(e: BaseException | str) -> str:
    """A short why of a failed MLflow call (its messages run to several hundred characters)."""
    s = str(e)
    for known in ("Connection refused", "timed out", "Name or service not known", "Temporary failure in name "
                  "resolution", "No route to host", "Network is unreachable", "Connection reset"):
        if known.lower() in s.lower():
            return known.lower()
    code = getattr(e, "get_http_status_code", None)
    return f"HTTP {code()}: {s[:120]}" if code else s[:160]


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


def start_run(cfg: TrackingConfig, name: str, config: dict, tags: dict[str, str], command: str = "pretrain") -> str:
    """Create the run `name` of `popscale COMMAND`, log the whole `config` (nested dicts) as params;
    returns the run id."""
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow.entities import Param, RunTag

    c = client(cfg)
    run = c.create_run(experiment_id(cfg), run_name=name, tags=tags)
    # a URI's password (tracking.uri = http://user:pw@host) is never stored in the run's params
    params = [Param(k, redact(v)) for k, v in flatten(config).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i:i + 100])
    c.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", f"popscale {command} {name}")])
    return run.info.run_id


def log_records(c, run_id: str, records: list[dict]) -> int:
    """One log_batch of the first metric records {step, timestamp (ms), metrics} (up to 1000
    metrics; a larger record in several calls); returns how many records it sent."""
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow.entities import Metric

    batch, n = [], 0
    for r in records:
        ms = [Metric(k, float(v), int(r["timestamp"]), int(r["step"])) for k, v in r["metrics"].items()]
        if batch and len(batch) + len(ms) > 1000:
            break
        batch += ms
        n += 1
    for i in range(0, len(batch), 1000):
        c.log_batch(run_id, metrics=batch[i:i + 1000])
    return n


def _stderr(message: str) -> None:
    print(f"popscale: {message}", file=sys.stderr, flush=True)


class MLflowSink:
    """A metrics sink (sinks.py) writing into an existing run: each `log` is one `log_batch` call
    (MLflow slows down with many single-metric calls).

    `buffer=True`: a call that fails for want of the server (`transient`) does not raise. What
    could not be sent is kept, in order, and sent with a later `log` once the server answers again
    (tried at most every `retry_s`, doubling to a minute; a TCP probe first, so a server that is
    away costs no timeouts), with one warning when it goes away and one line when it is back.
    `run_dir` (a path or URL) also writes what is kept to the run's offline journal
    (offline.py), so `popscale tracking-sync RUN_DIR` sends it if the process ends first;
    with `run_id=None` (the run could not be created at the start) everything goes there only."""

    MAX_KEPT = 100_000  # records kept in memory; beyond, the oldest are in the journal only

    def __init__(self, cfg: TrackingConfig, run_id: str | None, *, buffer: bool = False, run_dir: str | None = None,
                 notify: Callable[[str], None] | None = None, retry_s: float = 5.0) -> None:
        self.uri = tracking_uri(cfg)
        self.client, self.run_id = store_client(self.uri), run_id
        self.buffered = buffer or run_dir is not None
        if run_id is None and run_dir is None:
            raise ValueError("MLflowSink: no run to log into (run_id) and no run directory to keep metrics in")
        self.journal = Journal(run_dir) if run_dir is not None else None
        self.notify = notify or _stderr
        self.kept: list[dict] = []  # records {step, timestamp, metrics} not sent yet
        self.dropped = 0  # records no longer in memory (in the journal, or lost without one)
        self.down_since: float | None = None
        self.retry_s, self.delay, self.next_try = retry_s, retry_s, 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": int(step), "timestamp": int(time.time() * 1000),
                  "metrics": {k: float(v) for k, v in metrics.items()}}
        if not self.buffered:
            self._send([record])
            return
        if self.run_id is None:  # no run yet: the journal is where it goes (offline.sync_run sends it)
            self.journal.append([record])
            return
        self.kept.append(record)
        if self.down_since is not None:
            if self.journal is not None:
                self.journal.append([record])
            if len(self.kept) > self.MAX_KEPT:
                self.kept.pop(0)
                self.dropped += 1
            if time.monotonic() < self.next_try:
                return
        self.flush()

    def flush(self) -> bool:
        """Send what is kept now; True when nothing is left unsent."""
        if not self.kept or self.run_id is None:
            return not self.kept
        if self.down_since is not None:
            why = unreachable(self.uri)
            if why:
                self._away(why)
                return False
        try:
            while self.kept:
                n = self._send(self.kept)
                del self.kept[:n]
        except Exception as e:  # noqa: BLE001 - only a server that is away is kept for later
            if not (self.buffered and transient(e)):
                raise
            self._away(reason(e))
            return False
        if self.down_since is not None:
            lost = ""
            if self.dropped:
                lost = (f"; the {self.dropped} oldest were kept only in {self.journal.dir} (popscale tracking-sync "
                        f"{self.journal.run_dir} sends them)" if self.journal else f"; {self.dropped} were lost")
            self.notify(f"MLflow at {_shown(self.uri)} is reachable again: sent the metrics kept since {self.down_at}{lost}")
            if self.journal is not None and not self.dropped:
                self.journal.mark_sent()
            self.down_since, self.delay, self.dropped = None, self.retry_s, 0
        return True

    def _send(self, records: list[dict]) -> int:
        return log_records(self.client, self.run_id, records)

    def _away(self, why: str) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since, self.down_at = now, time.strftime("%H:%M:%S")
            if self.journal is not None:
                self.journal.append(self.kept)
            where = (f" (also written to {self.journal.dir}; `popscale tracking-sync {self.journal.run_dir}` "
                     "sends them if the run ends first)") if self.journal else ""
            self.notify(f"warning: MLflow at {_shown(self.uri)} is unreachable ({why}): training continues; its "
                        f"metrics are kept and sent when the server is back{where}")
        self.next_try = now + self.delay
        self.delay = min(2 * self.delay, 60.0)

    def artifact(self, path: str, folder: str) -> None:
        if self.run_id is None or self.down_since is not None:
            return  # plots are not kept: the next one shows the same, later
        try:
            self.client.log_artifact(self.run_id, path, folder)
        except Exception as e:  # noqa: BLE001
            if not (self.buffered and transient(e)):
                raise
            self._away(reason(e))


def _shown(uri: str) -> str:
    return redact(uri)

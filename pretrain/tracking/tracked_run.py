"""One tracked run, as the commands that train use it: started online, or kept in its run
directory while the server is away (offline.py); a metrics sink that never stops training; plots
logged or kept beside the run; the end, with the export registered or left for one command.

    run = TrackedRun.start(cfg, run_dir, "m1-unit-id", config, "finetune", tags={"mode": "unit-id"})
    sinks = run.sink()                      # metrics: sent, or journalled and sent later
    run.artifact("decoded.png", "plots")   # logged, or kept in the run directory
    run.log({"test_r2": 0.71}, step=500)    # a command's figures
    fin = run.finish(export=export_dir, model_name="my-model")

`run_tags` is the one place that lists the tags every run carries."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_service.remote import join, redact, write_text
from data_service.version import __version__

from .config import TrackingConfig
from .mlflow_runs import MLflowSink, store_client, tracking_uri, transient, unreachable
from .offline import (RUN_FILE, Finished, TrackingUnavailable, export_tags, finish, resume_tracking,
                      start_run_or_offline, storable_uri)


def run_tags(command: str, **extra: str) -> dict[str, str]:
    """The tags every popscale run carries (the command that made it, popscale's version), then
    the command's own."""
    return {"popscale_command": command, "popscale_version": __version__, **extra}


@dataclass
class TrackedRun:
    cfg: TrackingConfig
    run_dir: str  # where what could not be sent is kept (a path or a URL)
    run_id: str | None  # None: the server was away at the start; sync creates it
    command: str = "pretrain"
    notify: Callable[[str], None] = field(default=print, repr=False)

    @classmethod
    def start(cls, cfg: TrackingConfig, run_dir: str | Path, name: str, config: dict, command: str, *,
              tags: dict[str, str] | None = None, resume: str | None = None,
              notify: Callable[[str], None] = print) -> "TrackedRun":
        """A new run `name` with `config` as its params; with the server away, one warning and the
        run kept in `run_dir`. `resume`: the command that continues it, if there is one."""
        run_id = start_run_or_offline(cfg, name, config, run_tags(command, **(tags or {})), str(run_dir), resume,
                                      notify, command)
        # what `popscale tracking-sync RUN_DIR` and `finish` read to find the run again
        write_text(join(str(run_dir), RUN_FILE), json.dumps({"name": Path(str(run_dir).rstrip("/")).name,
                                                             "mlflow_run_id": run_id,
                                                             "tracking_uri": storable_uri(tracking_uri(cfg))}))
        return cls(cfg, str(run_dir), run_id, command, notify)

    @classmethod
    def resumed(cls, cfg: TrackingConfig, run_dir: str | Path, meta: dict, command: str, *,
                notify: Callable[[str], None] = print) -> "TrackedRun":
        """The run an earlier attempt started (`meta`: its RUN_FILE), after sending what that attempt
        kept, its MLflow run itself if the server was away at its start; with the server still away,
        one warning and the run stays kept."""
        run_id = resume_tracking(str(run_dir), tracking_uri(cfg), meta, notify)
        return cls(cfg, str(run_dir), run_id, command, notify)

    @classmethod
    def attach(cls, cfg: TrackingConfig, run_dir: str | Path, run_id: str, command: str, *,
               notify: Callable[[str], None] = print) -> "TrackedRun":
        """A run another command made (a sweep's parent, a point's pretraining) that this one adds to."""
        return cls(cfg, str(run_dir), run_id, command, notify)

    @property
    def uri(self) -> str:
        return tracking_uri(self.cfg)

    def sink(self) -> MLflowSink:
        """Metrics into the run; with the server away, kept (and journalled) until it is back."""
        return MLflowSink(self.cfg, self.run_id, buffer=True, run_dir=self.run_dir, notify=self.notify)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """A few figures at once (a command's results, not a training curve): sent, or kept."""
        sink = self.sink()
        sink.log(metrics, step)
        sink.flush()

    def artifact(self, path: str | Path, folder: str) -> None:
        """Log a file to the run; with no run or no server, keep a copy in the run directory (a local
        one: a run directory on object storage keeps none yet)."""
        if self.run_id is not None:
            try:
                store_client(self.uri).log_artifact(self.run_id, str(path), folder)
                return
            except Exception as e:  # noqa: BLE001 - a server that is away loses no plot
                if not transient(e):
                    raise
        keep = Path(self.run_dir) / folder
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / Path(path).name)

    def finish(self, *, export: str | Path | None = None, model_name: str = "", alias: str | None = None,
               tags: dict[str, str] | None = None, terminate: bool = True, budget_s: float = 60.0) -> Finished:
        """Send what was kept, register `export` (when given) as a new version of `model_name`, set
        the run FINISHED; with the server away, the rest is kept and one warning says the command."""
        return finish(self.run_dir, self.uri, self.run_id, terminate=terminate, export=export, model_name=model_name,
                      alias=alias, tags=tags, budget_s=budget_s, notify=self.notify)

    def failed(self) -> None:
        """Mark the run FAILED, if there is a run and a server to tell."""
        if self.run_id is None:
            return
        try:
            store_client(self.uri).set_terminated(self.run_id, "FAILED")
        except Exception as e:  # noqa: BLE001 - the failure being reported matters more
            if not transient(e):
                raise


def register_alone(export: str | Path, *, name: str, alias: str | None = None, uri: str | None = None,
                   runs: str | Path = "runs/register") -> Finished:
    """`popscale register EXPORT` with no run behind it (a shipped checkpoint, weights from elsewhere):
    a small run of its own (command `register`, the export's provenance as params) holds the model
    version MLflow needs a run for. Needs the server: there is no training to carry on without it."""
    export = Path(export).resolve()
    if not (export / "config.json").exists() or not (export / "model.safetensors").exists():
        raise FileNotFoundError(f"{export}: not an exported model (no config.json + model.safetensors)")
    cfg = TrackingConfig(uri=uri)
    why = unreachable(tracking_uri(cfg))
    if why:
        raise TrackingUnavailable(f"MLflow at {redact(tracking_uri(cfg))} is unreachable ({why})")
    prov = json.loads((export / "config.json").read_text()).get("provenance", {})
    run_dir = Path(runs) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = TrackedRun.start(cfg, run_dir, f"register {export.name}", {"export": str(export), "provenance": prov},
                           "register", tags={"export": str(export)})
    return run.finish(export=export, model_name=name, alias=alias, tags=export_tags(export))

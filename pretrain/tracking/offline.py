"""Tracking while the MLflow server is away, and catching up once it is back.

Training never waits for the tracking server. What popscale could not send is kept in the run's
directory (a path or a URL, data_service/remote.py), under `mlflow_offline/`:

    run.json                 the run that could not be created at the start: experiment, run name,
                             tags, params, start time, and a key (the run's `popscale_run_key` tag)
    metrics-<writer>.jsonl   metric records {step, timestamp, metrics} a sink could not send, one
                             file per process, appended (on object storage, which cannot append,
                             one object per write: metrics-<writer>.<n>.jsonl)
    metrics-<writer>.sent    how many of that writer's records were sent after all
    end.json                 the run's end (FINISHED), when it could not be set
    register.json            a registration that could not be made: export, model name, alias, tags

`sync_run` (`popscale tracking-sync RUN_DIR`; also `popscale pretrain --resume` and the end of
every run) creates the run if it has no id yet (or finds the one an earlier attempt made, by its
key), logs its params and tags, sends the records not sent yet, and sets its end. Sending a record
twice is harmless: MLflow keeps one of identical metrics (key, value, step and timestamp).
`register_export` (`popscale register EXPORT --run RUN_DIR`) syncs the run, then registers the
export it kept. `finish` is the end of `popscale pretrain`: registration is tried again with
backoff for about a minute, then left for later with the one command that does it.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_service.remote import exists, join, redact, write_text

from .config import TrackingConfig
from .journal import journals, now_ms, offline_dir, read_json, remove
from .mlflow_runs import (
    experiment_id,
    flatten,
    log_records,
    reason,
    start_run,
    store_client,
    tracking_uri,
    transient,
    unreachable,
)

RUN_FILE = "popscale_run.json"  # in a run directory: the run's name, MLflow run id and store
KEY_TAG = "popscale_run_key"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached (now): nothing was lost, try again later."""


def storable_uri(uri: str) -> str | None:
    """A tracking URI as it may be written into a run directory: never one with a password."""
    return uri if redact(uri) == uri else None


# ---- the start: a run that could not be created ----------------------------------------------------------
def start_run_or_offline(cfg: TrackingConfig, run_name: str, config: dict, tags: dict[str, str], run_dir: str,
                         resume: str | None = None, notify: Callable[[str], None] = print,
                         command: str = "pretrain") -> str | None:
    """mlflow_runs.start_run, or, with the server away (one warning), the run kept in `run_dir`
    for `sync_run` to create later; returns the run id, or None. `resume`: the command that
    continues the run (and sends what it kept), when there is one."""
    key = uuid.uuid4().hex
    tags = {**tags, KEY_TAG: key}
    uri = tracking_uri(cfg)
    why = unreachable(uri)
    if why is None:
        try:
            return start_run(cfg, run_name, config, tags, command)
        except Exception as e:  # noqa: BLE001 - a server that is away does not stop training
            if not transient(e):
                raise
            why = reason(e)
    record = {"key": key, "tracking_uri": storable_uri(uri), "experiment": cfg.experiment,
              "artifact_location": cfg.artifact_location, "run_name": run_name, "tags": tags,
              "params": {k: redact(v) for k, v in flatten(config).items()},
              "note": f"popscale {command} {run_name}", "start_time": now_ms()}
    write_text(join(offline_dir(run_dir), "run.json"), json.dumps(record))
    notify(f"warning: MLflow at {redact(uri)} is unreachable ({why}): training goes on without it; the run's "
           f"params and metrics are kept in {offline_dir(run_dir)} and sent by `popscale tracking-sync {run_dir}` "
           + (f" (or `{resume}`)" if resume else "") + " once it is back")
    return None


# ---- catching up -----------------------------------------------------------------------------------------
@dataclass
class SyncReport:
    run_id: str
    tracking_uri: str
    created: bool = False  # the run was made now, from the offline record
    metrics: int = 0  # records sent now
    ended: str = ""  # the status set now
    registration: dict | None = None  # a registration still to make (register.json)


def pending(run_dir: str) -> bool:
    """Whether something of the run is not in MLflow yet (registration aside)."""
    if not read_json(join(str(run_dir), RUN_FILE)).get("mlflow_run_id"):
        return True
    if exists(join(offline_dir(run_dir), "end.json")):
        return True
    return any(len(records) > sent for records, sent in journals(run_dir).values())


def run_tracking_uri(run_dir: str, uri: str | None = None) -> str:
    """The store a run logs to: `uri`, else the one it recorded, else the default (tracking.tracking_uri)."""
    recorded = (read_json(join(str(run_dir), RUN_FILE)).get("tracking_uri")
                or read_json(join(offline_dir(run_dir), "run.json")).get("tracking_uri"))
    return uri or recorded or tracking_uri(TrackingConfig())


def sync_run(run_dir: str, uri: str | None = None) -> SyncReport:
    """Send what the run kept (see the module docstring); raises TrackingUnavailable with the server away."""
    run_dir = str(run_dir)
    meta = read_json(join(run_dir, RUN_FILE))
    record = read_json(join(offline_dir(run_dir), "run.json"))
    if not meta and not record:
        raise FileNotFoundError(f"{run_dir}: not a popscale run directory (no {RUN_FILE})")
    uri = run_tracking_uri(run_dir, uri)
    why = unreachable(uri)
    if why:
        raise TrackingUnavailable(f"MLflow at {redact(uri)} is unreachable ({why})")
    try:
        return _sync(run_dir, uri, meta, record)
    except Exception as e:
        if transient(e):
            raise TrackingUnavailable(f"MLflow at {redact(uri)} is unreachable ({reason(e)})") from e
        raise


def _sync(run_dir: str, uri: str, meta: dict, record: dict) -> SyncReport:
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow.entities import Param, RunTag

    c = store_client(uri)
    rep = SyncReport(run_id=meta.get("mlflow_run_id") or "", tracking_uri=uri)
    if not rep.run_id:
        if not record:
            raise FileNotFoundError(f"{run_dir}: no MLflow run id in {RUN_FILE} and no offline record of the run")
        exp = experiment_id(TrackingConfig(uri=uri, experiment=record["experiment"],
                                           artifact_location=record.get("artifact_location")))
        found = c.search_runs([exp], filter_string=f"tags.{KEY_TAG} = '{record['key']}'", max_results=1)
        if found:  # made by an attempt that got no further
            rep.run_id = found[0].info.run_id
        else:
            rep.run_id = c.create_run(exp, start_time=record["start_time"], run_name=record["run_name"],
                                      tags=record["tags"]).info.run_id
            rep.created = True
        params = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(params), 100):
            c.log_batch(rep.run_id, params=params[i:i + 100])
        c.log_batch(rep.run_id, tags=[RunTag("mlflow.note.content", record["note"])])
        meta = {**meta, "name": meta.get("name") or Path(run_dir.rstrip("/")).name, "mlflow_run_id": rep.run_id}
        if storable_uri(uri) and not meta.get("tracking_uri"):
            meta["tracking_uri"] = uri
        write_text(join(run_dir, RUN_FILE), json.dumps(meta))
    d = offline_dir(run_dir)
    for writer, (records, sent) in journals(run_dir).items():
        start = sent
        try:
            while sent < len(records):
                sent += log_records(c, rep.run_id, records[sent:])
        finally:
            if sent != start:
                write_text(join(d, f"metrics-{writer}.sent"), json.dumps({"records": sent}))
                rep.metrics += sent - start
    end = read_json(join(d, "end.json"))
    if end:
        c.set_terminated(rep.run_id, end["status"], end_time=end["end_time"])
        remove(join(d, "end.json"))
        rep.ended = end["status"]
    rep.registration = read_json(join(d, "register.json")) or None
    return rep


def _caught_up(rep: SyncReport) -> str:
    parts = (([f"created run {rep.run_id} from its offline record"] if rep.created else [])
             + ([f"sent {rep.metrics} metric records kept while the server was away"] if rep.metrics else [])
             + ([f"set it {rep.ended}"] if rep.ended else []))
    return f"MLflow at {redact(rep.tracking_uri)}: " + ", ".join(parts) if parts else ""


def resume_tracking(run_dir: str, uri: str, meta: dict, notify: Callable[[str], None] = print) -> str | None:
    """At `popscale pretrain --resume`: catch up on what the run kept (creating its MLflow run if the
    server was away at its start); with the server still away, one warning. Returns the run id."""
    if meta.get("mlflow_run_id") and not pending(run_dir):
        return meta["mlflow_run_id"]
    try:
        rep = sync_run(run_dir, uri)
    except TrackingUnavailable as e:
        notify(f"warning: {e}: training goes on; what it logs is kept in {offline_dir(run_dir)} and sent by "
               f"`popscale tracking-sync {run_dir}` once it is back")
        return meta.get("mlflow_run_id") or None
    if line := _caught_up(rep):
        notify(line)
    return rep.run_id


# ---- the end: terminate, register ------------------------------------------------------------------------
@dataclass
class Finished:
    run_id: str | None
    version: str = ""
    model_uri: str = ""  # models:/NAME/VERSION, or the export's path while its registration is pending
    registration: str = "none"  # registered | pending | none (nothing to register)
    tracking: str = "ok"  # ok | pending (params, metrics or the run's end kept in the run directory)
    command: str = ""  # what sends the rest later


def register_command(export: str | Path, run_dir: str, name: str, alias: str | None, uri: str) -> str:
    shown = storable_uri(uri)
    return " ".join(["popscale", "register", shlex.quote(str(export)), "--run", shlex.quote(str(run_dir)),
                     "--name", shlex.quote(name), *(["--alias", shlex.quote(alias)] if alias else []),
                     *(["--tracking-uri", shlex.quote(shown)] if shown else [])])


def finish(run_dir: str, uri: str, run_id: str | None, *, terminate: bool, export: str | Path | None = None,
           model_name: str = "", alias: str | None = None, tags: dict[str, str] | None = None,
           budget_s: float = 60.0, notify: Callable[[str], None] = print,
           sleep: Callable[[float], None] = time.sleep) -> Finished:
    """The end of a pretraining run: send what was kept (`sync_run`), register `export` (when given) as
    a new version of `model_name`, set the run FINISHED (`terminate`). With the server away this is
    tried again with backoff (3, 6, 12, 24 s) for `budget_s` when there is a model to register, once
    otherwise; then the run's end and the registration are kept for later and one warning says the
    command that does the rest (`popscale register ...`, or `popscale tracking-sync RUN_DIR`)."""
    # deferred: importing torch only when used keeps start-up light
    from .registry import register

    t0, since_ms, delay, slept = time.monotonic(), now_ms(), 3.0, 0.0
    synced = bool(run_id) and not pending(run_dir)
    if synced and export is None and not terminate:
        return Finished(run_id)  # nothing to send
    version = model_uri = ""
    while True:
        try:
            if not synced:
                rep = sync_run(run_dir, uri)
                run_id, synced = rep.run_id, True
                if line := _caught_up(rep):
                    notify(line)
            why = unreachable(uri)
            if why:
                raise TrackingUnavailable(f"MLflow at {redact(uri)} is unreachable ({why})")
            if export is not None and not version:
                version, model_uri = register(uri, run_id, export, model_name, alias, tags, since_ms=since_ms)
            if terminate:
                store_client(uri).set_terminated(run_id, "FINISHED")
            return Finished(run_id, version, model_uri, "registered" if version else "none")
        except Exception as e:  # noqa: BLE001 - only a server that is away is waited for
            if not (isinstance(e, TrackingUnavailable) or transient(e)):
                raise
            why = str(e) if isinstance(e, TrackingUnavailable) else f"MLflow at {redact(uri)} is unreachable ({reason(e)})"
        if export is None or version or max(slept, time.monotonic() - t0) + delay > budget_s:
            break
        sleep(delay)
        slept, delay = slept + delay, delay * 2
    d = offline_dir(run_dir)
    if terminate:
        write_text(join(d, "end.json"), json.dumps({"status": "FINISHED", "end_time": now_ms()}))
    waited = f" (tried for {time.monotonic() - t0:.0f} s)" if export is not None and not version else ""
    if export is not None and not version:
        write_text(join(d, "register.json"), json.dumps({
            "export": str(export), "name": model_name, "alias": alias, "tags": tags or {}, "since_ms": since_ms,
            "tracking_uri": storable_uri(uri)}))
        command = register_command(export, run_dir, model_name, alias, uri)
        notify(f"warning: {why}{waited}: the model is exported to {export} but not registered; register it (this "
               f"also sends the run's kept params and metrics) with: {command}")
        return Finished(run_id, "", str(export), "pending", "pending", command)
    command = f"popscale tracking-sync {shlex.quote(str(run_dir))}"
    what = "the run's end and what it could not log are" if terminate else "what the run could not log is"
    notify(f"warning: {why}: {what} kept in {d}; send it with: {command}")
    return Finished(run_id, version, model_uri, "registered" if version else "none", "pending", command)


def export_tags(export: Path) -> dict[str, str]:
    prov = json.loads((export / "config.json").read_text()).get("provenance", {})
    return {k: str(prov[k]) for k in ("git_commit", "corpus_fingerprint", "ray_run") if prov.get(k)}


def register_export(export: str | Path, run: str, *, name: str | None = None, alias: str | None = None,
                    uri: str | None = None) -> tuple[str, str, str, SyncReport | None]:
    """`popscale register`: register an exported model as a new version, logged to `run` (an MLflow
    run id, or a run directory, which is synced first: its run is created if the server was away at
    its start). A registration the run kept (register.json) gives the defaults of name, alias and
    tags. Returns (version, models:/ URI, run id, the sync's report or None)."""
    # deferred: importing torch only when used keeps start-up light
    from .registry import register

    export = Path(export).resolve()
    if not (export / "config.json").exists() or not (export / "model.safetensors").exists():
        raise FileNotFoundError(f"{export}: not an exported model (no config.json + model.safetensors)")
    kept, rep = {}, None
    is_dir = exists(join(str(run), RUN_FILE)) or exists(join(offline_dir(str(run)), "run.json"))
    if is_dir:
        kept = read_json(join(offline_dir(str(run)), "register.json"))
        rep = sync_run(str(run), uri or kept.get("tracking_uri"))
        run_id, uri = rep.run_id, rep.tracking_uri
    else:
        run_id, uri = str(run), uri or tracking_uri(TrackingConfig())
    same = kept and Path(kept.get("export", "")).resolve() == export
    name = name or (kept.get("name") if same else None) or TrackingConfig().registered_model
    alias = alias if alias is not None else (kept.get("alias") if same else None)
    tags = (kept.get("tags") if same else None) or export_tags(export)
    why = unreachable(uri)
    if why:
        raise TrackingUnavailable(f"MLflow at {redact(uri)} is unreachable ({why})")
    try:
        version, model_uri = register(uri, run_id, export, name, alias, tags,
                                      since_ms=kept.get("since_ms") if same else None)
    except Exception as e:
        if transient(e):
            raise TrackingUnavailable(f"MLflow at {redact(uri)} is unreachable ({reason(e)})") from e
        raise
    if same:
        remove(join(offline_dir(str(run)), "register.json"))
    return version, model_uri, run_id, rep

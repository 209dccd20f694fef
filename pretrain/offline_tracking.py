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
import os
import re
import shlex
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_service.remote import as_path, exists, filesystem, is_url, join, listdir, read_text, redact, write_text

from .run_config import RunConfig, TrackingConfig
from .tracking import (experiment_id, flatten, log_records, reason, start_run, store_client, tracking_uri,
                       transient, unreachable)

OFFLINE = "mlflow_offline"
RUN_FILE = "popscale_run.json"  # launch.RUN_FILE: the run's name and MLflow run id
KEY_TAG = "popscale_run_key"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached (now): nothing was lost, try again later."""


def offline_dir(run_dir: str) -> str:
    return join(str(run_dir), OFFLINE)


def _read_json(path: str) -> dict:
    return json.loads(read_text(path)) if exists(path) else {}


def _remove(path: str) -> None:
    if is_url(path):
        if filesystem(path).exists(path):
            filesystem(path).rm_file(path)
    else:
        as_path(path).unlink(missing_ok=True)


def storable_uri(uri: str) -> str | None:
    """A tracking URI as it may be written into a run directory: never one with a password."""
    return uri if redact(uri) == uri else None


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---- the journal of metric records ---------------------------------------------------------------------
class Journal:
    """One writer's metric records in a run's offline directory (see the module docstring)."""

    def __init__(self, run_dir: str, writer: str | None = None) -> None:
        self.run_dir, self.dir = str(run_dir), offline_dir(str(run_dir))
        raw = writer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.writer = re.sub(r"[^A-Za-z0-9-]", "-", raw)
        self.count, self.segment = 0, 0

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r) + "\n" for r in records)
        if is_url(self.dir):
            self.segment += 1
            write_text(join(self.dir, f"metrics-{self.writer}.{self.segment:06d}.jsonl"), text)
        else:
            d = as_path(self.dir)
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"metrics-{self.writer}.jsonl", "a") as f:
                f.write(text)
        self.count += len(records)

    def mark_sent(self, n: int | None = None) -> None:
        """The first `n` records (default: all written) are in MLflow."""
        write_text(join(self.dir, f"metrics-{self.writer}.sent"), json.dumps({"records": self.count if n is None else n}))


def journals(run_dir: str) -> dict[str, tuple[list[dict], int]]:
    """{writer: (its records in order, how many were sent)} of a run directory."""
    d = offline_dir(run_dir)
    parts: dict[str, list[tuple[int, str]]] = {}
    for name in listdir(d):
        m = re.fullmatch(r"metrics-([A-Za-z0-9-]+)(?:\.(\d+))?\.jsonl", name)
        if m:
            parts.setdefault(m[1], []).append((int(m[2] or 0), name))
    out = {}
    for writer, files in parts.items():
        records = []
        for _, name in sorted(files):
            for line in read_text(join(d, name)).splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a process that died writing it
                    pass
        out[writer] = (records, int(_read_json(join(d, f"metrics-{writer}.sent")).get("records", 0)))
    return out


# ---- the start: a run that could not be created ----------------------------------------------------------
def start_run_or_offline(run: RunConfig, tags: dict[str, str], run_dir: str, name: str,
                         notify: Callable[[str], None] = print) -> str | None:
    """tracking.start_run, or, with the server away (one warning), the run kept in `run_dir` for
    `sync_run` to create later; returns the run id, or None."""
    key = uuid.uuid4().hex
    tags = {**tags, KEY_TAG: key}
    uri = tracking_uri(run.tracking)
    why = unreachable(uri)
    if why is None:
        try:
            return start_run(run, tags)
        except Exception as e:  # noqa: BLE001 - a server that is away does not stop training
            if not transient(e):
                raise
            why = reason(e)
    record = {"key": key, "tracking_uri": storable_uri(uri), "experiment": run.tracking.experiment,
              "artifact_location": run.tracking.artifact_location, "run_name": run.name, "tags": tags,
              "params": {k: redact(v) for k, v in flatten(run.to_dict()).items()},
              "note": f"popscale pretrain {run.name}", "start_time": _now_ms()}
    write_text(join(offline_dir(run_dir), "run.json"), json.dumps(record))
    notify(f"warning: MLflow at {redact(uri)} is unreachable ({why}): training goes on without it; the run's "
           f"params and metrics are kept in {offline_dir(run_dir)} and sent by `popscale tracking-sync {run_dir}` "
           f"(or `popscale pretrain --resume {name}`) once it is back")
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
    if not _read_json(join(str(run_dir), RUN_FILE)).get("mlflow_run_id"):
        return True
    if exists(join(offline_dir(run_dir), "end.json")):
        return True
    return any(len(records) > sent for records, sent in journals(run_dir).values())


def run_tracking_uri(run_dir: str, uri: str | None = None) -> str:
    """The store a run logs to: `uri`, else the one it recorded, else the default (tracking.tracking_uri)."""
    recorded = (_read_json(join(str(run_dir), RUN_FILE)).get("tracking_uri")
                or _read_json(join(offline_dir(run_dir), "run.json")).get("tracking_uri"))
    return uri or recorded or tracking_uri(TrackingConfig())


def sync_run(run_dir: str, uri: str | None = None) -> SyncReport:
    """Send what the run kept (see the module docstring); raises TrackingUnavailable with the server away."""
    run_dir = str(run_dir)
    meta = _read_json(join(run_dir, RUN_FILE))
    record = _read_json(join(offline_dir(run_dir), "run.json"))
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
    end = _read_json(join(d, "end.json"))
    if end:
        c.set_terminated(rep.run_id, end["status"], end_time=end["end_time"])
        _remove(join(d, "end.json"))
        rep.ended = end["status"]
    rep.registration = _read_json(join(d, "register.json")) or None
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
    from .registry import register

    t0, since_ms, delay, slept = time.monotonic(), _now_ms(), 3.0, 0.0
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
        write_text(join(d, "end.json"), json.dumps({"status": "FINISHED", "end_time": _now_ms()}))
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


def _export_tags(export: Path) -> dict[str, str]:
    prov = json.loads((export / "config.json").read_text()).get("provenance", {})
    return {k: str(prov[k]) for k in ("git_commit", "corpus_fingerprint", "ray_run") if prov.get(k)}


def register_export(export: str | Path, run: str, *, name: str | None = None, alias: str | None = None,
                    uri: str | None = None) -> tuple[str, str, str, SyncReport | None]:
    """`popscale register`: register an exported model as a new version, logged to `run` (an MLflow
    run id, or a run directory, which is synced first: its run is created if the server was away at
    its start). A registration the run kept (register.json) gives the defaults of name, alias and
    tags. Returns (version, models:/ URI, run id, the sync's report or None)."""
    from .registry import register

    export = Path(export).resolve()
    if not (export / "config.json").exists() or not (export / "model.safetensors").exists():
        raise FileNotFoundError(f"{export}: not an exported model (no config.json + model.safetensors)")
    kept, rep = {}, None
    is_dir = exists(join(str(run), RUN_FILE)) or exists(join(offline_dir(str(run)), "run.json"))
    if is_dir:
        kept = _read_json(join(offline_dir(str(run)), "register.json"))
        rep = sync_run(str(run), uri or kept.get("tracking_uri"))
        run_id, uri = rep.run_id, rep.tracking_uri
    else:
        run_id, uri = str(run), uri or tracking_uri(TrackingConfig())
    same = kept and Path(kept.get("export", "")).resolve() == export
    name = name or (kept.get("name") if same else None) or TrackingConfig().registered_model
    alias = alias if alias is not None else (kept.get("alias") if same else None)
    tags = (kept.get("tags") if same else None) or _export_tags(export)
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
        _remove(join(offline_dir(str(run)), "register.json"))
    return version, model_uri, run_id, rep

"""The MLflow model registry: an exported model (export.py) registered as a version, found
again by URI, pulled into a local cache.

It is registered as an MLflow pyfunc model *from code* (pyfunc.py is copied in, not pickled)
with the export's files as artifacts, for serving. popscale itself never goes through the
pyfunc: `pull` downloads the files and `load_exported` reads weights and JSON. Every run
registers a new version; an alias moves only when asked (`register(..., alias=)`, `promote`).

    ref, path = pull("models:/popscale-poyo@pretrained", tracking_uri)   # runs/models/<store>/NAME/VERSION
    model, tokenizer = load_exported(path)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_service.remote import redact

from ..model.poyo import POYO
from ..tokens.tokenizer import Tokenizer
from .export import load_exported
from .mlflow_runs import store_client

PYFUNC = Path(__file__).with_name("pyfunc.py")


class ModelNotFound(LookupError):
    """A models:/ URI (or a path) that names no model."""


@dataclass
class ModelRef:
    name: str
    version: str
    uri: str  # models:/name/version

    def __str__(self) -> str:
        return self.uri


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `NAME@ALIAS` or `NAME/VERSION`."""
    body = uri[len("models:/"):] if uri.startswith("models:/") else uri
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise ModelNotFound(f"{uri!r} is not a model URI: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve(uri: str, tracking_uri: str) -> ModelRef:
    """The registered version a URI names (an alias is read now: it may move later)."""
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    client = store_client(tracking_uri)
    try:
        v = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        known = [m.name for m in client.search_registered_models(max_results=50)]
        what = f"alias @{alias}" if alias else f"version {version}"
        raise ModelNotFound(f"no registered model {name!r} with {what} in {tracking_uri} (registered models: "
                            f"{', '.join(known) or 'none'}; `popscale models NAME` lists versions and aliases)"
                            ) from None
    return ModelRef(name, str(v.version), f"models:/{name}/{v.version}")


def _export_root(downloaded: Path) -> Path:
    """The exported-model directory inside a downloaded MLflow model (pyfunc layout or plain)."""
    for cand in (downloaded / "artifacts" / "model", downloaded):
        if (cand / "config.json").exists() and (cand / "model.safetensors").exists():
            return cand
    found = [p.parent for p in downloaded.rglob("model.safetensors") if (p.parent / "config.json").exists()]
    if found:
        return found[0]
    raise ModelNotFound(f"the registered model at {downloaded} holds no popscale weights (model.safetensors + "
                        "config.json); it was not registered by popscale")


def pull(uri: str, tracking_uri: str, cache: str | Path = "runs/models") -> tuple[ModelRef, Path]:
    """Fetch a registered version's files (weights, config, vocabularies, plan, model card) into
    `cache/<store>/NAME/VERSION` (once: a version never changes; `<store>` tells tracking stores
    apart) and return that directory. Only files are copied: nothing of the MLflow pyfunc wrapper
    is imported or run."""
    # deferred: importing mlflow only when used keeps start-up light
    import mlflow

    ref = resolve(uri, tracking_uri)
    run_id = _run_id(ref, tracking_uri)
    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:10]  # the same name/version in two stores differs
    out = Path(cache) / store / ref.name / ref.version
    marker = out / "registered.json"
    if marker.exists() and json.loads(marker.read_text()).get("run_id") == run_id:
        return ref, out
    if out.exists():
        shutil.rmtree(out)  # a store recreated with the same name: that copy is another model
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=tmp))
        staged = Path(tmp) / "export"
        shutil.copytree(_export_root(got), staged)

        (staged / "registered.json").write_text(json.dumps({"tracking_uri": redact(tracking_uri), "name": ref.name,
                                                            "version": ref.version, "run_id": run_id}))
        os.replace(staged, out)
    return ref, out


def _run_id(ref: ModelRef, tracking_uri: str) -> str:
    return str(store_client(tracking_uri).get_model_version(ref.name, ref.version).run_id)


def locate(uri_or_dir: str | Path, tracking_uri: str | None = None, cache: str | Path = "runs/models"
           ) -> tuple[ModelRef, Path]:
    """(reference, local directory) of a models:/ URI (pulled into the cache first) or of an exported
    directory (its reference then has no version, and its URI is the resolved path)."""
    p = Path(str(uri_or_dir))
    if not str(uri_or_dir).startswith("models:/") and (p / "config.json").exists():
        return ModelRef(p.resolve().name, "", str(p.resolve())), p.resolve()
    if not str(uri_or_dir).startswith("models:/") and "@" not in str(uri_or_dir):
        raise ModelNotFound(f"{uri_or_dir}: neither a models:/ URI nor a directory with an exported model")
    if tracking_uri is None:
        raise ValueError("a tracking URI is needed to load a registered model")
    ref, path = pull(str(uri_or_dir), tracking_uri, cache)
    return ref, path.resolve()


def load(uri_or_dir: str | Path, tracking_uri: str | None = None, cache: str | Path = "runs/models",
         device: str = "cpu") -> tuple[POYO, Tokenizer, Path]:
    """(model, tokenizer, local directory) of a models:/ URI (pulled first) or an exported directory."""
    _, path = locate(uri_or_dir, tracking_uri, cache)
    model, tok = load_exported(path, device)
    return model, tok, path


def register(tracking_uri: str, run_id: str, export_dir: str | Path, name: str, alias: str | None = None,
             tags: dict[str, str] | None = None, description: str | None = None,
             since_ms: int | None = None) -> tuple[str, str]:
    """Log the exported model to the run and register a new version of `name`; `alias` is moved to
    it only when given. Returns (version, models:/name/version). With `since_ms` (an attempt again,
    after one that failed: offline.finish, `popscale register`), a version of `name` that
    this run registered since then is taken as this one (the server may have made it before the
    connection broke; five minutes' slack for its clock), and only its tags, description and alias
    are set."""
    # deferred: importing mlflow only when used keeps start-up light
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)  # the registry is the tracking store, whatever the environment says
    client = store_client(tracking_uri)  # (also: popscale's short HTTP retries, tracking.http_defaults)
    made = [] if since_ms is None else [
        v for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if (v.creation_timestamp or 0) >= since_ms - 300_000]
    if made:
        version = str(max(int(v.version) for v in made))
    else:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC),
                                           artifacts={"model": str(export_dir)}, registered_model_name=name,
                                           pip_requirements=["popscale"])
        version = str(info.registered_model_version)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, str(v)[:5000])
    card = Path(export_dir) / "MODEL_CARD.md"
    if description or card.exists():
        client.update_model_version(name, version, description=description or card.read_text()[:5000])
    if alias:
        promote(tracking_uri, name, version, alias)
    return version, f"models:/{name}/{version}"


def promote(tracking_uri: str, name: str, version: str, alias: str) -> str | None:
    """Point `alias` at `version` of `name`; returns the version it pointed at before (or None)."""
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow.exceptions import MlflowException

    client = store_client(tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise ModelNotFound(f"no version {version} of registered model {name!r} in {tracking_uri}") from None
    try:
        before = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        before = None
    client.set_registered_model_alias(name, alias, str(version))
    return before


def versions(tracking_uri: str, name: str) -> tuple[list[dict], dict[str, str]]:
    """([{version, run_id, created, source tags}], {alias: version}) of a registered model."""
    # deferred: importing mlflow only when used keeps start-up light
    from mlflow.exceptions import MlflowException

    client = store_client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ModelNotFound(f"no registered model {name!r} in {tracking_uri}") from None
    rows = [{"version": str(v.version), "run_id": v.run_id, "created": v.creation_timestamp, **dict(v.tags)}
            for v in client.search_model_versions(f"name='{name}'")]
    return sorted(rows, key=lambda r: int(r["version"])), {a: str(v) for a, v in (model.aliases or {}).items()}


def load_model(uri: str, tracking_uri: str | None = None, cache: str | Path = "runs/models") -> tuple[POYO, Tokenizer]:
    """The model and tokenizer of a registered version (models:/name@alias or models:/name/version),
    # deferred: importing mlflow only when used keeps start-up light
    from its files only (see `pull`)."""
    import mlflow

    model, tok, _ = load(uri, tracking_uri or mlflow.get_tracking_uri(), cache)
    return model, tok

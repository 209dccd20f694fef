"""Exported models and the MLflow model registry.

An exported model is a directory of plain files, nothing pickled:
    model.safetensors   the weights (fp32)
    config.json         model config, tokenizer config (geometry, readouts, target scales, loss
                        weights), provenance (corpus fingerprint, run, step)
    vocab.json          unit and session ids, in the order of the embedding rows
    plan.json           the run plan it was trained with (when it came from a run)
    MODEL_CARD.md       data, metrics, lineage, intended use
It is registered as an MLflow pyfunc model *from code* (pretrain/mlflow_pyfunc.py is copied in,
not pickled) with those files as artifacts, for serving. popscale itself never goes through the
pyfunc: `pull` downloads the files and `load_exported` reads weights and JSON, so loading a
model runs no code stored with it. Every run registers a new version; an alias moves only when
asked (`register(..., alias=)`, `promote`).

    ref, path = pull("models:/popscale-poyo@pretrained", tracking_uri)   # runs/models/<store>/NAME/VERSION
    model, tokenizer = load_exported(path)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import POYO
from .tokenizer import Geometry, Readout, Tokenizer, TokenizerConfig
from .tracking import store_client

PYFUNC = Path(__file__).with_name("mlflow_pyfunc.py")
FORMAT_VERSION = 2  # 2: the tokenizer config holds the window geometry and the readouts (1: flat, window in the model)


def export_model(model: POYO, tokenizer_cfg: TokenizerConfig, out: str | Path, provenance: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.endswith("_extra_state")}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "format": "popscale-model", "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
        "tokenizer": asdict(tokenizer_cfg), "provenance": provenance or {}}, indent=1))
    (out / "vocab.json").write_text(json.dumps({"units": model.unit_emb.ids, "sessions": model.session_emb.ids}))
    return out


def _configs(cfg: dict) -> tuple[ModelConfig, TokenizerConfig]:
    """(model config, tokenizer config) of an export's config.json, of either format version."""
    if cfg.get("format_version") == FORMAT_VERSION:
        return ModelConfig.from_dict(cfg["model"]), TokenizerConfig.from_dict(cfg["tokenizer"])
    if cfg.get("format_version") != 1:
        raise ValueError(f"unknown exported-model format version {cfg.get('format_version')!r}")
    known = {f.name for f in fields(ModelConfig)}
    m = ModelConfig.from_dict({k: v for k, v in cfg["model"].items() if k in known})  # v1 kept the window here
    t = cfg["tokenizer"]
    return m, TokenizerConfig(Geometry(t["window"], t["latent_step"], t["latents_per_step"]),
                              [Readout(n, d, list(t["readouts"].get(n, []))) for n, d in m.readouts.items()],
                              dict(t["target_scale"]), dict(t["interval_weights"]))


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, provenance: dict) -> Path:
    """Consolidate a training checkpoint (checkpoint.py) into fp32 weights and export them, with
    the model, vocabularies and tokenizer of the plan it carries."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .checkpoint import read_state
    from .plan import RunPlan

    state, plan = read_state(checkpoint_dir), RunPlan.load(checkpoint_dir)
    model = POYO(plan.model, plan.unit_vocab, plan.session_vocab)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=state["tag"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = export_model(model, plan.tokenizer, out, {**provenance, "step": state["step"]})
    plan.save(out)
    return out


def load_exported(path: str | Path, device: str = "cpu") -> tuple[POYO, Tokenizer]:
    path = Path(path)
    mcfg, tcfg = _configs(json.loads((path / "config.json").read_text()))
    vocab = json.loads((path / "vocab.json").read_text())
    model = POYO(mcfg, vocab["units"], vocab["sessions"], device=device)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"exported model at {path} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.eval()
    return model, Tokenizer(tcfg, model.unit_emb.frozen(), model.session_emb.frozen())


# ---- provenance -------------------------------------------------------------------------------------------
PACKAGES = ("torch", "deepspeed", "ray", "mlflow", "zarr", "numpy", "safetensors", "popscale")


def provenance(extra: dict | None = None) -> dict:
    """What a registered version was made with: the git commit of this checkout (with `+dirty`
    when it has uncommitted changes), package versions and the host's Python."""
    import platform
    import subprocess
    from importlib import metadata

    repo = Path(__file__).resolve().parents[1]
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+dirty" if dirty and commit != "unknown" else ""
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"git_commit": commit, "packages": versions, "python": platform.python_version(), **(extra or {})}


def model_card(path: str | Path, *, title: str, data: str, metrics: dict[str, float], lineage: str = "",
               intended_use: str | None = None) -> Path:
    """A short MODEL_CARD.md beside the weights: what it was trained on, how well, what it is for."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    prov = cfg.get("provenance", {})
    vocab = json.loads((Path(path) / "vocab.json").read_text())
    use = intended_use or ("Decoding behaviour from spikes of the sessions in its vocabulary, and adapting to new "
                           "sessions with `popscale finetune`. A research model: not validated for clinical use.")
    lines = [f"# {title}", "", "## Data", data, f"- {len(vocab['sessions'])} sessions and {len(vocab['units'])} units "
             f"in its vocabulary; corpus fingerprint {prov.get('corpus_fingerprint', 'unknown')}", "",
             "## Metrics", *[f"- {k}: {v:.4f}" for k, v in metrics.items()], "",
             "## Model", f"- {cfg['model']['dim']}-dim, depth {cfg['model']['depth']}, readouts "
             f"{', '.join(f'{k} ({v})' for k, v in cfg['model']['readouts'].items())}",
             f"- git commit {prov.get('git_commit', 'unknown')}", *([f"- lineage: {lineage}"] if lineage else []), "",
             "## Intended use", use, ""]
    out = Path(path) / "MODEL_CARD.md"
    out.write_text("\n".join(lines))
    return out


# ---- the registry ---------------------------------------------------------------------------------------
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
    import tempfile

    import mlflow

    import hashlib

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
        from data_service.remote import redact  # the cache never stores a URL's password

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
    after one that failed: offline_tracking.finish, `popscale register`), a version of `name` that
    this run registered since then is taken as this one (the server may have made it before the
    connection broke; five minutes' slack for its clock), and only its tags, description and alias
    are set."""
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
    from its files only (see `pull`)."""
    import mlflow

    model, tok, _ = load(uri, tracking_uri or mlflow.get_tracking_uri(), cache)
    return model, tok

"""Exported models and the MLflow model registry.

An exported model is a directory of plain files, nothing pickled:
    model.safetensors   the weights (fp32)
    config.json         model config, tokenizer config (geometry, readouts, target scales, loss
                        weights), provenance (corpus fingerprint, run, step)
    vocab.json          unit and session ids, in the order of the embedding rows
It is registered as an MLflow pyfunc model *from code* (pretrain/mlflow_pyfunc.py is copied in,
not pickled) with those files as artifacts, and an alias points at the version.

    model, tokenizer = load_model("models:/popscale-poyo@pretrained")
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import POYO
from .tokenizer import Geometry, Readout, Tokenizer, TokenizerConfig

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
    return export_model(model, plan.tokenizer, out, {**provenance, "step": state["step"]})


def load_exported(path: str | Path, device: str = "cpu") -> tuple[POYO, Tokenizer]:
    path = Path(path)
    mcfg, tcfg = _configs(json.loads((path / "config.json").read_text()))
    vocab = json.loads((path / "vocab.json").read_text())
    model = POYO(mcfg, vocab["units"], vocab["sessions"], device=device)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors"), device=device), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"exported model at {path} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.eval()
    return model, Tokenizer(tcfg, model.unit_emb.frozen(), model.session_emb.frozen())


def register(tracking_uri: str, run_id: str, export_dir: str | Path, name: str, alias: str) -> tuple[str, str]:
    """Log the exported model to the run and register it; returns (version, models:/ uri)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC), artifacts={"model": str(export_dir)},
                                       registered_model_name=name, pip_requirements=["popscale"])
    version = str(info.registered_model_version)
    mlflow.MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)
    return version, f"models:/{name}@{alias}"


def load_model(uri: str, tracking_uri: str | None = None) -> tuple[POYO, Tokenizer]:
    """The model and tokenizer of a registered version (models:/name@alias or models:/name/version)."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(uri)
    impl = pyfunc.unwrap_python_model()
    return impl.model, impl.tokenizer

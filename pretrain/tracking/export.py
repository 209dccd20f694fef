"""The exported-model directory: plain files, nothing pickled, so loading a model runs no code
stored with it.
    model.safetensors   the weights (fp32)
    config.json         model config, tokenizer config (geometry, readouts, target scales, loss
                        weights), provenance (corpus fingerprint, run, step)
    vocab.json          unit and session ids, in the order of the embedding rows
    plan.json           the run plan it was trained with (when it came from a run)
    MODEL_CARD.md       data, metrics, lineage, intended use

    model, tokenizer = load_exported(path)
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, fields
from importlib import metadata
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..model.config import ModelConfig
from ..model.poyo import POYO
from ..tokens.config import Geometry, Readout, TokenizerConfig
from ..tokens.tokenizer import Tokenizer

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
    repo = Path(__file__).resolve().parents[2]
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

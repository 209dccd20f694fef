"""A training checkpoint (checkpoint.py) as an exported model (pretrain/tracking/export.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.poyo import POYO
from ..tracking.export import export_model
from .checkpoint import read_state
from .plan import RunPlan


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, provenance: dict) -> Path:
    """Consolidate a training checkpoint (checkpoint.py) into fp32 weights and export them, with
    the model, vocabularies and tokenizer of the plan it carries."""
    state, plan = read_state(checkpoint_dir), RunPlan.load(checkpoint_dir)
    model = POYO(plan.model, plan.unit_vocab, plan.session_vocab)
    weights = _fp32_weights(Path(checkpoint_dir), state["tag"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = export_model(model, plan.tokenizer, out, {**provenance, "step": state["step"]})
    plan.save(out)
    return out


def _fp32_weights(checkpoint_dir: Path, tag: str) -> dict:
    """The model's fp32 weights: gathered from ZeRO's partitions, or, from a run without ZeRO
    (train.zero_stage 0, fp32: an elastic run's), the whole module DeepSpeed saved."""
    if any((checkpoint_dir / tag).glob("*optim_states.pt")):
        # deferred: importing deepspeed only when used keeps start-up light
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items() if torch.is_tensor(v)}

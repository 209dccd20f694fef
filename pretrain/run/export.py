"""A training checkpoint (checkpoint.py) as an exported model (pretrain/tracking/export.py)."""

from __future__ import annotations

from pathlib import Path

from ..model.poyo import POYO
from ..tracking.export import export_model
from .checkpoint import read_state
from .plan import RunPlan


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, provenance: dict) -> Path:
    """Consolidate a training checkpoint (checkpoint.py) into fp32 weights and export them, with
    the model, vocabularies and tokenizer of the plan it carries."""
    # deferred: importing deepspeed only when used keeps start-up light
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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

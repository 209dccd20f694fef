"""The model a run plan trains: built from the plan's config and vocabularies with its warm
start, or, for an adaptation, the source model with the plan's sessions added and, under
unit identification, everything but their rows frozen. Workers call it; the plan stays data.
(It lives here, not in pretrain/finetune/, because the training workers build every model and
pretrain.run may not import the finetune layer above it.)"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..model.poyo import POYO
from ..tracking.export import load_exported
from .plan import PlanMismatch, RunPlan
from .warm_start import apply_warm_start


def build_model(plan: RunPlan, device="cpu") -> POYO:
    """The model `plan` trains, warm start applied (seed torch first: rows start random)."""
    if plan.adapt is None:
        model = POYO(plan.model, plan.unit_vocab, plan.session_vocab, device=device)
    else:
        model = adapted_model(plan, device)
    if plan.warm_start is not None:
        apply_warm_start(model, plan.warm_start)
    return model


def adapted_model(plan: RunPlan, device="cpu") -> POYO:
    """The source model with the plan's sessions added (new rows ~ N(0, init scale), old rows
    untouched); with `trainable=new`, everything else frozen and only those rows take gradients."""
    a = plan.adapt
    model, _ = load_exported(a.source, device=device)
    model.cfg = replace(model.cfg, causal=plan.model.causal)  # finetune --causal-mask: the same weights, masked by time
    model.train()
    if a.reinit:
        with torch.no_grad():
            for emb, ids in ((model.unit_emb, a.units), (model.session_emb, plan.sessions)):
                known = [i for i in ids if i in emb.index]
                rows = torch.as_tensor(emb.lookup(known), device=emb.weight.device)
                emb.weight[rows] = torch.randn(len(known), emb.dim, device=emb.weight.device) * emb.init_scale
    for name in a.new_readouts:
        if name not in model.readouts:
            model.add_readout(name, plan.model.readouts[name])
    if model.readout_names != list(plan.model.readouts):
        raise PlanMismatch(f"the model at {a.source} has readouts {model.readout_names}, the plan "
                           f"{list(plan.model.readouts)}")
    model.unit_emb.extend(plan.unit_vocab)
    model.session_emb.extend(plan.session_vocab)
    if model.unit_emb.ids != plan.unit_vocab or model.session_emb.ids != plan.session_vocab:
        raise PlanMismatch(f"the model at {a.source} does not have the plan's vocabularies in the plan's order")
    if a.trainable == "new":
        for p in model.parameters():
            p.requires_grad_(False)
        for emb, ids in ((model.unit_emb, a.units), (model.session_emb, plan.sessions)):
            mask = torch.zeros(len(emb), 1, device=emb.weight.device)
            mask[torch.as_tensor(emb.lookup(ids), device=mask.device)] = 1.0
            emb.weight.requires_grad_(True)
            emb.weight.register_hook(lambda g, m=mask: g * m)  # other rows: exactly zero gradient
        for name in a.new_readouts:
            model.readouts[name].requires_grad_(True)
        if a.new_readouts:
            emb = model.readout_emb
            mask = torch.zeros(emb.weight.shape[0], 1, device=emb.weight.device)
            mask[[model.readout_names.index(n) for n in a.new_readouts]] = 1.0
            emb.weight.requires_grad_(True)
            emb.weight.register_hook(lambda g, m=mask: g * m)
    return model

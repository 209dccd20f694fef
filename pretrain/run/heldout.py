"""The training loss on held-out time of a run's own sessions: the figure a scaling law is fitted to.

The training loss itself is a poor one (it is measured on the batches being learned, with unit
dropout); validation R2 saturates and is bounded. This is the loss of the loop (loss.py: weighted
MSE on per-session normalised targets, cross-entropy for classes) over the windows of the
sessions' `valid` split, in a fixed window order (the index's own, seeded), no augmentation,
no dropout (a causal run's queries kept to the window's end, as it learns them): two points that trained on the same sessions are scored on the same windows.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from data_service.augment import AugmentConfig
from data_service.service import build_batch, window_index

from ..model.loss import weighted_mse
from .plan import RunPlan


@torch.no_grad()
def heldout_loss(model, plan: RunPlan, split: str = "valid", max_windows: int = 512, batch: int = 32,
                 device: str = "cpu") -> tuple[float, int]:
    """(loss-weighted mean loss, windows scored) over at most `max_windows` windows of `split`."""
    index = replace(plan.index, split=split, intervals=None, session_weights={},
                    sessions=list(plan.valid_sessions if split == "valid" else plan.sessions), seed=0)
    if not index.sessions:
        return float("nan"), 0
    spec = replace(plan.service_spec(), index=index, global_batch=batch, seed=0, index_fingerprint=None,
                   augment=AugmentConfig(unit_dropout=False, query_tail_s=plan.run.data.augment.query_tail_s))
    n = min(max_windows, window_index(spec).epoch_size(0))
    kinds = [r.kind for r in plan.tokenizer.readouts]
    was = model.training
    model.eval()
    total = weight = 0.0
    batches = (n + batch - 1) // batch
    try:
        for b in range(batches):
            data = build_batch(spec, b, 0, 1).data.to(device)
            loss, _ = weighted_mse(model(data), data, model.readout_names, kinds)
            w = float(data.weight.sum())
            total, weight = total + float(loss) * w, weight + w
    finally:
        model.train(was)
    return (total / weight if weight > 0 else float("nan")), batches * batch

"""Weighted MSE over every output query, as in the reference: per query the squared error is
averaged over the readout's dims and multiplied by the query's weight; the sum is divided by the
sum of weights. Categorical readouts use cross-entropy per query, weighted the same way."""

from __future__ import annotations

import torch

from .batch import PackedBatch


def weighted_mse(preds: dict[str, torch.Tensor], b: PackedBatch, readout_names: list[str],
                 kinds: list[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss over all readouts, loss per readout for logging). A categorical readout (`kinds`)
    contributes its cross-entropy instead (the class id is the target's first column)."""
    # 0 x every prediction: a batch without labels (a window of sleep) still gives a loss in the graph
    total = sum((p.sum() * 0.0 for p in preds.values()), b.weight.new_zeros(()))
    weight_sum = b.weight.sum().clamp_min(1e-12)
    per = {}
    for i, name in enumerate(readout_names):
        pred = preds[name]
        if pred.shape[0] == 0:
            continue
        sel = slice(None) if len(readout_names) == 1 else (b.output_readout == i)
        y = b.target[sel][:, : pred.shape[1]]
        w = b.weight[sel]
        if kinds is not None and kinds[i] == "categorical":
            err = torch.nn.functional.cross_entropy(pred, y[:, 0].long().clamp_min(0), reduction="none") * w
        else:
            err = (pred - y).pow(2).mean(dim=-1) * w
        total = total + err.sum()
        per[name] = float(err.sum().detach() / w.sum().clamp_min(1e-12))
    return total / weight_sum, per
